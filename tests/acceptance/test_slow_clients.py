"""Hostile and slow HTTP clients against a real runserver_stream, over raw sockets.

The server bounds a request's head (MAX_HEADER_BYTES), the time to receive it
(HEADER_TIMEOUT) and the silence between requests (IDLE_TIMEOUT), refuses WebSocket
upgrades cleanly, and never applies any of these to a response in progress (an SSE stream).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from typing import BinaryIO

import httpx
import pytest

from tests.models import ScriptedTask
from tests.support import ManagedProcess, parse_sse, read_stream

pytestmark = pytest.mark.django_db(transaction=True)

HEADER_TIMEOUT = 3.0
IDLE_TIMEOUT = 2.0
SLACK = 1.0  # timer granularity, process scheduling on a loaded 2-core machine
LIMITS = {
    "STREAMING_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
    "STREAMING_IDLE_TIMEOUT": str(IDLE_TIMEOUT),
}
MAX_HEADER_BYTES = 65536  # the default
GET_HEALTH = b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n"


@pytest.fixture
def server(server_factory: Callable[..., ManagedProcess]) -> ManagedProcess:
    return server_factory(**LIMITS)


def connect(server: ManagedProcess) -> socket.socket:
    assert server.port is not None
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float | None]:
    """What the server sends until it closes (or resets) the connection, and when it did;
    ``None`` for the time if it was still open after ``timeout`` seconds."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        return data, None
    except ConnectionResetError:
        pass
    return data, time.monotonic()


def read_response(reader: BinaryIO) -> tuple[int, bytes]:
    """One response with a Content-Length, from ``sock.makefile("rb")``: status, body."""
    status = reader.readline()
    assert status, "the connection closed before a response"
    length = 0
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return int(status.split()[1]), reader.read(length)


def dechunk(body: bytes) -> bytes:
    """A chunked body, decoded (up to its last chunk)."""
    out = b""
    while True:
        size, _, body = body.partition(b"\r\n")
        if int(size, 16) == 0:
            return out
        out, body = out + body[: int(size, 16)], body[int(size, 16) + 2 :]


def status_of(reply: bytes) -> int | None:
    return int(reply.split()[1]) if reply.startswith(b"HTTP/1.1 ") else None


