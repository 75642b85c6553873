"""A bounded soak with real processes: every fault at once-ish, many clients, then the log.

Two ``runserver_stream`` servers (each with a worker) and one ``runworker_stream`` worker,
whose database connections go through ``tests.tcpproxy.TcpProxy``, run ScriptedTasks that
tick steadily, under short leases (3 s, renewed every 0.5 s). Tasks arrive one by one: each
one's first client queues it by its GET; some get a second client that joins later from a
random Last-Event-ID. Every client drops its connection after a random number of events and
resumes with Last-Event-ID on a random server, and is thrown off by the faults, injected one
after another while tasks run:

- ``kill``: kill -9 of a worker-bearing process while it holds tasks (the busiest server in
  even rounds, the worker in odd ones), and a new one of its kind in its place;
- ``stop``: SIGSTOP of the busiest worker-bearing process (a server in odd rounds) until
  every task it held was taken over (past its lease), then SIGCONT;
- ``lost_ack``: the worker's next ``streaming_append_batch`` commits, but the proxy drops its
  answer and the connection (the worker only sees a dead connection);
- ``network``: the proxy cuts every connection of the worker;
- ``pg_restart``: the embedded Postgres stopped, down for a second, started again;
- ``terminate``: pg_terminate_backend of every application connection (not this test's).

At the end, in SQL and against what every client received: seqs are exactly 1..N per task;
each client got exactly the log rows after its starting point (no gap, no duplicate, in
order, same data) and ``end`` exactly once; every task completed, with one ``end`` as its
last row; no row of an attempt comes after a later attempt's ``retry`` row (fencing); each
attempt stored each of its ticks once (DESIGN.md 2.1); no 5xx at all (requests wait out the
database faults, which are shorter than DATABASE_WAIT); no task reclaimed before its dead
owner's lease expired. The figures are printed (``pytest -s``) and asserted.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
from django.db import connection, connections

from streaming.client import StreamEvent
from tests import faults, support
from tests.faults import Row, wait_until
from tests.models import ScriptedTask
from tests.tcpproxy import TcpProxy

pytestmark = pytest.mark.django_db(transaction=True)

LEASE_TTL = 3.0
SOAK_ENV = {
    "STREAMING_LEASE_TTL": str(LEASE_TTL),
    "STREAMING_HEARTBEAT_INTERVAL": "0.5",
    "STREAMING_WORKER_POLL_INTERVAL": "0.3",
    "STREAMING_HUB_POLL_INTERVAL": "1",
    "STREAMING_KEEPALIVE_INTERVAL": "1",  # so that a silent stream is a dead one after 5 s
    # Enough attempts that the faults never use them up: every task must complete.
    "STREAMING_MAX_ATTEMPTS": "50",
}
APPEND_MARKER = "streaming_append_batch"  # in the SQL text of the worker's batch append
MODEL = "ScriptedTask"
ALL_KINDS = ("kill", "stop", "lost_ack", "network", "pg_restart", "terminate")
# SOAK_FAULTS=kill,stop,... injects only those (a one-off run, to tell faults apart).
KINDS = tuple(k for k in os.environ.get("SOAK_FAULTS", ",".join(ALL_KINDS)).split(",") if k)
assert set(KINDS) <= set(ALL_KINDS), f"SOAK_FAULTS: unknown kinds {set(KINDS) - set(ALL_KINDS)}"
READ_TIMEOUT = 5.0  # seconds of silence (keep-alives come every 1 s) before a client gives up


@dataclass(frozen=True)
class Plan:
    seed: int
    tasks: int
    ticks: tuple[int, int]  # the range of a task's tick count
    delay: float  # seconds before each tick
    arrival: float  # seconds between two tasks' first clients
    joiners: float  # the share of tasks that get a second client, from a random Last-Event-ID
    rounds: int  # how many times each kind of fault is injected
    first_fault_after: float  # seconds
    between_faults: float  # seconds
    budget: float  # seconds for the whole run; past it, the clients give up and the test fails
    max_events_per_session: int  # a client disconnects after 1..this many events
    outage: tuple[float, float]  # the range of a Postgres restart's downtime, seconds


DEFAULT = Plan(
    seed=20261127,
    tasks=40,
    ticks=(12, 28),
    delay=0.25,
    arrival=1.0,
    joiners=0.4,
    rounds=1,
    first_fault_after=8.0,
    between_faults=3.0,
    budget=150.0,
    max_events_per_session=10,
    outage=(1.5, 1.5),
)
# Longer outages too: past the lease, the running tasks are stopped and reclaimed after it.
LONG = Plan(
    seed=1127,
    tasks=160,
    ticks=(16, 48),
    delay=0.2,
    arrival=1.0,
    joiners=0.5,
    rounds=4,
    first_fault_after=8.0,
    between_faults=2.5,
    budget=700.0,
    max_events_per_session=25,
    outage=(0.5, 4.5),
)
if os.environ.get("SOAK_SEED"):  # another seed for a one-off run: SOAK_SEED=7 pytest ...
    DEFAULT = dataclasses.replace(DEFAULT, seed=int(os.environ["SOAK_SEED"]))
    LONG = dataclasses.replace(LONG, seed=int(os.environ["SOAK_SEED"]))


# -- the processes -------------------------------------------------------------------------


class Cluster:
    """The soak's processes. The servers come and go (kill -9), so clients ask for ``urls``."""

    def __init__(
        self,
        server_factory: Callable[..., support.ManagedProcess],
        live_db: str,
        proxy: TcpProxy,
        log_dir: Path,
    ) -> None:
        self._server_factory = server_factory
        self._worker_url = proxy.url_for(live_db)
        self._log_dir = log_dir
        self._lock = threading.Lock()
        self.all: list[support.ManagedProcess] = []  # every process started, dead ones too
        self.servers = [self._start_server(), self._start_server()]
        self.worker = self._start_worker()

    def _start_server(self) -> support.ManagedProcess:
        mp = self._server_factory(**SOAK_ENV)
        self.all.append(mp)
        return mp

    def _start_worker(self) -> support.ManagedProcess:
        env: dict[str, Any] = SOAK_ENV
        mp = faults.start_worker(self._worker_url, self._log_dir, **env)
        self.all.append(mp)
        return mp

    def urls(self) -> list[str]:
        with self._lock:
            return [s.url for s in self.servers]

    def worker_bearing(self) -> list[support.ManagedProcess]:
        with self._lock:
            return [*self.servers, self.worker]

    def replace(self, dead: support.ManagedProcess) -> support.ManagedProcess:
        """Start a process of the same kind as ``dead`` in its place."""
        if dead is self.worker:
            new = self._start_worker()
            with self._lock:
                self.worker = new
            return new
        new = self._start_server()
        with self._lock:
            self.servers = [new if s is dead else s for s in self.servers]
        return new

    def live_servers(self) -> list[support.ManagedProcess]:
        with self._lock:
            return [s for s in self.servers if s.proc.poll() is None]

    def close(self) -> None:
        for mp in self.all:
            mp.signal(signal.SIGCONT)
        for mp in self.all:
            if mp.args[0] == "runworker_stream":  # server_factory stops the servers
                mp.stop()

    def problems_in_logs(self) -> list[str]:
        """Tracebacks and ERROR lines of every process, for the failure report."""
        out = []
        for mp in self.all:
            lines = mp.log().splitlines()
            bad = [i for i, line in enumerate(lines) if " ERROR " in line or "Traceback" in line]
            for i in bad[:5]:
                out.append(f"{mp.log_path.name}:{i + 1}: " + " | ".join(lines[i : i + 3])[:600])
        return out


