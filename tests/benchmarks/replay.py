"""Scenario 5: a new client replays a 10,000-event history; vs a raw psycopg SELECT of it."""

from __future__ import annotations

import asyncio
import time

import psycopg

from streaming import queries
from tests.benchmarks.context import Context
from tests.benchmarks.harness import Result, median

HISTORY = 10_000
FILL = """
INSERT INTO streaming_taskevent (app_label, model_name, task_id, seq, attempt, event_type, data)
SELECT 'benchmarks', 'BenchTask', t, s, 1, 'tick',
       jsonb_build_object('i', s, 'total', %(n)s::bigint,
                          'message', 'step ' || s || ' of ' || %(n)s::bigint)
  FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS t,
       generate_series(1, %(n)s::bigint) AS s
"""
END = """
INSERT INTO streaming_taskevent (app_label, model_name, task_id, seq, attempt, event_type, data)
VALUES ('benchmarks', 'BenchTask', %(t)s, %(n)s::bigint + 1, 1, 'end',
        '{"status": "completed", "final_value": null}')
"""
RUN = """
INSERT INTO streaming_taskrun (app_label, model_name, task_id, db_table, status, attempt,
                               last_seq, started_at, finished_at)
VALUES ('benchmarks', 'BenchTask', %(t)s, 'benchmarks_benchtask', 'completed', 1, %(n)s::bigint + 1,
        now(), now())
"""


async def run(ctx: Context) -> list[Result]:
    from tests.benchmarks.models import BenchTask

    total_rows = ctx.size(100_000, 1_000_000)
    ctx.stack.reset()
    task = await BenchTask.objects.acreate(events=HISTORY)
    _fill(ctx, task.pk, total_rows)
    server = await asyncio.to_thread(ctx.stack.start_server, "--no-worker")
    path = f"/stream/benchmarks/BenchTask/{task.pk}"
    ours: list[float] = []
    raw: list[float] = []
    try:
        await _replay(server.port or 0, path)  # warm: the server's pool, the page cache
        _select(ctx, task.pk)
        for _ in range(ctx.size(3, 5) * ctx.repeat):
            ours.append((HISTORY + 1) / await _replay(server.port or 0, path))
            raw.append((HISTORY + 1) / _select(ctx, task.pk))
    finally:
        await asyncio.to_thread(ctx.stack.stop, server)
    note = (
        f"{HISTORY + 1} events of one task among {total_rows:,} rows; ours: HTTP GET to the "
        "last byte of the SSE stream; raw: SELECT ... data::text, fetchall"
    )
    return [
        Result(
            "5 replay",
            "events/s",
            "ev/s",
            median(ours),
            median(raw),
            "ratio >= 0.5",
            "raw psycopg SELECT",
            note,
            {"ours": ours, "baseline": raw},
        )
    ]


def _fill(ctx: Context, task_id: int, total_rows: int) -> None:
    """The task's history, plus other tasks' rows around it, so the index is realistic."""
    others = max(0, total_rows // HISTORY - 1)
    with ctx.stack.connect() as conn:
        conn.execute(FILL.encode(), {"n": HISTORY, "first": task_id, "last": task_id})
        conn.execute(END.encode(), {"t": task_id, "n": HISTORY})
        conn.execute(RUN.encode(), {"t": task_id, "n": HISTORY})
        if others:
            conn.execute(
                FILL.encode(), {"n": HISTORY, "first": task_id + 1, "last": task_id + others}
            )
        conn.execute(b"VACUUM ANALYZE streaming_taskevent")


def _select(ctx: Context, task_id: int) -> float:
    """Seconds to fetch the same rows with psycopg, by hand, in one query."""
    query = queries.get("read_events").encode()
    params = {
        "app_label": "benchmarks",
        "model_name": "BenchTask",
        "task_id": task_id,
        "after": 0,
        "limit": HISTORY + 1,
    }
    with psycopg.connect(ctx.stack.url, autocommit=True) as conn:
        start = time.perf_counter()
        rows = conn.execute(query, params).fetchall()
        elapsed = time.perf_counter() - start
    if len(rows) != HISTORY + 1:
        raise RuntimeError(f"raw SELECT returned {len(rows)} rows")
    return elapsed


async def _replay(port: int, path: str) -> float:
    """Seconds from connecting to the end of the stream; checks that every event came."""
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    body = bytearray()
    while True:
        chunk = await reader.read(1 << 20)
        if not chunk:
            break
        body += chunk
        if b"event: end\n" in body[-len(chunk) - 16 :]:
            break
    elapsed = time.perf_counter() - start
    writer.close()
    ids = body.count(b"\nid: ")
    if ids != HISTORY + 1:
        raise RuntimeError(f"replay delivered {ids} events, expected {HISTORY + 1}")
    return elapsed
