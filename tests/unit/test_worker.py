"""The worker against an in-memory run store and fake tasks: claim, run, stop, finish."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from streaming import context
from streaming.context import RunContext
from streaming.events import CANCELLED_ERROR, Append, Status, TaskKey
from streaming.exceptions import LeaseLost, TaskNotFound
from streaming.worker import Runnable, Worker, WorkerSettings, error_info
from tests.unit.fakes import (
    FakeAppender,
    FakeTask,
    MemoryStore,
    blocking,
    key,
    raising,
    returning,
    settle,
    wait_until,
)

SETTINGS = WorkerSettings(
    lease_ttl=5.0, heartbeat_interval=60.0, concurrency=8, poll_interval=0.02, finish_retry_for=0.5
)


class Tasks:
    """The loader: a task's identity to its fake task object (TaskNotFound if unknown)."""

    def __init__(self) -> None:
        self.tasks: dict[TaskKey, FakeTask] = {}
        self.loads: list[TaskKey] = []
        self.gate: asyncio.Event | None = None

    def add(
        self, store: MemoryStore, body: Callable[[], Awaitable[Any]], **run: Any
    ) -> tuple[int, FakeTask]:
        run_id = store.add(**run)
        task = self.tasks[store.runs[run_id].key] = FakeTask(body)
        return run_id, task

    async def load(self, task: TaskKey) -> Runnable:
        self.loads.append(task)
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(0)
        try:
            return self.tasks[task]
        except KeyError:
            raise TaskNotFound(f"no task {task.path}") from None


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def tasks() -> Tasks:
    return Tasks()


@pytest.fixture
async def worker(store: MemoryStore, tasks: Tasks) -> AsyncIterator[Worker]:
    w = Worker(store, FakeAppender(), tasks.load, SETTINGS, owner="me")
    yield w
    await w.shutdown(0)


def finished(store: MemoryStore, run_id: int) -> Callable[[], bool]:
    return lambda: store.status(run_id).finished


# -- running to the end ------------------------------------------------------------------


async def test_a_claimed_run_completes_with_its_result(
    worker: Worker, store: MemoryStore, tasks: Tasks
) -> None:
    run_id, task = tasks.add(store, returning({"answer": 42}))
    assert await worker.claim()
    await wait_until(finished(store, run_id))
    assert store.status(run_id) == Status.COMPLETED
    assert store.runs[run_id].final_value == {"answer": 42}
    (call,) = store.finishes
    assert (call.attempt, call.status, call.error) == (1, Status.COMPLETED, None)
    assert task.calls == 1
    assert worker.counts["claimed"] == 1 and worker.counts["completed"] == 1
    await wait_until(lambda: not worker.running)


async def test_claim_is_false_when_nothing_is_queued(worker: Worker, store: MemoryStore) -> None:
    assert not await worker.claim()
    assert store.claims == [None] and worker.counts["claimed"] == 0


async def test_claim_of_a_given_run_takes_only_that_one(
    worker: Worker, store: MemoryStore, tasks: Tasks
) -> None:
    first, _ = tasks.add(store, returning(1))
    second, _ = tasks.add(store, returning(2))
    assert await worker.claim(second)
    await wait_until(finished(store, second))
    assert store.status(first) == Status.PENDING


async def test_the_concurrency_cap_is_never_exceeded(store: MemoryStore, tasks: Tasks) -> None:
    gate = asyncio.Event()
    active = 0
    peak = 0

    async def body() -> int:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        try:
            await gate.wait()
            await asyncio.sleep(0.001)
        finally:
            active -= 1
        return 1

    runs = [tasks.add(store, body)[0] for _ in range(12)]
    worker = Worker(store, FakeAppender(), tasks.load, SETTINGS, owner="me")
    for _ in range(8):
        assert await worker.claim()
    assert not await worker.claim()  # full: not even asked of the store
    assert len(store.claims) == 8 and worker.full
    worker.start()
    await wait_until(lambda: active == 8)
    await settle()
    assert store.count(Status.RUNNING) == 8 and store.count(Status.PENDING) == 4
    gate.set()
    await wait_until(lambda: all(store.status(r) == Status.COMPLETED for r in runs))
    assert peak == 8
    assert worker.counts["completed"] == 12
    await worker.shutdown(0)


