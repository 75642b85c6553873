"""The Django admin (streaming/admin.py, tests/admin.py) on a real Postgres: the read-only
run and event tables, a task model's pages, and the start and cancel actions."""

from __future__ import annotations

import asyncio
import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import django.contrib.admin
import pytest
from asgiref.sync import sync_to_async
from django.db import connection, connections
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from streaming import admin as streaming_admin
from streaming import registry, runtime, tokens
from streaming.coordinator import coordinator
from streaming.models import TaskEvent, TaskRun
from tests.models import ExampleTask, ScriptedTask
from tests.support import django_wsgi_server, sql, wait_for_status

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parents[2]
RUNS = "/admin/streaming/taskrun/"
EVENTS = "/admin/streaming/taskevent/"
EXAMPLES = "/admin/tests/exampletask/"
SCRIPTED = "/admin/tests/scriptedtask/"
YESTERDAY = (timezone.now() - timedelta(days=1)).isoformat()


@pytest.fixture
def staff(django_user_model: Any) -> Client:
    """A test client signed in as a staff superuser."""
    user = django_user_model.objects.create_superuser("admin", "admin@example.com", "pw")
    client = Client()
    client.force_login(user)
    return client


async def get(client: Client, url: str, **params: Any) -> Any:
    """GET in a thread, as Django serves a sync view, while this loop's worker keeps going."""
    return await sync_to_async(client.get)(url, params)


async def post(client: Client, url: str, data: dict[str, Any]) -> Any:
    return await sync_to_async(client.post)(url, data)


async def action(client: Client, url: str, name: str, *pks: int) -> list[str]:
    """Run a changelist action on these rows; the messages it left."""
    resp = await sync_to_async(client.post)(
        url, {"action": name, "_selected_action": [str(pk) for pk in pks]}, follow=True
    )
    assert resp.status_code == 200
    return [str(m) for m in resp.context["messages"]]


def run_row(task: Any) -> tuple[Any, ...]:
    key = registry.key_of(task)
    rows = sql(
        "SELECT id, status, attempt, releases, last_seq, finished_at, final_value, error "
        "FROM streaming_taskrun WHERE app_label = %s AND model_name = %s AND task_id = %s",
        key.app_label,
        key.model_name,
        key.task_id,
    )
    assert len(rows) == 1
    return rows[0]


def log_of(task: Any) -> list[tuple[int, int, str]]:
    key = registry.key_of(task)
    return [
        (seq, attempt, event_type)
        for seq, attempt, event_type in sql(
            "SELECT seq, attempt, event_type FROM streaming_taskevent "
            "WHERE app_label = %s AND model_name = %s AND task_id = %s ORDER BY seq",
            key.app_label,
            key.model_name,
            key.task_id,
        )
    ]


async def completed(rt: Any, model: Any, **fields: Any) -> Any:
    task = await model.objects.acreate(**fields)
    await coordinator.start_task(task)
    assert await wait_for_status(rt, task) == "completed"
    return task


# -- pages ---------------------------------------------------------------------------------------


