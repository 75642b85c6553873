"""Django app configuration for streaming."""

from __future__ import annotations

from django.apps import AppConfig


class StreamingConfig(AppConfig):
    name = "streaming"
    verbose_name = "Streaming tasks"
    default_auto_field = "django.db.models.BigAutoField"
