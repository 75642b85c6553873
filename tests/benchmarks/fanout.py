"""Scenario 4: many SSE clients of one server process following one task; vs the seed.

Besides delivery, throughput and latency, it checks that the cost on the database does not
grow with the number of clients: DB queries and hub fetches per event, with few clients and
with many, and the connections the server holds to Postgres (pool + the LISTEN connection).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from streaming import conf
from tests.benchmarks import stack
from tests.benchmarks.context import Context
from tests.benchmarks.followers import FollowRun, follow_ours, follow_seed
from tests.benchmarks.harness import Result, fmt, median

RATE = 100.0
FEW = 10


async def run(ctx: Context) -> list[Result]:
    clients = ctx.size(200, 1000)
    events = int(RATE * ctx.size(5, 30))
    burst = ctx.size(300, 500)
    per_process = ctx.size(100, 250)
    ctx.stack.reset()
    runs: dict[str, list[FollowRun]] = {k: [] for k in ("ours", "seed", "few", "max", "seed_max")}
    held: list[int] = []
    # As the seed does: the task runs in the process that serves its clients.
    server = await asyncio.to_thread(ctx.stack.start_server)
    try:
        for _ in range(ctx.repeat):
            runs["few"].append(await follow_ours(ctx, server, FEW, events // 2, RATE, per_process))
            runs["ours"].append(await follow_ours(ctx, server, clients, events, RATE, per_process))
            held.append(stack.db_connections(server.proc.pid, _pg_port(ctx)))
            runs["seed"].append(await follow_seed(ctx, clients, events, RATE, per_process))
            runs["max"].append(await follow_ours(ctx, server, clients, burst, 0, per_process))
            runs["seed_max"].append(await follow_seed(ctx, clients, burst, 0, per_process))
    finally:
        await asyncio.to_thread(ctx.stack.stop, server)
    rows = _rows(runs, held, clients, events, burst)
    rows += await _remote(ctx, clients, events, per_process)
    return rows


async def _remote(ctx: Context, clients: int, events: int, per_process: int) -> list[Result]:
    """The task in a worker process: the server learns of events by NOTIFY and reads them."""
    server = await asyncio.to_thread(ctx.stack.start_server, "--no-worker")
    worker = await asyncio.to_thread(ctx.stack.start_worker)
    try:
        # Tasks queued by the application before anyone watches them (no ORM lookup then).
        few = await follow_ours(ctx, server, FEW, events // 2, RATE, per_process, queue=True)
        run = await follow_ours(ctx, server, clients, events, RATE, per_process, queue=True)
        held = stack.db_connections(server.proc.pid, _pg_port(ctx))
    finally:
        await asyncio.to_thread(ctx.stack.stop, worker)
        await asyncio.to_thread(ctx.stack.stop, server)
    name = "4b fan-out, task in a worker"
    note = f"{clients} clients, {events} events at {RATE:.0f}/s; once"
    return [
        Result(
            name,
            "delivered exactly once",
            "%",
            100 * run.stats.delivery(run.events),
            None,
            "ours >= 100",
            "",
            note,
        ),
        Result(
            name, "p99 latency from call", "ms", run.stats.latency(0.99, "call"), None, "", "", note
        ),
        Result(
            name,
            "DB queries per event",
            "q/ev",
            run.queries / run.events,
            few.queries / few.events,
            "ratio <= 1.2",
            f"ours, {FEW} clients",
            "hub reads, one per wake-up whatever the number of clients",
        ),
        Result(
            name,
            "DB connections held",
            "conns",
            float(held),
            float(conf.get().POOL_MAX_SIZE + 1),
            "ratio <= 1",
            "pool size + 1",
            f"SSE-only server (--no-worker), {clients} clients",
        ),
    ]


def _rows(
    runs: dict[str, list[FollowRun]], held: list[int], clients: int, events: int, burst: int
) -> list[Result]:
    name = "4 fan-out"
    note = f"{clients} clients, {events} events at {RATE:.0f}/s"

    def pair(
        key: str, f: Callable[[FollowRun], float], base: str = "seed"
    ) -> dict[str, list[float]]:
        return {"ours": [f(r) for r in runs[key]], "baseline": [f(r) for r in runs[base]]}

    def row(
        metric: str,
        unit: str,
        samples: dict[str, list[float]],
        target: str,
        baseline_name: str,
        text: str,
        pick: Callable[[list[float]], float] = median,
    ) -> Result:
        return Result(
            name,
            metric,
            unit,
            pick(samples["ours"]),
            pick(samples["baseline"]),
            target,
            baseline_name,
            text,
            samples,
        )

    settings = conf.get()
    conns = [float(h) for h in held]
    return [
        row(
            "delivered exactly once",
            "%",
            pair("ours", lambda r: 100 * r.stats.delivery(r.events)),
            "ours >= 100",
            "seed 0.2.1",
            note,
            min,
        ),
        row(
            "deliveries/s at 100 ev/s",
            "ev/s",
            pair("ours", lambda r: r.delivered_per_s),
            "ratio >= 1",
            "seed 0.2.1",
            note + "; first call to last receipt: the offered load if the server keeps up",
        ),
        row(
            "max deliveries/s",
            "ev/s",
            pair("max", lambda r: r.delivered_per_s, "seed_max"),
            "ratio >= 1",
            "seed 0.2.1",
            f"{clients} clients, {burst} events sent as fast as send_event returns",
        ),
        row(
            "delivered exactly once, max",
            "%",
            pair("max", lambda r: 100 * r.stats.delivery(r.events), "seed_max"),
            "ours >= 100",
            "seed 0.2.1",
            f"{burst} events unthrottled",
            min,
        ),
        row(
            "p99 latency from call",
            "ms",
            pair("ours", lambda r: r.stats.latency(0.99, "call")),
            "ratio <= 2",
            "seed 0.2.1",
            note + "; send_event call to receipt",
        ),
        row(
            "p50 latency from call",
            "ms",
            pair("ours", lambda r: r.stats.latency(0.5, "call")),
            "",
            "seed 0.2.1",
            note,
        ),
        Result(
            name,
            "p99 latency from return",
            "ms",
            median([r.stats.latency(0.99) for r in runs["ours"]]),
            None,
            "",
            "",
            note
            + "; the seed's is "
            + fmt(median([r.stats.latency(0.99) for r in runs["seed"]]))
            + " ms: its send_event returns after its own fan-out",
        ),
        row(
            "DB queries per event",
            "q/ev",
            pair("ours", lambda r: r.queries / r.events, "few"),
            "ratio <= 1.2",
            f"ours, {FEW} clients",
            f"server process (it also runs the task), {clients} vs {FEW} clients",
        ),
        row(
            "hub fetches per event",
            "f/ev",
            pair("ours", lambda r: r.fetches / r.events, "few"),
            "ratio <= 1.2",
            f"ours, {FEW} clients",
            f"{clients} vs {FEW} clients",
        ),
        Result(
            name,
            "DB connections held",
            "conns",
            max(conns),
            float(settings.POOL_MAX_SIZE + 2),
            "ratio <= 1",
            "pool + LISTEN + ORM",
            "server with its worker: the worker loads tasks through the Django ORM, which "
            "keeps one connection; an SSE-only server holds pool + 1 (see 4b)",
            {"ours": conns},
        ),
    ]


def _pg_port(ctx: Context) -> int:
    from urllib.parse import urlsplit

    return urlsplit(ctx.stack.url).port or 5432