async def test_concurrent_claims_do_not_pass_the_cap_together(
    store: MemoryStore, tasks: Tasks
) -> None:
    settings = WorkerSettings(lease_ttl=5.0, heartbeat_interval=60.0, concurrency=3)
    worker = Worker(store, FakeAppender(), tasks.load, settings, owner="me")
    gate = asyncio.Event()
    for _ in range(6):
        tasks.add(store, blocking(gate))
    results = await asyncio.gather(*(worker.claim() for _ in range(6)))
    assert sorted(results) == [False] * 3 + [True] * 3
    assert len(store.claims) == 3  # the store was asked only while a slot was free
    assert len(worker.running) == 3 and store.count(Status.PENDING) == 3
    gate.set()
    await worker.shutdown(1.0)


async def test_a_raising_process_fails_with_its_error(
    worker: Worker, store: MemoryStore, tasks: Tasks
) -> None:
    run_id, _ = tasks.add(store, raising(ValueError("bad input")))
    await worker.claim()
    await wait_until(finished(store, run_id))
    assert store.status(run_id) == Status.FAILED
    assert store.runs[run_id].error == {"message": "bad input", "error_type": "ValueError"}
    assert worker.counts["failed"] == 1


async def test_an_error_without_message_is_named_by_its_type(
    worker: Worker, store: MemoryStore, tasks: Tasks
) -> None:
    run_id, _ = tasks.add(store, raising(KeyError()))
    await worker.claim()
    await wait_until(finished(store, run_id))
    assert store.runs[run_id].error == {"message": "KeyError", "error_type": "KeyError"}
    assert error_info(RuntimeError("x")) == {"message": "x", "error_type": "RuntimeError"}


async def test_a_run_past_its_timeout_fails(
    worker: Worker, store: MemoryStore, tasks: Tasks
) -> None:
    run_id, _ = tasks.add(store, blocking(asyncio.Event()), timeout=0.02)
    await worker.claim()
    await wait_until(finished(store, run_id))
    assert store.status(run_id) == Status.FAILED
    assert store.runs[run_id].error == {"message": "TimeoutError", "error_type": "TimeoutError"}


@pytest.mark.parametrize(
    "value",
    [{1, 2}, object(), b"bytes", {"x": float("nan")}, float("inf")],
    ids=["set", "object", "bytes", "nan", "inf"],
)
async def test_a_result_that_is_not_json_fails_with_a_type_error(
    worker: Worker, store: MemoryStore, tasks: Tasks, value: Any
) -> None:
    run_id, _ = tasks.add(store, returning(value))
    await worker.claim()
    await wait_until(lambda: not worker.running)
    assert store.status(run_id) == Status.FAILED
    error = store.runs[run_id].error
    assert error is not None and error["error_type"] == "TypeError"
    assert error["message"].startswith("process() returned a value that is not JSON")
    assert [f.status for f in store.finishes] == [Status.FAILED]


async def test_the_result_of_an_ordinary_json_value_is_kept(
    worker: Worker, store: MemoryStore, tasks: Tasks
) -> None:
    value = {"list": [1, 2.5, None, True], "nested": {"s": "é"}, "pi": math.pi}
    run_id, _ = tasks.add(store, returning(value))
    await worker.claim()
    await wait_until(finished(store, run_id))
    assert store.runs[run_id].final_value == value


async def test_an_unknown_task_fails_without_running(
    worker: Worker, store: MemoryStore, tasks: Tasks
) -> None:
    run_id = store.add(key(404))
    await worker.claim()
    await wait_until(finished(store, run_id))
    assert store.status(run_id) == Status.FAILED
    assert store.runs[run_id].error == {
        "message": "no task tests/FakeTask/404",
        "error_type": "TaskNotFound",
    }
    assert tasks.loads == [key(404)]


async def test_an_unknown_task_fails_with_the_cause_it_names(
    worker: Worker, store: MemoryStore, tasks: Tasks
) -> None:
    class DoesNotExist(Exception):
        pass

    async def load(task: TaskKey) -> Runnable:
        raise TaskNotFound("gone") from DoesNotExist("Model matching query does not exist.")

    worker.loader = load
    run_id = store.add(key(405))
    await worker.claim()
    await wait_until(finished(store, run_id))
    assert store.runs[run_id].error == {
        "message": "Model matching query does not exist.",
        "error_type": "DoesNotExist",
    }


async def test_runs_failed_by_the_claim_are_counted(
    worker: Worker, store: MemoryStore, tasks: Tasks
) -> None:
    used_up = store.add(key(1), max_attempts=1)
    run = store.runs[used_up]
    run.status, run.attempt, run.owner = Status.RUNNING, 1, "crashed-worker"
    run.lease_expires = time.monotonic() - 1  # its one attempt's lease expired
    run_id, _ = tasks.add(store, returning("ok"))
    assert await worker.claim()
    assert store.status(used_up) == Status.FAILED
    await wait_until(finished(store, run_id))
    assert store.claims == [run_id]
    assert worker.counts["failed"] == 1 and worker.counts["completed"] == 1