# -- the clients -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerError:
    status: int
    url: str
    began: float  # time.monotonic()
    ended: float
    retry_after: str | None


class SoakClient(threading.Thread):
    """Follows one task's stream through random disconnects and servers, keeping every event.

    No de-duplication here (unlike streaming.client): what the servers send is what is kept.
    """

    def __init__(
        self,
        name: str,
        task_id: int,
        start_after: int,
        cluster: Cluster,
        rng: random.Random,
        plan: Plan,
        stop: threading.Event,
        deadline: float,
    ) -> None:
        super().__init__(daemon=True, name=name)
        self.task_id = task_id
        self.start_after = start_after
        self.last: int | None = start_after or None
        self.cluster = cluster
        self.rng = rng
        self.plan = plan
        self.stop = stop
        self.deadline = deadline
        self.events: list[StreamEvent] = []
        self.sessions = 0
        self.deliberate = 0  # disconnects of its own
        self.forced = 0  # connections that failed, broke or were refused
        self.statuses: Counter[int] = Counter()
        self.transport_errors: Counter[str] = Counter()
        self.server_errors: list[ServerError] = []
        self.anomalies: list[str] = []
        self.error: BaseException | None = None

    @property
    def ended(self) -> bool:
        return any(e.event == "end" for e in self.events)

    def run(self) -> None:
        timeout = httpx.Timeout(2.0, read=READ_TIMEOUT)
        try:
            with httpx.Client(timeout=timeout) as http:
                while not self.ended and not self.anomalies and self.sessions < 2000:
                    if self.stop.is_set() or time.monotonic() > self.deadline:
                        self.anomalies.append(f"gave up after {self.sessions} sessions")
                        return
                    self._session(http)
        except BaseException as exc:
            self.error = exc

    def _session(self, http: httpx.Client) -> None:
        url = self.rng.choice(self.cluster.urls())
        headers = {"Accept": "text/event-stream"}
        if self.last is not None:
            headers["Last-Event-ID"] = str(self.last)
        self.sessions += 1
        began = time.monotonic()
        try:
            with http.stream(
                "GET", f"{url}/stream/tests/{MODEL}/{self.task_id}", headers=headers
            ) as resp:
                self.statuses[resp.status_code] += 1
                kind = resp.headers.get("content-type", "")
                if resp.status_code == 200 and kind.startswith("text/event-stream"):
                    self._read(resp)
                    return
                resp.read()
                self.forced += 1
                if resp.status_code >= 500:
                    self.server_errors.append(
                        ServerError(
                            resp.status_code,
                            url,
                            began,
                            time.monotonic(),
                            resp.headers.get("retry-after"),
                        )
                    )
                elif resp.status_code != 429:  # 429: a per-address limit, retry
                    self.anomalies.append(
                        f"{url} answered {resp.status_code} {kind} after {self.last}: "
                        f"{resp.text[:200]!r}"
                    )
        except httpx.TransportError as exc:
            self.forced += 1
            self.transport_errors[type(exc).__name__] += 1
            if self.ended:
                self.anomalies.append(f"{url}: {exc!r} after the end instead of a close")
        if not self.ended:
            time.sleep(self.rng.uniform(0.02, 0.3))

    def _read(self, resp: httpx.Response) -> None:
        budget = self.rng.randint(1, self.plan.max_events_per_session)
        got = 0
        buf = ""
        ended_at: float | None = None
        for chunk in resp.iter_text():
            buf += chunk
            while (cut := buf.find("\n\n")) >= 0:
                block, buf = buf[: cut + 2], buf[cut + 2 :]
                for sse in support.parse_sse(block):
                    if sse.id is None:
                        self.anomalies.append(f"an event without an id: {sse}")
                        continue
                    self.events.append(StreamEvent(sse.id, sse.event, sse.data))
                    self.last = sse.id
                    got += 1
                    if sse.event == "end":
                        ended_at = time.monotonic()
            if ended_at is not None:
                # Read on: the server must close the stream (and send nothing more).
                if time.monotonic() - ended_at > READ_TIMEOUT:
                    self.anomalies.append("the stream stayed open after its end")
                    return
            elif got >= budget:
                self.deliberate += 1
                return  # leaving the block closes the connection
        if ended_at is None:  # closed under us: a server going away, or failing
            self.forced += 1
            self.transport_errors["closed before the end"] += 1


