"""streaming.testing: tasks run to their end in a test, a plain TestCase refused, nothing left."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from asgiref.sync import SyncToAsync, sync_to_async
from django.db import connection
from django.test import TestCase, TransactionTestCase

from streaming import registry, runtime, testing
from streaming.models import TaskRun
from streaming.testing import (
    StreamingTestMixin,
    TaskNotCommitted,
    TaskTimeout,
    arun_task,
    close_connections,
    run_task,
)
from tests.models import ExampleTask, ScriptedTask

committed = pytest.mark.django_db(transaction=True)
# The repository's conftest has no ``pytest_plugins``: the fixture as it would give it.
streaming_tasks = testing.streaming_tasks  # what ``pytest_plugins = ["streaming.testing"]`` gives

OTHERS = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
    "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
)


def others() -> int:
    """Client connections to the test database besides this thread's Django connection."""
    with connection.cursor() as cur:
        cur.execute(OTHERS)
        row = cur.fetchone()
    assert row is not None
    return int(row[0])


def settled() -> int:
    """``others()`` once it stops changing (backends of earlier tests may still be exiting)."""
    last = others()
    while True:
        time.sleep(0.05)
        now = others()
        if now == last:
            return now
        last = now


def back_to(before: int, within: float = 3.0) -> int:
    """``others()`` once it is at most ``before`` again, or after ``within`` seconds."""
    deadline = time.monotonic() + within
    now = others()
    while now > before and time.monotonic() < deadline:
        time.sleep(0.02)
        now = others()
    return now


def rises_above(before: int, within: float = 3.0) -> int:
    """``others()`` once it is above ``before`` (pools connect in the background)."""
    deadline = time.monotonic() + within
    now = others()
    while now <= before and time.monotonic() < deadline:
        time.sleep(0.02)
        now = others()
    return now


# -- running tasks ---------------------------------------------------------------------------


@committed
def test_run_task_completes_the_task_and_returns_it_refreshed() -> None:
    task = ExampleTask.objects.create(message="hi")
    got = run_task(task)
    assert got is task
    assert task.status == "completed" and task.attempt == 1
    assert task.final_value == {"message": "hi", "steps": 3}
    assert task.completed_at is not None and task.error is None


@committed
def test_every_event_is_in_the_log_when_run_task_returns() -> None:
    task = run_task(ExampleTask.objects.create(message="events", total_steps=2))
    history = task.events()
    assert [e["type"] for e in history] == ["start", "progress", "progress", "complete", "end"]
    assert [e["seq"] for e in history] == [1, 2, 3, 4, 5]
    assert history[0]["data"]["message"] == "events"
    assert history[-1]["data"]["status"] == "completed"
    assert history[-1]["data"]["final_value"] == {"message": "events", "steps": 2}


@committed
def test_a_failing_task_comes_back_failed_with_its_error() -> None:
    task = run_task(ScriptedTask.objects.create(ticks=5, fail_at=2))
    assert task.status == "failed" and task.final_value is None
    assert task.error == {"message": "failed at step 2", "error_type": "RuntimeError"}
    assert [e["type"] for e in task.events()] == ["tick", "error", "end"]


@committed
def test_a_finished_task_is_returned_as_it_is() -> None:
    task = run_task(ScriptedTask.objects.create(ticks=2, result={"n": 1}))
    again = run_task(task, timeout=5)
    assert again.status == "completed" and again.final_value == {"n": 1}
    assert [e["seq"] for e in again.events()] == [1, 2, 3]  # not run a second time


@committed
def test_a_timeout_says_what_state_the_task_was_in_and_cancels_it() -> None:
    task = ScriptedTask.objects.create(ticks=1000, delay=0.05)
    started = time.monotonic()
    with pytest.raises(TaskTimeout) as caught:
        run_task(task, timeout=0.4)
    assert time.monotonic() - started < 6
    assert isinstance(caught.value, AssertionError)
    message = str(caught.value)
    assert f"ScriptedTask {task.pk} (tests/ScriptedTask/{task.pk})" in message
    assert "did not finish within 0.4s: it was still running (attempt 1," in message
    assert "it has been cancelled" in message
    task.refresh_from_db()
    assert task.status == "cancelled"  # nothing of it goes on running after the test


@committed
def test_run_task_on_an_event_loop_points_to_arun_task() -> None:
    task = ScriptedTask.objects.create(ticks=1)

    async def call() -> None:
        run_task(task)

    from asgiref.sync import async_to_sync

    with pytest.raises(RuntimeError, match="await arun_task"):
        async_to_sync(call)()


@committed
async def test_arun_task_runs_the_task_on_the_tests_loop(streaming_tasks: Any) -> None:
    task = await ScriptedTask.objects.acreate(ticks=3, result=["ok"])
    got = await arun_task(task)
    assert got is task and task.status == "completed" and task.final_value == ["ok"]
    assert [e["type"] for e in await task.aevents()] == ["tick", "tick", "tick", "end"]
    assert runtime.existing() is None  # the runtime it started is closed


