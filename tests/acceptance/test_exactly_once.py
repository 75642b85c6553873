"""Exactly-once behaviour end to end: real ``manage.py`` processes, real HTTP, real Postgres.

The concurrency cap, cancels sent many times at once, a Last-Event-ID past the log's end,
database restarts under HTTP requests and under group commit, SIGTERM mid-append, and a
worker whose connection stalls for longer than its lease: each time the log must stay
gap-free, every attempt's events intact, and the task must end exactly once.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from django.db import connections

from streaming.embedded import EphemeralServer
from tests import faults
from tests.faults import FAST_LEASES, Follower, wait_until
from tests.models import ScriptedTask
from tests.support import SSE, ManagedProcess, parse_sse, sql
from tests.tcpproxy import TcpProxy

pytestmark = pytest.mark.django_db(transaction=True)
SSE_ACCEPT = {"Accept": "text/event-stream"}
FINISHED = ("completed", "failed", "cancelled")


# -- helpers ----------------------------------------------------------------------------------


def create_on(server: ManagedProcess, **fields: Any) -> ScriptedTask:
    """Create a task through ``server`` (which claims it when it has a worker)."""
    resp = httpx.post(server.url + "/tasks/tests/ScriptedTask", json=fields, timeout=30)
    assert resp.status_code == 201, resp.text
    return ScriptedTask.objects.get(pk=resp.json()["id"])


def task_path(task: ScriptedTask) -> str:
    return f"tests/ScriptedTask/{task.pk}"


def wait_status(task: ScriptedTask, statuses: tuple[str, ...], timeout: float) -> faults.Run:
    """Wait until the task's run has one of ``statuses``; the run."""

    def check() -> faults.Run | None:
        run = faults.run_of(task)
        return run if run.status in statuses else None

    return wait_until(check, timeout, f"task {task.pk} to be one of {statuses}")


def wait_last_seq(task: ScriptedTask, at_least: int, timeout: float = 20.0) -> int:
    def check() -> int | None:
        seq = faults.run_of(task).last_seq
        return seq if seq >= at_least else None

    return wait_until(check, timeout, f"task {task.pk} to reach seq {at_least}")


def wait_attempt(task: ScriptedTask, attempt: int, timeout: float) -> faults.Run:
    def check() -> faults.Run | None:
        run = faults.run_of(task)
        return run if run.attempt >= attempt else None

    return wait_until(check, timeout, f"task {task.pk} to reach attempt {attempt}")


def wait_owner(task: ScriptedTask, timeout: float = 10.0) -> int:
    def check() -> int | None:
        return faults.run_of(task).owner_pid

    return wait_until(check, timeout, f"a worker to claim task {task.pk}")


def types_of(rows: list[faults.Row]) -> list[str]:
    return [r.event_type for r in rows]


def attempts_in(rows: list[faults.Row]) -> list[int]:
    return sorted({r.attempt for r in rows})


def assert_each_attempt_intact(rows: list[faults.Row]) -> None:
    """Every attempt's ticks are 1..k, each once, in seq order: no hole, no repeat."""
    for attempt in attempts_in(rows):
        ticks = faults.tick_numbers(rows, attempt)
        assert ticks == list(range(1, len(ticks) + 1)), (
            f"attempt {attempt}'s ticks are not 1..{len(ticks)}: {_summary(ticks)}"
        )


def _summary(ticks: list[int]) -> str:
    """Where a tick sequence departs from 1, 2, 3…"""
    for i, tick in enumerate(ticks):
        if tick != i + 1:
            return f"position {i}: {ticks[max(0, i - 3) : i + 4]} (expected {i + 1})"
    return "ok"


def assert_ended_once(rows: list[faults.Row], status: str) -> None:
    kinds = Counter(types_of(rows))
    assert kinds["end"] == 1, kinds
    assert rows[-1].event_type == "end" and rows[-1].data["status"] == status, rows[-1]


