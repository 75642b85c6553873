"""In-memory fakes of the streaming components' collaborators, for tests without a database.

Each fake keeps the behaviour the code under test relies on (seq order, fencing on attempt,
leases, failures of the database) and counts what was asked of it, so that tests can assert
on both the results and the traffic.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from streaming import events, queries, schema
from streaming.db import Database, Row
from streaming.events import Append, Event, Status, TaskKey
from streaming.exceptions import DatabaseUnavailable
from streaming.log import EventLog
from streaming.runs import Claim, Claimed

EPOCH = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
_PLACEHOLDER = re.compile(r"%\((\w+)\)s")


def key(task_id: int, model: str = "FakeTask") -> TaskKey:
    return TaskKey("tests", model, task_id)


async def settle(turns: int = 20) -> None:
    """Let every ready task run a few steps (no wall-clock wait)."""
    for _ in range(turns):
        await asyncio.sleep(0)


async def wait_until(cond: Callable[[], bool], timeout: float = 1.0) -> None:
    """Poll ``cond`` until it holds; AssertionError after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.002)


def check_params(name: str, params: Mapping[str, Any] | None) -> None:
    """The statement ``name`` exists and takes exactly the parameters given."""
    sql = queries.all_queries()[name]
    assert set(_PLACEHOLDER.findall(sql)) == set(params or {}), (name, sorted(params or {}))


def _split_top_level(text: str) -> list[str]:
    parts: list[str] = []
    depth = 0
    current = ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [" ".join(p.split()) for p in parts if p.strip()]


def select_columns(name: str) -> list[str]:
    """The result column names of query ``name``, in order (aliases where given)."""
    sql = queries.get(name)
    returning = re.search(r"\bRETURNING\b(.*)$", sql, re.S)
    if returning:
        select = returning.group(1)
    else:
        found = re.search(r"^SELECT\b(.*?)\bFROM\b", sql, re.S)
        assert found is not None, name
        select = found.group(1)
    out = []
    for expr in _split_top_level(select):
        alias = re.search(r"\bAS (\w+)$", expr)
        out.append(alias.group(1) if alias else expr.split(".")[-1])
    return out


def table_columns(table: str) -> list[str]:
    """The columns of ``table`` as its CREATE TABLE in the DDL files declares them."""
    for name in schema.files():
        body = re.search(rf"CREATE TABLE {table} \((.*?)\n\);", schema.read(name), re.S)
        if body:
            return re.findall(r"^    ([a-z_]+)\s", body.group(1), re.M)
    raise LookupError(table)


def function_columns(function: str) -> list[str]:
    """The result columns of the latest definition of the SQL function ``function``."""
    pattern = re.compile(
        rf"CREATE (?:OR REPLACE )?FUNCTION {function}\((?:[^()]|\(\))*\)\s*RETURNS\s+"
        r"(?:TABLE \(([^()]*)\)|SETOF (\w+))",
        re.S,
    )
    found: list[str] | None = None
    for name in schema.files():
        for match in pattern.finditer(schema.read(name)):
            if match.group(1) is not None:
                found = [col.split()[0] for col in _split_top_level(match.group(1))]
            else:
                found = table_columns(match.group(2))
    if found is None:
        raise LookupError(function)
    return found


class Failures:
    """Makes the next ``n`` calls of a fake raise (DatabaseUnavailable unless told)."""

    def __init__(self) -> None:
        self.remaining = 0
        self.skip = 0
        self.error: Callable[[], BaseException] = lambda: DatabaseUnavailable("fake outage")

    def fail(
        self, times: int, error: Callable[[], BaseException] | None = None, skip: int = 0
    ) -> None:
        """Fail ``times`` calls, after letting the next ``skip`` ones through."""
        self.remaining = times
        self.skip = skip
        if error is not None:
            self.error = error

    def check(self) -> None:
        if self.skip > 0:
            self.skip -= 1
            return
        if self.remaining > 0:
            self.remaining -= 1
            raise self.error()


# -- the event log, as the hub reads it --------------------------------------------------