def launch_clients(
    tasks: list[ScriptedTask],
    cluster: Cluster,
    plan: Plan,
    clients: list[SoakClient],
    stop: threading.Event,
    deadline: float,
) -> None:
    """Start each task's first client, ``arrival`` s apart, and the joiners a while later."""
    rng = random.Random(plan.seed + 1)
    joiners: list[tuple[float, SoakClient]] = []  # (when, its task's first client)

    def start(name: str, task_id: int, after: int) -> None:
        client = SoakClient(
            name, task_id, after, cluster, random.Random(rng.random()), plan, stop, deadline
        )
        clients.append(client)
        client.start()

    def due_joiners(now: float) -> None:
        for when, first in [j for j in joiners if j[0] <= now]:
            joiners.remove((when, first))
            # A starting point the first client got past; short of the end, which would
            # leave nothing to stream (a 204).
            last = (first.last or 0) - (1 if first.ended else 0)
            start(f"join-{first.task_id}", first.task_id, rng.randint(0, max(0, last)))

    for task in tasks:
        if stop.wait(plan.arrival):
            return
        start(f"first-{task.pk}", task.pk, 0)
        if rng.random() < plan.joiners:
            joiners.append((time.monotonic() + rng.uniform(1.0, 6.0), clients[-1]))
        due_joiners(time.monotonic())
    while joiners and not stop.wait(0.1):
        due_joiners(time.monotonic())


# -- the faults ------------------------------------------------------------------------------


@dataclass
class Fault:
    kind: str
    began: float  # time.monotonic()
    ended: float = 0.0
    db_began: datetime | None = None  # the same two moments on the database's clock
    db_ended: datetime | None = None
    victim: int | None = None  # the pid of the process it hit
    held: list[tuple[int, int]] = field(default_factory=list)  # (task id, attempt) it held
    leases: dict[tuple[int, int], datetime] = field(default_factory=dict)  # their last lease
    taken_over: int = 0  # held tasks that another attempt took over while it lasted
    round: int = 0  # how many faults of its kind came before it
    detail: str = ""


def owner_pid(owner: str) -> int:
    return int(owner.split(":")[-2])  # "host:pid:nonce" (streaming.worker.make_owner)


def held_tasks() -> dict[int, list[tuple[int, int]]]:
    """The tasks each process holds under a live lease: {pid: [(task id, attempt)]}."""
    rows = support.sql(
        "SELECT lease_owner, task_id, attempt FROM streaming_taskrun "
        "WHERE status = 'running' AND lease_expires_at > now() AND model_name = %s",
        MODEL,
    )
    out: dict[int, list[tuple[int, int]]] = {}
    for owner, task_id, attempt in rows:
        out.setdefault(owner_pid(owner), []).append((task_id, attempt))
    return out


def busiest(
    candidates: list[support.ManagedProcess], what: str
) -> tuple[support.ManagedProcess, list[tuple[int, int]]]:
    """The running candidate holding the most tasks (waits until one holds some)."""

    def pick() -> tuple[support.ManagedProcess, list[tuple[int, int]]] | None:
        held = held_tasks()
        alive = [mp for mp in candidates if mp.proc.poll() is None and held.get(mp.proc.pid)]
        if not alive:
            return None
        best = max(alive, key=lambda mp: len(held[mp.proc.pid]))
        return best, held[best.proc.pid]

    return wait_until(pick, 30, f"a process holding tasks, for {what}", interval=0.1)


def runs_of(task_ids: list[int]) -> dict[int, tuple[str, int]]:
    """{task id: (status, attempt)}."""
    rows = support.sql(
        "SELECT task_id, status, attempt FROM streaming_taskrun "
        "WHERE model_name = %s AND task_id = ANY(%s)",
        MODEL,
        task_ids,
    )
    return {task_id: (status, attempt) for task_id, status, attempt in rows}


def taken_over(held: list[tuple[int, int]]) -> int:
    runs = runs_of([t for t, _ in held])
    return sum(1 for t, attempt in held if runs[t][1] > attempt)


