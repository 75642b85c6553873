"""Scenarios 1 and 2, and where NOTIFY goes: committed events per second, in this process."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

from streaming import queries, runtime
from streaming.coordinator import coordinator
from tests.benchmarks.context import Context, go, wait_started, wait_timing
from tests.benchmarks.harness import Result, median

RAW_RUN = (
    "INSERT INTO streaming_taskrun (app_label, model_name, task_id, db_table, status, "
    "attempt) SELECT 'raw', 'Raw', coalesce(max(task_id), 0) + 1, 'none', 'running', 1 "
    "FROM streaming_taskrun WHERE app_label = 'raw' RETURNING id"
)


async def ours(ctx: Context, tasks: int, events: int) -> float:
    """``tasks`` BenchTasks writing ``events`` each, run here; aggregate committed events/s."""
    from tests.benchmarks.models import BenchTask

    go_file = ctx.stack.path("go")
    objs = [await BenchTask.objects.acreate(events=events, go_file=go_file) for _ in range(tasks)]
    for obj in objs:
        await coordinator.start_task(obj)
    await wait_started([o.pk for o in objs])
    go(go_file)
    timings = [await wait_timing(o.pk) for o in objs]
    first = min(t.first_call for t in timings)
    last = max(t.returns[-1] for t in timings)
    return tasks * events / (last - first)


async def raw(
    ctx: Context,
    connections: int,
    events: int,
    step: Callable[[psycopg.AsyncConnection[Any], int, int], Awaitable[None]] | None = None,
) -> float:
    """``connections`` raw psycopg connections, one append per transaction; events/s."""
    step = step or raw_append
    conns = [
        await psycopg.AsyncConnection.connect(ctx.stack.url, autocommit=True)
        for _ in range(connections)
    ]
    try:
        runs = []
        for conn in conns:
            row = await (await conn.execute(RAW_RUN.encode())).fetchone()
            assert row is not None
            runs.append(row[0])

        async def loop(conn: psycopg.AsyncConnection[Any], run_id: int) -> None:
            for i in range(1, events + 1):
                await step(conn, run_id, i)

        start = time.perf_counter()
        await asyncio.gather(*(loop(c, r) for c, r in zip(conns, runs, strict=True)))
        return connections * events / (time.perf_counter() - start)
    finally:
        for conn in conns:
            await conn.close()


async def raw_append(conn: psycopg.AsyncConnection[Any], run_id: int, i: int) -> None:
    """The statement the appender runs, for one event (the data serialised as it does)."""
    cur = await conn.execute(
        queries.get("append_batch").encode(),
        {
            "writer": f"raw-{run_id}",
            "batch": i,
            "run_ids": [run_id],
            "attempts": [1],
            "types": ["tick"],
            "datas": [json.dumps({"i": i}, separators=(",", ":"))],
        },
    )
    await cur.fetchall()


BATCH = 16


async def raw_batch(conn: psycopg.AsyncConnection[Any], run_id: int, i: int) -> None:
    """A group commit of BATCH events (what one busy worker process sends per commit)."""
    cur = await conn.execute(
        queries.get("append_batch").encode(),
        {
            "writer": f"raw-{run_id}",
            "batch": i,
            "run_ids": [run_id] * BATCH,
            "attempts": [1] * BATCH,
            "types": ["tick"] * BATCH,
            "datas": [
                json.dumps({"i": i * BATCH + k}, separators=(",", ":")) for k in range(BATCH)
            ],
        },
    )
    await cur.fetchall()


async def raw_batch_notify_inside(conn: psycopg.AsyncConnection[Any], run_id: int, i: int) -> None:
    async with conn.transaction():
        await raw_batch(conn, run_id, i)
        await conn.execute(b"SELECT pg_notify('bench', %s)", (f"e {run_id}={i}",))


async def raw_batch_notify_after(conn: psycopg.AsyncConnection[Any], run_id: int, i: int) -> None:
    await raw_batch(conn, run_id, i)
    await conn.execute(
        queries.get("notify").encode(), {"channel": "bench", "payload": f"e {run_id}={i}"}
    )


async def raw_append_notify_inside(conn: psycopg.AsyncConnection[Any], run_id: int, i: int) -> None:
    async with conn.transaction():
        await raw_append(conn, run_id, i)
        await conn.execute(b"SELECT pg_notify('bench', %s)", (f"e {run_id}={i}",))


async def raw_append_notify_after(conn: psycopg.AsyncConnection[Any], run_id: int, i: int) -> None:
    await raw_append(conn, run_id, i)
    await conn.execute(
        queries.get("notify").encode(), {"channel": "bench", "payload": f"e {run_id}={i}"}
    )


async def _fresh_runtime(ctx: Context) -> runtime.Runtime:
    await runtime.shutdown()
    ctx.stack.reset()
    return await runtime.current()


async def write_one(ctx: Context) -> list[Result]:
    """Scenario 1: one task awaiting send_event in a loop vs the same statement by hand."""
    n = ctx.size(400, 3000)
    ours_s: list[float] = []
    raw_s: list[float] = []
    for _ in range(ctx.repeat):
        await _fresh_runtime(ctx)
        ours_s.append(await ours(ctx, 1, n))
        raw_s.append(await raw(ctx, 1, n))
    await runtime.shutdown()
    return [
        Result(
            "1 write, one task",
            "events/s",
            "ev/s",
            median(ours_s),
            median(raw_s),
            "ratio >= 0.6",
            "raw psycopg loop",
            samples={"ours": ours_s, "baseline": raw_s},
            note=f"{n} events; send_event returns after the commit",
        )
    ]


async def write_many(ctx: Context) -> list[Result]:
    """Scenario 2: 64 tasks in one process (group commit) vs one event/txn on 4 connections."""
    tasks, per_task = 64, ctx.size(40, 200)
    ours_s: list[float] = []
    raw_s: list[float] = []
    for _ in range(ctx.repeat):
        await _fresh_runtime(ctx)
        ours_s.append(await ours(ctx, tasks, per_task))
        raw_s.append(await raw(ctx, 4, tasks * per_task // 4))
    rt = await runtime.current()
    batch = rt.appender.appended / max(1, rt.appender.batches)
    await runtime.shutdown()
    return [
        Result(
            "2 write, 64 tasks",
            "events/s",
            "ev/s",
            median(ours_s),
            median(raw_s),
            "ratio >= 3",
            "raw psycopg, 1 ev/txn, 4 conns",
            samples={"ours": ours_s, "baseline": raw_s},
            note=f"{tasks}x{per_task} events; mean group-commit batch {batch:.1f}",
        )
    ]


def _notify_inside(rt: runtime.Runtime) -> None:
    """Make this runtime's appender NOTIFY inside its transaction (the rejected design)."""
    appender = rt.appender
    pool = rt.db._pool  # benchmark-only: the variant needs the transaction itself

    async def write(items: list[Any], number: int) -> list[int | None]:
        params = {
            "writer": appender.writer,
            "batch": number,
            "run_ids": [i.run_id for i in items],
            "attempts": [i.attempt for i in items],
            "types": [i.event_type for i in items],
            "datas": [i.data_json for i in items],
        }
        async with pool.connection() as conn, conn.transaction():
            rows = await (await conn.execute(queries.get("append_batch"), params)).fetchall()
            by_ord = {row[0]: row[1] for row in rows}
            seqs = [by_ord.get(n + 1) for n in range(len(items))]
            last: dict[int, int] = {}
            for item, seq in zip(items, seqs, strict=True):
                if seq is not None:
                    last[item.run_id] = max(seq, last.get(item.run_id, 0))
            payload = "e " + ",".join(f"{r}={s}" for r, s in last.items())
            await conn.execute(
                queries.get("notify"), {"channel": rt.settings.CHANNEL, "payload": payload}
            )
        appender.appended += len(items)
        return seqs

    appender._write = write  # type: ignore[method-assign]
    appender.log = _LocalOnly(rt)  # type: ignore[assignment]  # no second NOTIFY after commit