class FakeLog:
    """A list-backed event log per task: the hub's ``LogReader`` and its ``LastSeqs``."""

    def __init__(self, page: int = 1000, page_bytes: int = 1 << 30) -> None:
        self.page = page
        self.page_bytes = page_bytes
        self.events: dict[TaskKey, list[Event]] = {}
        self.runs: dict[int, TaskKey] = {}
        self.reads = 0
        self.read_calls: list[tuple[TaskKey, int, int]] = []
        self.last_seq_calls: list[list[int]] = []
        self.failures = Failures()
        self.gate: asyncio.Event | None = None  # when set: reads wait for it

    def add_run(self, run_id: int, task: TaskKey) -> None:
        self.runs[run_id] = task
        self.events.setdefault(task, [])

    def append(
        self, task: TaskKey, event_type: str = "progress", data: dict[str, Any] | None = None
    ) -> Event:
        """A new event at the next seq of ``task`` (not announced: call the hub for that)."""
        rows = self.events.setdefault(task, [])
        seq = len(rows) + 1
        ev = events.build(
            task,
            seq,
            event_type,
            json.dumps(data or {"n": seq}),
            EPOCH + timedelta(milliseconds=seq),
            1,
        )
        rows.append(ev)
        return ev

    def extend(self, task: TaskKey, count: int, end: bool = False) -> list[Event]:
        out = [self.append(task) for _ in range(count)]
        if end:
            out.append(self.append(task, "end", {"status": "completed"}))
        return out

    def last(self, task: TaskKey) -> int:
        return len(self.events.get(task, []))

    async def read(self, key: TaskKey, after: int, limit: int = -1) -> list[Event]:
        self.reads += 1
        if limit < 0:
            limit = self.page
        self.read_calls.append((key, after, limit))
        if self.gate is not None:
            await self.gate.wait()
        else:
            await asyncio.sleep(0)  # a read is never instantaneous
        self.failures.check()
        rows = self.events.get(key, [])
        page: list[Event] = []
        size = 0
        for ev in rows:
            if ev.seq > after and len(page) < limit and size < self.page_bytes:
                page.append(ev)
                size += len(ev.frame)
        return page

    def full(self, page: list[Event], limit: int = -1) -> bool:
        limit = self.page if limit < 0 else limit
        return len(page) >= limit or sum(len(ev.frame) for ev in page) >= self.page_bytes

    async def last_seqs(self, run_ids: Sequence[int]) -> dict[int, int]:
        self.last_seq_calls.append(list(run_ids))
        await asyncio.sleep(0)
        return {run_id: self.last(self.runs[run_id]) for run_id in run_ids if run_id in self.runs}


class FakeListener:
    """A LISTEN connection fed by the test; ``drop()`` breaks it as a lost socket would."""

    _DROP = object()

    def __init__(self) -> None:
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        self.connects = 0
        self.closes = 0
        self.pings = 0
        self.connected = False
        self.connect_failures = Failures()

    def send(self, payload: str) -> None:
        self.queue.put_nowait(payload)

    def drop(self) -> None:
        self.queue.put_nowait(self._DROP)

    async def connect(self, timeout: float = 5.0) -> None:
        self.connects += 1
        self.connect_failures.check()
        self.connected = True

    async def payloads(self, timeout: float) -> AsyncIterator[str]:
        while True:
            try:
                async with asyncio.timeout(timeout):
                    item = await self.queue.get()
            except TimeoutError:
                return
            if item is self._DROP:
                self.connected = False
                raise DatabaseUnavailable("LISTEN connection lost")
            assert isinstance(item, str)
            yield item

    async def ping(self, timeout: float) -> None:
        self.pings += 1
        if not self.connected:
            raise DatabaseUnavailable("LISTEN connection did not answer")

    async def close(self) -> None:
        self.closes += 1
        self.connected = False


# -- the appender's database and its log sink --------------------------------------------

#: ``streaming_append_batch``'s result columns, in order (checked against the SQL).
APPEND_BATCH_COLUMNS = ("ord", "seq", "created_at", "data", "app_label", "model_name", "task_id")


@dataclass
class LogRun:
    """What the append needs of one ``streaming_taskrun`` row."""

    key: TaskKey
    attempt: int = 1
    status: Status = Status.RUNNING
    last_seq: int = 0


