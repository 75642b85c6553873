"""Worker faults for real: kill -9, SIGSTOP past the lease, attempts used up.

Every scenario runs real ``manage.py`` processes on the test database with a 2 s lease, and
checks the log in SQL and what a client following through a server that is not harmed saw.
"""

from __future__ import annotations

import random
import signal
from collections.abc import Callable
from datetime import datetime

import httpx
import pytest

from tests import faults
from tests.faults import FAST_LEASES, Follower, Row, wait_until
from tests.models import ScriptedTask
from tests.support import ManagedProcess

pytestmark = pytest.mark.django_db(transaction=True)

TICKS = 4
DELAY = 0.4  # before each tick: the window in which a kill lands "between events"


def kill_at(point: str, task: ScriptedTask, victim: ManagedProcess, k: int = 1) -> None:
    """Kill -9 ``victim`` while it runs ``task``, at ``point`` of its run."""
    if point == "before_first":
        victim.kill()
    elif point == "between":
        wait_until(lambda: faults.run_of(task).last_seq >= k, 20, f"tick {k}")
        victim.kill()
    elif point == "after_last":
        # Hold the run row so that the last tick's append blocks; kill the worker while it
        # waits; let go. The append, already sent, commits without anybody to hear it.
        wait_until(lambda: faults.run_of(task).last_seq >= TICKS - 1, 20, "the tick before last")
        with faults.run_row_locked(task):
            wait_until(lambda: faults.an_append_is_blocked(), 20, "the last append to block")
            victim.kill()
    else:
        raise ValueError(point)


def check_reclaimed_run(
    task: ScriptedTask, follower: Follower, lease_expired_at: datetime
) -> list[Row]:
    """The log after one kill: attempt 1's prefix, retry, a whole attempt 2, end."""
    follower.finish()
    faults.assert_gap_free(task)
    rows = faults.log_of(task)
    first = [r for r in rows if r.attempt == 1]
    assert all(r.event_type == "tick" for r in first)
    assert faults.tick_numbers(rows, 1) == list(range(1, len(first) + 1))
    retry = rows[len(first)]
    assert (retry.event_type, retry.attempt, retry.data["attempt"]) == ("retry", 2, 2)
    assert faults.tick_numbers(rows, 2) == list(range(1, TICKS + 1))
    assert (rows[-1].event_type, rows[-1].data["status"]) == ("end", "completed")
    faults.same_as_log(follower.events, rows)
    run = faults.run_of(task)
    assert (run.status, run.attempt) == ("completed", 2)
    created = faults.created_at(task, retry.seq)
    assert created >= lease_expired_at, "reclaimed before the dead worker's lease expired"
    return first


@pytest.mark.parametrize("point", ["before_first", "between", "after_last"])
def test_a_killed_workers_task_is_reclaimed_and_rerun_from_the_start(
    point: str,
    server_factory: Callable[..., ManagedProcess],
    worker_factory: Callable[..., ManagedProcess],
) -> None:
    front = server_factory("--no-worker", **FAST_LEASES)
    victim = worker_factory(**FAST_LEASES)
    task = ScriptedTask.objects.create(ticks=TICKS, delay=DELAY)
    follower = Follower(front.url, task)
    follower.start()  # its GET queues the task, from seq 1
    wait_until(lambda: faults.run_of(task).owner_pid == victim.proc.pid, 20, "the claim")

    kill_at(point, task, victim, k=random.randint(1, TICKS - 1))
    lease_expired_at = faults.lease_expires_at(task)
    rescuer = server_factory(**FAST_LEASES)

    first = check_reclaimed_run(task, follower, lease_expired_at)
    expected = {"before_first": [0], "between": range(1, TICKS), "after_last": [TICKS]}[point]
    assert len(first) in expected
    counters = faults.metrics(rescuer.url)
    assert counters["streaming_worker_tasks_claimed_total"] == 1
    assert counters["streaming_worker_tasks_reclaimed_total"] == 1
    assert counters["streaming_worker_tasks_completed_total"] == 1


