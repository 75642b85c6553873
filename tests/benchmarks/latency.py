"""Scenario 3: send_event return to SSE receipt, one client, 200 events/s; vs the seed."""

from __future__ import annotations

import asyncio

from tests.benchmarks.context import Context
from tests.benchmarks.followers import follow_ours, follow_seed
from tests.benchmarks.harness import Result, median

RATE = 200.0


async def run(ctx: Context) -> list[Result]:
    events = int(RATE * ctx.size(2, 10))
    ctx.stack.reset()
    server = await asyncio.to_thread(ctx.stack.start_server)
    p50: dict[str, list[float]] = {"ours": [], "baseline": []}
    p99: dict[str, list[float]] = {"ours": [], "baseline": []}
    try:
        for _ in range(ctx.repeat):
            ours = await follow_ours(ctx, server, 1, events, RATE)
            seed = await follow_seed(ctx, 1, events, RATE)
            for run, side in ((ours, "ours"), (seed, "baseline")):
                if run.stats.complete != 1:
                    raise RuntimeError(f"{side}: the client missed events: {run.stats}")
                p50[side].append(run.stats.latency(0.5))
                p99[side].append(run.stats.latency(0.99))
    finally:
        await asyncio.to_thread(ctx.stack.stop, server)
    note = f"{events} events at {RATE:.0f}/s, 1 client"
    return [
        Result(
            "3 latency",
            "p50",
            "ms",
            median(p50["ours"]),
            median(p50["baseline"]),
            "ratio <= 3",
            "seed 0.2.1",
            note,
            p50,
        ),
        Result(
            "3 latency",
            "p99",
            "ms",
            median(p99["ours"]),
            median(p99["baseline"]),
            "ratio <= 3",
            "seed 0.2.1",
            note,
            p99,
        ),
    ]
