"""The benchmark's Django app: the task model the scenarios run."""

from __future__ import annotations

from django.apps import AppConfig


class BenchmarksConfig(AppConfig):
    name = "tests.benchmarks"
    label = "benchmarks"
    default_auto_field = "django.db.models.BigAutoField"