def last_leases(victim: support.ManagedProcess) -> dict[tuple[int, int], datetime]:
    """The leases a process that was just killed or stopped holds: {(task, attempt): expiry}."""
    time.sleep(0.3)  # a statement it sent just before may still commit
    rows = support.sql(
        "SELECT task_id, attempt, lease_expires_at FROM streaming_taskrun "
        "WHERE model_name = %s AND status = 'running' AND lease_owner LIKE %s",
        MODEL,
        f"%:{victim.proc.pid}:%",
    )
    return {(t, a): expires for t, a, expires in rows}


def terminate_application_backends() -> int:
    """pg_terminate_backend of every client connection to the test database but this
    process's (its Django connection and the connection asking); how many."""
    connection.ensure_connection()
    with connection.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        (django_pid,) = cur.fetchone()
    rows = support.sql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND backend_type = 'client backend' "
        "AND pid <> pg_backend_pid() AND pid <> %s",
        django_pid,
    )
    return sum(1 for (ok,) in rows if ok)


class Injector:
    """Injects the faults one by one, and keeps what each one did (for the checks)."""

    def __init__(
        self,
        cluster: Cluster,
        proxy: TcpProxy,
        pg_server: Any,
        probe_task: int,
        plan: Plan,
        rng: random.Random,
    ) -> None:
        self.plan = plan
        self.rng = rng
        self.cluster = cluster
        self.proxy = proxy
        self.pg_server = pg_server
        self.probe_task = probe_task
        self.done: list[Fault] = []

    def inject(self, kind: str) -> Fault:
        fault = Fault(kind, time.monotonic(), db_began=faults.db_now())
        fault.round = sum(1 for f in self.done if f.kind == kind)
        getattr(self, f"_{kind}")(fault)
        fault.ended = time.monotonic()
        fault.db_ended = faults.db_now()
        self.done.append(fault)
        return fault

    def _kill(self, fault: Fault) -> None:
        # A server (its clients are thrown off too) in even rounds, the worker in odd ones.
        targets = self.cluster.live_servers() if fault.round % 2 == 0 else [self.cluster.worker]
        victim, held = busiest(targets, "kill -9")
        fault.victim, fault.held = victim.proc.pid, held
        victim.kill()
        fault.leases = last_leases(victim)
        new = self.cluster.replace(victim)
        fault.detail = f"{victim.args[0]} {victim.proc.pid} -> {new.proc.pid}"

    def _stop(self, fault: Fault) -> None:
        # The busiest process in even rounds, the busiest server in odd ones.
        every = self.cluster.worker_bearing()
        targets = every if fault.round % 2 == 0 else self.cluster.live_servers()
        victim, held = busiest(targets, "SIGSTOP")
        fault.victim, fault.held = victim.proc.pid, held
        victim.signal(signal.SIGSTOP)
        try:
            fault.leases = last_leases(victim)
            wait_until(
                lambda: self._finished(held),
                30,
                "the stopped process's tasks to be taken over",
                interval=0.1,
            )
        finally:
            victim.signal(signal.SIGCONT)
        fault.taken_over = taken_over(held)
        fault.detail = (
            f"{victim.args[0]} {victim.proc.pid} stopped "
            f"{time.monotonic() - fault.began:.1f}s, {fault.taken_over} of "
            f"{len(held)} tasks taken over"
        )

    @staticmethod
    def _finished(held: list[tuple[int, int]]) -> bool:
        runs = runs_of([t for t, _ in held])
        return all(runs[t][1] > a or runs[t][0] != "running" for t, a in held)

    def _lost_ack(self, fault: Fault) -> None:
        worker = self.cluster.worker
        busiest([worker], "a lost acknowledgement")
        fault.victim = worker.proc.pid
        before = self.proxy.acks_lost
        self.proxy.lose_next_ack(marker=APPEND_MARKER)
        lost = self.proxy.wait_ack_lost(before + 1, timeout=20)
        self.proxy.disarm()
        fault.detail = f"acks lost {self.proxy.acks_lost - before}"
        assert lost, "the worker sent no batch append within 20 s"

    def _network(self, fault: Fault) -> None:
        busiest([self.cluster.worker], "a network cut")
        fault.victim = self.cluster.worker.proc.pid
        fault.detail = f"{self.proxy.cut_all()} connections cut"

    def _pg_restart(self, fault: Fault) -> None:
        outage = self.rng.uniform(*self.plan.outage)
        fault.detail = f"down {outage:.1f}s"
        try:
            self.pg_server.stop()
            time.sleep(outage)
        finally:
            self.pg_server.start()
            connections.close_all()  # this process's Django connection died with the server
        self._await_recovery(fault)

    def _terminate(self, fault: Fault) -> None:
        fault.detail = f"{terminate_application_backends()} backends terminated"
        self._await_recovery(fault)

    def _await_recovery(self, fault: Fault) -> None:
        """Until every live server answers a request that needs the database."""
        for server in self.cluster.live_servers():
            url = f"{server.url}/tasks/tests/{MODEL}/{self.probe_task}"
            wait_until(
                functools.partial(_answers, url),
                30,
                f"{server.url} to reach the database",
                interval=0.1,
            )


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# -- the checks -----------------------------------------------------------------------------


def logs_of(task_ids: list[int]) -> dict[int, list[Row]]:
    rows = support.sql(
        "SELECT task_id, seq, attempt, event_type, data FROM streaming_taskevent "
        "WHERE app_label = 'tests' AND model_name = %s AND task_id = ANY(%s) "
        "ORDER BY task_id, seq",
        MODEL,
        task_ids,
    )
    out: dict[int, list[Row]] = {t: [] for t in task_ids}
    for task_id, *row in rows:
        out[task_id].append(Row(*row))
    return out