@pytest.mark.slow
def test_random_kills_over_many_trials(
    server_factory: Callable[..., ManagedProcess], worker_factory: Callable[..., ManagedProcess]
) -> None:
    """Ten trials, each killing whichever worker holds the task at a random point."""
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    front = server_factory("--no-worker", **FAST_LEASES)
    workers = [worker_factory(**FAST_LEASES), worker_factory(**FAST_LEASES)]
    for trial in range(10):
        point = rng.choice(["before_first", "between", "after_last"])
        task = ScriptedTask.objects.create(ticks=TICKS, delay=DELAY)
        follower = Follower(front.url, task)
        follower.start()
        # mypy cannot type a lambda with a default argument (python/mypy#15459)
        owner = wait_until(lambda t=task: faults.run_of(t).owner_pid, 20, "the claim")  # type: ignore[misc]
        victim = next(w for w in workers if w.proc.pid == owner)
        kill_at(point, task, victim, k=rng.randint(1, TICKS - 1))
        lease_expired_at = faults.lease_expires_at(task)
        workers.remove(victim)
        workers.append(worker_factory(**FAST_LEASES))
        try:
            check_reclaimed_run(task, follower, lease_expired_at)
        except AssertionError as exc:
            raise AssertionError(f"trial {trial} ({point}, seed {seed}): {exc}") from exc


def test_a_worker_paused_past_its_lease_writes_nothing_after_the_takeover(
    server_factory: Callable[..., ManagedProcess], worker_factory: Callable[..., ManagedProcess]
) -> None:
    front = server_factory("--no-worker", **FAST_LEASES)
    paused = server_factory(**FAST_LEASES)
    task = ScriptedTask.objects.create(ticks=40, delay=0.05)
    follower = Follower(front.url, task)
    follower.start()
    wait_until(lambda: faults.run_of(task).last_seq >= 5, 20, "five ticks")
    paused.signal(signal.SIGSTOP)
    try:
        rescuer = worker_factory(**FAST_LEASES)
        wait_until(lambda: faults.run_of(task).attempt == 2, 20, "the takeover")
        wait_until(lambda: faults.run_of(task).last_seq >= 15, 20, "attempt 2 to go on")
    finally:
        paused.signal(signal.SIGCONT)
    # The resumed worker notices at its next heartbeat (or its next fenced append).
    wait_until(
        lambda: faults.metrics(paused.url)["streaming_worker_tasks_lease_lost_total"] == 1,
        10,
        "the paused worker to notice it lost the lease",
    )
    follower.finish()
    faults.assert_gap_free(task)
    rows = faults.log_of(task)
    retry = next(r for r in rows if r.event_type == "retry")
    assert retry.attempt == 2
    assert [r for r in rows if r.attempt == 1 and r.seq > retry.seq] == []
    assert faults.tick_numbers(rows, 2) == list(range(1, 41))
    assert rows[-1].event_type == "end" and rows[-1].attempt == 2
    faults.same_as_log(follower.events, rows)
    assert faults.metrics(paused.url)["streaming_worker_running_tasks"] == 0
    assert "lease lost" in paused.log()
    assert rescuer.proc.poll() is None


def test_a_worker_that_retakes_its_own_expired_run_keeps_the_new_attempt(
    server_factory: Callable[..., ManagedProcess],
) -> None:
    """A lease that expired while the heartbeat was late, and no other worker around.

    The worker is paused right after a renewal and its lease is expired by hand, as a late
    heartbeat would leave it; on waking, its claim loop (every 0.2 s) is due long before its
    heartbeat (every 1.5 s), so attempt 2 starts in the process that still runs attempt 1.
    Attempt 1 must stop without taking attempt 2 down with it.
    """
    server = server_factory(**{**FAST_LEASES, "STREAMING_HEARTBEAT_INTERVAL": "1.5"})
    task = ScriptedTask.objects.create(ticks=40, delay=0.05)
    follower = Follower(server.url, task)
    follower.start()
    wait_until(lambda: faults.run_of(task).last_seq >= 1, 20, "the first tick")
    renewed = faults.lease_expires_at(task)
    wait_until(lambda: faults.lease_expires_at(task) != renewed, 5, "a renewal", interval=0.005)
    server.signal(signal.SIGSTOP)
    try:
        faults.expire_lease(task)
    finally:
        server.signal(signal.SIGCONT)
    follower.finish()
    faults.assert_gap_free(task)
    rows = faults.log_of(task)
    run = faults.run_of(task)
    assert (run.status, run.attempt) == ("completed", 2)
    assert [r.event_type for r in rows].count("retry") == 1
    assert faults.tick_numbers(rows, 2) == list(range(1, 41))
    faults.same_as_log(follower.events, rows)
    counters = faults.metrics(server.url)
    assert counters["streaming_worker_tasks_lease_lost_total"] == 1
    assert counters["streaming_worker_tasks_reclaimed_total"] == 1
    assert counters["streaming_worker_running_tasks"] == 0