class FakeAppendDb:
    """``Database.fetchall("append_batch", …)``: seqs per run, fenced per run and attempt.

    At most once per (writer, batch), as ``streaming_append_batch_once``: a retried batch
    writes nothing and returns the rows of its first commit.
    """

    def __init__(self) -> None:
        self.runs: dict[int, LogRun] = {}
        self.calls: list[dict[str, Any]] = []
        self.executed: list[tuple[str, dict[str, Any]]] = []
        self.batch_sizes: list[int] = []  # of the calls that committed
        self.failures = Failures()  # before the commit: nothing written
        self.lost_acks = Failures()  # after the commit: written, but the caller hears an error
        self.refuse: Callable[[dict[str, Any]], BaseException | None] = lambda params: None
        self.execute_failures = Failures()
        self.gate: asyncio.Event | None = None  # when set: each call waits for it
        self.in_flight = 0
        self._last: dict[str, tuple[int, list[Row]]] = {}  # writer -> its last batch's rows

    def add_run(self, run_id: int, task: TaskKey, attempt: int = 1) -> LogRun:
        run = self.runs[run_id] = LogRun(task, attempt)
        return run

    async def fetchall(self, name: str, params: Mapping[str, Any] | None = None) -> list[Row]:
        assert name == "append_batch", name
        check_params(name, params)
        assert params is not None
        self.calls.append(dict(params))
        self.in_flight += 1
        try:
            if self.gate is not None:
                await self.gate.wait()
            else:
                await asyncio.sleep(0)
            self.failures.check()
        finally:
            self.in_flight -= 1
        refused = self.refuse(dict(params))
        if refused is not None:
            raise refused
        writer, number = params["writer"], params["batch"]
        last = self._last.get(writer)
        if last is not None and last[0] >= number:
            assert last[0] == number, f"writer {writer} retried batch {number} after {last[0]}"
            rows = last[1]
        else:
            rows = self._append(params)
            self._last[writer] = (number, rows)
            self.batch_sizes.append(len(rows))
        self.lost_acks.check()
        return list(rows)

    def _append(self, params: Mapping[str, Any]) -> list[Row]:
        inputs = list(
            zip(
                params["run_ids"], params["attempts"], params["types"], params["datas"], strict=True
            )
        )
        rows: list[Row] = []
        for ordinal, (run_id, attempt, _type, data) in enumerate(inputs, 1):
            run = self.runs.get(run_id)
            if run is None or run.attempt != attempt or run.status != Status.RUNNING:
                rows.append((ordinal, None, None, None, None, None, None))
                continue
            run.last_seq += 1
            text = json.dumps(json.loads(data))  # jsonb's rendering: ", " and ": "
            rows.append(
                (
                    ordinal,
                    run.last_seq,
                    EPOCH + timedelta(seconds=run.last_seq),
                    text,
                    run.key.app_label,
                    run.key.model_name,
                    run.key.task_id,
                )
            )
        return rows

    async def execute(self, name: str, params: Mapping[str, Any] | None = None) -> None:
        check_params(name, params)
        await asyncio.sleep(0)
        self.execute_failures.check()
        self.executed.append((name, dict(params or {})))


@dataclass(frozen=True)
class Recorded:
    """One ``EventLog.record`` call."""

    run_id: int
    key: TaskKey
    seq: int
    event_type: str
    data_json: str
    created_at: datetime
    attempt: int