def gap_problems(task_ids: list[int]) -> list[str]:
    """Tasks whose seqs are not exactly 1..N, N being the run's last_seq (in SQL)."""
    rows = support.sql(
        "SELECT r.task_id, r.last_seq, count(e.seq), count(DISTINCT e.seq), "
        "       coalesce(min(e.seq), 0), coalesce(max(e.seq), 0) "
        "  FROM streaming_taskrun r LEFT JOIN streaming_taskevent e "
        "    ON (e.app_label, e.model_name, e.task_id) = (r.app_label, r.model_name, r.task_id) "
        " WHERE r.model_name = %s AND r.task_id = ANY(%s) GROUP BY r.task_id, r.last_seq",
        MODEL,
        task_ids,
    )
    return [
        f"task {t}: last_seq {n}, {count} rows, {distinct} distinct seqs, {low}..{high}"
        for t, n, count, distinct, low, high in rows
        if not (count == distinct == high == n and low == 1)
    ]


def fenced_rows(task_ids: list[int]) -> list[tuple[Any, ...]]:
    """Rows of an attempt after a later attempt's retry row: written by a fenced attempt.

    Attempt n+1 begins with its ``retry`` row, written by the claim that fenced attempt n off
    (and everything before it) in the same transaction: a row of an older attempt with a
    higher seq was appended after the takeover, which fencing forbids."""
    return support.sql(
        "SELECT e.task_id, e.seq, e.attempt, e.event_type, r.seq, r.attempt "
        "  FROM streaming_taskevent e JOIN streaming_taskevent r "
        "    ON (r.app_label, r.model_name, r.task_id) = (e.app_label, e.model_name, e.task_id) "
        " WHERE e.model_name = %s AND e.task_id = ANY(%s) "
        "   AND r.event_type = 'retry' AND r.attempt > e.attempt AND r.seq < e.seq "
        " ORDER BY e.task_id, e.seq",
        MODEL,
        task_ids,
    )


def attempt_problems(task: ScriptedTask, rows: list[Row], run: tuple[str, int]) -> list[str]:
    """One task's log, attempt by attempt: retry rows, ticks stored once, one end, last."""
    status, final = run
    out = []
    where = f"task {task.pk}"
    if status != "completed":
        out.append(f"{where}: {status} (attempt {final})")
    ends = [r for r in rows if r.event_type == "end"]
    if len(ends) != 1 or rows[-1] is not ends[0]:
        out.append(f"{where}: {len(ends)} end rows, last row {rows[-1] if rows else None}")
    elif (ends[0].attempt, ends[0].data.get("status")) != (final, "completed"):
        out.append(f"{where}: end {ends[0]} but the run is at attempt {final}")
    retries = [r for r in rows if r.event_type == "retry"]
    if [r.attempt for r in retries] != list(range(2, final + 1)) or any(
        r.data.get("attempt") != r.attempt for r in retries
    ):
        out.append(f"{where}: retry rows {retries} for a run at attempt {final}")
    attempts = [r.attempt for r in rows]
    if attempts != sorted(attempts) or (attempts and max(attempts) > final):
        out.append(f"{where}: attempts along the log {attempts}, the run at {final}")
    for attempt in sorted(set(attempts)):
        ticks = faults.tick_numbers(rows, attempt)
        whole = attempt == final
        if ticks != list(range(1, (task.ticks if whole else len(ticks)) + 1)):
            out.append(
                f"{where}: attempt {attempt} stored ticks {ticks}"
                + (f" (of {task.ticks})" if whole else "")
            )
    return out


def client_problems(client: SoakClient, rows: list[Row]) -> tuple[int, int, list[str]]:
    """(lost, duplicated, problems) of one client against its task's log."""
    expected = [r for r in rows if r.seq > client.start_after]
    got = Counter(e.id for e in client.events)
    lost = sum(1 for r in expected if r.seq not in got)
    duplicated = sum(n - 1 for n in got.values() if n > 1)
    where = f"{client.name} (after {client.start_after})"
    out = [f"{where}: {a}" for a in client.anomalies]
    if client.error is not None:
        out.append(f"{where}: {client.error!r}")
    ends = sum(1 for e in client.events if e.event == "end")
    if ends != 1 or not client.events or client.events[-1].event != "end":
        out.append(f"{where}: {ends} end events, last {client.events[-1:]}")
    try:
        faults.same_as_log(client.events, rows, after=client.start_after)
    except AssertionError as exc:
        ids = [e.id for e in client.events]
        out.append(
            f"{where}: not the log: lost {lost}, duplicated {duplicated}, "
            f"ids {ids[:60]}{'…' if len(ids) > 60 else ''}: {str(exc)[:300]}"
        )
    return lost, duplicated, out


def stored_twice(task_ids: list[int]) -> list[tuple[int, int, str, list[int], list[datetime]]]:
    """Ticks an attempt stored more than once: (task, attempt, i, seqs, created_at)."""
    return [
        (t, a, i, list(seqs), list(times))
        for t, a, i, seqs, times in support.sql(
            "SELECT task_id, attempt, data->>'i', array_agg(seq ORDER BY seq), "
            "       array_agg(created_at ORDER BY seq) "
            "  FROM streaming_taskevent "
            " WHERE model_name = %s AND task_id = ANY(%s) AND event_type = 'tick' "
            " GROUP BY task_id, attempt, data->>'i' HAVING count(*) > 1 ORDER BY task_id",
            MODEL,
            task_ids,
        )
    ]


