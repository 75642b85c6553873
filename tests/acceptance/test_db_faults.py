"""Database faults for real: Postgres restarted, LISTEN and pool connections terminated.

Tasks keep emitting to clients on two servers; every client must end with exactly the log.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from django.db import connections

from streaming.embedded import EphemeralServer
from tests import faults
from tests.faults import Follower, wait_until
from tests.models import ScriptedTask
from tests.support import ManagedProcess, read_stream

pytestmark = pytest.mark.django_db(transaction=True)

TICKS = 60


def start_tasks(
    servers: list[ManagedProcess], count: int = 2
) -> tuple[list[ScriptedTask], list[Follower]]:
    """``count`` tasks, each followed by one client on every server."""
    tasks = [ScriptedTask.objects.create(ticks=TICKS, delay=0.05) for _ in range(count)]
    followers = [Follower(s.url, t, name=f"{s.port}/{t.pk}") for t in tasks for s in servers]
    for f in followers:
        f.start()
    for t in tasks:
        # mypy cannot type a lambda with a default argument (python/mypy#15459)
        wait_until(lambda t=t: faults.run_of(t).last_seq >= 5, 20, "five ticks")  # type: ignore[misc]
    return tasks, followers


def check_complete(tasks: list[ScriptedTask], followers: list[Follower]) -> None:
    """Every client saw exactly its task's log; every task ran once, all of its ticks."""
    for f in followers:
        f.finish()
    for t in tasks:
        faults.assert_gap_free(t)
        rows = faults.log_of(t)
        run = faults.run_of(t)
        assert run.status == "completed", run
        assert faults.tick_numbers(rows, run.attempt) == list(range(1, TICKS + 1))
        for f in followers:
            if f.task is t:
                faults.same_as_log(f.events, rows)


def test_a_postgres_restart_mid_stream_loses_nothing(
    pg_server: EphemeralServer,
    server_factory: Callable[..., ManagedProcess],
    worker_factory: Callable[..., ManagedProcess],
) -> None:
    servers = [server_factory("--no-worker"), server_factory("--no-worker")]
    worker_factory()  # the tasks run in a worker-only process
    tasks, followers = start_tasks(servers)
    try:
        pg_server.stop()
        time.sleep(1.0)  # the outage
    finally:
        pg_server.start()
        connections.close_all()  # this process's Django connection died with the server
    check_complete(tasks, followers)
    for s in servers:
        counters = faults.metrics(s.url)
        assert counters["streaming_listener_reconnects_total"] >= 1
        assert counters["streaming_listener_up"] == 1
    # New clients and new tasks work too: Django's own connections came back as well.
    for s in servers:
        task = ScriptedTask.objects.create(ticks=3)
        resp, events = read_stream(f"{s.url}/stream/tests/ScriptedTask/{task.pk}")
        assert resp.status_code == 200, resp.text
        assert [e.event for e in events] == ["tick", "tick", "tick", "end"]


def test_terminated_listen_connections_reconnect_and_streams_go_on(
    server_factory: Callable[..., ManagedProcess],
) -> None:
    servers = [server_factory(), server_factory("--no-worker")]
    tasks, followers = start_tasks(servers)
    before = faults.listener_backends()
    for s in servers:
        assert faults.terminate_backend(before[s.proc.pid])
    for s in servers:
        wait_until(
            # mypy cannot type a lambda with a default argument (python/mypy#15459)
            lambda s=s: (  # type: ignore[misc]
                faults.listener_backends().get(s.proc.pid, before[s.proc.pid]) != before[s.proc.pid]
            ),
            10,
            "a new LISTEN connection",
        )
        assert faults.metrics(s.url)["streaming_listener_reconnects_total"] == 1
    # Still running: the clients get events announced on the new connections.
    progress = {f.name: len(f.events) for f in followers}
    wait_until(lambda: all(len(f.events) > progress[f.name] for f in followers), 10, "new events")
    check_complete(tasks, followers)


def test_every_connection_of_the_servers_terminated_at_once(
    server_factory: Callable[..., ManagedProcess],
) -> None:
    """Pool, LISTEN and worker connections all die mid-append; all of them come back."""
    servers = [server_factory(), server_factory()]
    tasks, followers = start_tasks(servers)
    killed = faults.terminate_other_backends()
    connections.close_all()
    assert killed >= 4  # two LISTEN connections and at least one pool connection each
    check_complete(tasks, followers)
    for s in servers:
        assert faults.metrics(s.url)["streaming_listener_reconnects_total"] == 1


@pytest.mark.slow
def test_listen_connections_terminated_again_and_again(
    server_factory: Callable[..., ManagedProcess],
) -> None:
    servers = [server_factory(), server_factory("--no-worker")]
    tasks, followers = start_tasks(servers)
    rounds = 0
    while faults.run_of(tasks[0]).status == "running" and rounds < 10:
        for pid in faults.listener_backends().values():
            faults.terminate_backend(pid)
        rounds += 1
        time.sleep(0.3)  # let it reconnect before the next blow
    check_complete(tasks, followers)
    for s in servers:
        assert faults.metrics(s.url)["streaming_listener_reconnects_total"] >= 2


@pytest.mark.slow
def test_repeated_postgres_restarts(
    pg_server: EphemeralServer, server_factory: Callable[..., ManagedProcess]
) -> None:
    servers = [server_factory(), server_factory()]
    tasks, followers = start_tasks(servers)
    for _ in range(3):
        try:
            pg_server.stop(immediate=True)  # crash-like: recovery on start
            time.sleep(0.5)
        finally:
            pg_server.start()
            connections.close_all()
        time.sleep(0.5)
    check_complete(tasks, followers)


def test_a_new_stream_while_postgres_is_down_gets_a_503_not_a_500(
    server_factory: Callable[..., ManagedProcess], pg_server: EphemeralServer
) -> None:
    import httpx

    from tests.models import ScriptedTask

    server = server_factory("--no-worker")
    task = ScriptedTask.objects.create(ticks=1)
    url = f"{server.url}/stream/tests/ScriptedTask/{task.pk}"
    pg_server.stop()
    try:
        resp = httpx.get(url, timeout=30)
        assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
        assert (
            httpx.get(f"{server.url}/tasks/tests/ScriptedTask/{task.pk}", timeout=30).status_code
            == 503
        )
    finally:
        pg_server.start()
        connections.close_all()  # this process's Django connection died with the server
    assert httpx.get(server.url + "/health").text == "OK"