async def test_a_claim_with_cancel_requested_is_cancelled_without_running(
    worker: Worker, store: MemoryStore, tasks: Tasks
) -> None:
    run_id, task = tasks.add(store, returning(1), cancel_requested=True)
    assert await worker.claim()
    await wait_until(finished(store, run_id))
    assert store.status(run_id) == Status.CANCELLED
    assert store.runs[run_id].error == CANCELLED_ERROR
    assert task.calls == 0 and tasks.loads == []
    assert worker.counts["cancelled"] == 1


async def test_a_fenced_finish_counts_as_a_lost_lease(
    worker: Worker, store: MemoryStore, tasks: Tasks
) -> None:
    gate = asyncio.Event()
    run_id, _ = tasks.add(store, blocking(gate, "late"))
    await worker.claim()
    await settle()
    store.take_over(run_id)  # another worker took it over meanwhile
    gate.set()
    await wait_until(lambda: not worker.running)
    assert [f.seq for f in store.finishes] == [None]
    assert store.status(run_id) == Status.RUNNING  # the other attempt's to finish
    assert worker.counts["lease_lost"] == 1 and worker.counts["completed"] == 0


async def test_lease_lost_raised_by_the_task_writes_nothing(
    worker: Worker, store: MemoryStore, tasks: Tasks
) -> None:
    tasks.add(store, raising(LeaseLost("gone")))
    await worker.claim()
    await wait_until(lambda: not worker.running)
    assert store.finishes == [] and worker.counts["lease_lost"] == 1


async def test_a_finish_is_retried_through_an_outage(
    worker: Worker, store: MemoryStore, tasks: Tasks
) -> None:
    run_id, _ = tasks.add(store, returning("ok"))
    store.finish_failures.fail(1)
    await worker.claim()
    await wait_until(finished(store, run_id))
    assert store.status(run_id) == Status.COMPLETED
    assert len(store.finishes) == 1  # the failed call never reached the row


async def test_a_finish_whose_reply_was_lost_is_not_taken_for_a_lost_lease(
    worker: Worker, store: MemoryStore, tasks: Tasks
) -> None:
    run_id, _ = tasks.add(store, returning("ok"))
    store.finish_lost_acks.fail(1)  # written, but the reply never arrived: retried
    await worker.claim()
    await wait_until(lambda: not worker.running)
    assert store.status(run_id) == Status.COMPLETED
    seqs = [f.seq for f in store.finishes]
    assert len(seqs) == 2 and seqs[0] == seqs[1] is not None  # the same seq: written once
    assert worker.counts["completed"] == 1 and worker.counts["lease_lost"] == 0


async def test_a_finish_made_inside_process_is_not_repeated(
    worker: Worker, store: MemoryStore, tasks: Tasks
) -> None:
    async def body() -> str:
        ctx = context.current()
        assert ctx is not None
        await worker.finish(ctx, Status.COMPLETED, "early")
        return "late"

    tasks.add(store, body)
    await worker.claim()
    await wait_until(lambda: not worker.running)
    assert [f.final_value for f in store.finishes] == ["early"]
    assert worker.counts["completed"] == 1 and worker.counts["lease_lost"] == 0


# -- the run's context -------------------------------------------------------------------


async def test_process_runs_under_its_run_context(
    worker: Worker, store: MemoryStore, tasks: Tasks
) -> None:
    seen: list[RunContext | None] = []

    async def child() -> None:
        seen.append(context.current())

    async def body() -> None:
        seen.append(context.current())
        await asyncio.create_task(child())

    run_id, _ = tasks.add(store, body, timeout=9.0)
    assert context.current() is None
    await worker.claim()
    await wait_until(finished(store, run_id))
    ctx = seen[0]
    assert ctx is not None and seen[1] is ctx
    assert (ctx.run_id, ctx.attempt, ctx.key, ctx.timeout) == (run_id, 1, key(run_id), 9.0)
    assert ctx.finished
    assert ctx.append is worker.append  # the worker's appender, for send_event
    assert context.current() is None


async def test_the_run_context_is_unset_after_a_failing_process(
    worker: Worker, store: MemoryStore, tasks: Tasks
) -> None:
    seen: list[RunContext | None] = []

    async def body() -> None:
        seen.append(context.current())
        raise RuntimeError("boom")

    run_id, _ = tasks.add(store, body)
    await worker.claim()
    await wait_until(lambda: not worker.running)
    assert seen[0] is not None and seen[0].run_id == run_id
    assert store.status(run_id) == Status.FAILED
    assert context.current() is None


