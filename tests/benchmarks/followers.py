"""One run of N SSE clients following one emitting task, on our server or on the seed's."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass

from tests import support
from tests.benchmarks import stack
from tests.benchmarks.clients import ClientGroup, Stats
from tests.benchmarks.context import Context, go
from tests.benchmarks.seed import SEED_STOP


@dataclass
class FollowRun:
    """What one run measured: the clients' stats, and the server's counters around it."""

    stats: Stats
    events: int
    first_send: float
    seconds: float
    queries: float = 0.0
    fetches: float = 0.0
    db_connections: int = 0
    pool_size: int = 0

    @property
    def delivered_per_s(self) -> float:
        """Deliveries per second, from the first send_event call to the last receipt."""
        return self.stats.received / self.seconds if self.seconds > 0 else 0.0


def _client_cfg(
    port: int, path: str, end: str, expect: int, times_file: str, wait_headers: bool, timeout: float
) -> dict[str, object]:
    return {
        "host": "127.0.0.1",
        "port": port,
        "path": path,
        "end": end,
        "expect": expect,
        "times_file": times_file,
        "wait_headers": wait_headers,
        "timeout": timeout,
    }


async def follow_ours(
    ctx: Context,
    server: support.ManagedProcess,
    clients: int,
    events: int,
    rate: float,
    per_process: int = 500,
    queue: bool = False,
) -> FollowRun:
    """``clients`` SSE clients of one BenchTask run by a worker (``server``'s by default).

    The first client's GET starts the task (as on the seed), unless ``queue``: then this
    process queues it first, as an application would, for any worker to claim.
    """
    from streaming.coordinator import coordinator
    from tests.benchmarks.models import BenchTask

    go_file, times_file = ctx.stack.path("go"), ctx.stack.path("times")
    task = await BenchTask.objects.acreate(
        events=events, rate=rate, go_file=go_file, times_file=times_file
    )
    if queue:
        await coordinator.enqueue(task)
    cfg = _client_cfg(
        server.port or 0,
        f"/stream/benchmarks/BenchTask/{task.pk}",
        "end",
        events,
        times_file,
        True,
        _timeout(events, rate, clients),
    )
    group = await ClientGroup.start(cfg, clients, per_process)
    before = await asyncio.to_thread(stack.metrics, server)
    go(go_file)
    stats = await group.results(timeout=float(cfg["timeout"]) + 60)  # type: ignore[arg-type]
    after = await asyncio.to_thread(stack.metrics, server)
    first = _sends(times_file)["calls"][0]
    run = FollowRun(stats, events, first, stats.last_receipt - first)
    run.queries = after["streaming_db_queries_total"] - before["streaming_db_queries_total"]
    run.fetches = after["streaming_hub_fetches_total"] - before["streaming_hub_fetches_total"]
    return run


async def follow_seed(
    ctx: Context, clients: int, events: int, rate: float, per_process: int = 500
) -> FollowRun:
    """The same on the seed: its task starts emitting once every client is attached."""
    project = await ctx.seed()
    server = await asyncio.to_thread(project.start_server, ctx.stack.workdir)
    try:
        times_file = ctx.stack.path("seed-times")
        pk = project.create_task(
            events=events, rate=rate, wait_clients=clients, times_file=times_file
        )
        cfg = _client_cfg(
            server.port or 0,
            f"/stream/benchapp/BenchTask/{pk}",
            "complete",
            events,
            times_file,
            False,
            _timeout(events, rate, clients),
        )
        group = await ClientGroup.start(cfg, clients, per_process)
        stats = await group.results(timeout=float(cfg["timeout"]) + 60)  # type: ignore[arg-type]
        first = _sends(times_file)["calls"][0]
        return FollowRun(stats, events, first, stats.last_receipt - first)
    finally:
        await asyncio.to_thread(server.stop, SEED_STOP)


def _timeout(events: int, rate: float, clients: int) -> float:
    """How long clients may wait for the end: a saturated server runs several times late."""
    nominal = events / rate if rate else events * clients / 10_000
    return 300 + 5 * nominal


def _sends(path: str) -> dict[str, list[float]]:
    import json

    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.05)
    with open(path) as f:
        return dict(json.load(f))
