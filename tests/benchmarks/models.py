"""BenchTask: emits a given number of events at a given rate, once told to go."""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from django.db import models

from streaming.models import StreamTask

GO_POLL = 0.005
GO_TIMEOUT = 300.0


@dataclass
class Timing:
    """What one run of a BenchTask measured, kept in the process that ran it."""

    first_call: float = 0.0
    calls: list[float] = field(default_factory=list)
    returns: list[float] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)


#: Timings of the tasks this process ran, by primary key (in-process scenarios read them).
TIMINGS: dict[int, Timing] = {}


async def wait_for_file(path: str, timeout: float = GO_TIMEOUT) -> None:
    """Until ``path`` exists: the harness creates it once every client is connected."""
    deadline = time.monotonic() + timeout
    while path and not exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no go signal ({path}) within {timeout}s")
        await asyncio.sleep(GO_POLL)


class BenchTask(StreamTask):
    """``events`` ``tick`` events ``{"i": n}``, ``rate`` per second (0: as fast as it can).

    Waits for ``go_file`` first; writes the wall-clock times at which each ``send_event`` was
    called and returned to ``times_file`` (JSON ``{"calls": [...], "returns": [...]}``).
    """

    # django-stubs adds ``objects`` only to the models of installed apps, and its settings
    # (tests.settings) do not install tests.benchmarks: declared here for mypy only.
    objects: ClassVar[models.Manager[BenchTask]]

    # This field shadows the StreamTask.events() method, which nothing calls on a BenchTask.
    events = models.PositiveIntegerField(default=100)  # type: ignore[assignment]
    rate = models.FloatField(default=0.0)
    payload_size = models.PositiveIntegerField(default=0)
    go_file = models.CharField(max_length=500, blank=True, default="")
    times_file = models.CharField(max_length=500, blank=True, default="")

    allow_http_create = True

    async def process(self) -> Any:
        timing = TIMINGS[self.pk] = Timing()
        await wait_for_file(self.go_file)
        pad = "x" * self.payload_size
        loop = asyncio.get_running_loop()
        start = loop.time()
        timing.first_call = time.time()
        for i in range(1, self.events + 1):
            if self.rate:
                delay = start + (i - 1) / self.rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            timing.calls.append(time.time())
            await self.send_event("tick", {"i": i, "pad": pad} if pad else {"i": i})
            timing.returns.append(time.time())
        if self.times_file:
            _write_json(self.times_file, {"calls": timing.calls, "returns": timing.returns})
        timing.done.set()
        return {"events": self.events}


def exists(path: str) -> bool:
    """A stat of a local file: microseconds, fine to call on the event loop."""
    return os.path.exists(path)


def _write_json(path: str, value: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as out:
        json.dump(value, out)
    os.replace(tmp, path)