@committed
async def test_arun_task_leaves_a_runtime_it_did_not_start_open(rt: Any) -> None:
    task = await ScriptedTask.objects.acreate(ticks=1)
    assert (await arun_task(task)).status == "completed"
    run = await rt.store.get(registry.key_of(task))
    assert run is not None and run.status == "completed"
    assert runtime.existing() is rt  # still open, still this loop's


@committed
def test_the_fixture_runs_tasks_with_its_default_timeout(streaming_tasks: Any) -> None:
    assert streaming_tasks.run(ScriptedTask.objects.create(ticks=2)).status == "completed"
    streaming_tasks.timeout = 0.2
    with pytest.raises(TaskTimeout, match=r"within 0\.2s"):
        streaming_tasks.run(ScriptedTask.objects.create(ticks=100, delay=0.05))


# -- nothing left open -----------------------------------------------------------------------


@committed
def test_run_task_leaves_no_connection_open() -> None:
    ScriptedTask.objects.exists()  # this thread's own connection, excluded from the count
    before = settled()
    task = run_task(ScriptedTask.objects.create(ticks=3))
    assert task.status == "completed"
    assert back_to(before) == before


@committed
def test_a_timed_out_run_leaves_no_connection_open() -> None:
    ScriptedTask.objects.exists()
    before = settled()
    with pytest.raises(TaskTimeout):
        run_task(ScriptedTask.objects.create(ticks=100, delay=0.05), timeout=0.2)
    assert back_to(before) == before


@committed
async def test_arun_task_leaves_no_connection_open(streaming_tasks: Any) -> None:
    task = await ScriptedTask.objects.acreate(ticks=3)
    before = await sync_to_async(settled)()
    assert (await arun_task(task)).status == "completed"
    assert await sync_to_async(back_to)(before) == before


@committed
async def test_the_count_sees_the_librarys_connections(streaming_tasks: Any) -> None:
    """The probe above can fail: a runtime left open is counted."""
    await ScriptedTask.objects.acount()
    before = await sync_to_async(settled)()
    await runtime.current()
    try:
        assert await sync_to_async(rises_above)(before) > before
    finally:
        await runtime.shutdown()
    assert await sync_to_async(back_to)(before) == before


@committed
def test_close_connections_closes_the_async_orm_threads_connection() -> None:
    ScriptedTask.objects.exists()
    before = settled()
    SyncToAsync.single_thread_executor.submit(ScriptedTask.objects.exists).result(10)
    assert others() == before + 1
    close_connections()
    assert back_to(before) == before


@committed
async def test_close_connections_called_on_the_orm_thread_does_not_deadlock(
    streaming_tasks: Any,
) -> None:
    await ScriptedTask.objects.acount()
    await asyncio.wait_for(sync_to_async(close_connections)(), 10)


# -- a plain TestCase is refused at once -----------------------------------------------------


class PlainTestCaseTests(TestCase):
    """Django's TestCase: one uncommitted transaction per test, which no worker can see."""

    def test_run_task_fails_at_once_naming_transaction_test_case(self) -> None:
        task = ExampleTask.objects.create()
        started = time.monotonic()
        with self.assertRaises(TaskNotCommitted) as caught:
            run_task(task)
        self.assertLess(time.monotonic() - started, 2)
        message = str(caught.exception)
        for part in ("not committed", "TransactionTestCase", "StreamingTestMixin"):
            self.assertIn(part, message)
        self.assertIn("django_db(transaction=True)", message)
        self.assertFalse(TaskRun.objects.filter(task_id=task.pk).exists())  # nothing queued
        task.refresh_from_db()
        self.assertEqual(task.status, "pending")

    async def test_arun_task_fails_at_once_too(self) -> None:
        task = await ExampleTask.objects.acreate()
        with self.assertRaisesMessage(TaskNotCommitted, "arun_task() was called inside"):
            await arun_task(task)


def test_pytest_djangos_db_fixture_is_refused_too(db: None) -> None:
    with pytest.raises(TaskNotCommitted, match=r"transaction=True"):
        run_task(ExampleTask.objects.create())


# -- the mixin, under Django's TransactionTestCase -------------------------------------------


class MixinTests(StreamingTestMixin, TransactionTestCase):
    def tearDown(self) -> None:
        # Django's flush skips the SQL-managed log tables.
        with connection.cursor() as cur:
            cur.execute("TRUNCATE streaming_taskevent, streaming_taskrun")

    def test_run_task(self) -> None:
        task = self.run_task(ExampleTask.objects.create(message="mixin"), timeout=10)
        self.assertEqual(task.status, "completed")
        self.assertEqual(task.final_value, {"message": "mixin", "steps": 3})

    async def test_arun_task(self) -> None:
        task = await self.arun_task(await ScriptedTask.objects.acreate(ticks=2, result=7))
        self.assertEqual((task.status, task.final_value), ("completed", 7))