async def test_the_run_event_and_task_pages_load_with_filters(rt: Any, staff: Client) -> None:
    task = await completed(rt, ExampleTask, message="admin pages")
    run = await TaskRun.objects.aget(model_name="ExampleTask", task_id=task.pk)
    path = f"tests/ExampleTask/{task.pk}"

    resp = await get(staff, RUNS)
    assert resp.status_code == 200 and resp.context["cl"].result_count == 1
    filtered = {
        "task_model": "tests.ExampleTask",
        "status__exact": "completed",
        "finished_at__gte": YESTERDAY,
        "q": path,
    }
    resp = await get(staff, RUNS, **filtered)
    assert resp.status_code == 200 and resp.context["cl"].result_count == 1
    page = resp.content.decode()
    assert f"tests.ExampleTask #{task.pk}" in page
    assert f'href="{EXAMPLES}{task.pk}/change/"' in page  # the task's own page, linked
    resp = await get(staff, RUNS, status__exact="failed")
    assert resp.status_code == 200 and resp.context["cl"].result_count == 0
    resp = await get(staff, f"{RUNS}{run.pk}/change/")
    assert resp.status_code == 200
    assert "admin pages" in resp.content.decode()  # final_value
    assert "<strong>retry</strong>" not in resp.content.decode()

    resp = await get(staff, EVENTS, task_model="tests.ExampleTask", q=str(task.pk))
    assert resp.status_code == 200 and resp.context["cl"].result_count == 6
    resp = await get(
        staff,
        EVENTS,
        event_type="progress",
        created_at__gte=YESTERDAY,
        q=f"ExampleTask#{task.pk}",
    )
    assert resp.status_code == 200 and resp.context["cl"].result_count == 3
    page = resp.content.decode()
    assert "&quot;step&quot;: 2" in page  # data, compactly
    assert "event_type=end" in page  # the type filter offers the types of the log
    event = await TaskEvent.objects.aget(model_name="ExampleTask", task_id=task.pk, seq=6)
    resp = await get(staff, f"{EVENTS}{event.pk}/change/")
    assert resp.status_code == 200 and "final_value" in resp.content.decode()

    resp = await get(staff, EXAMPLES, status__exact="completed", q="admin")
    assert resp.status_code == 200 and resp.context["cl"].result_count == 1
    resp = await get(staff, f"{EXAMPLES}{task.pk}/change/")
    assert resp.status_code == 200
    page = resp.content.decode()
    assert f'href="http://127.0.0.1:8888/watch/{path}"' in page
    assert "&quot;steps&quot;: 3" in page  # final_value, read-only
    assert f'<a href="{RUNS}{run.pk}/change/">#{run.pk}</a>' in page
    assert f"{EVENTS}?task_model=tests.ExampleTask&amp;task_id={task.pk}" in page
    form = resp.context["adminform"].form
    assert set(form.fields) == {"message", "total_steps", "step_delay"}  # run state: read-only
    seqs = [int(s) for s in _event_rows(page)]
    assert seqs == [6, 5, 4, 3, 2, 1]  # newest first
    resp = await get(staff, f"{EXAMPLES}add/")
    assert resp.status_code == 200 and "Latest 20 events" not in resp.content.decode()
    resp = await get(staff, f"{EVENTS}?task_model=tests.ExampleTask&task_id={task.pk}")
    assert resp.status_code == 200 and resp.context["cl"].result_count == 6


def _event_rows(page: str) -> list[str]:
    table = page.split('class="streaming-events"', 1)[1].split("</table>", 1)[0]
    return [row.split("<td>", 2)[1].split("</td>", 1)[0] for row in table.split("<tr>")[2:]]


async def test_a_task_page_reads_a_fixed_number_of_rows_however_long_its_log(
    rt: Any, staff: Client
) -> None:
    short = await completed(rt, ScriptedTask, ticks=2)
    long = await completed(rt, ScriptedTask, ticks=60)

    def queries(url: str) -> tuple[int, str]:
        with CaptureQueriesContext(connection) as ctx:
            resp = staff.get(url)
        assert resp.status_code == 200
        return len(ctx), resp.content.decode()

    await sync_to_async(queries)(f"{SCRIPTED}{short.pk}/change/")  # the connection's set-up
    few, _ = await sync_to_async(queries)(f"{SCRIPTED}{short.pk}/change/")
    many, page = await sync_to_async(queries)(f"{SCRIPTED}{long.pk}/change/")
    assert few == many
    assert [int(s) for s in _event_rows(page)] == list(range(61, 41, -1))  # the last 20
    listed, _ = await sync_to_async(queries)(SCRIPTED)
    assert listed <= 8, listed  # no query per row


async def test_runs_and_events_cannot_be_added_changed_or_deleted(rt: Any, staff: Client) -> None:
    task = await completed(rt, ScriptedTask, ticks=1)
    run = await TaskRun.objects.aget(model_name="ScriptedTask", task_id=task.pk)
    event = await TaskEvent.objects.aget(model_name="ScriptedTask", task_id=task.pk, seq=1)
    for base, pk in ((RUNS, run.pk), (EVENTS, event.pk)):
        assert (await get(staff, f"{base}add/")).status_code == 403
        assert (await post(staff, f"{base}add/", {"task_id": "1"})).status_code == 403
        view = await get(staff, f"{base}{pk}/change/")
        assert view.status_code == 200  # viewable, read-only
        assert 'name="_save"' not in view.content.decode()
        assert (await post(staff, f"{base}{pk}/change/", {"status": "failed"})).status_code == 403
        assert (await get(staff, f"{base}{pk}/delete/")).status_code == 403
        assert (await post(staff, f"{base}{pk}/delete/", {"post": "yes"})).status_code == 403
        listing = await get(staff, base)
        assert "delete_selected" not in listing.content.decode()
        assert f'href="{base}add/"' not in listing.content.decode()
        bulk = await post(staff, base, {"action": "delete_selected", "_selected_action": [pk]})
        assert bulk.status_code in (200, 302)
    assert run_row(task)[1] == "completed" and len(log_of(task)) == 2