async def test_events_sent_from_process_carry_the_run_and_attempt(
    store: MemoryStore, tasks: Tasks
) -> None:
    appender = FakeAppender()
    worker = Worker(store, appender, tasks.load, SETTINGS, owner="me")

    async def body() -> list[int | None]:
        ctx = context.current()
        assert ctx is not None
        return [await ctx.append(Append(ctx.run_id, ctx.attempt, "step", "{}")) for _ in "ab"]

    run_id, _ = tasks.add(store, body)
    store.runs[run_id].attempt = 1
    store.runs[run_id].releases = 1  # released once: this claim is its attempt 2
    await worker.claim()
    await wait_until(finished(store, run_id))
    assert store.runs[run_id].final_value == [1, 2]
    assert [(i.run_id, i.attempt, i.event_type) for i in appender.items] == [
        (run_id, 2, "step"),
        (run_id, 2, "step"),
    ]
    await worker.shutdown(0)


# -- stopping ----------------------------------------------------------------------------


@pytest.mark.parametrize("calls", [1, 3, 10])
async def test_stop_local_cancels_exactly_once(
    worker: Worker, store: MemoryStore, tasks: Tasks, calls: int
) -> None:
    run_id, task = tasks.add(store, blocking(asyncio.Event()))
    await worker.claim()
    await wait_until(lambda: task.calls == 1)
    store.finish_gate = asyncio.Event()

    async def stop() -> bool:
        await asyncio.sleep(0)
        return worker.stop_local(run_id, "cancelled")

    first = await asyncio.gather(*(stop() for _ in range(calls)))
    assert all(first)
    await wait_until(lambda: store.finishing == 1)  # the cancelled write is in flight
    during = [worker.stop_local(run_id, "cancelled") for _ in range(calls)]
    store.finish_gate.set()
    await wait_until(finished(store, run_id))
    assert not any(during)
    assert [(f.status, f.error) for f in store.finishes] == [(Status.CANCELLED, CANCELLED_ERROR)]
    assert store.status(run_id) == Status.CANCELLED
    assert worker.counts["cancelled"] == 1 and not task.done
    await wait_until(lambda: not worker.running)


async def test_stop_local_of_a_run_not_held_here_is_false(worker: Worker) -> None:
    assert not worker.stop_local(12345, "cancelled")


async def test_a_run_stopped_right_after_its_claim_is_cancelled(
    worker: Worker, store: MemoryStore, tasks: Tasks
) -> None:
    # E.g. a cancel notification handled in the same turn of the loop as the claim.
    run_id, task = tasks.add(store, blocking(asyncio.Event()))
    assert await worker.claim()
    assert worker.stop_local(run_id, "cancelled")
    await wait_until(lambda: not worker.running, timeout=0.2)
    assert store.status(run_id) == Status.CANCELLED
    assert task.calls == 0


async def test_a_run_stopped_while_its_task_loads_is_cancelled(
    worker: Worker, store: MemoryStore, tasks: Tasks
) -> None:
    tasks.gate = asyncio.Event()
    run_id, task = tasks.add(store, blocking(asyncio.Event()))
    await worker.claim()
    await wait_until(lambda: bool(tasks.loads))  # the loader is reading the task's row
    assert worker.stop_local(run_id, "cancelled")
    await wait_until(lambda: not worker.running, timeout=0.2)
    assert store.status(run_id) == Status.CANCELLED
    assert task.calls == 0


async def test_heartbeat_renews_the_leases_held(
    worker: Worker, store: MemoryStore, tasks: Tasks
) -> None:
    gate = asyncio.Event()
    runs = [tasks.add(store, blocking(gate))[0] for _ in range(2)]
    for _ in runs:
        await worker.claim()
    await settle()
    before = {r: store.runs[r].lease_expires for r in runs}
    await asyncio.sleep(0.01)
    await worker.heartbeat()
    assert sorted(store.heartbeats[-1]) == [(r, 1) for r in runs]
    for r in runs:
        after, was = store.runs[r].lease_expires, before[r]
        assert after is not None and was is not None and after > was
    assert all(worker.running[r].stop_reason is None for r in runs)
    gate.set()
    await wait_until(lambda: all(store.status(r) == Status.COMPLETED for r in runs))