class FakeSink:
    """What the appender and the run store tell the event log, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []  # (kind, run_id, seq); seq 0: requeued
        self.records: list[Recorded] = []

    def record(
        self,
        run_id: int,
        key: TaskKey,
        seq: int,
        event_type: str,
        data_json: str,
        created_at: datetime,
        attempt: int,
    ) -> None:
        self.records.append(Recorded(run_id, key, seq, event_type, data_json, created_at, attempt))
        self.calls.append(("record", run_id, seq))

    def committed(self, run_id: int, seq: int) -> None:
        self.calls.append(("committed", run_id, seq))

    def requeued(self, run_id: int) -> None:
        self.calls.append(("requeued", run_id, 0))

    def of(self, kind: str) -> list[tuple[int, int]]:
        return [(run_id, seq) for k, run_id, seq in self.calls if k == kind]


def as_database(fake: object) -> Database:
    """A fake where a ``Database`` is declared (the components take the concrete class)."""
    return cast(Database, fake)


def as_log(fake: FakeSink) -> EventLog:
    return cast(EventLog, fake)


# -- the run store, as a worker uses it --------------------------------------------------


@dataclass
class MemRun:
    """One run in the in-memory store (the columns of ``streaming_taskrun`` that matter)."""

    run_id: int
    key: TaskKey
    status: Status = Status.PENDING
    attempt: int = 0
    releases: int = 0
    max_attempts: int = 3
    timeout: float | None = None
    owner: str | None = None
    lease_expires: float | None = None
    cancel_requested: bool = False
    last_seq: int = 0
    final_value: Any = None
    error: dict[str, Any] | None = None
    queued: int = 0  # claim order


@dataclass(frozen=True)
class FinishCall:
    run_id: int
    attempt: int
    status: Status
    final_value: Any
    error: dict[str, Any] | None
    seq: int | None  # what the store answered (None: fenced off)


@dataclass
class MemoryStore:
    """``worker.Store`` in memory: claims, leases, fencing on attempt, cancel flags.

    In the spirit of procrastinate's in-memory connector: the rules of the SQL functions
    (``streaming_claim``, ``heartbeat``, ``release``, ``streaming_finish``) on a dict.
    """

    runs: dict[int, MemRun] = field(default_factory=dict)
    claims: list[int | None] = field(default_factory=list)  # what each claim returned
    heartbeats: list[list[tuple[int, int]]] = field(default_factory=list)
    releases: list[tuple[int, int]] = field(default_factory=list)
    finishes: list[FinishCall] = field(default_factory=list)
    finish_failures: Failures = field(default_factory=Failures)  # before the write
    finish_lost_acks: Failures = field(default_factory=Failures)  # after the write
    claim_failures: Failures = field(default_factory=Failures)
    finish_gate: asyncio.Event | None = None  # when set: finish waits for it
    release_gate: asyncio.Event | None = None  # when set: release waits for it
    finishing: int = 0  # finish calls in flight
    _next_id: int = 1
    _clock: int = 0

    def add(
        self,
        task: TaskKey | None = None,
        *,
        timeout: float | None = None,
        cancel_requested: bool = False,
        max_attempts: int = 3,
    ) -> int:
        run_id = self._next_id
        self._next_id += 1
        self._clock += 1
        self.runs[run_id] = MemRun(
            run_id,
            task or key(run_id),
            timeout=timeout,
            cancel_requested=cancel_requested,
            max_attempts=max_attempts,
            queued=self._clock,
        )
        return run_id

    def status(self, run_id: int) -> Status:
        return self.runs[run_id].status

    def count(self, status: Status) -> int:
        return sum(1 for r in self.runs.values() if r.status == status)

    def request_cancel(self, run_id: int) -> None:
        self.runs[run_id].cancel_requested = True

    def take_over(self, run_id: int, owner: str = "another-worker") -> None:
        """Another worker claimed the run after its lease expired (a new attempt)."""
        run = self.runs[run_id]
        run.attempt += 1
        run.owner = owner
        run.lease_expires = time.monotonic() + 30

    def finished_with(self, run_id: int) -> list[FinishCall]:
        return [f for f in self.finishes if f.run_id == run_id]

    async def claim(self, owner: str, ttl: float, run_id: int | None = None) -> Claimed:
        await asyncio.sleep(0)
        self.claim_failures.check()
        now = time.monotonic()
        candidates = sorted(
            (
                r
                for r in self.runs.values()
                if (run_id is None or r.run_id == run_id)
                and (
                    r.status == Status.PENDING
                    or (
                        r.status == Status.RUNNING
                        and r.lease_expires is not None
                        and r.lease_expires < now
                    )
                )
            ),
            key=lambda r: (r.queued, r.run_id),
        )
        failed = 0
        for run in candidates:
            if run.attempt - run.releases >= run.max_attempts:
                run.attempt += 1
                self._finish(
                    run,
                    Status.FAILED,
                    None,
                    {"message": "lease expired", "error_type": "LeaseExpired"},
                )
                failed += 1
                continue
            run.status = Status.RUNNING
            run.attempt += 1
            run.owner = owner
            run.lease_expires = now + ttl
            if run.attempt > 1:
                run.last_seq += 1  # its retry event
            self.claims.append(run.run_id)
            claim = Claim(
                run.run_id, run.key, run.attempt, run.timeout, run.last_seq, run.cancel_requested
            )
            return Claimed(claim, failed)
        self.claims.append(None)
        return Claimed(None, failed)

    async def heartbeat(
        self, owner: str, ttl: float, held: Sequence[tuple[int, int]]
    ) -> dict[int, bool]:
        self.heartbeats.append(list(held))
        await asyncio.sleep(0)
        now = time.monotonic()
        out: dict[int, bool] = {}
        for run_id, attempt in held:
            run = self.runs.get(run_id)
            if (
                run is not None
                and run.attempt == attempt
                and run.status == Status.RUNNING
                and run.owner == owner
            ):
                run.lease_expires = now + ttl
                out[run_id] = run.cancel_requested
        return out

    async def release(self, run_id: int, attempt: int) -> bool:
        self.releases.append((run_id, attempt))
        if self.release_gate is not None:
            await self.release_gate.wait()
        else:
            await asyncio.sleep(0)
        run = self.runs.get(run_id)
        if run is None or run.attempt != attempt or run.status != Status.RUNNING:
            return False
        run.status = Status.PENDING
        run.releases += 1
        run.owner = None
        run.lease_expires = None
        self._clock += 1
        run.queued = self._clock
        return True

    async def finish(
        self,
        run_id: int,
        attempt: int,
        status: Status,
        final_value: Any = None,
        error: dict[str, Any] | None = None,
    ) -> int | None:
        self.finishing += 1
        try:
            if self.finish_gate is not None:
                await self.finish_gate.wait()
            else:
                await asyncio.sleep(0)
            self.finish_failures.check()
        finally:
            self.finishing -= 1
        # What jsonb accepts: strict JSON (no NaN, no Infinity), as Postgres would refuse it.
        json.dumps(final_value, allow_nan=False)
        json.dumps(error, allow_nan=False)
        run = self.runs.get(run_id)
        seq: int | None = None
        if run is not None and run.attempt == attempt and run.status == Status.RUNNING:
            seq = self._finish(run, status, final_value, error)
        elif run is not None and run.attempt == attempt and run.status == status:
            seq = run.last_seq  # a retry of this very finish: its seq again, nothing written
        self.finishes.append(FinishCall(run_id, attempt, status, final_value, error, seq))
        self.finish_lost_acks.check()
        return seq

    @staticmethod
    def _finish(run: MemRun, status: Status, final_value: Any, error: dict[str, Any] | None) -> int:
        if status == Status.CANCELLED or (status == Status.FAILED and error is not None):
            run.last_seq += 1  # its error / cancelled event
        run.last_seq += 1  # its end event
        run.status = status
        run.final_value = final_value
        run.error = error
        run.owner = None
        run.lease_expires = None
        return run.last_seq


class FakeAppender:
    """The ``context.Appender`` a worker hands its runs: seqs per run, no fencing."""

    def __init__(self) -> None:
        self.items: list[Append] = []
        self._seqs: dict[int, int] = {}

    async def __call__(self, item: Append) -> int | None:
        await asyncio.sleep(0)
        self.items.append(item)
        self._seqs[item.run_id] = self._seqs.get(item.run_id, 0) + 1
        return self._seqs[item.run_id]


# -- tasks a worker runs -----------------------------------------------------------------


class FakeTask:
    """Something with ``async process()``: runs ``body`` and counts its calls."""

    def __init__(self, body: Callable[[], Awaitable[Any]]) -> None:
        self.body = body
        self.calls = 0
        self.done = False

    async def process(self) -> Any:
        self.calls += 1
        result = await self.body()
        self.done = True
        return result


def returning(value: Any) -> Callable[[], Awaitable[Any]]:
    async def body() -> Any:
        await asyncio.sleep(0)
        return value

    return body


def raising(exc: BaseException) -> Callable[[], Awaitable[Any]]:
    async def body() -> Any:
        await asyncio.sleep(0)
        raise exc

    return body


def blocking(gate: asyncio.Event, value: Any = None) -> Callable[[], Awaitable[Any]]:
    async def body() -> Any:
        await gate.wait()
        return value

    return body
