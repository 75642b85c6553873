"""Fault-injection helpers: worker processes, metrics, log checks, followers, slow readers."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psycopg

from streaming.client import ReconnectPolicy, StreamEvent, StreamingClient, StreamInterrupted
from tests import support

T = TypeVar("T")

# Leases short enough that a dead worker's task is reclaimed within a few seconds.
FAST_LEASES = {
    "STREAMING_LEASE_TTL": "2",
    "STREAMING_HEARTBEAT_INTERVAL": "0.3",
    "STREAMING_WORKER_POLL_INTERVAL": "0.2",
    "STREAMING_HUB_POLL_INTERVAL": "1",
}
# Followers reconnect quickly and often: faults make them reconnect on purpose.
PATIENT = ReconnectPolicy(max_retries=40, backoff=0.1, max_backoff=0.5, read_timeout=20.0)
# Followers with several servers give one up quickly and resume on the next.
FAILOVER = ReconnectPolicy(max_retries=2, backoff=0.05, max_backoff=0.1, read_timeout=20.0)


def wait_until(
    check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.02
) -> T:
    """Call ``check`` until it returns something truthy; that value, or AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def start_worker(
    database_url: str, log_dir: Path, *extra: str, wait: float = 30.0, **env: str
) -> support.ManagedProcess:
    """``manage.py runworker_stream``; returns once it logs that it is ready."""
    mp = support.start_manage(
        ["runworker_stream", *extra], support.child_env(database_url, **env), log_dir
    )
    wait_until(lambda: _ready(mp), wait, f"worker {mp.proc.pid} to start", interval=0.05)
    return mp


def _ready(mp: support.ManagedProcess) -> bool:
    if mp.proc.poll() is not None:
        raise RuntimeError(f"worker exited with {mp.proc.returncode}:\n{mp.log()}")
    return "ready:" in mp.log()


def metrics(url: str) -> dict[str, float]:
    """A server's /metrics as a dict (Prometheus text format, no labels)."""
    out: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


# -- the database, seen from the side ------------------------------------------------------

_OF_TASK = "WHERE app_label = %s AND model_name = %s AND task_id = %s"


def _task_sql(query: str, task: Any, *more: Any) -> list[tuple[Any, ...]]:
    """``query`` (ending in a WHERE on the task's identity, ``_OF_TASK``) on its own connection."""
    return support.sql(query, task._meta.app_label, task._meta.object_name, task.pk, *more)


@dataclass(frozen=True)
class Run:
    status: str
    attempt: int
    last_seq: int
    owner_pid: int | None
    error: dict[str, Any] | None


def run_of(task: Any) -> Run:
    """The run row of a task (status "absent" before it is queued), on a fresh connection."""
    rows = _task_sql(
        f"SELECT status, attempt, last_seq, lease_owner, error FROM streaming_taskrun {_OF_TASK}",
        task,
    )
    if not rows:
        return Run("absent", 0, 0, None, None)
    status, attempt, last_seq, owner, error = rows[0]
    # lease_owner is "host:pid:nonce" (streaming.worker.make_owner).
    pid = int(owner.split(":")[-2]) if owner else None
    return Run(status, attempt, last_seq, pid, error)


@dataclass(frozen=True)
class Row:
    seq: int
    attempt: int
    event_type: str
    data: dict[str, Any]


def log_of(task: Any) -> list[Row]:
    """Every event row of a task, in seq order."""
    rows = _task_sql(
        f"SELECT seq, attempt, event_type, data FROM streaming_taskevent {_OF_TASK} ORDER BY seq",
        task,
    )
    return [Row(*r) for r in rows]


def assert_gap_free(task: Any) -> int:
    """Check in SQL that the task's seqs are exactly 1..N; N."""
    rows = _task_sql(
        "SELECT count(*), count(DISTINCT seq), coalesce(min(seq), 0), coalesce(max(seq), 0), "
        "       bool_and(attempt >= lag_attempt) "
        "  FROM (SELECT seq, attempt, lag(attempt, 1, 0) OVER (ORDER BY seq) AS lag_attempt "
        f"          FROM streaming_taskevent {_OF_TASK}) e",
        task,
    )
    count, distinct, low, high, monotonic = rows[0]
    assert count == distinct == high and low == 1, f"seqs not 1..N: {rows[0]}"
    assert monotonic, "an older attempt wrote after a newer one"
    return int(high)


def run_column(task: Any, column: str) -> Any:
    """One column of the task's run row."""
    assert column.isidentifier()
    return _task_sql(f"SELECT {column} FROM streaming_taskrun {_OF_TASK}", task)[0][0]


def lease_expires_at(task: Any) -> Any:
    """When the task's current lease expires (a datetime; None when nobody holds it)."""
    return run_column(task, "lease_expires_at")


def expire_lease(task: Any) -> None:
    """Make the task's lease expired now, as a heartbeat late by a whole TTL leaves it."""
    _task_sql(
        "UPDATE streaming_taskrun SET lease_expires_at = now() - interval '1 second' " + _OF_TASK,
        task,
    )


def created_at(task: Any, seq: int) -> Any:
    """When the event ``seq`` of a task was written (the database's clock)."""
    return _task_sql(
        f"SELECT created_at FROM streaming_taskevent {_OF_TASK} AND seq = %s", task, seq
    )[0][0]


def db_now() -> Any:
    return support.sql("SELECT clock_timestamp()")[0][0]