def test_when_attempts_are_used_up_the_task_fails_with_error_and_end(
    server_factory: Callable[..., ManagedProcess], worker_factory: Callable[..., ManagedProcess]
) -> None:
    env = {**FAST_LEASES, "STREAMING_MAX_ATTEMPTS": "1"}
    front = server_factory("--no-worker", **env)  # its GET queues the task: max_attempts 1
    victim = worker_factory(**env)
    task = ScriptedTask.objects.create(ticks=20, delay=0.1)
    follower = Follower(front.url, task)
    follower.start()
    wait_until(lambda: faults.run_of(task).last_seq >= 2, 20, "two ticks")
    victim.kill()
    rescuer = server_factory(**env)
    events = follower.finish()
    assert [e.event for e in events][-2:] == ["error", "end"]
    assert events[-2].data["error_type"] == "LeaseExpired"
    assert events[-1].data["status"] == "failed"
    run = faults.run_of(task)
    assert run.status == "failed" and run.error is not None
    assert run.error["error_type"] == "LeaseExpired"
    faults.assert_gap_free(task)
    faults.same_as_log(events, faults.log_of(task))
    assert "retry" not in [e.event for e in events]
    task.refresh_from_db()
    assert task.status == "failed" and task.completed_at is not None
    assert faults.metrics(rescuer.url)["streaming_worker_tasks_claimed_total"] == 0


@pytest.mark.slow
def test_three_kills_use_up_three_attempts(
    server_factory: Callable[..., ManagedProcess], worker_factory: Callable[..., ManagedProcess]
) -> None:
    front = server_factory("--no-worker", **FAST_LEASES)
    task = ScriptedTask.objects.create(ticks=50, delay=0.05)
    follower = Follower(front.url, task)
    follower.start()
    for attempt in (1, 2, 3):
        worker = worker_factory(**FAST_LEASES)
        # mypy cannot type a lambda with a default argument (python/mypy#15459)
        wait_until(lambda a=attempt: faults.run_of(task).attempt == a, 20, f"attempt {attempt}")  # type: ignore[misc]
        pid = worker.proc.pid
        # mypy cannot type a lambda with a default argument (python/mypy#15459)
        wait_until(lambda p=pid: faults.run_of(task).owner_pid == p, 5, "its claim")  # type: ignore[misc]
        worker.kill()
    worker_factory(**FAST_LEASES)
    events = follower.finish()
    assert [e.event for e in events].count("retry") == 2
    assert [e.event for e in events][-2:] == ["error", "end"]
    assert faults.run_of(task).status == "failed"
    faults.same_as_log(events, faults.log_of(task))


def test_a_queued_task_whose_row_was_deleted_fails_at_once(
    server_factory: Callable[..., ManagedProcess], worker_factory: Callable[..., ManagedProcess]
) -> None:
    front = server_factory("--no-worker", **FAST_LEASES)
    resp = httpx.post(front.url + "/tasks/tests/ScriptedTask", json={"ticks": 3})
    assert resp.status_code == 201
    task = ScriptedTask.objects.get(pk=resp.json()["id"])
    ScriptedTask.objects.filter(pk=task.pk).delete()  # the run stays queued
    worker_factory(**FAST_LEASES)
    wait_until(lambda: faults.run_of(task).status == "failed", 10, "the run to fail")
    run = faults.run_of(task)
    assert run.attempt == 1, "failed on its first attempt, not after leases expired"
    assert run.error is not None and run.error["error_type"] == "DoesNotExist"
    assert [r.event_type for r in faults.log_of(task)] == ["error", "end"]