def during(when: datetime, done: list[Fault]) -> str:
    """The faults under way at ``when`` (or up to a lease later: an append's retries)."""
    names = [
        f.kind
        for f in done
        if f.db_began
        and f.db_ended
        and f.db_began <= when <= f.db_ended + timedelta(seconds=LEASE_TTL)
    ]
    return ", ".join(names) or "no fault"


@dataclass(frozen=True)
class Reclaim:
    task_id: int
    attempt: int  # the attempt that began with the retry row
    silence: float  # seconds from the row before the retry row to it
    since: datetime  # when the row before it was written
    at: datetime  # when the retry row was written


def reclaims(task_ids: list[int]) -> list[Reclaim]:
    """Every retry row after some other row, with the log's silence before it, longest first."""
    rows = support.sql(
        "SELECT r.task_id, r.attempt, extract(epoch FROM r.created_at - p.created_at), "
        "       p.created_at, r.created_at "
        "  FROM streaming_taskevent r JOIN streaming_taskevent p "
        "    ON (p.app_label, p.model_name, p.task_id, p.seq) "
        "     = (r.app_label, r.model_name, r.task_id, r.seq - 1) "
        " WHERE r.model_name = %s AND r.task_id = ANY(%s) AND r.event_type = 'retry' "
        " ORDER BY 3 DESC",
        MODEL,
        task_ids,
    )
    return [Reclaim(t, a, float(silence), since, at) for t, a, silence, since, at in rows]


class RunMonitor(threading.Thread):
    """Samples the running runs twice a second, to explain a long reclaim afterwards."""

    def __init__(self, stop: threading.Event) -> None:
        super().__init__(daemon=True, name="run-monitor")
        self.stop = stop
        # (database clock, {task id: (attempt, owner pid, lease seconds left, last_seq)})
        self.samples: list[tuple[datetime, dict[int, tuple[int, int, float, int]]]] = []

    def run(self) -> None:
        while not self.stop.wait(0.5):
            try:
                ((now, runs),) = support.sql(
                    "SELECT clock_timestamp(), coalesce(json_agg(json_build_array(task_id, "
                    "       attempt, lease_owner, extract(epoch FROM lease_expires_at "
                    "       - clock_timestamp()), last_seq)), '[]') "
                    "  FROM streaming_taskrun WHERE model_name = %s AND status = 'running'",
                    MODEL,
                )
            except psycopg.Error:
                continue  # the database is down or cut off: that shows as a hole
            self.samples.append(
                (now, {t: (a, owner_pid(o), float(left), n) for t, a, o, left, n in runs if o})
            )

    def history(self, task_id: int, since: datetime, until: datetime) -> str:
        """The task's run between two moments: each change of attempt, owner or last_seq."""
        out: list[str] = []
        last: tuple[int, int, int] | None = None
        for when, runs in self.samples:
            if not since - timedelta(seconds=1) <= when <= until + timedelta(seconds=1):
                continue
            run = runs.get(task_id)
            state = (run[0], run[1], run[3]) if run else None
            if state != last:
                lease = f", lease {run[2]:+.1f}s" if run else ""
                what = f"attempt {run[0]} pid {run[1]} last_seq {run[3]}{lease}" if run else "-"
                out.append(f"{when:%H:%M:%S.%f}"[:-3] + f" {what}")
                last = state
        return "; ".join(out) or "no samples"


def early_reclaims(fault: Fault) -> list[str]:
    """Tasks of a killed or stopped process whose next attempt began before its lease
    expired."""
    out = []
    for (task_id, attempt), expires in fault.leases.items():
        rows = support.sql(
            "SELECT created_at FROM streaming_taskevent WHERE model_name = %s AND task_id = %s "
            "AND event_type = 'retry' AND attempt = %s",
            MODEL,
            task_id,
            attempt + 1,
        )
        if rows and rows[0][0] < expires:
            out.append(
                f"task {task_id}: attempt {attempt + 1} began {rows[0][0]}, "
                f"before the lease of attempt {attempt} expired ({expires})"
            )
    return out


# -- the soak ---------------------------------------------------------------------------------


@pytest.fixture
def proxy(live_db: str) -> Iterator[TcpProxy]:
    """A TCP proxy in front of the test database, for the worker's connections."""
    parts = urlsplit(live_db)
    with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432) as p:
        yield p


@pytest.fixture
def cluster(
    server_factory: Callable[..., support.ManagedProcess],
    live_db: str,
    proxy: TcpProxy,
    tmp_path: Path,
) -> Iterator[Cluster]:
    c = Cluster(server_factory, live_db, proxy, tmp_path)
    try:
        yield c
    finally:
        c.close()


