"""manage.py cleanup_old_tasks: delete finished tasks older than N hours, with their logs."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from django.core.management.base import BaseCommand

from streaming import runtime


def positive_hours(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("--hours must be positive")
    return value


class Command(BaseCommand):
    help = "Delete tasks that finished more than --hours ago, with their runs and events."

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--hours", type=positive_hours, default=24.0)
        parser.add_argument("--dry-run", action="store_true", help="only count what would go")

    def handle(self, *args: Any, **options: Any) -> None:
        count = asyncio.run(self._run(options["hours"], options["dry_run"]))
        verb = "Would delete" if options["dry_run"] else "Deleted"
        self.stdout.write(f"{verb} {count} finished task(s) older than {options['hours']} h")

    @staticmethod
    async def _run(hours: float, dry_run: bool) -> int:
        try:
            rt = await runtime.current()
            expired = await rt.store.expired(hours)
            if not dry_run:
                for run in expired:
                    await rt.store.delete(run)
            return len(expired)
        finally:
            await runtime.shutdown()