# -- actions -------------------------------------------------------------------------------------


async def test_cancel_stops_a_running_and_a_pending_task(rt: Any, staff: Client) -> None:
    await rt.hub.wait_listening()  # the cancel reaches this loop's worker by NOTIFY
    running = await ScriptedTask.objects.acreate(ticks=10_000, delay=0.01)
    await coordinator.start_task(running)
    assert await wait_for_status(rt, running, ("running",)) == "running"
    pending = await ScriptedTask.objects.acreate(ticks=1)
    await coordinator.enqueue(pending)  # queued, claimed by nobody
    done = await completed(rt, ScriptedTask, ticks=1)

    notes = await action(staff, SCRIPTED, "cancel_selected", running.pk, pending.pk, done.pk)
    assert notes == ["2 tasks cancelled. 1 left alone (finished or never started)."]
    assert await wait_for_status(rt, running, timeout=10) == "cancelled"
    assert run_row(pending)[1] == "cancelled"
    assert run_row(done)[1] == "completed"
    for task in (running, pending):
        types = [t for _, _, t in log_of(task)]
        assert types[-2:] == ["cancelled", "end"] and types.count("end") == 1
        await task.arefresh_from_db()
        assert task.status == "cancelled"
    assert not rt.worker.running  # this loop's worker let it go
    # What the action's own loop opened is closed: only this test's runtime is left.
    assert set(runtime._runtimes) == {asyncio.get_running_loop()}


async def test_start_queues_only_never_started_tasks(rt: Any, staff: Client) -> None:
    fresh = await ScriptedTask.objects.acreate(ticks=2)
    done = await completed(rt, ScriptedTask, ticks=1)
    notes = await action(staff, SCRIPTED, "start_selected", fresh.pk, done.pk)
    assert notes == ["1 task queued. 1 left alone (already started)."]
    run_id, status, *_ = run_row(fresh)
    assert status == "pending"
    assert await rt.worker.claim(run_id)
    assert await wait_for_status(rt, fresh) == "completed"


async def test_rerun_appends_a_new_attempt_after_the_log_of_a_finished_task(
    rt: Any, staff: Client
) -> None:
    await rt.hub.wait_listening()  # the re-run's NOTIFY wakes this loop's worker
    rt.worker.start()
    done = await completed(rt, ScriptedTask, ticks=2)
    fresh = await ScriptedTask.objects.acreate(ticks=1)
    first = log_of(done)
    assert [t for _, _, t in first][-1] == "end"

    notes = await action(staff, SCRIPTED, "rerun_selected", done.pk, fresh.pk)
    assert notes == ["1 task queued again. 1 left alone (not finished)."]
    assert await wait_for_status(rt, done, ("completed",), timeout=10) == "completed"
    log = log_of(done)
    seqs = [seq for seq, _, _ in log]
    assert seqs == list(range(1, len(log) + 1))  # gap-free across both attempts
    types = [t for _, _, t in log]
    assert types[: len(first)] == [*[t for _, _, t in first][:-1], "previous_end"]
    assert types[len(first)] == "retry"  # attempt 2 begins after the last seq
    assert types.count("end") == 1 and types[-1] == "end"
    await done.arefresh_from_db()
    assert (done.status, done.attempt) == ("completed", 2)
    never = "SELECT 1 FROM streaming_taskrun WHERE model_name = 'ScriptedTask' AND task_id = %s"
    assert sql(never, fresh.pk) == []  # never started: left alone
    # A finished task can be re-run again; an unfinished one cannot.
    assert await coordinator.rerun_task("tests", "ScriptedTask", done.pk) is True
    assert await coordinator.rerun_task("tests", "ScriptedTask", fresh.pk) is False
    assert await wait_for_status(rt, done, ("completed",), timeout=10) == "completed"
    types = [t for _, _, t in log_of(done)]
    assert types.count("end") == 1 and types.count("previous_end") == 2
    # A stream replaying the log from the start passes the earlier ends, closes at the last.
    run_id = run_row(done)[0]
    sub = await coordinator.subscribe(run_id, registry.key_of(done), 0)
    streamed = [ev.type async for batch in sub.batches(1.0) for ev in batch]
    rt.hub.unsubscribe(sub)
    assert streamed == types