class _LocalOnly:
    """The appender's view of the log, announcing to the local hub only (no NOTIFY)."""

    def __init__(self, rt: runtime.Runtime) -> None:
        self.hub = rt.hub

    def committed(self, run_id: int, seq: int) -> None:
        self.hub.committed(run_id, seq)


async def notify_placement(ctx: Context) -> list[Result]:
    """NOTIFY after commit (what we ship) vs inside the write transaction.

    In this process (64 tasks, one group-commit writer), and by hand on 4 connections, as
    4 busy worker processes would write: one event per transaction, or 16 per transaction.
    The after-commit NOTIFY is our ``notify`` statement (asynchronous commit).
    """
    tasks, per_task = 64, ctx.size(40, 200)
    n_raw, n_batches = ctx.size(300, 1500), ctx.size(40, 150)
    s: dict[str, list[float]] = {
        k: [] for k in ("after", "inside", "raw_after", "raw_inside", "batch_after", "batch_inside")
    }
    for _ in range(ctx.repeat):
        await _fresh_runtime(ctx)
        s["after"].append(await ours(ctx, tasks, per_task))
        _notify_inside(await _fresh_runtime(ctx))
        s["inside"].append(await ours(ctx, tasks, per_task))
        s["raw_after"].append(await raw(ctx, 4, n_raw, raw_append_notify_after))
        s["raw_inside"].append(await raw(ctx, 4, n_raw, raw_append_notify_inside))
        s["batch_after"].append(BATCH * await raw(ctx, 4, n_batches, raw_batch_notify_after))
        s["batch_inside"].append(BATCH * await raw(ctx, 4, n_batches, raw_batch_notify_inside))
    await runtime.shutdown()

    def row(name: str, a: str, b: str, note: str) -> Result:
        return Result(
            name,
            "events/s",
            "ev/s",
            median(s[a]),
            median(s[b]),
            "",
            "NOTIFY inside the txn",
            note,
            {"ours": s[a], "baseline": s[b]},
        )

    return [
        row(
            "NOTIFY placement, 64 tasks",
            "after",
            "inside",
            "one process: ours = coalesced NOTIFY after commit",
        ),
        row(
            "NOTIFY placement, 4 conns x 1",
            "raw_after",
            "raw_inside",
            "by hand: 1 event per transaction on 4 connections",
        ),
        row(
            "NOTIFY placement, 4 conns x 16",
            "batch_after",
            "batch_inside",
            f"by hand: {BATCH}-event group commits on 4 connections (4 busy workers)",
        ),
    ]
