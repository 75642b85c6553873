"""The example app's tasks (as in the seed) and a scriptable task the tests drive."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

from streaming.models import StreamTask


class ExampleTask(StreamTask):
    """Three progress steps between a start and a complete event."""

    # Bounded, as every model that accepts HTTP creation should be: one request, bounded work.
    message = models.CharField(max_length=255, default="Hello from ExampleTask")
    total_steps = models.PositiveIntegerField(default=3, validators=[MaxValueValidator(1000)])
    step_delay = models.FloatField(
        default=0.01, validators=[MinValueValidator(0.0), MaxValueValidator(10.0)]
    )

    allow_http_create = True

    async def process(self) -> Any:
        await self.send_event("start", {"message": self.message, "total_steps": self.total_steps})
        for i in range(1, self.total_steps + 1):
            await asyncio.sleep(self.step_delay)
            await self.send_event(
                "progress",
                {
                    "step": i,
                    "total_steps": self.total_steps,
                    "message": f"Step {i} of {self.total_steps}",
                },
            )
        await self.send_event("complete", {"message": "Task completed successfully"})
        return {"message": self.message, "steps": self.total_steps}


class ShoutingTask(ExampleTask):
    """A proxy of ExampleTask with a process() of its own: its tasks run as themselves."""

    class Meta:
        proxy = True

    async def process(self) -> Any:
        await self.send_event("shout", {"message": self.message.upper()})
        return {"message": self.message.upper()}


class ContinueTask(StreamTask):
    """Keeps going whether or not anybody listens: the seed's disconnect scenario."""

    message = models.CharField(max_length=255, default="continuing")
    steps = models.PositiveIntegerField(default=5)
    step_delay = models.FloatField(default=0.05)

    async def process(self) -> Any:
        await self.send_event("start", {"message": self.message, "steps": self.steps})
        for i in range(1, self.steps + 1):
            await asyncio.sleep(self.step_delay)
            await self.send_event("progress", {"step": i, "total": self.steps})
        await self.send_event("complete", {"message": "Task continued to the end"})
        return self.steps


class AsyncGeneratorTask(StreamTask):
    count = models.PositiveIntegerField(default=5)
    delay = models.FloatField(default=0.01)

    async def process(self) -> Any:
        async def progress() -> Any:
            for i in range(self.count):
                await asyncio.sleep(self.delay)
                yield {"step": i + 1, "total": self.count, "percentage": (i + 1) / self.count * 100}

        await self.send_event("start", {"total_steps": self.count})
        final = await self.process_generator(progress())
        await self.send_event("complete", {"message": "Done"})
        return final


class SyncGeneratorTask(StreamTask):
    items = models.JSONField(default=list)
    delay = models.FloatField(default=0.0)

    async def process(self) -> Any:
        def processor() -> Any:
            for idx, item in enumerate(self.items):
                time.sleep(self.delay)  # blocking work: runs in a thread, not on the loop
                yield {"index": idx, "item": item, "processed": f"Processed: {item}"}

        await self.send_event("start", {"total_items": len(self.items)})
        final = await self.process_sync_generator(processor())
        await self.send_event("complete", {})
        return final


class HttpxFetchTask(StreamTask):
    url = models.URLField()

    async def process(self) -> Any:
        await self.send_event("start", {"url": self.url})
        async with httpx.AsyncClient(timeout=30.0) as client:
            await self.send_event(
                "progress", {"status": "fetching", "message": f"Fetching from {self.url}"}
            )
            response = await client.get(self.url)
            response.raise_for_status()
            data = response.json()
            await self.send_event(
                "progress", {"status": "fetched", "status_code": response.status_code}
            )
        await self.send_event("complete", {"message": "Data fetched successfully"})
        return data


class ScriptedTask(StreamTask):
    """A task shaped by its fields, for tests: how many events, how fast, how big, failing."""

    # Bounded for HTTP creation: at most 10,000 events of 64 KiB, 10 s apart.
    ticks = models.PositiveIntegerField(default=5, validators=[MaxValueValidator(10_000)])
    delay = models.FloatField(
        default=0.0, validators=[MinValueValidator(0.0), MaxValueValidator(10.0)]
    )
    payload_size = models.PositiveIntegerField(default=0, validators=[MaxValueValidator(65_536)])
    fail_at = models.IntegerField(null=True, blank=True)
    result = models.JSONField(null=True, blank=True)

    allow_http_create = True

    async def process(self) -> Any:
        pad = "x" * self.payload_size
        for i in range(1, self.ticks + 1):
            if self.fail_at == i:
                raise RuntimeError(f"failed at step {i}")
            if self.delay:
                await asyncio.sleep(self.delay)
            await self.send_event("tick", {"i": i, "pad": pad} if pad else {"i": i})
        return self.result


class TimeoutTask(StreamTask):
    """Sleeps longer than its class timeout allows."""

    sleep_for = models.FloatField(default=5.0)

    timeout = 0.3

    async def process(self) -> Any:
        await self.send_event("start", {})
        await asyncio.sleep(self.sleep_for)
        return "unreachable"
