"""The sync twins and short-lived loops: Django's own connection, nothing opened besides.

A process that queues, cancels and reads tasks from sync code (a WSGI view, a shell, a
thread pool), or from ``asyncio.run``/``async_to_sync``, must hold a constant number of
Postgres sessions, whatever the number of calls.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import psycopg
import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.db import connection, connections, transaction
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path

from streaming import conf, runtime
from streaming.coordinator import coordinator
from tests.models import ExampleTask, ShoutingTask
from tests.support import database_url_from_settings, django_wsgi_server, sql, wait_for_status

pytestmark = pytest.mark.django_db(transaction=True)


def sessions() -> int:
    """Sessions on the test database, the counting one excepted."""
    (row,) = sql(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    return int(row[0])


def run_row(task: Any) -> tuple[Any, ...] | None:
    rows = sql(
        "SELECT status, last_seq FROM streaming_taskrun"
        " WHERE app_label = 'tests' AND model_name = %s AND task_id = %s",
        type(task).__name__,
        task.pk,
    )
    return rows[0] if rows else None


@contextmanager
def listening() -> Iterator[psycopg.Connection[Any]]:
    conn = psycopg.connect(database_url_from_settings(), autocommit=True)
    try:
        conn.execute(f"LISTEN {conf.get().CHANNEL}")
        yield conn
    finally:
        conn.close()


def payloads(conn: psycopg.Connection[Any], wait: float = 1.0) -> list[str]:
    return [n.payload for n in conn.notifies(timeout=wait, stop_after=10)]


# -- the twins ----------------------------------------------------------------------------------


def test_start_task_sync_queues_in_the_callers_transaction_and_notifies_on_commit() -> None:
    with listening() as conn:
        with transaction.atomic():
            task = ExampleTask.objects.create(message="sync")
            task.start()
            assert run_row(task) is None  # not committed yet: nobody else sees it
        assert run_row(task) == ("pending", 0)
        run_id = sql("SELECT id FROM streaming_taskrun WHERE task_id = %s", task.pk)[0][0]
        assert f"q {run_id}" in payloads(conn)

        task.start()  # idempotent: the same run
        coordinator.start_task_sync(task, "tests", "ExampleTask")
        assert sql("SELECT count(*) FROM streaming_taskrun")[0][0] == 1


def test_a_rolled_back_start_leaves_no_run_and_sends_nothing() -> None:
    with listening() as conn:
        task = ExampleTask.objects.create(message="rolled back")
        with pytest.raises(RuntimeError, match="changed my mind"), transaction.atomic():
            task.start()
            raise RuntimeError("changed my mind")
        assert run_row(task) is None
        assert payloads(conn, wait=0.5) == []


def test_the_sync_twins_check_their_arguments() -> None:
    task = ExampleTask.objects.create()
    with pytest.raises(ValueError, match="does not match"):
        coordinator.start_task_sync(task, "tests", "ContinueTask")
    with pytest.raises(ValueError, match="must be saved"):
        ExampleTask().start()
    with pytest.raises(TypeError, match="expected"):
        coordinator.cancel_task_sync(1)


def test_cancel_sync_finishes_a_queued_task_once_and_refuses_a_finished_one() -> None:
    task = ExampleTask.objects.create()
    assert task.cancel() is False  # never started
    task.start()
    assert task.cancel() is True
    assert run_row(task) == ("cancelled", 2)
    assert [e["type"] for e in task.events()] == ["cancelled", "end"]
    assert task.cancel() is False
    assert coordinator.cancel_task_sync("tests", "ExampleTask", task.pk) is False
    task.refresh_from_db()
    assert task.status == "cancelled"


async def test_cancel_sync_of_a_running_task_asks_its_worker(rt: Any) -> None:
    task = await ExampleTask.objects.acreate(total_steps=400, step_delay=0.05)
    await coordinator.start_task(task)
    await wait_for_status(rt, task, ("running",))
    assert await sync_to_async(task.cancel)() is True
    assert await wait_for_status(rt, task) == "cancelled"
    types = [e["type"] for e in await task.aevents()]
    assert types[-2:] == ["cancelled", "end"]
    assert types.count("end") == 1


async def test_events_sync_equals_aevents_and_reads_past_one_page(rt: Any) -> None:
    task = await ExampleTask.objects.acreate(total_steps=1200, step_delay=0)
    await coordinator.start_task(task)
    await wait_for_status(rt, task)
    via_async = await task.aevents()
    via_sync = await sync_to_async(task.events)()
    assert len(via_sync) == 1200 + 3
    assert via_sync == via_async
    assert [e["seq"] for e in via_sync] == list(range(1, 1204))
    assert await sync_to_async(task.events)(1200) == via_async[1200:]
    running = await sync_to_async(coordinator.is_task_running)("tests", "ExampleTask", task.pk)
    assert running is False


def test_get_task_instance_sync_starts_and_returns_the_task() -> None:
    task = ExampleTask.objects.create()
    got = coordinator.get_task_instance_sync("tests", "ExampleTask", task.pk)
    assert got == task
    assert run_row(task) == ("pending", 0)
    assert coordinator.get_task_instance_sync("tests", "ExampleTask", 10**9) is None
    assert coordinator.get_task_instance_sync("tests", "NoSuchModel", 1) is None
    assert coordinator.is_task_running("ExampleTask", task.pk) is True


# -- short-lived loops ---------------------------------------------------------------------------


def test_asyncio_run_calls_open_no_runtime_and_no_session() -> None:
    task = ExampleTask.objects.create()
    connection.close()
    before = sessions()

    for _ in range(20):
        asyncio.run(coordinator.start_task(task, "tests", "ExampleTask"))
        asyncio.run(coordinator.enqueue(task))
        assert asyncio.run(task.aevents()) == []
    assert not runtime._runtimes  # none was built for these loops
    # asgiref's one thread for thread-sensitive calls holds Django's connection there
    assert sessions() <= before + 1
    assert run_row(task) == ("pending", 0)
    assert asyncio.run(task.acancel()) is True
    assert run_row(task) == ("cancelled", 2)


def test_a_thread_pool_of_sync_calls_holds_one_session_per_thread() -> None:
    tasks = [ExampleTask.objects.create() for _ in range(10)]
    connection.close()
    before = sessions()
    peak = 0
    lock = threading.Lock()

    def call(i: int) -> None:
        nonlocal peak
        task = tasks[i % len(tasks)]
        task.start()
        task.events()
        coordinator.is_task_running("tests", "ExampleTask", task.pk)
        if i % 50 == 0:
            with lock:
                peak = max(peak, sessions())

    barrier = threading.Barrier(4)

    def close_own_connection(_: int) -> None:
        barrier.wait(10)  # one call per thread: each closes its own Django connection
        connection.close()

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(call, range(1000)))
        during = sessions()
        list(pool.map(close_own_connection, range(4)))
    assert during <= before + 4
    assert peak <= before + 4


# -- a WSGI view ---------------------------------------------------------------------------------


def start_view(request: HttpRequest, pk: int) -> HttpResponse:
    task = ExampleTask.objects.get(pk=pk)
    if request.GET.get("how") == "async_to_sync":
        async_to_sync(coordinator.enqueue)(task)  # what code written for the seed does
    else:
        task.start()
    return JsonResponse({"events": len(task.events())})


urlpatterns = [path("start/<int:pk>", start_view)]


def test_a_wsgi_view_starting_tasks_keeps_the_session_count_flat(settings: Any) -> None:
    settings.ROOT_URLCONF = __name__
    tasks = [ExampleTask.objects.create() for _ in range(5)]
    connections.close_all()
    before = sessions()
    with django_wsgi_server() as base, httpx.Client(base_url=base, timeout=30) as http:
        counts = []
        for i in range(300):
            how = "async_to_sync" if i % 2 else "start"
            r = http.get(f"/start/{tasks[i % 5].pk}", params={"how": how})
            assert r.status_code == 200, r.text
            if i % 25 == 0:
                counts.append(sessions())
    assert max(counts) <= before + 1, counts
    assert sql("SELECT count(*) FROM streaming_taskrun WHERE status = 'pending'")[0][0] == 5


# -- proxies -------------------------------------------------------------------------------------


async def test_a_proxy_models_task_runs_its_own_process(rt: Any) -> None:
    task = await ShoutingTask.objects.acreate(message="quiet")
    await coordinator.start_task(task, "tests", "ShoutingTask")
    assert await wait_for_status(rt, task) == "completed"
    history = await task.aevents()
    assert [e["type"] for e in history] == ["shout", "end"]
    assert history[0]["data"]["message"] == "QUIET"
    assert history[0]["data"]["_model"] == "ShoutingTask"
    await task.arefresh_from_db()
    assert task.final_value == {"message": "QUIET"}
    assert task.status == "completed"


def test_close_closes_the_readers_of_every_thread() -> None:
    task = ExampleTask.objects.create()
    task.start()
    connection.close()
    coordinator.close()
    before = sessions()

    async def ask() -> bool:  # on an event loop: a reader connection of this thread's own
        return coordinator.is_task_running("tests", "ExampleTask", task.pk)

    threads = [threading.Thread(target=lambda: asyncio.run(ask())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sessions() == before + 3
    coordinator.close()
    deadline = time.monotonic() + 5  # a backend leaves pg_stat_activity as it exits
    while sessions() != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sessions() == before


def test_the_sync_calls_survive_a_terminated_backend_outside_a_transaction() -> None:
    task = ExampleTask.objects.create()

    def kill_djangos_backend() -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            (pid,) = cursor.fetchone()
        sql("SELECT pg_terminate_backend(%s)", pid)
        time.sleep(0.1)

    kill_djangos_backend()
    task.start()  # a fresh connection, once, and the statement again
    assert run_row(task) == ("pending", 0)
    kill_djangos_backend()
    assert task.events() == []
    kill_djangos_backend()
    assert coordinator.is_task_running("tests", "ExampleTask", task.pk) is True
    kill_djangos_backend()
    assert task.cancel() is True
    assert run_row(task) == ("cancelled", 2)

    # Inside the caller's transaction the error is the caller's: nothing is retried there.
    from streaming.exceptions import DatabaseUnavailable

    other = ExampleTask.objects.create()
    with pytest.raises(DatabaseUnavailable), transaction.atomic():
        kill_djangos_backend()
        other.start()
    connection.close()
    assert run_row(other) is None
