"""Exactly once under faults, in-process on a real Postgres: retried batches, refused data,
prompt terminal events, the concurrency cap, repeated cancels."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from streaming import conf, queries, registry
from streaming.coordinator import coordinator
from streaming.db import conninfo_from_django
from streaming.events import Append, Status
from streaming.exceptions import DatabaseError, DataRefused, InvalidEventData
from streaming.runtime import Runtime
from tests.models import ScriptedTask
from tests.support import database_url_from_settings, sql, wait_for_status
from tests.tcpproxy import TcpProxy

pytestmark = pytest.mark.django_db(transaction=True)


def _named(name: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url_from_settings(), autocommit=True) as conn:
        return conn.execute(queries.get(name).encode(), params).fetchall()


def _running_run(task_id: int) -> int:
    """A run row that a worker holds as attempt 1 (no worker needed to append to it)."""
    rows = sql(
        "INSERT INTO streaming_taskrun (app_label, model_name, task_id, db_table, status, "
        "attempt, lease_owner, lease_expires_at) VALUES ('tests', 'ScriptedTask', %s, "
        "'tests_scriptedtask', 'running', 1, 'test', now() + interval '1 hour') RETURNING id",
        task_id,
    )
    return int(rows[0][0])


def _batch(writer: str, number: int, run_id: int, datas: list[str]) -> list[tuple[Any, ...]]:
    n = len(datas)
    return _named(
        "append_batch",
        {
            "writer": writer,
            "batch": number,
            "run_ids": [run_id] * n,
            "attempts": [1] * n,
            "types": ["t"] * n,
            "datas": datas,
        },
    )


def test_a_retried_batch_writes_nothing_and_returns_the_first_commits_rows() -> None:
    run_id = _running_run(9001)
    first = _batch("w1", 1, run_id, ['{"i": 1}', '{"i": 2}'])
    again = _batch("w1", 1, run_id, ['{"i": 1}', '{"i": 2}'])
    assert [r[1] for r in first] == [1, 2]
    assert again == first  # same seqs, timestamps, data text and identity
    assert sql("SELECT count(*) FROM streaming_taskevent WHERE task_id = 9001") == [(2,)]
    nxt = _batch("w1", 2, run_id, ['{"i": 3}'])
    assert [r[1] for r in nxt] == [3]
    other = _batch("w2", 1, run_id, ['{"i": 4}'])  # another writer's batch 1 is its own
    assert [r[1] for r in other] == [4]
    with pytest.raises(psycopg.errors.RaiseException, match="retried batch 1 after batch 2"):
        _batch("w1", 1, run_id, ['{"i": 1}'])
    assert sql("SELECT seq FROM streaming_taskevent WHERE task_id = 9001 ORDER BY seq") == [
        (1,),
        (2,),
        (3,),
        (4,),
    ]


@pytest.fixture
async def proxied() -> AsyncIterator[tuple[Runtime, TcpProxy]]:
    """A runtime of its own whose connections go through a TCP proxy to the test Postgres."""
    cfg = psycopg.conninfo.conninfo_to_dict(conninfo_from_django())
    proxy = TcpProxy(str(cfg["host"]), int(str(cfg["port"]))).start()
    conninfo = psycopg.conninfo.make_conninfo(
        conninfo_from_django(), host=proxy.host, port=str(proxy.port)
    )
    rt = Runtime(conf.get(), conninfo)
    await rt.start()
    try:
        yield rt, proxy
    finally:
        await rt.aclose()
        proxy.close()


async def test_an_append_whose_acknowledgement_was_lost_is_stored_once(
    proxied: tuple[Runtime, TcpProxy],
) -> None:
    rt, proxy = proxied
    run_id = _running_run(9002)
    assert await rt.appender.append(Append(run_id, 1, "t", '{"i": 1}')) == 1
    proxy.lose_next_ack(marker="streaming_append_batch_once")
    # Committed, but the answer is lost and the connection cut: the appender retries.
    seqs = await asyncio.gather(
        *(rt.appender.append(Append(run_id, 1, "t", f'{{"i": {i}}}')) for i in (2, 3, 4))
    )
    assert proxy.acks_lost == 1
    assert sorted(s for s in seqs if s is not None) == [2, 3, 4]
    rows = sql("SELECT seq, data->>'i' FROM streaming_taskevent WHERE task_id = 9002 ORDER BY seq")
    assert rows == [(1, "1"), (2, "2"), (3, "3"), (4, "4")]  # each event exactly once
    assert await rt.appender.append(Append(run_id, 1, "t", '{"i": 5}')) == 5


async def test_a_refused_append_fails_only_its_own_caller(rt: Any) -> None:
    runs = [_running_run(9010 + n) for n in range(4)]
    # Data that got past validation but that Postgres refuses (a NUL escape in jsonb),
    # sent in the same group-commit batch as three good appends of other tasks.
    bad = Append(runs[0], 1, "t", '{"text": "\\u0000"}')
    results = await asyncio.gather(
        rt.appender.append(bad),
        *(rt.appender.append(Append(r, 1, "t", '{"ok": true}')) for r in runs[1:]),
        return_exceptions=True,
    )
    assert isinstance(results[0], DataRefused) and isinstance(results[0], DatabaseError)
    assert results[1:] == [1, 1, 1]
    counts = sql(
        "SELECT task_id, count(*) FROM streaming_taskevent WHERE task_id BETWEEN 9010 AND 9013 "
        "GROUP BY task_id ORDER BY task_id"
    )
    assert counts == [(9011, 1), (9012, 1), (9013, 1)]


@pytest.mark.parametrize(
    ("data", "refused"),
    [
        ({"a": "\x00"}, True),
        ({"a": "\ud800"}, True),
        ({"\udfff": 1}, True),
        ({"a": ["ok", {"b": "x\udbffy"}]}, True),
        ({"a": "\\u0000"}, False),  # the six characters, not a NUL
        ({"a": "\ud83d\ude00"}, False),  # a surrogate pair: jsonb stores the emoji
        ({"a": "é😀\u2028"}, False),
    ],
)
async def test_validation_refuses_exactly_what_jsonb_refuses(
    rt: Any, data: dict[str, Any], refused: bool
) -> None:
    """Each case is also sent to Postgres's own jsonb parser, the reference."""
    text = json.dumps(data)
    try:
        sql("SELECT %s::jsonb", text)
        jsonb_refuses = False
    except psycopg.DataError:
        jsonb_refuses = True
    assert jsonb_refuses == refused
    task = await ScriptedTask.objects.acreate(ticks=0)
    if refused:
        with pytest.raises(InvalidEventData):
            await coordinator.append_event(task, "t", data)
    else:
        from streaming import events

        assert events.validate("t", data) == json.dumps(data, separators=(",", ":"))


