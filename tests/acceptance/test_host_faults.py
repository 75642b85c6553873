"""Host faults for real: a server killed under its clients, a client that stops reading,
cancels and signals that cross hosts, graceful and impatient shutdowns."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from streaming.coordinator import coordinator
from tests import faults
from tests.faults import FAST_LEASES, Follower, wait_until
from tests.models import ScriptedTask, TimeoutTask
from tests.support import ManagedProcess, read_stream

pytestmark = pytest.mark.django_db(transaction=True)
SSE = {"Accept": "text/event-stream"}


def create_on(server: ManagedProcess, **fields: Any) -> ScriptedTask:
    """Create a task through ``server`` (which claims it when it has a worker)."""
    resp = httpx.post(server.url + "/tasks/tests/ScriptedTask", json=fields)
    assert resp.status_code == 201, resp.text
    return ScriptedTask.objects.get(pk=resp.json()["id"])


def test_clients_of_a_killed_server_resume_on_the_other_and_miss_nothing(
    server_factory: Callable[..., ManagedProcess],
) -> None:
    servers = [server_factory(**FAST_LEASES), server_factory(**FAST_LEASES)]
    task = create_on(servers[0], ticks=40, delay=0.05)
    owner = wait_until(lambda: faults.run_of(task).owner_pid, 10, "the claim")
    # The server that runs the task dies too: its clients' resume also waits for a reclaim.
    doomed, other = sorted(servers, key=lambda s: s.proc.pid != owner)
    clients = [Follower([doomed.url, other.url], task, name=f"c{i}") for i in range(3)]
    for c in clients:
        c.start()
    wait_until(lambda: all(len(c.events) >= 5 for c in clients), 20, "five events each")
    doomed.kill()
    rows: list[faults.Row] = []
    for c in clients:
        c.finish()
        assert c.hops[:2] == [doomed.url, other.url]
        rows = rows or faults.log_of(task)
        faults.same_as_log(c.events, rows)
    faults.assert_gap_free(task)
    run = faults.run_of(task)
    assert (run.status, run.attempt) == ("completed", 2)  # the other server reclaimed it
    assert faults.tick_numbers(rows, 2) == list(range(1, 41))


def test_a_client_that_stops_reading_delays_nobody_and_catches_up(
    server_factory: Callable[..., ManagedProcess],
) -> None:
    # A small per-subscriber buffer: the slow client's overflows, and it must then catch up
    # from the log rather than hold the events (or anybody else) up.
    server = server_factory("--no-worker", STREAMING_SUBSCRIBER_BUFFER="16")
    worker = server_factory()
    # 200 events of 64 KiB: far more than the socket buffers between server and client.
    task = ScriptedTask.objects.create(ticks=200, payload_size=65536)
    slow = faults.RawStream(server.url, f"/stream/tests/ScriptedTask/{task.pk}")
    try:
        wait_until(lambda: faults.run_of(task).status != "absent", 10, "the slow GET to queue it")
        fast = [Follower(server.url, task, name=f"fast{i}") for i in range(2)]
        for f in fast:
            f.start()
        for f in fast:
            f.finish()
        wait_until(lambda: faults.run_of(task).status == "completed", 20, "the task to finish")
        # The slow client's stream is still open: it is behind, and nobody waited for it.
        assert faults.metrics(server.url)["streaming_connected_clients"] == 1
        rows = faults.log_of(task)
        assert len(rows) == 201
        for f in fast:
            faults.same_as_log(f.events, rows)
        events = slow.read_all()
    finally:
        slow.close()
    assert [(e.id, e.event) for e in events] == [(r.seq, r.event_type) for r in rows]
    assert all(len(e.data.get("pad", "")) == 65536 for e in events[:-1])
    wait_until(
        lambda: faults.metrics(server.url)["streaming_connected_clients"] == 0, 5, "no clients"
    )
    assert faults.metrics(worker.url)["streaming_worker_tasks_completed_total"] == 1


def test_cancel_on_one_server_stops_the_task_on_another(
    server_factory: Callable[..., ManagedProcess],
) -> None:
    runner, front = server_factory(), server_factory("--no-worker")
    task = create_on(runner, ticks=1000, delay=0.05)
    follower = Follower(front.url, task)
    follower.start()
    wait_until(lambda: len(follower.events) >= 3, 20, "three events")
    assert faults.run_of(task).owner_pid == runner.proc.pid
    resp = httpx.post(f"{front.url}/tasks/tests/ScriptedTask/{task.pk}/cancel")
    assert resp.status_code == 202
    events = follower.finish()
    assert [e.event for e in events][-2:] == ["cancelled", "end"]
    assert events[-1].data["status"] == "cancelled"
    assert faults.run_of(task).status == "cancelled"
    faults.same_as_log(events, faults.log_of(task))
    assert faults.metrics(runner.url)["streaming_worker_tasks_cancelled_total"] == 1
    task.refresh_from_db()
    assert task.status == "cancelled"


async def test_acancel_from_a_process_without_a_worker(
    server_factory: Callable[..., ManagedProcess], rt: Any
) -> None:
    """``task.acancel()`` here (a third host) reaches the worker through NOTIFY."""
    from asgiref.sync import sync_to_async

    runner = await sync_to_async(server_factory)()
    task = await ScriptedTask.objects.acreate(ticks=1000, delay=0.05)
    await coordinator.enqueue(task)  # queued for any worker; this process has none running
    await sync_to_async(wait_until)(
        lambda: faults.run_of(task).last_seq >= 2, 20, "the runner to start it"
    )
    assert await task.acancel() is True
    await sync_to_async(wait_until)(
        lambda: faults.run_of(task).status == "cancelled", 10, "the cancel to land"
    )
    rows = await sync_to_async(faults.log_of)(task)
    assert [r.event_type for r in rows][-2:] == ["cancelled", "end"]
    assert not rt.worker.running
    assert faults.run_of(task).owner_pid is None
    assert faults.metrics(runner.url)["streaming_worker_tasks_cancelled_total"] == 1


def test_a_task_past_its_timeout_fails_with_a_timeout_error(
    server_factory: Callable[..., ManagedProcess],
) -> None:
    server = server_factory()
    task = TimeoutTask.objects.create(sleep_for=5.0)
    _, events = read_stream(f"{server.url}/stream/tests/TimeoutTask/{task.pk}", headers=SSE)
    assert [e.event for e in events] == ["start", "error", "end"]
    assert events[1].data["error_type"] == "TimeoutError"
    assert events[2].data["status"] == "failed"
    assert faults.metrics(server.url)["streaming_worker_tasks_failed_total"] == 1


def test_sigterm_releases_the_run_ends_streams_and_exits(
    server_factory: Callable[..., ManagedProcess], worker_factory: Callable[..., ManagedProcess]
) -> None:
    stopping = server_factory("--grace", "1")  # lease TTL stays at its 30 s default
    task = create_on(stopping, ticks=1000, delay=0.05)
    wait_until(lambda: faults.run_of(task).owner_pid == stopping.proc.pid, 10, "the claim")
    other = worker_factory("--grace", "0")
    reader = faults.Reader(f"{stopping.url}/stream/tests/ScriptedTask/{task.pk}")
    reader.start()  # a plain client on the stopping server, without reconnects
    wait_until(
        lambda: faults.metrics(stopping.url)["streaming_connected_clients"] == 1, 10, "the GET"
    )
    stopping.signal(signal.SIGTERM)
    wait_until(lambda: "shutting down" in stopping.log(), 10, "the signal to land")
    with pytest.raises(httpx.ConnectError):  # new clients go elsewhere at once
        httpx.get(stopping.url + "/health")
    reader.join(10)
    assert not reader.is_alive() and reader.error is None, repr(reader.error)
    assert reader.events and reader.events[-1].event == "tick"  # ended early, not by "end"
    assert stopping.proc.wait(10) == 0
    # Released, not expired: the other worker claims it long before the 30 s lease would end.
    wait_until(lambda: faults.run_of(task).attempt == 2, 10, "the other worker's claim")
    assert faults.run_of(task).owner_pid == other.proc.pid
    assert faults.run_column(task, "releases") == 1
    assert "Cancel 1 running task" not in stopping.log()  # uvicorn had nothing left to cut


def test_a_second_signal_exits_at_once(
    server_factory: Callable[..., ManagedProcess], worker_factory: Callable[..., ManagedProcess]
) -> None:
    impatient = server_factory("--grace", "60", **FAST_LEASES)
    task = create_on(impatient, ticks=100, delay=0.05)
    wait_until(lambda: faults.run_of(task).owner_pid == impatient.proc.pid, 10, "the claim")
    impatient.signal(signal.SIGINT)
    wait_until(lambda: "shutting down" in impatient.log(), 10, "the first signal to land")
    impatient.signal(signal.SIGINT)
    try:
        code = impatient.proc.wait(5)
    except subprocess.TimeoutExpired:
        pytest.fail("a second signal did not end the process")
    assert code != 0
    worker_factory(**FAST_LEASES)  # the run was not released: reclaimed when the lease ends
    wait_until(lambda: faults.run_of(task).status == "completed", 30, "the reclaimed run")
    assert faults.run_of(task).attempt == 2


def test_a_worker_only_process_releases_its_run_on_sigterm(
    server_factory: Callable[..., ManagedProcess], worker_factory: Callable[..., ManagedProcess]
) -> None:
    front = server_factory("--no-worker")
    leaving = worker_factory("--grace", "0.2")
    task = create_on(front, ticks=1000, delay=0.05)
    wait_until(lambda: faults.run_of(task).owner_pid == leaving.proc.pid, 10, "the claim")
    follower = Follower(front.url, task)
    follower.start()
    wait_until(lambda: len(follower.events) >= 3, 10, "three events")
    leaving.signal(signal.SIGTERM)
    assert leaving.proc.wait(10) == 0
    assert faults.run_of(task).status == "pending"  # handed back, not left to expire
    staying = worker_factory("--grace", "0")
    wait_until(lambda: faults.run_of(task).owner_pid == staying.proc.pid, 10, "the reclaim")
    assert httpx.post(f"{front.url}/tasks/tests/ScriptedTask/{task.pk}/cancel").status_code == 202
    events = follower.finish()
    faults.same_as_log(events, faults.log_of(task))
    retry = next(e for e in events if e.event == "retry")
    assert retry.data["attempt"] == 2
    assert [e.event for e in events][-2:] == ["cancelled", "end"]


def test_clients_joining_while_a_notification_is_in_flight_never_stall_the_others(
    server_factory: Callable[..., ManagedProcess],
) -> None:
    """A joiner reads the log between a commit and its NOTIFY (held back 0.2 s here).

    The rows it read then count as fetched for the whole task, so the NOTIFY hands them to
    nobody: the clients already waiting must still get them, the final ``end`` included.
    """
    front = server_factory("--no-worker")
    server_factory(STREAMING_NOTIFY_DELAY="0.2")  # the worker
    task = ScriptedTask.objects.create(ticks=8, delay=0.3)
    url = f"{front.url}/stream/tests/ScriptedTask/{task.pk}"
    waiting = faults.Reader(url)  # one plain GET; it would hang on a missed end
    waiting.start()
    joined = 0
    while faults.run_of(task).status != "completed":
        read_stream(url, headers=SSE, max_events=1, timeout=10)
        joined += 1
    waiting.join(15)
    assert not waiting.is_alive(), "a waiting client never got the end"
    assert waiting.error is None, repr(waiting.error)
    assert [e.id for e in waiting.events] == [r.seq for r in faults.log_of(task)]
    assert joined >= 10
