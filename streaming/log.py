"""The event log: reads (one page at a time, recent local rows first, the next page ahead)
and the announcement of every commit (local subscribers once, other processes by NOTIFY)."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from itertools import islice

from streaming import events
from streaming.db import Database, Row
from streaming.events import Event, TaskKey
from streaming.exceptions import DatabaseUnavailable
from streaming.notifier import Notifier

PAGE = 1000  # rows a read returns at most
PAGE_BYTES = 1 << 20  # and about this many bytes of frames: a reader holds a page at a time


def page_full(page: list[Event], limit: int, max_bytes: int) -> bool:
    """Whether a read stopped at its bound (rows or bytes): the log may go on after it."""
    return len(page) >= limit or sum(len(ev.frame) for ev in page) >= max_bytes


def to_event(key: TaskKey, row: Row) -> Event:
    seq, event_type, data_json, created_at, attempt = row
    return events.build(key, seq, event_type, data_json, created_at, attempt)


class EventLog:
    """One process's (one event loop's) view of ``streaming_taskevent``.

    ``committed`` is the one announcement of a commit, whichever path wrote it (an append,
    a claim's ``retry``, a finish): it updates the recent rows, wakes the local watchers
    (the hub) once, and schedules the NOTIFY that tells the other processes.
    """

    page = PAGE

    def __init__(self, db: Database, notifier: Notifier, max_bytes: int = PAGE_BYTES) -> None:
        self.db = db
        self.notifier = notifier
        self.max_bytes = max_bytes
        self.recent = Recent()
        #: ``record(run_id, key, seq, type, data_json, created_at, attempt)``: a row this
        #: process just committed, before its commit is announced (kept in the recent rows).
        self.record = self.recent.add
        self.ahead = ReadAhead(db, max_bytes)
        self._watchers: list[Callable[[int, int], None]] = []

    def watch(self, callback: Callable[[int, int], None]) -> None:
        """Call ``callback(run_id, seq)`` on every commit announced in this process."""
        self._watchers.append(callback)

    def committed(self, run_id: int, seq: int) -> None:
        """Rows up to ``seq`` of the run are committed: tell local watchers and other hosts."""
        self.recent.committed(run_id, seq)
        for watcher in self._watchers:
            watcher(run_id, seq)
        self.notifier.events_committed(run_id, seq)

    def requeued(self, run_id: int) -> None:
        """The run is queued (new, or released): it may run elsewhere next; wake workers."""
        self.recent.forget(run_id)
        self.notifier.queued(run_id)

    def requeued_elsewhere(self, run_id: int) -> None:
        """Another process queued the run: forget what this one remembers of its rows."""
        self.recent.forget(run_id)

    async def read(self, key: TaskKey, after: int, limit: int = PAGE) -> list[Event]:
        """Events of one task with seq > ``after``, in seq order, at most ``limit``."""
        cached = self.recent.read(key, after, limit, self.max_bytes)
        if cached is not None:
            return cached
        page = await self.ahead.take(key, after, limit)
        if page is None:
            page = await _fetch(self.db, key, after, limit, self.max_bytes)
        if self.full(page, limit):
            self.ahead.start(key, page[-1].seq, limit)
        return page

    def full(self, page: list[Event], limit: int = PAGE) -> bool:
        """Whether ``page`` (of a ``read``) stopped at a bound: read on after its last seq."""
        return page_full(page, limit, self.max_bytes)

    async def read_last(self, key: TaskKey) -> Event | None:
        row = await self.db.fetchone("read_last_event", key.params)
        return to_event(key, row) if row else None

    async def read_all(self, key: TaskKey, after: int = 0) -> list[Event]:
        """Every event after ``after``, page by page."""
        out: list[Event] = []
        while True:
            page = await self.read(key, after)
            out.extend(page)
            if not self.full(page):
                return out
            after = page[-1].seq

    async def event_types(self, key: TaskKey) -> list[str]:
        rows = await self.db.fetchall("event_types", key.params)
        return [row[0] for row in rows]

    def counters(self) -> dict[str, int]:
        return {
            "log_recent_hits_total": self.recent.hits,
            "log_readahead_hits_total": self.ahead.hits,
        }


async def _fetch(db: Database, key: TaskKey, after: int, limit: int, max_bytes: int) -> list[Event]:
    rows = await db.fetchall(
        "read_frames",
        {
            **key.params,
            "after": after,
            "limit": limit,
            "meta": events.meta_prefix(key),
            "max_bytes": max_bytes,
        },
    )
    return [Event(seq, event_type, frame.encode()) for seq, event_type, frame in rows]


@dataclass
class _Window:
    """The last rows this process appended to one task, contiguous in seq."""

    run_id: int
    rows: deque[Row] = field(default_factory=deque)
    size: int = 0
    stamp: float = 0.0
    known: int = 0  # the last seq this process knows was committed for the run

    @property
    def last(self) -> int:
        return int(self.rows[-1][0]) if self.rows else 0


class Recent:
    """Rows this process committed in the last moments, so its own readers skip a query.

    The appender records each committed row; the hub's read right after that commit (the
    common case: a task and its SSE clients share a process) is then served from memory.
    A read is answered here only when the whole answer is here: the window holds seq
    ``after + 1`` and reaches the last seq this process knows was committed for the run
    (``committed`` hears of every local commit, terminal events included), and it was
    written to less than ``max_age`` ago, far less than a lease, so rows that another process
    could add after taking the run over cannot be hidden. Anything else reads the table.
    """

    def __init__(self, per_task: int = 256, max_bytes: int = 8 << 20, max_age: float = 2.0) -> None:
        self.per_task = per_task
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.hits = 0
        self._windows: OrderedDict[TaskKey, _Window] = OrderedDict()
        self._keys: dict[int, TaskKey] = {}  # run id -> its window's key
        self._bytes = 0

    def add(
        self,
        run_id: int,
        key: TaskKey,
        seq: int,
        event_type: str,
        data_json: str,
        created_at: datetime,
        attempt: int,
    ) -> None:
        """A row this process just committed (before the commit is announced)."""
        window = self._windows.get(key)
        if window is None or window.run_id != run_id or seq != window.last + 1:
            self._drop(key)
            window = self._windows[key] = _Window(run_id)
            self._keys[run_id] = key
        else:
            self._windows.move_to_end(key)
        window.rows.append((seq, event_type, data_json, created_at, attempt))
        window.stamp = time.monotonic()
        window.known = max(window.known, seq)
        cost = len(data_json) + _ROW_COST
        window.size += cost
        self._bytes += cost
        while len(window.rows) > self.per_task:
            dropped = window.rows.popleft()
            window.size -= len(dropped[2]) + _ROW_COST
            self._bytes -= len(dropped[2]) + _ROW_COST
        while self._bytes > self.max_bytes:
            self._drop(next(iter(self._windows)))

    def committed(self, run_id: int, seq: int) -> None:
        """Rows up to ``seq`` of the run were committed by this process, by any path."""
        key = self._keys.get(run_id)
        if key is not None:
            window = self._windows[key]
            window.known = max(window.known, seq)

    def forget(self, run_id: int) -> None:
        """The run left this process (released, or queued again): answer nothing for it."""
        key = self._keys.get(run_id)
        if key is not None:
            self._drop(key)

    def read(
        self, key: TaskKey, after: int, limit: int, max_bytes: int = PAGE_BYTES
    ) -> list[Event] | None:
        """The events after ``after`` if this window holds all that exist, else None."""
        window = self._windows.get(key)
        if window is None:
            return None
        first, last = int(window.rows[0][0]), window.last
        if not first <= after + 1 <= last or window.known != last:
            return None
        if time.monotonic() - window.stamp > self.max_age:
            return None
        self.hits += 1
        start = after + 1 - first
        page = [to_event(key, row) for row in islice(window.rows, start, start + limit)]
        size = 0
        for n, ev in enumerate(page):  # the same byte bound as the SQL read
            if size >= max_bytes:
                return page[:n]
            size += len(ev.frame)
        return page

    def _drop(self, key: TaskKey) -> None:
        window = self._windows.pop(key, None)
        if window is not None:
            self._bytes -= window.size
            self._keys.pop(window.run_id, None)


_ROW_COST = 200  # bytes a cached row costs besides its data text, roughly


class ReadAhead:
    """The next page of a long read, fetched while the reader sends the page it has.

    A reader that got a full page will ask for the next one: fetching it meanwhile, on another
    pooled connection, overlaps the database's work with the reader's. Only a full page is
    handed over, as it cannot change once its rows exist; a short one (the tail) is read again,
    fresh, so that a reader never mistakes an older tail for the end of the log.
    """

    def __init__(
        self, db: Database, max_bytes: int = PAGE_BYTES, slots: int = 16, max_age: float = 5.0
    ) -> None:
        self.db = db
        self.max_bytes = max_bytes
        self.slots = slots
        self.max_age = max_age
        self.hits = 0
        self._pages: OrderedDict[
            tuple[TaskKey, int, int], tuple[float, asyncio.Task[list[Event]]]
        ] = OrderedDict()

    def start(self, key: TaskKey, after: int, limit: int) -> None:
        slot = (key, after, limit)
        if slot in self._pages:
            return
        task = asyncio.get_running_loop().create_task(
            _fetch(self.db, key, after, limit, self.max_bytes)
        )
        task.add_done_callback(_retrieve)
        self._pages[slot] = (time.monotonic(), task)
        while len(self._pages) > self.slots:
            # Forgotten, not cancelled: a query cancelled midway costs its connection a reset.
            self._pages.popitem(last=False)

    async def take(self, key: TaskKey, after: int, limit: int) -> list[Event] | None:
        """The page fetched ahead for exactly this read, if it is full; else None."""
        entry = self._pages.pop((key, after, limit), None)
        if entry is None:
            return None
        started, task = entry
        if time.monotonic() - started > self.max_age:
            return None
        try:
            page = await asyncio.shield(task)
        except DatabaseUnavailable:
            return None
        if not page_full(page, limit, self.max_bytes):
            return None
        self.hits += 1
        return page


def _retrieve(task: asyncio.Task[list[Event]]) -> None:
    # A page nobody came for: its error (the database went away meanwhile) is nobody's.
    if not task.cancelled():
        task.exception()
