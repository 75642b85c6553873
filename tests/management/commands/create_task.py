"""manage.py create_task: create an example task and queue it for the server's worker."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from django.core.management.base import BaseCommand

from streaming import runtime
from streaming.coordinator import coordinator
from tests.models import ContinueTask, ExampleTask


class Command(BaseCommand):
    help = "Create an ExampleTask (or ContinueTask) and queue it for any worker."

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--type", choices=["example", "continue"], default="example")
        parser.add_argument("--message", default="Hello from create_task")
        parser.add_argument("--steps", type=int, default=None, help="number of progress steps")
        parser.add_argument("--delay", type=float, default=None, help="seconds between steps")
        parser.add_argument("--no-start", action="store_true", help="create it, do not queue it")

    def handle(self, *args: Any, **options: Any) -> None:
        task = asyncio.run(self._create(options))
        self.stdout.write(f"Created {type(task)._meta.object_name} {task.pk}")
        self.stdout.write(f"Stream: {task.stream_url()}")

    @staticmethod
    async def _create(options: dict[str, Any]) -> ExampleTask | ContinueTask:
        fields: dict[str, Any] = {"message": options["message"]}
        if options["type"] == "example":
            if options["steps"] is not None:
                fields["total_steps"] = options["steps"]
            if options["delay"] is not None:
                fields["step_delay"] = options["delay"]
            task: ExampleTask | ContinueTask = await ExampleTask.objects.acreate(**fields)
        else:
            if options["steps"] is not None:
                fields["steps"] = options["steps"]
            if options["delay"] is not None:
                fields["step_delay"] = options["delay"]
            task = await ContinueTask.objects.acreate(**fields)
        if not options["no_start"]:
            try:
                await coordinator.enqueue(task)
            finally:
                await runtime.shutdown()
        return task