def run_soak(plan: Plan, cluster: Cluster, proxy: TcpProxy, pg_server: Any) -> None:
    rng = random.Random(plan.seed)
    began = time.monotonic()
    deadline = began + plan.budget
    tasks = [
        ScriptedTask.objects.create(ticks=rng.randint(*plan.ticks), delay=plan.delay)
        for _ in range(plan.tasks)
    ]
    by_id = {t.pk: t for t in tasks}
    ids = list(by_id)
    clients: list[SoakClient] = []
    stop = threading.Event()
    launcher = threading.Thread(
        target=launch_clients,
        name="launcher",
        daemon=True,
        args=(tasks, cluster, plan, clients, stop, deadline),
    )
    injector = Injector(cluster, proxy, pg_server, tasks[0].pk, plan, random.Random(rng.random()))
    schedule = [kind for _ in range(plan.rounds) for kind in KINDS]
    if plan.rounds > 1:
        rng.shuffle(schedule)
    monitor = RunMonitor(stop)
    monitor.start()
    launcher.start()
    failed_fault: list[str] = []  # a fault that could not be injected (or not recovered from)
    try:
        time.sleep(plan.first_fault_after)
        for kind in schedule:
            try:
                fault = injector.inject(kind)
            except AssertionError as exc:
                failed_fault.append(f"{kind} at {time.monotonic() - began:.1f}s: {exc}")
                stop.set()  # the clients give up: the checks tell what was left undone
                break
            print(f"  {fault.ended - began:6.1f}s {kind:<10} {fault.detail}", flush=True)
            time.sleep(plan.between_faults)
        launcher.join(max(0.0, deadline - time.monotonic()))
        for c in list(clients):
            c.join(max(0.0, deadline - time.monotonic()))
    finally:
        stop.set()  # on a failure, the threads stop too
    elapsed = time.monotonic() - began
    running = [c.name for c in clients if c.is_alive()]

    problems: list[str] = [f"fault {f}" for f in failed_fault]
    if launcher.is_alive():
        problems.append("the clients were still being started at the deadline")
    problems += [f"{name}: still streaming after {plan.budget}s" for name in running]
    problems += gap_problems(ids)
    logs = logs_of(ids)
    runs = runs_of(ids)
    for task in tasks:
        if task.pk not in runs:
            problems.append(f"task {task.pk}: never queued")
            continue
        problems += attempt_problems(task, logs[task.pk], runs[task.pk])
    fenced = fenced_rows(ids)
    problems += [
        f"fenced attempt wrote: task {t} seq {s} (attempt {a}, {kind}) after the retry "
        f"row seq {rs} of attempt {ra}"
        for t, s, a, kind, rs, ra in fenced
    ]
    lost = duplicated = 0
    for c in clients:
        c_lost, c_dup, c_problems = client_problems(c, logs[c.task_id])
        lost, duplicated = lost + c_lost, duplicated + c_dup
        problems += c_problems
    server_errors = [e for c in clients for e in c.server_errors]
    bad_5xx = server_errors  # not even a 503: every database fault is under DATABASE_WAIT
    problems += [
        f"HTTP {e.status} from {e.url} at {e.began - began:.1f}s (retry-after {e.retry_after})"
        for e in bad_5xx
    ]
    kinds = Counter(f.kind for f in injector.done)
    problems += [
        f"{kind}: injected {kinds[kind]} times, not {plan.rounds}"
        for kind in KINDS
        if kinds[kind] != plan.rounds
    ]
    for f in injector.done:
        if f.kind in ("kill", "stop"):
            problems += early_reclaims(f)
        if f.kind == "stop" and f.taken_over == 0:
            problems.append(f"stop of {f.victim}: none of its tasks {f.held} was taken over")
    taken = reclaims(ids)
    gaps = [r.silence for r in taken]
    events = sum(len(rows) for rows in logs.values())
    statuses = sum((c.statuses for c in clients), Counter[int]())
    transport = sum((c.transport_errors for c in clients), Counter[str]())
    retries = sum(1 for rows in logs.values() for r in rows if r.event_type == "retry")
    twice = stored_twice(ids)
    problems += [
        f"task {t} attempt {a} stored tick {i} as seqs {seqs}, written "
        + ", ".join(f"{w:%H:%M:%S.%f} ({during(w, injector.done)})" for w in times)
        for t, a, i, seqs, times in twice
    ]
    repeats = sum(len(seqs) - 1 for *_, seqs, _ in twice)

    print(f"\nsoak ({'slow' if plan is LONG else 'default'}, seed {plan.seed}): {elapsed:.0f}s")
    print(
        f"  tasks {len(tasks)} ({sum(1 for r in runs.values() if r[0] == 'completed')} "
        f"completed), events {events}, clients {len(clients)}, "
        f"events received {sum(len(c.events) for c in clients)}"
    )
    print(
        f"  reconnects {sum(c.sessions - 1 for c in clients)} "
        f"(deliberate {sum(c.deliberate for c in clients)}, "
        f"forced {sum(c.forced for c in clients)}: {dict(transport)})"
    )
    print(
        f"  HTTP statuses {dict(sorted(statuses.items()))}; 5xx {len(server_errors)} "
        f"(all must be 0)"
    )
    print(f"  faults {dict(kinds)}; acks lost {proxy.acks_lost}")
    print(
        f"  retries (reclaims) {retries}; longest reclaim "
        f"{max(gaps, default=0.0):.1f}s (the log's silence before a retry; lease "
        f"{LEASE_TTL:g}s); "
        f"rows from a fenced attempt {len(fenced)}; ticks stored twice {repeats}"
    )
    print(f"  lost {lost}, duplicated {duplicated}")
    for r in [r for r in taken if r.silence > 2 * LEASE_TTL][:3]:
        print(
            f"  a long reclaim: task {r.task_id} attempt {r.attempt} after {r.silence:.1f}s "
            f"({during(r.since, injector.done)}): {monitor.history(r.task_id, r.since, r.at)}"
        )
    if problems:
        print("  problems:\n    " + "\n    ".join(problems[:60]))
        if logged := cluster.problems_in_logs():
            print("  process logs:\n    " + "\n    ".join(logged[:30]))
    assert (lost, duplicated) == (0, 0)
    assert not problems, f"{len(problems)} problems, the first: {problems[:10]}"
    assert len(clients) >= len(tasks) and events > 0
    if {"kill", "stop"} & set(KINDS):  # a dead or stopped owner's tasks are taken over
        assert retries >= 1 and gaps, "the faults caused no reclaim at all"
    assert proxy.acks_lost == kinds["lost_ack"]
    assert repeats == 0 and not fenced and not bad_5xx


