"""Scenario 6: server RSS per idle SSE client (connected to a running, silent task)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from tests import support
from tests.benchmarks import stack
from tests.benchmarks.clients import ClientGroup
from tests.benchmarks.context import Context
from tests.benchmarks.harness import Result, median
from tests.benchmarks.seed import SEED_STOP

SETTLE = 2.0


async def run(ctx: Context) -> list[Result]:
    clients = ctx.size(500, 2000)
    ours: list[float] = []
    seed: list[float] = []
    for _ in range(ctx.repeat):
        ours.append(await _ours(ctx, clients))
        seed.append(await _seed(ctx, clients))
    note = f"{clients} idle clients; (RSS after - RSS with one client) / clients"
    return [
        Result(
            "6 memory",
            "RSS per idle client",
            "KB",
            median(ours),
            median(seed),
            "ours <= 30",
            "seed 0.2.1",
            note,
            {"ours": ours, "baseline": seed},
        )
    ]


async def _ours(ctx: Context, clients: int) -> float:
    from tests.benchmarks.models import BenchTask

    ctx.stack.reset()
    server = await asyncio.to_thread(ctx.stack.start_server)
    try:
        task = await BenchTask.objects.acreate(events=1, go_file=ctx.stack.path("never"))
        cfg: dict[str, object] = {
            "host": "127.0.0.1",
            "port": server.port,
            "end": "end",
            "expect": 1,
            "path": f"/stream/benchmarks/BenchTask/{task.pk}",
            "hold": True,
        }
        return await _per_client(server, cfg, clients, wait_headers=True)
    finally:
        await asyncio.to_thread(ctx.stack.stop, server)


async def _seed(ctx: Context, clients: int) -> float:
    project = await ctx.seed()
    server = await asyncio.to_thread(project.start_server, ctx.stack.workdir)
    try:
        pk = project.create_task(events=1, go_file=ctx.stack.path("never"))
        cfg: dict[str, object] = {
            "host": "127.0.0.1",
            "port": server.port,
            "end": "complete",
            "expect": 1,
            "path": f"/stream/benchapp/BenchTask/{pk}",
            "hold": True,
        }
        # The seed sends its headers with the first event: count the clients it attached.
        return await _per_client(
            server, cfg, clients, wait_headers=False, settle=lambda: asyncio.sleep(SETTLE * 2)
        )
    finally:
        await asyncio.to_thread(server.stop, SEED_STOP)


async def _per_client(
    server: support.ManagedProcess,
    cfg: dict[str, object],
    clients: int,
    wait_headers: bool,
    settle: Callable[[], Awaitable[None]] | None = None,
) -> float:
    """KB of server RSS per client: one client first (warm), then ``clients`` more."""
    cfg = {**cfg, "wait_headers": wait_headers}
    first = await ClientGroup.start(cfg, 1)
    await asyncio.sleep(SETTLE)
    before = stack.rss_bytes(server.proc.pid)
    group = await ClientGroup.start(cfg, clients)
    await (settle() if settle else asyncio.sleep(SETTLE))
    after = stack.rss_bytes(server.proc.pid)
    await group.close()
    await first.close()
    return (after - before) / clients / 1024