async def test_deleting_tasks_deletes_their_log_and_stops_a_running_one(
    rt: Any, staff: Client
) -> None:
    await rt.hub.wait_listening()
    done = await completed(rt, ScriptedTask, ticks=2)
    running = await ScriptedTask.objects.acreate(ticks=10_000, delay=0.01)
    await coordinator.start_task(running)
    assert await wait_for_status(rt, running, ("running",)) == "running"
    kept = await completed(rt, ScriptedTask, ticks=1)

    resp = await post(staff, f"{SCRIPTED}{done.pk}/delete/", {"post": "yes"})
    assert resp.status_code == 302
    bulk = {"action": "delete_selected", "_selected_action": [str(running.pk)], "post": "yes"}
    assert (await post(staff, SCRIPTED, bulk)).status_code == 302
    for _ in range(500):  # its worker is told at once, and stops
        if not rt.worker.running:
            break
        await asyncio.sleep(0.02)
    assert not rt.worker.running
    for task in (done, running):
        key = registry.key_of(task)
        assert not await ScriptedTask.objects.filter(pk=task.pk).aexists()
        assert not await TaskRun.objects.filter(
            model_name=key.model_name, task_id=key.task_id
        ).aexists()
        assert log_of(task) == []  # nothing written after the delete either
    assert run_row(kept)[1] == "completed" and len(log_of(kept)) == 2


def test_watch_links_on_another_origin_signed_or_not() -> None:
    task = ExampleTask(pk=7)
    key = registry.key_of(task)

    class Signed(streaming_admin.StreamTaskAdmin):
        stream_base_url = "https://stream.example.com/"
        signed_watch_links = True

    plain = streaming_admin.StreamTaskAdmin(ExampleTask, django.contrib.admin.site)
    assert plain.watch_url(task) == "/watch/tests/ExampleTask/7"
    url = Signed(ExampleTask, django.contrib.admin.site).watch_url(task)
    base, _, query = url.partition("?token=")
    assert base == "https://stream.example.com/watch/tests/ExampleTask/7"
    assert tokens.check(unquote(query), key, "view")
    assert not tokens.check(unquote(query), key, "cancel")


# -- a screenshot ----------------------------------------------------------------------------


def test_screenshot_of_a_task_page(staff: Client, settings: Any, tmp_path: Path) -> None:
    """A finished ExampleTask's change page in headless Chromium, saved as docs/admin.png
    when UPDATE_SCREENSHOTS=1 (always taken and checked, under tmp_path otherwise)."""
    settings.STATIC_URL = "/static/"  # the admin's CSS, served below from its own files
    task = ExampleTask.objects.create(message="Quarterly report", total_steps=4)

    async def run_it() -> None:
        rt = await runtime.current()
        try:
            await coordinator.start_task(task)
            await wait_for_status(rt, task)
        finally:
            await runtime.shutdown()
        await sync_to_async(connections.close_all)()

    asyncio.run(run_it())
    session = staff.cookies["sessionid"].value

    # Playwright runs an event loop in this thread: no ORM call from here on.
    from playwright.sync_api import Route, sync_playwright

    from tests.acceptance.test_browser import CHROMIUM_ARGS, chromium_path

    static = Path(django.contrib.admin.__file__).parent / "static"

    def serve_static(route: Route) -> None:
        name = route.request.url.split("/static/", 1)[1].split("?", 1)[0]
        if (static / name).is_file():
            route.fulfill(path=str(static / name))
        else:
            route.abort()

    shot = tmp_path / "admin.png"
    with django_wsgi_server() as base, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            context.add_cookies([{"name": "sessionid", "value": session, "url": base}])
            page = context.new_page()
            page.route("**/static/**", serve_static)
            page.goto(f"{base}{EXAMPLES}{task.pk}/change/")
            assert page.locator(".streaming-events tbody tr").count() == 7
            assert "completed" in page.inner_text("#content-main")
            watch = f"http://127.0.0.1:8888/watch/tests/ExampleTask/{task.pk}"
            assert page.get_by_role("link", name=watch).count() == 1
            assert page.evaluate("getComputedStyle(document.body).fontFamily") != "serif"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        shutil.copyfile(shot, ROOT / "docs" / "admin.png")