@pytest.mark.timeout(300)
def test_soak(cluster: Cluster, proxy: TcpProxy, pg_server: Any) -> None:
    run_soak(DEFAULT, cluster, proxy, pg_server)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_long_soak(cluster: Cluster, proxy: TcpProxy, pg_server: Any) -> None:
    run_soak(LONG, cluster, proxy, pg_server)


def test_a_lost_append_acknowledgement_stores_no_event_twice(
    server_factory: Callable[..., support.ManagedProcess],
    proxy: TcpProxy,
    live_db: str,
    tmp_path: Path,
) -> None:
    """The soak's ``lost_ack`` alone, on one task: DESIGN.md 2.1 says each ``send_event`` is
    stored once, also when its commit's acknowledgement was lost and it was retried."""
    front = server_factory("--no-worker", **SOAK_ENV)
    env: dict[str, Any] = SOAK_ENV
    worker = faults.start_worker(proxy.url_for(live_db), tmp_path, **env)
    try:
        task = ScriptedTask.objects.create(ticks=20, delay=0.1)
        follower = faults.Follower(front.url, task)
        follower.start()
        wait_until(lambda: faults.run_of(task).last_seq >= 3, 20, "three ticks")
        proxy.lose_next_ack(marker=APPEND_MARKER)
        assert proxy.wait_ack_lost(1, timeout=10), "no append in 10 s"
        events = follower.finish()
    finally:
        worker.stop()
    faults.assert_gap_free(task)
    rows = faults.log_of(task)
    faults.same_as_log(events, rows)  # the clients see the log exactly, whatever it holds
    run = faults.run_of(task)
    assert (run.status, run.attempt) == ("completed", 1)
    assert faults.tick_numbers(rows, 1) == list(range(1, 21)), "a tick stored twice"


def test_the_checks_catch_a_gap_a_fenced_row_a_repeat_and_a_bad_client() -> None:
    """The soak's checks on a log made up by hand: each kind of damage is reported."""
    task = ScriptedTask.objects.create(ticks=2)
    support.sql(
        "INSERT INTO streaming_taskrun (app_label, model_name, task_id, db_table, status, "
        "attempt, last_seq) VALUES ('tests', %s, %s, 'tests_scriptedtask', 'completed', 2, 8)",
        MODEL,
        task.pk,
    )
    log = [
        (1, 1, "tick", {"i": 1}),
        (2, 1, "tick", {"i": 2}),
        (3, 2, "retry", {"attempt": 2, "max_attempts": 50}),
        (4, 1, "tick", {"i": 3}),  # attempt 1, after attempt 2 began: fenced
        (5, 2, "tick", {"i": 1}),
        (6, 2, "tick", {"i": 1}),  # stored twice
        (8, 2, "end", {"status": "completed", "final_value": None}),
    ]  # 7: a gap
    for seq, attempt, kind, data in log:
        support.sql(
            "INSERT INTO streaming_taskevent (app_label, model_name, task_id, seq, attempt, "
            "event_type, data) VALUES ('tests', %s, %s, %s, %s, %s, %s::jsonb)",
            MODEL,
            task.pk,
            seq,
            attempt,
            kind,
            json.dumps(data),
        )
    ids = [task.pk]
    assert gap_problems(ids) == [f"task {task.pk}: last_seq 8, 7 rows, 7 distinct seqs, 1..8"]
    assert fenced_rows(ids) == [(task.pk, 4, 1, "tick", 3, 2)]
    assert [(t, a, i, seqs) for t, a, i, seqs, _ in stored_twice(ids)] == [
        (task.pk, 2, "1", [5, 6])
    ]
    rows = logs_of(ids)[task.pk]
    found = attempt_problems(task, rows, ("completed", 2))
    assert any("attempts along the log" in p for p in found), found
    assert any("attempt 2 stored ticks [1, 1]" in p for p in found), found
    client = SoakClient(
        "c", task.pk, 1, cast(Cluster, None), random.Random(0), DEFAULT, threading.Event(), 0.0
    )
    # After seq 1: seq 4 missing, seq 5 twice.
    client.events = [
        StreamEvent(r.seq, r.event_type, r.data) for r in rows if r.seq in (2, 3, 5, 6, 8)
    ]
    client.events.insert(3, client.events[2])
    lost, duplicated, found = client_problems(client, rows)
    assert (lost, duplicated) == (1, 1) and len(found) == 1 and "not the log" in found[0]
    client.events = [StreamEvent(r.seq, r.event_type, r.data) for r in rows if r.seq > 1]
    assert client_problems(client, rows) == (0, 0, [])
