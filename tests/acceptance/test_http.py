"""The HTTP contract against real runserver_stream processes on the test database."""

from __future__ import annotations

import threading
from collections.abc import Callable

import httpx
import pytest

from streaming import client as stream_client
from tests.models import ExampleTask, ScriptedTask
from tests.support import ManagedProcess, read_stream, sql

pytestmark = pytest.mark.django_db(transaction=True)
SSE = {"Accept": "text/event-stream"}


@pytest.fixture
def server(server_factory: Callable[..., ManagedProcess]) -> ManagedProcess:
    return server_factory()


def test_health_and_unknown_paths(server: ManagedProcess) -> None:
    assert httpx.get(server.url + "/health").text == "OK"
    assert httpx.get(server.url + "/invalid").status_code == 404
    assert httpx.post(server.url + "/health").status_code == 404


def test_not_a_task_is_the_same_404_as_an_unknown_task(server: ManagedProcess) -> None:
    task = ExampleTask.objects.create()
    bodies = set()
    for path in (
        "/stream/auth/User/1",
        "/stream/auth/Group/1",
        "/stream/nope/ExampleTask/1",
        "/stream/tests/NoSuch/1",
        f"/stream/tests/ExampleTask/{task.pk + 1000}",
        "/stream/contenttypes/ContentType/1",
        "/tasks/auth/User/1",
        "/stream/streaming/TaskRun/1",
    ):
        resp = httpx.get(server.url + path)
        assert resp.status_code == 404, path
        bodies.add(resp.text)
    assert len(bodies) == 1


def test_malformed_id_and_last_event_id_are_400(server: ManagedProcess) -> None:
    task = ExampleTask.objects.create()
    assert httpx.get(server.url + "/stream/tests/ExampleTask/abc").status_code == 400
    assert httpx.get(server.url + "/stream/tests/ExampleTask/-1").status_code == 400
    url = f"{server.url}/stream/tests/ExampleTask/{task.pk}"
    assert httpx.get(url, headers={"Last-Event-ID": "x1"}).status_code == 400
    assert httpx.get(url + "?last_event_id=1.5").status_code == 400


def test_stream_runs_a_never_started_task_and_ends_after_end(server: ManagedProcess) -> None:
    task = ExampleTask.objects.create(message="over http", step_delay=0.05)
    resp, events = read_stream(f"{server.url}/stream/tests/ExampleTask/{task.pk}")
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "text/event-stream"
    assert resp.headers["cache-control"] == "no-cache"
    assert resp.headers["x-accel-buffering"] == "no"
    assert [e.event for e in events] == [
        "start",
        "progress",
        "progress",
        "progress",
        "complete",
        "end",
    ]
    assert [e.id for e in events] == [1, 2, 3, 4, 5, 6]
    assert events[0].data["message"] == "over http" and events[0].data["_seq"] == 1


def test_the_model_name_is_case_insensitive_and_the_app_optional(server: ManagedProcess) -> None:
    task = ScriptedTask.objects.create(ticks=2)
    _, events = read_stream(f"{server.url}/stream/scriptedtask/{task.pk}")
    assert [e.id for e in events] == [1, 2, 3]
    _, again = read_stream(f"{server.url}/stream/tests/SCRIPTEDTASK/{task.pk}", headers=SSE)
    assert again == events


def test_a_finished_task_plain_get_is_the_seeds_json_and_resume_at_end_is_204(
    server: ManagedProcess,
) -> None:
    task = ScriptedTask.objects.create(ticks=2, result={"answer": 42})
    url = f"{server.url}/stream/tests/ScriptedTask/{task.pk}"
    read_stream(url)
    resp = httpx.get(url)
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert body["status"] == "completed" and body["final_value"] == {"answer": 42}
    assert body["completed_at"].endswith("Z")
    assert httpx.get(url, headers={"Last-Event-ID": "3"}).status_code == 204
    assert httpx.get(url + "?last_event_id=9").status_code == 204
    resp, events = read_stream(url, headers=SSE)  # asking for SSE replays the history
    assert [e.event for e in events] == ["tick", "tick", "end"]


def test_resume_with_last_event_id_gives_exactly_the_missing_events(server: ManagedProcess) -> None:
    task = ScriptedTask.objects.create(ticks=30, delay=0.01)
    url = f"{server.url}/stream/tests/ScriptedTask/{task.pk}"
    _, head = read_stream(url, max_events=7)
    assert [e.id for e in head] == list(range(1, 8))
    _, tail = read_stream(url, headers={"Last-Event-ID": "7"})
    assert [e.id for e in tail] == list(range(8, 32))
    _, by_query = read_stream(url + "?last_event_id=20")
    assert [e.id for e in by_query] == list(range(21, 32))
    assert by_query == tail[13:]


