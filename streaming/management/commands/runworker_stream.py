"""manage.py runworker_stream: run queued tasks, serve no HTTP (hosts that only compute).

It logs when it is ready and each task it claims and finishes, on stderr when the project
configured no logging for the package (``streaming.logs``).
"""

from __future__ import annotations

import argparse
from typing import Any

from django.core.management.base import BaseCommand

from streaming import conf, logs
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
        logs.configure(options["verbosity"])
        settings = conf.get()
        grace = settings.SHUTDOWN_GRACE if options["grace"] is None else options["grace"]
        run(ServeOptions(http=False, worker=True, grace=grace))
