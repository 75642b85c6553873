"""Unit tests of streaming.client against scripted servers (httpx.MockTransport): no network."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from httpx_sse import ServerSentEvent

from streaming import client as client_module
from streaming.client import (
    InvalidStreamEvent,
    InvalidTaskFields,
    ReconnectPolicy,
    StreamEvent,
    StreamingClient,
    StreamInterrupted,
    TaskNotFound,
    _Resume,
    get_client,
)
from streaming.exceptions import StreamingError

BASE = "http://stream.test"
STREAM_PATH = "/stream/tests/ExampleTask/42"
Step = httpx.Response | Exception | Callable[[httpx.Request], httpx.Response]


class Server:
    """A scripted server: answers each request with the next step and records the requests."""

    def __init__(self, *steps: Step) -> None:
        self.steps = list(steps)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        step = self.steps.pop(0)
        if isinstance(step, Exception):
            raise step
        return step(request) if callable(step) else step

    def last_event_ids(self) -> list[str | None]:
        return [request.headers.get("Last-Event-ID") for request in self.requests]


class CutStream(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A body that sends some bytes, then fails the way a dropped connection does."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    def __iter__(self) -> Iterator[bytes]:
        yield self.body
        raise httpx.ReadError("connection reset")

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.body
        raise httpx.ReadError("connection reset")


def sse_body(*ids: int, end: int | None = None, retry: int | None = 1000) -> bytes:
    """An SSE body as the server writes it: ``progress`` events, then ``end`` if given."""
    lines = [f"retry: {retry}\n\n"] if retry is not None else []
    for seq in ids:
        data = json.dumps({"step": seq, "_seq": seq, "_task_id": 42})
        lines.append(f"id: {seq}\nevent: progress\ndata: {data}\n\n")
    if end is not None:
        data = json.dumps({"status": "completed", "final_value": "done", "_seq": end})
        lines.append(f"id: {end}\nevent: end\ndata: {data}\n\n")
    return "".join(lines).encode()


def sse(*ids: int, end: int | None = None, retry: int | None = 1000) -> httpx.Response:
    headers = {"content-type": "text/event-stream"}
    return httpx.Response(200, headers=headers, content=sse_body(*ids, end=end, retry=retry))


def cut(*ids: int) -> httpx.Response:
    headers = {"content-type": "text/event-stream"}
    return httpx.Response(200, headers=headers, stream=CutStream(sse_body(*ids)))


def make_client(server: Server, max_retries: int = 3) -> StreamingClient:
    transport = httpx.MockTransport(server)
    return StreamingClient(
        BASE,
        sync_client=httpx.Client(transport=transport),
        async_client=httpx.AsyncClient(transport=transport),
        reconnect=ReconnectPolicy(max_retries=max_retries, backoff=0, max_backoff=0),
    )


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def collect(
    server: Server, kind: str, last_event_id: int | None = None, max_retries: int = 3
) -> list[StreamEvent]:
    """Every event ``stream`` (sync) or ``astream`` (async) yields from the scripted server."""
    client = make_client(server, max_retries)
    try:
        if kind == "sync":
            return list(client.stream("tests", "ExampleTask", 42, last_event_id))
        events = client.astream("tests", "ExampleTask", 42, last_event_id)
        return [event async for event in events]
    finally:
        await client.aclose()


async def call(client: StreamingClient, kind: str, name: str, *args: Any, **kw: Any) -> Any:
    """Call the sync or the async twin of a client method."""
    if kind == "sync":
        sync_name = {"acreate_task": "create_task"}.get(name, f"{name}_sync")
        return getattr(client, sync_name)(*args, **kw)
    return await getattr(client, name)(*args, **kw)


def ids(events: list[StreamEvent]) -> list[int]:
    return [event.id for event in events]


# Streams


async def test_stream_yields_every_event_through_end(kind: str) -> None:
    server = Server(sse(1, 2, end=3))
    events = await collect(server, kind)
    assert [(e.id, e.event) for e in events] == [(1, "progress"), (2, "progress"), (3, "end")]
    assert events[0].data == {"step": 1, "_seq": 1, "_task_id": 42}
    assert events[-1].data["final_value"] == "done"
    (request,) = server.requests
    assert str(request.url) == BASE + STREAM_PATH
    assert request.headers["Accept"] == "text/event-stream"
    assert "Last-Event-ID" not in request.headers


async def test_stream_stops_at_end_without_reading_further(kind: str) -> None:
    body = sse_body(1, end=2) + sse_body(3, retry=None)
    response = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)
    assert ids(await collect(Server(response), kind)) == [1, 2]


async def test_stream_cut_cleanly_resumes_after_last_id_without_duplicates(kind: str) -> None:
    # The second server re-sends 2, as a replay racing a live event might.
    server = Server(sse(1, 2), sse(2, 3, end=4))
    assert ids(await collect(server, kind)) == [1, 2, 3, 4]
    assert server.last_event_ids() == [None, "2"]


async def test_stream_dropped_mid_body_resumes(kind: str) -> None:
    server = Server(cut(1, 2, 3), sse(1, 2, 3, 4, end=5))
    assert ids(await collect(server, kind)) == [1, 2, 3, 4, 5]
    assert server.last_event_ids() == [None, "3"]


async def test_stream_resumes_after_connect_error(kind: str) -> None:
    server = Server(httpx.ConnectError("refused"), sse(1, end=2))
    assert ids(await collect(server, kind)) == [1, 2]
    assert server.last_event_ids() == [None, None]


async def test_stream_retries_a_load_balancer_503(kind: str) -> None:
    server = Server(sse(1), httpx.Response(503, text="busy"), sse(2, end=3))
    assert ids(await collect(server, kind)) == [1, 2, 3]
    assert server.last_event_ids() == [None, "1", "1"]


async def test_stream_from_last_event_id_skips_older_events(kind: str) -> None:
    server = Server(sse(4, 5, 6, end=7))
    assert ids(await collect(server, kind, last_event_id=5)) == [6, 7]
    assert server.last_event_ids() == ["5"]


async def test_stream_204_means_nothing_left(kind: str) -> None:
    server = Server(httpx.Response(204))
    assert await collect(server, kind, last_event_id=9) == []
    assert len(server.requests) == 1


async def test_stream_204_after_a_cut_ends_the_stream(kind: str) -> None:
    server = Server(sse(1, 2), httpx.Response(204))
    assert ids(await collect(server, kind)) == [1, 2]
    assert server.last_event_ids() == [None, "2"]


async def test_stream_json_summary_ends_without_events(kind: str) -> None:
    server = Server(httpx.Response(200, json={"status": "completed", "final_value": 1}))
    assert await collect(server, kind) == []
    assert len(server.requests) == 1


async def test_stream_404_raises_task_not_found_without_retry(kind: str) -> None:
    server = Server(httpx.Response(404, text="Not found"), sse(1, end=2))
    with pytest.raises(TaskNotFound) as caught:
        await collect(server, kind)
    assert isinstance(caught.value, httpx.HTTPStatusError)
    assert isinstance(caught.value, StreamingError)
    assert caught.value.response.status_code == 404
    assert len(server.requests) == 1


async def test_stream_400_raises_without_retry(kind: str) -> None:
    server = Server(httpx.Response(400, text="bad Last-Event-ID"), sse(1, end=2))
    with pytest.raises(httpx.HTTPStatusError) as caught:
        await collect(server, kind, last_event_id=3)
    assert caught.value.response.status_code == 400
    assert not isinstance(caught.value, TaskNotFound)
    assert len(server.requests) == 1


async def test_stream_gives_up_after_max_retries(kind: str) -> None:
    server = Server(*(httpx.ConnectError("refused") for _ in range(4)))
    with pytest.raises(StreamInterrupted) as caught:
        await collect(server, kind, max_retries=3)
    assert isinstance(caught.value, httpx.TransportError)
    assert isinstance(caught.value.__cause__, httpx.ConnectError)
    assert len(server.requests) == 4  # the first try and three reconnects


async def test_stream_retry_budget_resets_on_progress(kind: str) -> None:
    # Four cuts in a row exceed max_retries=2, but each brings a new event.
    server = Server(sse(1), sse(2), sse(3), sse(4), sse(end=5))
    assert ids(await collect(server, kind, max_retries=2)) == [1, 2, 3, 4, 5]
    assert server.last_event_ids() == [None, "1", "2", "3", "4"]


async def test_stream_event_with_bad_data_raises(kind: str) -> None:
    body = b"id: 1\nevent: progress\ndata: [1, 2]\n\n"
    response = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)
    with pytest.raises(InvalidStreamEvent):
        await collect(Server(response), kind)


def test_reconnect_delay_honours_server_retry_doubling_up_to_cap() -> None:
    policy = ReconnectPolicy(max_retries=5, backoff=0.25, max_backoff=5.0)
    resume = _Resume(BASE + STREAM_PATH, None, policy)
    assert resume.next_delay() == 0.25
    assert resume.accept(ServerSentEvent(retry=1500)) is None
    assert [resume.next_delay() for _ in range(3)] == [3.0, 5.0, 5.0]


def test_reconnect_headers_carry_last_seen_id() -> None:
    resume = _Resume(BASE + STREAM_PATH, None, ReconnectPolicy())
    assert resume.headers() == {"Accept": "text/event-stream"}
    data = json.dumps({"_seq": 7})
    assert resume.accept(ServerSentEvent(event="progress", data=data, id="7")) is not None
    assert resume.headers()["Last-Event-ID"] == "7"
    assert resume.accept(ServerSentEvent(event="progress", data=data, id="7")) is None


# Status and creation


async def test_get_task_status_returns_json(kind: str) -> None:
    status = {"id": 42, "status": "running", "last_seq": 3, "stream_url": STREAM_PATH}
    server = Server(httpx.Response(200, json=status))
    client = make_client(server)
    assert await call(client, kind, "get_task_status", "tests", "ExampleTask", 42) == status
    assert str(server.requests[0].url) == f"{BASE}/tasks/tests/ExampleTask/42"
    await client.aclose()


async def test_get_task_status_404_raises_task_not_found(kind: str) -> None:
    client = make_client(Server(httpx.Response(404)))
    with pytest.raises(TaskNotFound):
        await call(client, kind, "get_task_status", "tests", "ExampleTask", 404)
    await client.aclose()


async def test_get_task_status_500_raises_http_status_error(kind: str) -> None:
    client = make_client(Server(httpx.Response(500)))
    with pytest.raises(httpx.HTTPStatusError) as caught:
        await call(client, kind, "get_task_status", "tests", "ExampleTask", 42)
    assert not isinstance(caught.value, TaskNotFound)
    await client.aclose()


async def test_create_task_posts_fields_and_returns_created(kind: str) -> None:
    created = {"id": 7, "app": "tests", "model": "ExampleTask", "status": "pending"}
    server = Server(httpx.Response(201, json={**created, "stream_url": "/stream/x"}))
    client = make_client(server)
    # "model" as a field name must not clash with the positional model argument.
    result = await call(client, kind, "acreate_task", "tests", "ExampleTask", message="hi", model=3)
    assert result["id"] == 7
    (request,) = server.requests
    assert (request.method, str(request.url)) == ("POST", f"{BASE}/tasks/tests/ExampleTask")
    assert json.loads(request.content) == {"message": "hi", "model": 3}
    await client.aclose()


async def test_create_task_400_carries_field_errors(kind: str) -> None:
    errors = {"message": ["This field is required."], "total": ["Not a number."]}
    client = make_client(Server(httpx.Response(400, json={"errors": errors})))
    with pytest.raises(InvalidTaskFields) as caught:
        await call(client, kind, "acreate_task", "tests", "ExampleTask", total="x")
    assert caught.value.errors == errors
    assert caught.value.response.status_code == 400
    await client.aclose()


async def test_create_task_400_without_json_body_has_no_field_errors(kind: str) -> None:
    client = make_client(Server(httpx.Response(400, text="Bad Request")))
    with pytest.raises(InvalidTaskFields) as caught:
        await call(client, kind, "acreate_task", "tests", "ExampleTask")
    assert caught.value.errors == {}
    await client.aclose()


# The shared client


def test_get_client_is_one_singleton_per_base_url() -> None:
    default = get_client()
    assert get_client() is default
    assert default.base_url == "http://127.0.0.1:8888"
    assert get_client("http://other.test/") is get_client("http://other.test")
    assert get_client("http://other.test") is not default


async def test_httpx_clients_are_made_lazily_and_remade_after_close() -> None:
    client = StreamingClient("http://lazy.test/")
    assert client._sync_client is None and client._async_client is None
    sync_client, async_client = client.sync_client, client.async_client
    assert client.sync_client is sync_client and client.async_client is async_client
    assert sync_client.base_url == "http://lazy.test"
    await client.aclose()
    assert sync_client.is_closed and async_client.is_closed
    assert client.sync_client is not sync_client
    client.close()


async def test_module_functions_use_the_default_client(monkeypatch: pytest.MonkeyPatch) -> None:
    server = Server(sse(1, end=2))
    client = make_client(server)
    monkeypatch.setattr(client_module, "get_client", lambda: client)
    assert ids(list(client_module.stream("tests", "ExampleTask", 42))) == [1, 2]
    assert str(server.requests[0].url) == BASE + STREAM_PATH
    await client.aclose()


def test_importing_the_client_needs_neither_django_nor_psycopg() -> None:
    code = "import sys, streaming.client; print(sorted({'django', 'psycopg'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


async def test_a_stream_token_rides_on_every_reconnect(kind: str) -> None:
    server = Server(cut(1, 2), sse(3, end=4))
    client = make_client(server)
    try:
        if kind == "sync":
            got = list(client.stream("tests", "ExampleTask", 42, token="a:b/c"))
        else:
            got = [e async for e in client.astream("tests", "ExampleTask", 42, token="a:b/c")]
    finally:
        await client.aclose()
    assert ids(got) == [1, 2, 3, 4]
    assert [r.url.params.get("token") for r in server.requests] == ["a:b/c", "a:b/c"]
    assert server.last_event_ids() == [None, "2"]


def test_headers_and_the_seeds_defaults_reach_the_clients_it_makes() -> None:
    client = StreamingClient(BASE, headers={"Authorization": "Bearer t0k"})
    try:
        for http in (client.sync_client, client.async_client):
            assert http.headers["authorization"] == "Bearer t0k"
            assert http.follow_redirects is True
            assert http.timeout.read == 60.0
    finally:
        client.close()