def listener_backends() -> dict[int, int]:
    """Each server process's LISTEN connection: {client pid: backend pid}."""
    rows = support.sql(
        "SELECT application_name, pid FROM pg_stat_activity "
        "WHERE application_name LIKE 'streaming-listener:%%'"
    )
    return {int(name.split(":")[1]): pid for name, pid in rows}


def terminate_backend(pid: int) -> bool:
    return bool(support.sql("SELECT pg_terminate_backend(%s)", pid)[0][0])


def terminate_other_backends() -> int:
    """Terminate every other client connection to the test database; how many.

    This process's Django connection goes too: call ``connections.close_all()`` after."""
    rows = support.sql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid() "
        "AND backend_type = 'client backend'"
    )
    return sum(1 for (ok,) in rows if ok)


@contextmanager
def run_row_locked(task: Any) -> Iterator[psycopg.Connection[Any]]:
    """Hold the task's run row FOR UPDATE: its worker's next append or finish blocks."""
    with psycopg.connect(support.database_url_from_settings()) as conn:
        conn.execute(
            f"SELECT 1 FROM streaming_taskrun {_OF_TASK} FOR UPDATE".encode(),
            (task._meta.app_label, task._meta.object_name, task.pk),
        )
        yield conn
        conn.rollback()


def an_append_is_blocked() -> bool:
    """Whether some worker's append waits on a row lock (``run_row_locked``'s)."""
    rows = support.sql(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND query LIKE '%%streaming_append%%'"
    )
    return bool(rows[0][0])


# -- clients ---------------------------------------------------------------------------------


class Follower(threading.Thread):
    """Follows one task's stream with ``StreamingClient.stream`` in a thread.

    With one URL it reconnects there patiently; with several it moves on to the next server
    (Last-Event-ID = the last event it got) whenever one stops answering.
    """

    def __init__(
        self, urls: str | list[str], task: Any, last_event_id: int | None = None, name: str = ""
    ) -> None:
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        super().__init__(daemon=True, name=name or f"follow-{self.urls[0]}")
        self.task = task
        self.last_event_id = last_event_id
        self.events: list[StreamEvent] = []
        self.hops: list[str] = []  # the servers it read from, in order
        self.error: BaseException | None = None
        self.policy = PATIENT if len(self.urls) == 1 else FAILOVER

    def run(self) -> None:
        try:
            for i in range(20):
                if self._follow(self.urls[i % len(self.urls)]):
                    return
            raise AssertionError("the stream never ended")
        except BaseException as exc:
            self.error = exc

    def _follow(self, url: str) -> bool:
        t = self.task
        client = StreamingClient(url, reconnect=self.policy)
        self.hops.append(url)
        last = self.events[-1].id if self.events else self.last_event_id
        try:
            for ev in client.stream(t._meta.app_label, t._meta.object_name, t.pk, last):
                self.events.append(ev)
            return True
        except StreamInterrupted:
            return False
        finally:
            client.close()

    def finish(self, timeout: float = 60.0) -> list[StreamEvent]:
        """Wait for the stream's end; the events (raises what the thread raised)."""
        self.join(timeout)
        assert not self.is_alive(), f"{self.name} still streaming after {timeout}s"
        if self.error is not None:
            raise AssertionError(f"{self.name} failed: {self.error!r}") from self.error
        return self.events


class Reader(threading.Thread):
    """One plain SSE GET in a thread, no reconnect: what it got before the stream ended."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True, name=f"read-{url}")
        self.url = url
        self.events: list[support.SSE] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            _, self.events = support.read_stream(self.url, headers={"Accept": "text/event-stream"})
        except BaseException as exc:
            self.error = exc


def same_as_log(events: list[StreamEvent], rows: list[Row], after: int = 0) -> None:
    """Assert a client saw exactly the log rows after ``after``: ids, types, data."""
    expected = [(r.seq, r.event_type) for r in rows if r.seq > after]
    assert [(e.id, e.event) for e in events] == expected
    for ev, row in zip(events, [r for r in rows if r.seq > after], strict=True):
        assert {k: v for k, v in ev.data.items() if not k.startswith("_")} == row.data


class RawStream:
    """An SSE GET on a raw socket with a tiny receive buffer, read only when told to."""

    def __init__(self, url: str, path: str, rcvbuf: int = 4096) -> None:
        host, port = httpx.URL(url).host, httpx.URL(url).port
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect((host, port))
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n"
            "Connection: close\r\n\r\n"
        )
        self.sock.sendall(request.encode())

    def read_all(self, timeout: float = 60.0) -> list[support.SSE]:
        """Read until the server closes the connection; the events of the body."""
        raw = bytearray()
        self.sock.settimeout(timeout)
        while chunk := self.sock.recv(1 << 20):
            raw += chunk
        self.sock.close()
        head, _, body = bytes(raw).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head[:200]
        if b"transfer-encoding: chunked" in head.lower():
            body = _dechunk(body)
        return support.parse_sse(body.decode())

    def close(self) -> None:
        self.sock.close()


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    pos = 0
    while pos < len(body):
        eol = body.index(b"\r\n", pos)
        size = int(body[pos:eol].split(b";")[0], 16)
        if size == 0:
            break
        out += body[eol + 2 : eol + 2 + size]
        pos = eol + 2 + size + 2
    return bytes(out)


def tick_numbers(rows: list[Row], attempt: int) -> list[int]:
    """The ``i`` of each tick event an attempt wrote (ScriptedTask)."""
    return [r.data["i"] for r in rows if r.attempt == attempt and r.event_type == "tick"]