def memory_kib(pid: int) -> tuple[int, int]:
    """The process's resident memory now and at its peak (VmRSS, VmHWM), in KiB."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def assert_healthy(server: ManagedProcess) -> None:
    assert httpx.get(server.url + "/health", timeout=5).text == "OK"
    log = server.log()
    assert "Traceback" not in log and "ERROR" not in log, log


@pytest.mark.parametrize("size", [1 << 20, 64 << 20], ids=["1MB", "64MB"])
def test_a_huge_head_is_refused_without_being_buffered(server: ManagedProcess, size: int) -> None:
    rss_before, peak_before = memory_kib(server.proc.pid)
    sock = connect(server)
    started = time.monotonic()
    sent = 0
    with sock:
        try:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\nX-Big: ")
            chunk = b"a" * 65536
            while sent < size:
                sent += sock.send(chunk)
        except OSError:  # reset or broken pipe: the server closed on us, as it should
            pass
        reply, closed_at = read_until_closed(sock, timeout=5)
    assert closed_at is not None and closed_at - started < 5, "the server kept reading"
    assert status_of(reply) in (None, 400, 431), reply[:200]
    if size > 8 << 20:  # more than the socket buffers hold: the server stopped reading
        assert sent < size
    rss_after, peak_after = memory_kib(server.proc.pid)
    growth = max(rss_after - rss_before, peak_after - peak_before)
    assert growth < 4096, f"the server's memory grew by {growth} KiB"
    assert_healthy(server)


def test_a_huge_head_sent_at_once_is_answered_431(server: ManagedProcess) -> None:
    # A client with too big a cookie: it sends everything, then reads the refusal.
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\nCookie: " + b"c" * 100_000)
        reply, closed_at = read_until_closed(sock, timeout=5)
    assert closed_at is not None
    assert status_of(reply) == 431, reply[:200]
    assert_healthy(server)


def test_heads_up_to_the_limit_and_big_bodies_are_served(server: ManagedProcess) -> None:
    filler = "x" * 1000
    headers = {f"x-fill-{i}": filler for i in range((MAX_HEADER_BYTES - 2048) // 1012)}
    resp = httpx.get(server.url + "/health", headers=headers)
    assert resp.status_code == 200 and resp.text == "OK"
    # A body is not part of the head, however big, and neither is one pipelined after it.
    body = json.dumps({"ticks": 1, "result": {"pad": "p" * 300_000}}).encode()
    post = (
        b"POST /tasks/tests/ScriptedTask HTTP/1.1\r\nHost: test\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    with connect(server) as sock, sock.makefile("rb") as reader:
        sock.sendall(post + body + GET_HEALTH)
        created, answer = read_response(reader)
        assert created == 201, answer[:300]
        assert read_response(reader) == (200, b"OK")
    assert_healthy(server)


def test_a_slowloris_is_cut_after_header_timeout(server: ManagedProcess) -> None:
    with connect(server) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        reply, closed_at = b"", None
        for i in range(10):  # one header line every 2 s: 20 s if nobody stops it
            reply, closed_at = read_until_closed(sock, timeout=2)
            if closed_at is not None:
                break
            sock.sendall(b"X-Slow-%d: 1\r\n" % i)
    assert closed_at is not None, "a head trickling in kept its connection open"
    assert HEADER_TIMEOUT - 0.2 < closed_at - started < HEADER_TIMEOUT + SLACK
    assert status_of(reply) in (None, 408), reply
    assert_healthy(server)


def test_a_keep_alive_head_is_timed_from_the_end_of_the_previous_response(
    server: ManagedProcess,
) -> None:
    with connect(server) as sock, sock.makefile("rb") as reader:
        sock.sendall(GET_HEALTH)
        assert read_response(reader) == (200, b"OK")
        answered = time.monotonic()
        trickle = b"GET /health HTTP/1.1\r\nX-Slow: " + b"a" * 100
        closed_at = None
        for i in range(20):  # a byte every IDLE_TIMEOUT / 2: never idle, never a whole head
            time.sleep(IDLE_TIMEOUT / 2)
            try:
                sock.sendall(trickle[i : i + 1])
            except OSError:
                closed_at = time.monotonic()
                break
            _, closed_at = read_until_closed(sock, timeout=0.01)
            if closed_at is not None:
                break
    assert closed_at is not None, "a keep-alive connection trickling a head stayed open"
    assert HEADER_TIMEOUT - 0.2 < closed_at - answered < HEADER_TIMEOUT + SLACK + 1


def test_idle_connections_are_closed_after_idle_timeout(server: ManagedProcess) -> None:
    # A connection that never says anything, and a keep-alive one after its response.
    with connect(server) as silent:
        opened = time.monotonic()
        reply, closed_at = read_until_closed(silent, timeout=IDLE_TIMEOUT + 5)
    assert closed_at is not None and reply == b""
    assert IDLE_TIMEOUT - 0.2 < closed_at - opened < IDLE_TIMEOUT + SLACK
    with connect(server) as kept, kept.makefile("rb") as reader:
        for _ in range(2):  # a request within IDLE_TIMEOUT reuses the connection
            kept.sendall(GET_HEALTH)
            assert read_response(reader) == (200, b"OK")
            time.sleep(IDLE_TIMEOUT / 2)
        kept.sendall(GET_HEALTH)
        assert read_response(reader) == (200, b"OK")
        answered = time.monotonic()
        reply, closed_at = read_until_closed(kept, timeout=IDLE_TIMEOUT + 5)
    assert closed_at is not None and reply == b""
    assert IDLE_TIMEOUT - 0.2 < closed_at - answered < IDLE_TIMEOUT + SLACK
    assert_healthy(server)


def test_an_sse_stream_outlives_every_timeout_and_delivers_every_event(
    server: ManagedProcess,
) -> None:
    # Silences of 3.5 s inside the response (no keep-alive comment before 15 s): longer than
    # both HEADER_TIMEOUT and IDLE_TIMEOUT, and more than both together in all.
    task = ScriptedTask.objects.create(ticks=2, delay=HEADER_TIMEOUT + 0.5)
    started = time.monotonic()
    resp, events = read_stream(f"{server.url}/stream/tests/ScriptedTask/{task.pk}")
    elapsed = time.monotonic() - started
    assert resp.status_code == 200
    assert [(e.event, e.id) for e in events] == [("tick", 1), ("tick", 2), ("end", 3)]
    assert elapsed > HEADER_TIMEOUT + IDLE_TIMEOUT
    # On a raw socket too, kept open across the silences: a frame arrives after each.
    task = ScriptedTask.objects.create(ticks=2, delay=HEADER_TIMEOUT + 0.5)
    with connect(server) as sock:
        sock.sendall(b"GET /stream/tests/ScriptedTask/%d HTTP/1.1\r\nHost: test\r\n\r\n" % task.pk)
        data, closed_at = read_until_closed(sock, timeout=3 * (HEADER_TIMEOUT + 0.5) + 5)
    assert closed_at is not None, "the stream did not end"
    head, _, body = data.partition(b"\r\n\r\n")
    assert status_of(head) == 200 and b"text/event-stream" in head
    assert [e.event for e in parse_sse(dechunk(body).decode())] == ["tick", "tick", "end"]
    assert_healthy(server)


@pytest.mark.slow
def test_an_sse_stream_lasts_minutes_with_the_default_limits(
    server_factory: Callable[..., ManagedProcess],
) -> None:
    server = server_factory()  # HEADER_TIMEOUT 10 s, IDLE_TIMEOUT 5 s, KEEPALIVE_INTERVAL 15 s
    task = ScriptedTask.objects.create(ticks=4, delay=40.0)
    with connect(server) as sock:
        sock.sendall(b"GET /stream/tests/ScriptedTask/%d HTTP/1.1\r\nHost: test\r\n\r\n" % task.pk)
        data, closed_at = read_until_closed(sock, timeout=60)  # at most 60 s between reads
    assert closed_at is not None, "the stream went silent"
    body = dechunk(data.partition(b"\r\n\r\n")[2])
    assert [e.event for e in parse_sse(body.decode())] == ["tick"] * 4 + ["end"]
    assert body.count(b": keep-alive\n") >= 4  # two in each 40 s silence
    assert_healthy(server)


@pytest.mark.parametrize("path", ["/health", "/stream/tests/ScriptedTask/{pk}"])
def test_a_websocket_upgrade_is_a_clean_4xx(server: ManagedProcess, path: str) -> None:
    task = ScriptedTask.objects.create(ticks=1)
    request = (
        f"GET {path.format(pk=task.pk)} HTTP/1.1\r\nHost: test\r\n"
        "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    with connect(server) as sock:
        sock.sendall(request.encode())
        reply, closed_at = read_until_closed(sock, timeout=5)
    assert closed_at is not None
    status = status_of(reply)
    assert status is not None and 400 <= status < 500, reply[:300]
    assert b"upgrade: websocket" not in reply.lower()
    # Other upgrades (h2c, as curl --http2 asks) are ignored: plain HTTP/1.1 answers them.
    with connect(server) as sock, sock.makefile("rb") as reader:
        sock.sendall(
            b"GET /health HTTP/1.1\r\nHost: test\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
        )
        assert read_response(reader) == (200, b"OK")
    assert_healthy(server)