async def test_heartbeat_stops_a_run_whose_lease_is_gone_or_cancelled(
    worker: Worker, store: MemoryStore, tasks: Tasks
) -> None:
    gate = asyncio.Event()
    lost, cancelled, kept = (tasks.add(store, blocking(gate, "done"))[0] for _ in range(3))
    for _ in range(3):
        await worker.claim()
    await settle()
    store.take_over(lost)
    store.request_cancel(cancelled)
    await worker.heartbeat()
    await wait_until(lambda: set(worker.running) == {kept})
    assert store.finished_with(lost) == []  # lease lost: nothing written for it
    assert worker.counts["lease_lost"] == 1
    assert store.status(cancelled) == Status.CANCELLED
    assert store.runs[cancelled].error == CANCELLED_ERROR
    assert store.status(kept) == Status.RUNNING
    gate.set()
    await wait_until(finished(store, kept))
    assert store.status(kept) == Status.COMPLETED
    assert worker.counts == {**worker.counts, "completed": 1, "cancelled": 1, "lease_lost": 1}


async def test_the_heartbeat_loop_renews_on_its_own(store: MemoryStore, tasks: Tasks) -> None:
    settings = WorkerSettings(
        lease_ttl=1.0,
        heartbeat_interval=0.01,
        concurrency=2,
        poll_interval=0.02,
        finish_retry_for=0.5,
    )
    worker = Worker(store, FakeAppender(), tasks.load, settings, owner="me")
    run_id, _ = tasks.add(store, blocking(asyncio.Event()))
    await worker.claim()
    await wait_until(lambda: len(store.heartbeats) >= 2)
    assert store.heartbeats[0] == [(run_id, 1)]
    store.request_cancel(run_id)
    await wait_until(finished(store, run_id))
    assert store.status(run_id) == Status.CANCELLED
    await worker.shutdown(0)


async def test_a_heartbeat_with_nothing_held_asks_nothing(
    worker: Worker, store: MemoryStore
) -> None:
    await worker.heartbeat()
    assert store.heartbeats == []


# -- shutting down -----------------------------------------------------------------------


async def test_shutdown_lets_quick_tasks_finish_and_releases_slow_ones(
    store: MemoryStore, tasks: Tasks
) -> None:
    async def quick() -> str:
        await asyncio.sleep(0.01)
        return "quick"

    worker = Worker(store, FakeAppender(), tasks.load, SETTINGS, owner="me")
    fast, _ = tasks.add(store, quick)
    slow, slow_task = tasks.add(store, blocking(asyncio.Event()))
    worker.start()
    await wait_until(lambda: slow_task.calls == 1)
    await worker.shutdown(0.1)
    assert store.status(fast) == Status.COMPLETED
    assert store.status(slow) == Status.PENDING  # claimable again, at once
    assert store.releases == [(slow, 1)]
    assert store.finished_with(slow) == []
    assert worker.counts["released"] == 1 and worker.counts["completed"] == 1
    assert not worker.running and not worker.claiming
    extra = store.add(key(999))
    await asyncio.sleep(0.05)  # several poll intervals: a stopped worker claims nothing
    assert store.status(extra) == Status.PENDING


async def test_a_released_run_is_claimed_again_as_its_next_attempt(
    store: MemoryStore, tasks: Tasks
) -> None:
    gate = asyncio.Event()
    run_id, task = tasks.add(store, blocking(gate, "second time"))
    first = Worker(store, FakeAppender(), tasks.load, SETTINGS, owner="first")
    await first.claim()
    await wait_until(lambda: task.calls == 1)
    await first.shutdown(0.01)
    second = Worker(store, FakeAppender(), tasks.load, SETTINGS, owner="second")
    assert await second.claim()
    gate.set()
    await wait_until(finished(store, run_id))
    assert store.finishes[-1].attempt == 2 and second.counts["reclaimed"] == 1
    assert store.status(run_id) == Status.COMPLETED
    await second.shutdown(0)


async def test_a_cancel_during_the_shutdown_release_does_not_interrupt_it(
    store: MemoryStore, tasks: Tasks
) -> None:
    worker = Worker(store, FakeAppender(), tasks.load, SETTINGS, owner="me")
    run_id, task = tasks.add(store, blocking(asyncio.Event()))
    await worker.claim()
    await wait_until(lambda: task.calls == 1)
    held = worker.running[run_id].task
    assert held is not None
    store.release_gate = asyncio.Event()
    assert worker.stop_local(run_id, "shutdown")
    await wait_until(lambda: bool(store.releases))  # the release is in flight
    assert worker.stop_local(run_id, "cancelled")  # held still, but not stopped twice
    store.release_gate.set()
    await wait_until(held.done)
    assert not held.cancelled()
    assert store.status(run_id) == Status.PENDING and store.finishes == []
    assert worker.counts["released"] == 1
    await worker.shutdown(0)