@dataclass
class Answer:
    kind: str
    status: int | None  # None: no HTTP answer (connection error)
    sent: float  # time.monotonic()
    done: float
    body: str = ""


@dataclass
class Pounder:
    """A client thread sending a fixed round of requests in a loop; every answer recorded."""

    base_url: str
    requests: list[tuple[str, str, str, dict[str, Any] | None]]  # kind, method, path, json
    answers: list[Answer] = field(default_factory=list)
    error: BaseException | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Pounder:
        self._thread = threading.Thread(target=self._run, daemon=True, name="pounder")
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            with httpx.Client(base_url=self.base_url, timeout=30) as http:
                while not self._stop.is_set():
                    for kind, method, path, body in self.requests:
                        sent = time.monotonic()
                        try:
                            resp = http.request(method, path, json=body)
                        except httpx.TransportError as exc:
                            self.answers.append(
                                Answer(kind, None, sent, time.monotonic(), repr(exc))
                            )
                            time.sleep(0.05)
                            continue
                        self.answers.append(
                            Answer(kind, resp.status_code, sent, time.monotonic(), resp.text[:500])
                        )
                    time.sleep(0.01)
        except BaseException as exc:
            self.error = exc

    def stop(self) -> list[Answer]:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(60)
        assert not self._thread.is_alive(), "the client thread hangs"
        assert self.error is None, repr(self.error)
        return self.answers


