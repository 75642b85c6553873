"""The seed's behaviours, in-process, on a real Postgres."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from streaming import registry
from streaming.coordinator import coordinator
from streaming.exceptions import InvalidEventData, InvalidEventType, TaskNotStarted
from tests.models import (
    AsyncGeneratorTask,
    ContinueTask,
    ExampleTask,
    ScriptedTask,
    SyncGeneratorTask,
)
from tests.support import sql, wait_for_status

pytestmark = pytest.mark.django_db(transaction=True)


async def test_example_task_emits_the_seeds_five_events_then_end(rt: Any) -> None:
    task = await ExampleTask.objects.acreate(message="hi")
    await coordinator.start_task(task, "tests", "ExampleTask")
    assert await wait_for_status(rt, task) == "completed"
    history = await task.aevents()
    assert [e["type"] for e in history] == [
        "start",
        "progress",
        "progress",
        "progress",
        "complete",
        "end",
    ]
    assert [e["seq"] for e in history] == [1, 2, 3, 4, 5, 6]
    start = history[0]["data"]
    assert start["message"] == "hi" and start["total_steps"] == 3
    assert start["_task_id"] == task.pk and start["_app"] == "tests"
    assert start["_model"] == "ExampleTask" and start["_seq"] == 1
    assert start["_timestamp"].endswith("Z")
    assert history[2]["data"]["step"] == 2 and history[2]["data"]["message"] == "Step 2 of 3"
    assert history[-1]["data"]["status"] == "completed"
    assert history[-1]["data"]["final_value"] == {"message": "hi", "steps": 3}


async def test_all_three_start_task_forms_and_idempotence(rt: Any) -> None:
    tasks = [await ScriptedTask.objects.acreate(ticks=1) for _ in range(3)]
    await coordinator.start_task(tasks[0], "tests", "ScriptedTask")
    await coordinator.start_task(tasks[1], "ScriptedTask")
    await coordinator.start_task(tasks[2])
    for t in tasks:
        assert await wait_for_status(rt, t) == "completed"
    await coordinator.start_task(tasks[0])  # finished: left alone
    await asyncio.sleep(0.1)
    rows = sql(
        "SELECT attempt, status, last_seq FROM streaming_taskrun WHERE task_id = %s "
        "AND model_name = 'ScriptedTask'",
        tasks[0].pk,
    )
    assert rows == [(1, "completed", 2)]
    with pytest.raises(ValueError, match="does not match"):
        await coordinator.start_task(tasks[0], "tests", "ExampleTask")


async def test_is_task_running_from_start_to_finish_and_completed_at(rt: Any) -> None:
    task = await ScriptedTask.objects.acreate(ticks=3, delay=0.05)
    assert not coordinator.is_task_running("tests", "ScriptedTask", task.pk)
    await coordinator.start_task(task)
    assert coordinator.is_task_running("tests", "ScriptedTask", task.pk)
    assert coordinator.is_task_running("ScriptedTask", task.pk)  # the seed's form
    await wait_for_status(rt, task)
    assert not coordinator.is_task_running("tests", "ScriptedTask", task.pk)
    await task.arefresh_from_db()
    assert task.completed_at is not None
    assert task.status == "completed" and task.attempt == 1 and task.started_at is not None


async def test_two_subscribers_get_identical_events(rt: Any) -> None:
    task = await ScriptedTask.objects.acreate(ticks=20, delay=0.005)
    q1: asyncio.Queue = asyncio.Queue()
    q2: asyncio.Queue = asyncio.Queue()
    await task.add_client(q1)
    await task.add_client(q2)
    await coordinator.start_task(task)
    await wait_for_status(rt, task)
    got1 = await _drain_until_end(q1)
    got2 = await _drain_until_end(q2)
    assert [m["seq"] for m in got1] == list(range(1, 22))
    assert got1 == got2


async def test_a_subscriber_that_never_reads_blocks_nobody(rt: Any) -> None:
    task = await ScriptedTask.objects.acreate(ticks=50)
    idle: asyncio.Queue = asyncio.Queue(maxsize=1)  # full after one item, never read
    busy: asyncio.Queue = asyncio.Queue()
    await task.add_client(idle)
    await task.add_client(busy)
    await coordinator.start_task(task)
    assert await wait_for_status(rt, task) == "completed"
    got = await _drain_until_end(busy)
    assert [m["seq"] for m in got] == list(range(1, 52))
    await task.remove_client(idle)


async def test_a_late_subscriber_gets_the_latest_event_first(rt: Any) -> None:
    task = await ScriptedTask.objects.acreate(ticks=4)
    await coordinator.start_task(task)
    await wait_for_status(rt, task)
    late: asyncio.Queue = asyncio.Queue()
    await task.add_client(late)
    first = await asyncio.wait_for(late.get(), 5)
    assert first["type"] == "end" and first["seq"] == 5
    assert set(first) == {"type", "data", "timestamp", "seq"}


async def test_the_task_completes_after_every_client_disconnects(rt: Any) -> None:
    task = await ContinueTask.objects.acreate(steps=5, step_delay=0.05)
    q: asyncio.Queue = asyncio.Queue()
    await task.add_client(q)
    await coordinator.start_task(task)
    await asyncio.wait_for(q.get(), 5)
    await task.remove_client(q)
    assert await wait_for_status(rt, task) == "completed"
    types = [e["type"] for e in await task.aevents()]
    assert types[-2:] == ["complete", "end"] and types.count("progress") == 5


async def test_large_event_data_arrives_intact(rt: Any) -> None:
    task = await ScriptedTask.objects.acreate(ticks=2, payload_size=50_000)
    q: asyncio.Queue = asyncio.Queue()
    await task.add_client(q)
    await coordinator.start_task(task)
    got = await _drain_until_end(q)
    ticks = [m for m in got if m["type"] == "tick"]
    assert len(ticks) == 2 and all(len(m["data"]["pad"]) == 50_000 for m in ticks)


async def test_process_exception_gives_error_then_end_and_failed(rt: Any) -> None:
    task = await ScriptedTask.objects.acreate(ticks=5, fail_at=3)
    await coordinator.start_task(task)
    assert await wait_for_status(rt, task) == "failed"
    history = await task.aevents()
    assert [e["type"] for e in history] == ["tick", "tick", "error", "end"]
    assert history[2]["data"]["error_type"] == "RuntimeError"
    assert history[2]["data"]["message"] == "failed at step 3"
    assert history[3]["data"]["status"] == "failed"
    await task.arefresh_from_db()
    assert task.status == "failed" and task.error is not None
    assert task.error["error_type"] == "RuntimeError"
    assert task.completed_at is not None


async def test_generators(rt: Any) -> None:
    agen = await AsyncGeneratorTask.objects.acreate(count=3)
    sgen = await SyncGeneratorTask.objects.acreate(items=["a", "b"])
    await coordinator.start_task(agen)
    await coordinator.start_task(sgen)
    assert await wait_for_status(rt, agen) == "completed"
    assert await wait_for_status(rt, sgen) == "completed"
    a_types = [e["type"] for e in await agen.aevents()]
    assert a_types == ["start", "progress", "progress", "progress", "complete", "end"]
    s_hist = await sgen.aevents()
    assert [e["data"].get("processed") for e in s_hist if e["type"] == "progress"] == [
        "Processed: a",
        "Processed: b",
    ]
    await agen.arefresh_from_db()
    assert agen.final_value is not None and agen.final_value["step"] == 3


async def test_a_sync_generator_does_not_block_the_event_loop(rt: Any) -> None:
    task = await SyncGeneratorTask.objects.acreate(items=[1, 2, 3], delay=0.2)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    t = asyncio.create_task(ticker())
    started = time.monotonic()
    await coordinator.start_task(task)
    await wait_for_status(rt, task)
    elapsed = time.monotonic() - started
    t.cancel()
    # Blocking next() on the loop would starve the ticker for ~0.6 s.
    assert ticks > elapsed / 0.01 * 0.3


async def test_bad_events_raise_before_anything_is_written(rt: Any) -> None:
    task = await ScriptedTask.objects.acreate(ticks=0)
    with pytest.raises(TaskNotStarted):
        await task.send_event("tick", {"a": 1})
    bad_types: list[Any] = ["bad type!", "", "x" * 65, None]
    for event_type in bad_types:
        with pytest.raises(InvalidEventType):
            await task.send_event(event_type, {})
    bad_data: list[Any] = [[1, 2], "text", None, {"f": object()}, {"n": float("nan")}]
    for data in bad_data:
        with pytest.raises(InvalidEventData):
            await task.send_event("ok", data)
    with pytest.raises(TypeError):
        await task.send_event("ok", [1])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await task.send_event("no spaces", {})
    assert sql("SELECT count(*) FROM streaming_taskevent") == [(0,)]


async def test_a_stale_attempt_writes_nothing_and_reaches_no_client(rt: Any) -> None:
    task = await ScriptedTask.objects.acreate(ticks=0)
    key = registry.key_of(task)
    run_id = (await coordinator.enqueue_key(ScriptedTask, key)).run_id
    assert await rt.worker.claim(run_id)
    await wait_for_status(rt, task)
    q: asyncio.Queue = asyncio.Queue()
    await task.add_client(q)
    latest = await asyncio.wait_for(q.get(), 5)
    from streaming.events import Append

    # attempt 1 finished; attempt 7 never held the run: both are fenced off.
    for attempt in (1, 7):
        seq = await rt.appender.append(Append(run_id, attempt, "late", "{}"))
        assert seq is None
    await asyncio.sleep(0.2)
    assert q.empty() and latest["type"] == "end"
    assert sql("SELECT event_type FROM streaming_taskevent WHERE event_type = 'late'") == []


async def test_seq_is_gap_free_per_task_under_concurrency(rt: Any) -> None:
    tasks = [await ScriptedTask.objects.acreate(ticks=40) for _ in range(8)]
    for t in tasks:
        await coordinator.start_task(t)
    for t in tasks:
        assert await wait_for_status(rt, t) == "completed"
    rows = sql(
        "SELECT task_id, count(*), min(seq), max(seq), count(DISTINCT seq) "
        "FROM streaming_taskevent WHERE model_name = 'ScriptedTask' GROUP BY task_id"
    )
    assert len(rows) == 8
    for _tid, n, lo, hi, distinct in rows:
        assert (n, lo, hi, distinct) == (41, 1, 41, 41)


async def test_get_task_instance_starts_a_never_started_task(rt: Any) -> None:
    task = await ScriptedTask.objects.acreate(ticks=1)
    got = await coordinator.get_task_instance("tests", "ScriptedTask", task.pk)
    assert got is not None and got.pk == task.pk
    assert await wait_for_status(rt, task) == "completed"
    assert await coordinator.get_task_instance("tests", "ScriptedTask", 10**9) is None
    assert await coordinator.get_task_instance("tests", "NoSuchModel", 1) is None


async def test_history_view_joins_status(rt: Any) -> None:
    task = await ScriptedTask.objects.acreate(ticks=2)
    await coordinator.start_task(task)
    await wait_for_status(rt, task)
    rows = sql(
        "SELECT seq, event_type, status FROM streaming_task_history WHERE task_id = %s "
        "AND model_name = 'ScriptedTask'",
        task.pk,
    )
    assert rows == [(1, "tick", "completed"), (2, "tick", "completed"), (3, "end", "completed")]


async def _drain_until_end(
    q: asyncio.Queue[dict[str, Any]], timeout: float = 10.0
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while True:
        msg = await asyncio.wait_for(q.get(), timeout)
        out.append(msg)
        if msg["type"] == "end":
            return out


async def test_a_run_whose_table_is_gone_fails_without_blocking_other_claims(rt: Any) -> None:
    sql(
        "INSERT INTO streaming_taskrun (app_label, model_name, task_id, db_table) "
        "VALUES ('gone', 'Removed', 1, 'gone_removed')"
    )
    task = await ScriptedTask.objects.acreate(ticks=1)
    await coordinator.enqueue(task)
    assert await rt.worker.claim()  # the orphan is the oldest: it is claimed first
    assert await rt.worker.claim()
    assert await wait_for_status(rt, task) == "completed"
    deadline = asyncio.get_running_loop().time() + 10
    while sql("SELECT status FROM streaming_taskrun WHERE app_label = 'gone'") != [("failed",)]:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