async def test_a_claim_that_fails_a_run_announces_its_end_at_once(rt: Any) -> None:
    task = await ScriptedTask.objects.acreate(ticks=1)
    key = registry.key_of(task)
    run_id = (await coordinator.enqueue_key(ScriptedTask, key)).run_id
    # Its worker died on the last allowed attempt: the lease expired long ago.
    sql(
        "UPDATE streaming_taskrun SET status = 'running', attempt = max_attempts, "
        "lease_owner = 'dead', lease_expires_at = now() - interval '1 minute' WHERE id = %s",
        run_id,
    )
    rt.hub.poll_interval = 3600  # only the announcement can wake the subscriber
    sub = await coordinator.subscribe(run_id, key, 0)
    got: list[str] = []

    async def follow() -> None:
        async for batch in sub.batches(3600):
            got.extend(ev.type for ev in batch)

    follower = asyncio.create_task(follow())
    await asyncio.sleep(0.1)
    failed_before = rt.worker.counts["failed"]
    assert not await rt.worker.claim(run_id)  # nothing to run: it was failed instead
    await asyncio.wait_for(follower, 2)
    rt.hub.unsubscribe(sub)
    assert got == ["error", "end"]
    assert rt.worker.counts["failed"] == failed_before + 1
    assert await wait_for_status(rt, task) == Status.FAILED


async def test_no_path_runs_more_tasks_than_the_cap(rt: Any) -> None:
    rt.worker.cfg = dataclasses.replace(rt.worker.cfg, concurrency=2)
    tasks = [await ScriptedTask.objects.acreate(ticks=3, delay=0.1) for _ in range(5)]
    for task in tasks:
        await coordinator.start_task(task)
    peak = 0
    deadline = asyncio.get_running_loop().time() + 20
    while asyncio.get_running_loop().time() < deadline:
        peak = max(peak, len(rt.worker.running))
        statuses = sql("SELECT status, count(*) FROM streaming_taskrun GROUP BY status")
        running = dict(statuses).get("running", 0)
        assert running <= 2, statuses
        if running == 0:
            break
        await asyncio.sleep(0.02)
    assert peak == 2
    # Three were left queued, for any worker: this runtime's claim loop (off here) or another.
    assert dict(sql("SELECT status, count(*) FROM streaming_taskrun GROUP BY status")) == {
        "completed": 2,
        "pending": 3,
    }
    rt.worker.start()
    for task in tasks:
        assert await wait_for_status(rt, task) == Status.COMPLETED


@pytest.mark.parametrize("callers", [3, 10])
async def test_concurrent_cancels_give_one_cancelled_and_one_end_at_once(
    rt: Any, callers: int
) -> None:
    for _trial in range(4):
        task = await ScriptedTask.objects.acreate(ticks=200, delay=0.02)
        await coordinator.start_task(task)
        deadline = asyncio.get_running_loop().time() + 10
        while not rt.worker.running:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        answers = await asyncio.gather(
            *(coordinator.cancel_task("tests", "ScriptedTask", task.pk) for _ in range(callers))
        )
        # Yes from each, except one that came after the cancel had finished ("finished").
        status = sql("SELECT status FROM streaming_taskrun WHERE task_id = %s", task.pk)
        assert all(answers) or status == [("cancelled",)]
        assert await wait_for_status(rt, task, timeout=3) == Status.CANCELLED
        types = [e["type"] for e in await task.aevents()]
        assert types.count("cancelled") == 1 and types.count("end") == 1
        assert types[-2:] == ["cancelled", "end"] and "retry" not in types
        await task.arefresh_from_db()
        assert task.attempt == 1
