"""What every scenario gets: the stack, the run's size, the seed project, small helpers."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.benchmarks import seed
from tests.benchmarks.stack import Stack


@dataclass
class Context:
    stack: Stack
    quick: bool
    repeat: int
    _seed: seed.SeedProject | None = field(default=None, repr=False)

    def size(self, quick: Any, full: Any) -> Any:
        return quick if self.quick else full

    async def seed(self) -> seed.SeedProject:
        """The seed's project (virtualenv installed and tables created on first use)."""
        if self._seed is None:
            root = self.stack.workdir / "seed-project"
            self._seed = await asyncio.to_thread(seed.make_project, root)
        return self._seed


async def wait_timing(pk: int, timeout: float = 600.0) -> Any:
    """The Timing of a BenchTask run in this process, once it has finished."""
    from tests.benchmarks.models import TIMINGS

    deadline = time.monotonic() + timeout
    while pk not in TIMINGS:
        if time.monotonic() > deadline:
            raise TimeoutError(f"BenchTask {pk} never started")
        await asyncio.sleep(0.005)
    await asyncio.wait_for(TIMINGS[pk].done.wait(), timeout)
    return TIMINGS[pk]


async def wait_started(pks: list[int], timeout: float = 60.0) -> None:
    """Until every one of these BenchTasks runs in this process (waiting for its go file)."""
    from tests.benchmarks.models import TIMINGS

    deadline = time.monotonic() + timeout
    while not all(pk in TIMINGS for pk in pks):
        if time.monotonic() > deadline:
            raise TimeoutError("tasks did not start")
        await asyncio.sleep(0.005)


def go(path: str) -> None:
    Path(path).touch()