def test_three_concurrent_clients_all_get_the_full_stream(server: ManagedProcess) -> None:
    task = ScriptedTask.objects.create(ticks=40, delay=0.01)
    url = f"{server.url}/stream/tests/ScriptedTask/{task.pk}"
    results: list[list[int | None]] = []

    def follow() -> None:
        _, events = read_stream(url, headers=SSE)
        results.append([e.id for e in events])

    threads = [threading.Thread(target=follow) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [list(range(1, 42))] * 3


def test_a_client_resumes_on_another_server_without_gap_or_duplicate(
    server_factory: Callable[..., ManagedProcess],
) -> None:
    first, second = server_factory(), server_factory("--no-worker")
    task = ScriptedTask.objects.create(ticks=60, delay=0.02)
    _, head = read_stream(f"{first.url}/stream/tests/ScriptedTask/{task.pk}", max_events=10)
    last = head[-1].id
    _, tail = read_stream(
        f"{second.url}/stream/tests/ScriptedTask/{task.pk}", headers={"Last-Event-ID": str(last)}
    )
    ids = [e.id for e in head] + [e.id for e in tail]
    assert ids == list(range(1, 62))
    log = sql(
        "SELECT seq FROM streaming_taskevent WHERE model_name = 'ScriptedTask' "
        "AND task_id = %s ORDER BY seq",
        task.pk,
    )
    assert [r[0] for r in log] == ids


def test_a_task_queued_by_manage_create_task_runs_on_the_servers_worker(
    server: ManagedProcess,
    manage: Callable[..., str],
) -> None:
    out = manage("create_task", "--message", "from the CLI", "--steps", "2", "--delay", "0.01")
    task_id = int(out.split("Created ExampleTask ")[1].split()[0])
    _, events = read_stream(f"{server.url}/stream/tests/ExampleTask/{task_id}", headers=SSE)
    assert [e.event for e in events] == ["start", "progress", "progress", "complete", "end"]
    assert events[0].data["message"] == "from the CLI"
    owner = sql(
        "SELECT lease_owner, status FROM streaming_taskrun WHERE task_id = %s "
        "AND model_name = 'ExampleTask'",
        task_id,
    )
    assert owner == [(None, "completed")]
    assert f"claimed task tests/ExampleTask/{task_id}" in server.log()


def test_create_status_and_field_errors_over_http(server: ManagedProcess) -> None:
    resp = httpx.post(server.url + "/tasks/tests/ScriptedTask", json={"ticks": 3})
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["app"] == "tests" and body["model"] == "ScriptedTask"
    assert body["stream_url"] == f"/stream/tests/ScriptedTask/{body['id']}"
    _, events = read_stream(server.url + body["stream_url"], headers=SSE)
    assert [e.event for e in events] == ["tick", "tick", "tick", "end"]
    status = httpx.get(f"{server.url}/tasks/tests/ScriptedTask/{body['id']}").json()
    assert status["status"] == "completed" and status["last_seq"] == 4
    bad = httpx.post(server.url + "/tasks/tests/ScriptedTask", json={"ticks": "many", "nope": 1})
    assert bad.status_code == 400
    assert set(bad.json()["errors"]) == {"nope", "ticks"}  # unknown, and not an integer
    bad = httpx.post(server.url + "/tasks/tests/ScriptedTask", json={"ticks": -3})
    assert bad.status_code == 400 and "ticks" in bad.json()["errors"]
    as_json = {"content-type": "application/json"}
    for body in (b"[1]", b"{", b'{"ticks": NaN}', b'{"ticks": 1, "ticks": 2}'):
        bad = httpx.post(server.url + "/tasks/tests/ScriptedTask", content=body, headers=as_json)
        assert bad.status_code == 400, body
    # Not JSON at all: a form or text/plain body (what a cross-site page can send) is a 415.
    for kind in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"content-type": kind} if kind else {}
        bad = httpx.post(server.url + "/tasks/tests/ScriptedTask", content=b"{}", headers=headers)
        assert bad.status_code == 415, kind
    # Models that did not opt in cannot be created over HTTP.
    assert httpx.post(server.url + "/tasks/tests/TimeoutTask", json={}).status_code == 404


def test_the_python_client_streams_and_resumes(server: ManagedProcess) -> None:
    task = ScriptedTask.objects.create(ticks=12, delay=0.01)
    sc = stream_client.StreamingClient(server.url)
    try:
        events = list(sc.stream("tests", "ScriptedTask", task.pk))
        assert [e.id for e in events] == list(range(1, 14)) and events[-1].event == "end"
        tail = list(sc.stream("tests", "ScriptedTask", task.pk, last_event_id=10))
        assert [e.id for e in tail] == [11, 12, 13]
        status = sc.get_task_status_sync("tests", "ScriptedTask", task.pk)
        assert status["status"] == "completed"
    finally:
        sc.close()


def test_cancel_over_http_ends_the_stream_with_cancelled_then_end(server: ManagedProcess) -> None:
    task = ScriptedTask.objects.create(ticks=1000, delay=0.05)
    url = f"{server.url}/stream/tests/ScriptedTask/{task.pk}"
    read_stream(url, max_events=2)
    resp = httpx.post(f"{server.url}/tasks/tests/ScriptedTask/{task.pk}/cancel")
    assert resp.status_code == 202
    _, events = read_stream(url, headers={"Last-Event-ID": "2"})
    assert [e.event for e in events][-2:] == ["cancelled", "end"]
    assert events[-1].data["status"] == "cancelled"
    again = httpx.post(f"{server.url}/tasks/tests/ScriptedTask/{task.pk}/cancel")
    assert again.status_code == 409


def test_the_seeds_httpx_sse_loop_reads_a_whole_stream(server: ManagedProcess) -> None:
    """The seed's documented client loop: ``json.loads(event.data)`` for every event. No
    block may be data-less (a lone ``retry:`` block was one); ``retry`` still arrives."""
    import json

    from httpx_sse import connect_sse

    task = ScriptedTask.objects.create(ticks=5, delay=0.02)
    seen: list[tuple[int, str, dict[str, object]]] = []
    retries: list[int] = []
    with (
        httpx.Client(timeout=30) as http,
        connect_sse(http, "GET", f"{server.url}/stream/tests/ScriptedTask/{task.pk}") as src,
    ):
        for sse in src.iter_sse():
            seen.append((int(sse.id), sse.event, json.loads(sse.data)))
            if sse.retry is not None:
                retries.append(sse.retry)
    assert [(seq, kind) for seq, kind, _ in seen] == [(i, "tick") for i in range(1, 6)] + [
        (6, "end")
    ]
    assert retries == [1000]  # once, on the first event
    assert seen[-1][2]["status"] == "completed"