class DeadlineReader(threading.Thread):
    """One SSE GET that gives up after ``deadline`` s: a stream that never ends is caught.

    ``on_open`` runs once the response headers are in (the server subscribed before them).
    """

    def __init__(
        self,
        url: str,
        headers: dict[str, str],
        deadline: float,
        on_open: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__(daemon=True, name=f"deadline-read-{url}")
        self.url = url
        self.headers = headers
        self.deadline = deadline
        self.on_open = on_open
        self.status: int | None = None
        self.opened: Any = None
        self.events: list[SSE] = []
        self.ended_by_server = False
        self.error: BaseException | None = None

    def run(self) -> None:
        end = time.monotonic() + self.deadline
        try:
            with (
                httpx.Client(timeout=10) as client,
                client.stream("GET", self.url, headers=self.headers) as resp,
            ):
                self.status = resp.status_code
                if self.on_open is not None:
                    self.opened = self.on_open()
                buf = ""
                for chunk in resp.iter_text():
                    buf += chunk
                    if time.monotonic() > end:
                        break
                else:
                    self.ended_by_server = True
                cut = buf.rfind("\n\n")
                self.events = parse_sse(buf[: cut + 2] if cut >= 0 else "")
        except BaseException as exc:
            self.error = exc

    def finish(self) -> list[SSE]:
        self.join(self.deadline + 15)
        assert not self.is_alive(), "the reader thread hangs"
        assert self.error is None, repr(self.error)
        assert self.ended_by_server, (
            f"the stream was still open after {self.deadline}s; it got "
            f"{[(e.id, e.event) for e in self.events][-5:]}"
        )
        return self.events


class CancelSquad:
    """Ten (or ``n``) clients, connected and waiting, that POST one URL the moment it is
    known, spread over a few milliseconds (client ``i`` waits ``i`` * 2 ms)."""

    def __init__(self, base_url: str, n: int) -> None:
        self.n = n
        self.url = ""
        self.go = threading.Event()
        self.ready = threading.Barrier(n + 1)
        self.pool = ThreadPoolExecutor(n)
        self.futures = [self.pool.submit(self._one, base_url, i) for i in range(n)]
        self.ready.wait(20)

    def _one(self, base_url: str, i: int) -> httpx.Response:
        with httpx.Client(base_url=base_url, timeout=30) as http:
            assert http.get("/health").text == "OK"  # the connection is open beforehand
            self.ready.wait(20)
            assert self.go.wait(60)
            time.sleep(i * 0.002)
            return http.post(self.url)

    def fire(self, url: str) -> list[httpx.Response]:
        self.url = url
        self.go.set()
        try:
            return [f.result(60) for f in self.futures]
        finally:
            self.pool.shutdown()


def finish(follower: Follower, server: ManagedProcess, timeout: float = 60.0) -> list[Any]:
    """``follower.finish()``, saying where it stopped when it did not end."""
    try:
        return follower.finish(timeout)
    except AssertionError as exc:
        got = follower.events
        raise AssertionError(
            f"{exc}: {len(got)} events, last {got[-1].id if got else None} "
            f"({got[-1].event if got else None}); the log has {faults.run_of(follower.task)}; "
            f"hops {follower.hops}\n{server_log_tail(server)}"
        ) from exc


def restart_postgres(
    pg_server: EphemeralServer, down_for: float, immediate: bool = False
) -> tuple[float, float]:
    """Stop Postgres, keep it down ``down_for`` s, start it; the monotonic outage window.

    ``immediate``: crash-like, so a commit may be durable and its acknowledgement lost."""
    began = time.monotonic()
    try:
        pg_server.stop(immediate=immediate)
        time.sleep(down_for)
    finally:
        pg_server.start()
        connections.close_all()  # this process's Django connection died with the server
    return began, time.monotonic()


def server_log_tail(mp: ManagedProcess, lines: int = 40) -> str:
    return "\n".join(mp.log().splitlines()[-lines:])


# -- 1. the concurrency cap -------------------------------------------------------------------


def test_a_worker_never_runs_more_tasks_at_once_than_its_concurrency(
    server_factory: Callable[..., ManagedProcess],
) -> None:
    cap, count, ticks = 8, 12, 20
    server = server_factory(STREAMING_WORKER_CONCURRENCY=str(cap))
    samples: list[tuple[int, int]] = []  # (running, pending) in the run table
    local: list[float] = []  # the server's own count of the tasks it runs
    stop = threading.Event()

    def sample() -> None:
        n = 0
        while not stop.is_set():
            running, pending = sql(
                "SELECT count(*) FILTER (WHERE status = 'running'), "
                "       count(*) FILTER (WHERE status = 'pending') FROM streaming_taskrun"
            )[0]
            samples.append((running, pending))
            n += 1
            if n % 5 == 0:
                local.append(faults.metrics(server.url)["streaming_worker_running_tasks"])

    sampler = threading.Thread(target=sample, daemon=True, name="sampler")
    sampler.start()
    try:
        barrier = threading.Barrier(count)

        def post(_: int) -> httpx.Response:
            barrier.wait(10)
            return httpx.post(
                server.url + "/tasks/tests/ScriptedTask",
                json={"ticks": ticks, "delay": 0.1},
                timeout=30,
            )

        with ThreadPoolExecutor(count) as pool:
            answers = list(pool.map(post, range(count)))
        assert [a.status_code for a in answers] == [201] * count, [a.text for a in answers]
        tasks = [ScriptedTask.objects.get(pk=a.json()["id"]) for a in answers]
        wait_until(
            lambda: (
                sql(
                    "SELECT count(*) FROM streaming_taskrun WHERE status = ANY(%s)", list(FINISHED)
                )[0][0]
                == count
            ),
            60,
            "every task to finish",
        )
    finally:
        stop.set()
        sampler.join(10)
    assert samples, "no sample taken"
    assert max(r for r, _ in samples) <= cap, f"running at once: {max(r for r, _ in samples)}"
    assert local and max(local) <= cap, f"the worker ran {max(local)} at once"
    # The ones over the cap waited, queued, while eight ran.
    assert max((p for r, p in samples if r == cap), default=0) >= count - cap, samples[:50]

    # The same from the run table's timestamps: no claim while eight others were running.
    runs = sql("SELECT task_id, started_at, finished_at FROM streaming_taskrun ORDER BY started_at")
    assert len(runs) == count
    for task_id, started, _ in runs:
        overlapping = [t for t, s, f in runs if s <= started < f]
        assert len(overlapping) <= cap, f"task {task_id} started with {overlapping} running"

    for task in tasks:
        faults.assert_gap_free(task)
        run = faults.run_of(task)
        assert (run.status, run.attempt) == ("completed", 1), run
        rows = faults.log_of(task)
        assert faults.tick_numbers(rows, 1) == list(range(1, ticks + 1))
        assert_ended_once(rows, "completed")


def test_the_cap_holds_while_tasks_come_and_go(
    server_factory: Callable[..., ManagedProcess],
) -> None:
    """Short tasks posted steadily: slots free while new claims arrive, again and again."""
    cap, threads, each = 4, 6, 8
    server = server_factory(STREAMING_WORKER_CONCURRENCY=str(cap))

    def post_several(_: int) -> list[int]:
        out = []
        with httpx.Client(base_url=server.url, timeout=30) as http:
            for _ in range(each):
                resp = http.post("/tasks/tests/ScriptedTask", json={"ticks": 3, "delay": 0.02})
                assert resp.status_code == 201, resp.text
                out.append(resp.json()["id"])
        return out

    with ThreadPoolExecutor(threads) as pool:
        ids = [i for batch in pool.map(post_several, range(threads)) for i in batch]
    assert len(ids) == threads * each
    wait_until(
        lambda: (
            sql("SELECT count(*) FROM streaming_taskrun WHERE status = 'completed'")[0][0]
            == len(ids)
        ),
        90,
        "every task to complete",
    )
    runs = sql("SELECT task_id, started_at, finished_at FROM streaming_taskrun")
    peak = max(sum(1 for _, s, f in runs if s <= started < f) for _, started, _ in runs)
    assert peak <= cap, f"{peak} tasks ran at once (cap {cap})"
    assert sql("SELECT max(attempt) FROM streaming_taskrun")[0][0] == 1


# -- 2. many cancels at once ------------------------------------------------------------------


@pytest.mark.parametrize("moment", ["mid_run", "on_creation"])
def test_ten_cancels_at_once_cancel_the_run_once_and_promptly(
    server_factory: Callable[..., ManagedProcess], moment: str
) -> None:
    """Ten cancels in parallel, on a task mid-run or the moment it is created (while its
    worker claims it and loads its row): one cancel, one end, no reclaim."""
    trials = 5
    # A long lease: a cancel that left the run "running" would only end by a reclaim 30 s on.
    server = server_factory(STREAMING_LEASE_TTL="30", STREAMING_HEARTBEAT_INTERVAL="5")
    for trial in range(trials):
        squad = CancelSquad(server.url, 10)
        task = create_on(server, ticks=10_000, delay=0.05)
        if moment == "mid_run":
            wait_last_seq(task, 2)
            assert faults.run_of(task).owner_pid == server.proc.pid
        url = f"{server.url}/tasks/{task_path(task)}/cancel"
        answers = squad.fire(url)
        codes = [a.status_code for a in answers]
        assert set(codes) <= {202, 409}, (trial, [(a.status_code, a.text) for a in answers])
        assert 202 in codes, (trial, codes)
        # Well inside the 30 s lease: stopped by the cancel, not by a lease expiry.
        run = wait_status(task, FINISHED, 10)
        # Attempt 0: cancelled before any worker claimed it; never a second attempt.
        expected_attempts = (1,) if moment == "mid_run" else (0, 1)
        assert run.status == "cancelled" and run.attempt in expected_attempts, (
            trial,
            run,
            server_log_tail(server),
        )
        rows = faults.log_of(task)
        kinds = Counter(types_of(rows))
        assert kinds["cancelled"] == 1 and kinds["end"] == 1 and kinds["retry"] == 0, (
            trial,
            kinds,
        )
        assert types_of(rows)[-2:] == ["cancelled", "end"]
        assert rows[-1].data["status"] == "cancelled"
        assert attempts_in(rows) == [run.attempt]
        faults.assert_gap_free(task)
        assert_each_attempt_intact(rows)
        # Finished: a late cancel is refused, and nothing more is written.
        assert httpx.post(url, timeout=30).status_code == 409
        assert faults.run_of(task).last_seq == rows[-1].seq
    counters = faults.metrics(server.url)
    assert counters["streaming_worker_running_tasks"] == 0
    if moment == "mid_run":
        assert counters["streaming_worker_tasks_cancelled_total"] == trials


# -- 3. a Last-Event-ID past the end ----------------------------------------------------------


def test_a_last_event_id_past_the_end_follows_from_the_end_and_closes_after_end(
    server_factory: Callable[..., ManagedProcess],
) -> None:
    server = server_factory(STREAMING_KEEPALIVE_INTERVAL="1")
    ticks = 25
    task = create_on(server, ticks=ticks, delay=0.15)
    before = wait_last_seq(task, 3)
    reader = DeadlineReader(
        f"{server.url}/stream/{task_path(task)}",
        {**SSE_ACCEPT, "Last-Event-ID": "9999"},
        deadline=30,
        on_open=lambda: faults.run_of(task).last_seq,
    )
    reader.start()
    events = reader.finish()
    assert reader.status == 200
    after_open: int = reader.opened
    rows = faults.log_of(task)
    assert faults.run_of(task).status == "completed"
    assert events, "nothing delivered"
    assert events[-1].event == "end" and events[-1].data["status"] == "completed"
    # It resumed from the log's end as the server saw it on connecting: no older event,
    # then every row after that, once each, in order.
    start = events[0].id
    assert start is not None and before < start <= after_open + 1, (before, start, after_open)
    assert [e.id for e in events] == [r.seq for r in rows if r.seq >= start]
    assert len({e.id for e in events}) == len(events)
    for ev, row in zip(events, [r for r in rows if r.seq >= start], strict=True):
        assert ev.event == row.event_type
        assert {k: v for k, v in ev.data.items() if not k.startswith("_")} == row.data
    assert len(events) < len(rows)  # the old ones were not replayed

    # Finished now: a Last-Event-ID past its end gets a 204, header or query, SSE or not.
    url = f"{server.url}/stream/{task_path(task)}"
    assert httpx.get(url, headers={"Last-Event-ID": "9999"}, timeout=10).status_code == 204
    assert (
        httpx.get(url, headers={**SSE_ACCEPT, "Last-Event-ID": "9999"}, timeout=10).status_code
        == 204
    )
    assert httpx.get(url + "?last_event_id=9999", timeout=10).status_code == 204


# -- 4. database outages under HTTP requests --------------------------------------------------


def test_a_quick_postgres_restart_is_invisible_to_http_clients(
    pg_server: EphemeralServer, server_factory: Callable[..., ManagedProcess]
) -> None:
    server = server_factory()  # DATABASE_WAIT stays at its 5 s default
    finished = create_on(server, ticks=2)
    wait_status(finished, FINISHED, 20)
    running = create_on(server, ticks=100, delay=0.05)
    # One client thread per kind of request, so that each kind has one in flight throughout.
    pounders = [
        Pounder(server.url, [("status", "GET", f"/tasks/{task_path(running)}", None)]),
        Pounder(server.url, [("summary", "GET", f"/stream/{task_path(finished)}", None)]),
        Pounder(server.url, [("create", "POST", "/tasks/tests/ScriptedTask", {"ticks": 1})]),
    ]
    for p in pounders:
        p.start()
    answers: list[Answer] = []
    try:
        wait_until(
            lambda: all(len(p.answers) >= 5 for p in pounders), 20, "requests before the restart"
        )
        down_from, down_to = restart_postgres(pg_server, down_for=0.5)
        wait_until(
            lambda: all(sum(1 for a in p.answers if a.sent > down_to) >= 5 for p in pounders),
            30,
            "requests after the restart",
        )
    finally:
        for p in pounders:
            answers += p.stop()
    codes = Counter((a.kind, a.status) for a in answers)
    bad = [a for a in answers if a.status is None or a.status >= 500]
    assert not bad, (codes, bad[:5], server_log_tail(server))
    assert set(codes) == {("status", 200), ("summary", 200), ("create", 201)}, codes
    # Some requests were sent while Postgres was down: they waited for it, then succeeded.
    during = [a for a in answers if down_from <= a.sent <= down_to]
    assert during, "no request was sent during the outage"
    for kind in ("status", "summary", "create"):
        assert any(a.kind == kind and a.sent < down_to < a.done for a in answers), (
            f"no {kind} request was waiting when Postgres came back"
        )
    # Every 201 is one task, created once, and run to its end.
    created = [a for a in answers if a.kind == "create"]
    assert ScriptedTask.objects.count() == 2 + len(created)
    ids = sorted(int(json.loads(a.body)["id"]) for a in created)
    assert len(set(ids)) == len(ids)
    wait_until(
        lambda: (
            sql(
                "SELECT count(*) FROM streaming_taskrun "
                "WHERE task_id = ANY(%s) AND status = 'completed'",
                ids,
            )[0][0]
            == len(ids)
        ),
        60,
        "every created task to complete",
    )
    wait_status(running, FINISHED, 60)
    for task in [finished, running, *ScriptedTask.objects.filter(pk__in=ids)]:
        faults.assert_gap_free(task)
        rows = faults.log_of(task)
        assert_each_attempt_intact(rows)
        assert_ended_once(rows, "completed")


def test_a_longer_outage_answers_503_with_retry_after_and_no_internals(
    pg_server: EphemeralServer, server_factory: Callable[..., ManagedProcess]
) -> None:
    server = server_factory(STREAMING_DATABASE_WAIT="1")
    finished = create_on(server, ticks=2)
    wait_status(finished, FINISHED, 20)
    requests: list[tuple[str, str, dict[str, str], dict[str, Any] | None]] = [
        ("GET", f"/tasks/{task_path(finished)}", {}, None),
        ("GET", f"/stream/{task_path(finished)}", {}, None),
        ("GET", f"/stream/{task_path(finished)}", {**SSE_ACCEPT, "Last-Event-ID": "1"}, None),
        ("POST", "/tasks/tests/ScriptedTask", {}, {"ticks": 1}),
        ("POST", f"/tasks/{task_path(finished)}/cancel", {}, None),
    ]
    wait = 1.0
    answers: list[tuple[str, httpx.Response, float]] = []  # request, answer, seconds taken
    pg_server.stop()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            for method, path, headers, body in requests:
                began = time.monotonic()
                resp = http.request(method, path, headers=headers, json=body)
                answers.append((f"{method} {path} {headers}", resp, time.monotonic() - began))
    finally:
        pg_server.start()
        connections.close_all()
    for what, resp, _ in answers:
        assert resp.status_code == 503, (what, resp.status_code, resp.text)
        assert resp.headers.get("retry-after", "").isdigit(), (what, resp.headers)
        text = resp.text
        for leak in ("Traceback", 'File "', "psycopg", "SELECT", "INSERT", "streaming_", "FROM "):
            assert leak not in text, (what, text)
        assert str(pg_server.port) not in text, (what, text)
        assert len(text) < 300, (what, text)
        assert isinstance(resp.json(), dict)
    assert "Traceback" not in server.log(), server_log_tail(server)
    # And back to normal once Postgres is.
    resp = httpx.get(f"{server.url}/tasks/{task_path(finished)}", timeout=30)
    assert resp.status_code == 200 and resp.json()["status"] == "completed"
    assert ScriptedTask.objects.count() == 1  # the refused POST created nothing
    # DATABASE_WAIT bounds the wait: the 503 comes after about a second, not after some other
    # timeout (a bound with seconds of slack, not a speed test).
    slow = [(what, round(took, 1)) for what, _, took in answers if took > wait + 3]
    assert not slow, f"answered long after DATABASE_WAIT={wait}s: {slow}"


# -- 5. SIGTERM mid-append ----------------------------------------------------------------------


def test_sigterm_while_appends_are_in_flight_loses_no_event_and_splits_no_batch(
    server_factory: Callable[..., ManagedProcess],
    worker_factory: Callable[..., ManagedProcess],
) -> None:
    """Three tasks appending as fast as they can (group commit) when their server is told to
    stop: it exits, another worker reruns them, and the log shows no torn batch."""
    ticks, count = 2500, 3
    front = server_factory("--no-worker")
    doomed = server_factory("--grace", "0")  # the only worker yet: it claims all three
    tasks = [create_on(doomed, ticks=ticks, delay=0) for _ in range(count)]
    for t in tasks:
        assert wait_owner(t) == doomed.proc.pid
    followers = [Follower(front.url, t, name=f"follow-{t.pk}") for t in tasks]
    for f in followers:
        f.start()
    pounder = Pounder(
        front.url, [("status", "GET", f"/tasks/{task_path(t)}", None) for t in tasks]
    ).start()
    try:
        staying = worker_factory("--grace", "0")
        for t in tasks:
            wait_last_seq(t, 50)
        assert all(faults.run_of(t).status == "running" for t in tasks)
        doomed.signal(signal.SIGTERM)
        assert doomed.proc.wait(20) == 0, server_log_tail(doomed)
        # Released, not left to expire (30 s lease): the other worker takes them at once.
        runs = [wait_status(t, FINISHED, 120) for t in tasks]
    finally:
        answers = pounder.stop()
    assert not [a for a in answers if a.status is None or a.status >= 500], Counter(
        a.status for a in answers
    )
    for t, run in zip(tasks, runs, strict=True):
        assert (run.status, run.attempt) == ("completed", 2), (run, server_log_tail(staying))
        assert run.owner_pid is None
        assert faults.run_column(t, "releases") == 1
        faults.assert_gap_free(t)
        rows = faults.log_of(t)
        first = faults.tick_numbers(rows, 1)
        assert first == list(range(1, len(first) + 1)), _summary(first)
        assert 50 <= len(first) < ticks  # stopped mid-way, by the signal
        assert faults.tick_numbers(rows, 2) == list(range(1, ticks + 1))
        # The log: attempt 1's ticks, then the retry, then attempt 2 to its end.
        assert types_of(rows) == ["tick"] * len(first) + ["retry"] + ["tick"] * ticks + ["end"]
        assert rows[len(first)].data["attempt"] == 2 and rows[len(first)].attempt == 2
        assert_ended_once(rows, "completed")
    for f in followers:
        faults.same_as_log(finish(f, front), faults.log_of(f.task))
    assert "Traceback" not in doomed.log(), server_log_tail(doomed)
    assert "stopped" in doomed.log()


# -- 6. a Postgres restart under group commit -----------------------------------------------


def test_a_postgres_restart_during_group_commit_duplicates_and_drops_nothing(
    pg_server: EphemeralServer, server_factory: Callable[..., ManagedProcess]
) -> None:
    ticks, count = 1000, 5
    server = server_factory()
    tasks = [create_on(server, ticks=ticks, delay=0.002) for _ in range(count)]
    followers = [Follower(server.url, t, name=f"follow-{t.pk}") for t in tasks]
    for f in followers:
        f.start()
    for t in tasks:
        wait_last_seq(t, 20)
    assert all(faults.run_of(t).status == "running" for t in tasks)
    batches_before = faults.metrics(server.url)["streaming_append_batches_total"]
    before = faults.db_now()
    restart_postgres(pg_server, down_for=0.5)  # a fast shutdown: in-flight statements abort
    reached = {t.pk: faults.run_of(t).last_seq for t in tasks}
    for t in tasks:
        wait_last_seq(t, reached[t.pk] + 20, timeout=40)
    restart_postgres(pg_server, down_for=0.5, immediate=True)  # crash-like: acks lost
    after = faults.db_now()
    for t in tasks:
        wait_status(t, FINISHED, 120)
    counters = faults.metrics(server.url)
    # Group commit indeed: fewer batches than events.
    appended = counters["streaming_events_appended_total"]
    assert counters["streaming_append_batches_total"] - batches_before < appended
    for t in tasks:
        run = faults.run_of(t)
        assert run.status == "completed", (run, server_log_tail(server))
        faults.assert_gap_free(t)
        rows = faults.log_of(t)
        assert_each_attempt_intact(rows)
        assert faults.tick_numbers(rows, run.attempt) == list(range(1, ticks + 1))
        assert_ended_once(rows, "completed")
        # It was writing on both sides of the restart.
        stamps = sql(
            "SELECT min(created_at), max(created_at) FROM streaming_taskevent "
            "WHERE task_id = %s AND model_name = 'ScriptedTask'",
            t.pk,
        )[0]
        assert stamps[0] < before and stamps[1] > after, (stamps, before, after)
    for f in followers:
        faults.same_as_log(finish(f, server), faults.log_of(f.task))


# -- 7. a worker cut off for longer than its lease ----------------------------------------------


def test_a_worker_cut_off_past_its_lease_is_fenced_when_it_comes_back(
    live_db: str,
    server_factory: Callable[..., ManagedProcess],
    worker_factory: Callable[..., ManagedProcess],
) -> None:
    ticks = 60
    target = urlsplit(live_db)
    assert target.hostname and target.port
    with TcpProxy(target.hostname, target.port) as proxy:
        front = server_factory("--no-worker", **FAST_LEASES)
        cut_off = worker_factory(**FAST_LEASES, DATABASE_URL=proxy.url_for(live_db))
        task = create_on(front, ticks=ticks, delay=0.1)
        assert wait_owner(task) == cut_off.proc.pid
        direct = worker_factory(**FAST_LEASES)
        follower = Follower(front.url, task)
        follower.start()
        wait_last_seq(task, 5)
        assert proxy.accepted >= 1
        proxy.pause()  # every byte of the first worker held: its writes arrive late
        try:
            run = wait_attempt(task, 2, 20)
            assert run.owner_pid == direct.proc.pid
            wait_last_seq(task, run.last_seq + 3)  # the new attempt is writing
        finally:
            proxy.resume()
        wait_until(lambda: "lease lost" in cut_off.log(), 20, "the first worker to notice")
        run = wait_status(task, FINISHED, 40)
        assert cut_off.proc.poll() is None, server_log_tail(cut_off)  # fenced, not crashed
        assert cut_off.stop() == 0, server_log_tail(cut_off)  # while its database answers
    assert (run.status, run.attempt) == ("completed", 2), run
    faults.assert_gap_free(task)
    rows = faults.log_of(task)
    retries = [r for r in rows if r.event_type == "retry"]
    assert len(retries) == 1 and retries[0].attempt == 2, retries
    retry_at = faults.created_at(task, retries[0].seq)
    late = sql(
        "SELECT seq, event_type, created_at FROM streaming_taskevent "
        "WHERE model_name = 'ScriptedTask' AND task_id = %s AND attempt = 1 AND created_at > %s",
        task.pk,
        retry_at,
    )
    assert late == [], f"attempt 1 wrote after attempt 2 began: {late}"
    assert attempts_in(rows) == [1, 2]
    assert_each_attempt_intact(rows)
    assert faults.tick_numbers(rows, 2) == list(range(1, ticks + 1))
    first = faults.tick_numbers(rows, 1)
    assert 4 <= len(first) < ticks
    assert_ended_once(rows, "completed")
    faults.same_as_log(finish(follower, front), rows)
