"""manage.py runworker_stream: run queued tasks, serve no HTTP (hosts that only compute)."""

from __future__ import annotations

import argparse
from typing import Any

from django.core.management.base import BaseCommand

from streaming import conf
from streaming.serve import ServeOptions, run


class Command(BaseCommand):
    help = "Claim and run queued streaming tasks until stopped (SIGTERM/SIGINT)."

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--grace",
            type=float,
            default=None,
            help="seconds running tasks get to finish on shutdown",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        settings = conf.get()
        grace = settings.SHUTDOWN_GRACE if options["grace"] is None else options["grace"]
        run(ServeOptions(http=False, worker=True, grace=grace))
