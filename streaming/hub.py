"""Fan-out: one LISTEN connection per process feeding every local subscriber of a task."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from streaming.events import Event, TaskKey
from streaming.exceptions import DatabaseUnavailable
from streaming.notifier import decode

logger = logging.getLogger(__name__)


class LogReader(Protocol):
    """What the hub reads of the event log: a page of a task's events after a seq."""

    async def read(self, key: TaskKey, after: int, limit: int = ...) -> list[Event]: ...

    def full(self, page: list[Event], limit: int = ...) -> bool:
        """Whether the page stopped at its bound (rows or bytes): more may follow it."""
        ...


#: Each run's last seq, from the run store (the poll that covers lost notifications).
LastSeqs = Callable[[Sequence[int]], Awaitable[dict[int, int]]]


class Listener(Protocol):
    """One LISTEN connection (``streaming.db.Listener``)."""

    async def connect(self, timeout: float = ...) -> None: ...

    def payloads(self, timeout: float) -> AsyncIterator[str]: ...

    async def ping(self, timeout: float) -> None: ...

    async def close(self) -> None: ...


class Subscription:
    """One consumer of one task's events; reads the log itself whenever it falls behind."""

    def __init__(
        self, hub: Hub, topic: _Topic, after: int, buffer: int, buffer_bytes: int = 1 << 20
    ) -> None:
        self.hub = hub
        self.topic = topic
        self.last = after
        self.latest = -1  # highest seq known to exist; -1: unknown, read the log first
        self.overflowed = False
        self.closed = False
        self._buffer = buffer
        self._buffer_bytes = buffer_bytes
        self._pending_bytes = 0
        self._pending: deque[Event] = deque()
        self._wake = asyncio.Event()

    def offer(self, batch: list[Event], size: int | None = None) -> None:
        """Hand over a batch; ``size`` is its frames' bytes (the hub computes it once for all
        subscribers of a task)."""
        if batch:
            self.latest = max(self.latest, batch[-1].seq)
        if size is None:
            size = sum(len(ev.frame) for ev in batch)
        if (
            self.overflowed
            or len(self._pending) + len(batch) > self._buffer
            or self._pending_bytes + size > self._buffer_bytes
        ):
            # Too much waiting for a slow client: drop it all; it reads the log itself.
            self.overflowed = True
            self._pending.clear()
            self._pending_bytes = 0
        else:
            self._pending.extend(batch)
            self._pending_bytes += size
        self._wake.set()

    def poke(self, seq: int) -> None:
        """The log has rows up to ``seq``, whether or not they were handed over."""
        if seq > self.latest:
            self.latest = seq
            self._wake.set()

    def close(self) -> None:
        self.closed = True
        self._wake.set()

    async def batches(self, keepalive: float) -> AsyncIterator[list[Event]]:
        """New events in seq order, no gap, no duplicate; an empty list after a silence."""
        while not self.closed:
            batch = self._take()
            if batch is None:
                batch = await self._catch_up()
            if batch:
                self.last = batch[-1].seq
                yield batch
                if batch[-1].is_terminal:
                    return
                continue
            self._wake.clear()
            if self.latest > self.last or self._pending:
                continue
            # asyncio.timeout, not wait_for: wait_for wraps the wait in a new task on every
            # wake-up of every subscriber, a third of the server's CPU at 1,000 clients.
            try:
                async with asyncio.timeout(keepalive):
                    await self._wake.wait()
            except TimeoutError:
                yield []

    def _take(self) -> list[Event] | None:
        """Buffered events that follow ``last``; None when the log must be read instead."""
        self._pending_bytes = 0  # whatever is pending is taken, or dropped, now
        if self.overflowed or self.latest < 0:
            self.overflowed = False
            self._pending.clear()
            return None
        out: list[Event] = []
        while self._pending:
            ev = self._pending.popleft()
            if ev.seq <= self.last:
                continue
            if ev.seq != self.last + len(out) + 1:
                self._pending.clear()
                return None
            out.append(ev)
        if not out and self.latest > self.last:
            return None
        return out

    async def _catch_up(self) -> list[Event]:
        seen = self.latest
        while True:
            try:
                batch = await self.hub.log.read(self.topic.key, self.last)
                break
            except DatabaseUnavailable:
                if self.closed:
                    return []
                await asyncio.sleep(0.5)  # the log is the truth; wait for it to come back
        end = batch[-1].seq if batch else self.last
        if self.hub.log.full(batch):
            self.latest = max(self.latest, end + 1)
        elif self.latest == seen:
            self.latest = end  # nothing announced meanwhile: the log says where we are
        self.hub.caught_up(self.topic, end)
        return batch


@dataclass(eq=False)
class _Topic:
    run_id: int
    key: TaskKey
    subs: set[Subscription] = field(default_factory=set)
    fetched: int = -1
    target: int = 0
    fetching: asyncio.Task[None] | None = None


class Hub:
    """Registers subscribers per task and hands each new committed row to all of them.

    One read per task per wake-up serves every subscriber; the SSE frame of each event is
    encoded once. A lost notification costs latency only: the hub polls the log.
    """

    def __init__(
        self,
        log: LogReader,
        last_seqs: LastSeqs,
        listener: Listener,
        *,
        buffer: int = 1024,
        buffer_bytes: int = 1 << 20,
        health_interval: float = 2.0,
        poll_interval: float = 5.0,
        origin: str = "",
    ) -> None:
        self.log = log
        self.last_seqs = last_seqs
        self.listener = listener
        self.origin = origin
        self.buffer = buffer
        self.buffer_bytes = buffer_bytes
        self.health_interval = health_interval
        self.poll_interval = poll_interval
        self.on_queued: Callable[[int], None] = lambda run_id: None
        self.on_cancel: Callable[[int], None] = lambda run_id: None
        self.listening = False
        self.reconnects = 0
        self.fetches = 0
        self._topics: dict[int, _Topic] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._connected = asyncio.Event()

    @property
    def subscriber_count(self) -> int:
        return sum(len(t.subs) for t in self._topics.values())

    def start(self) -> None:
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._listen()), loop.create_task(self._poll())]

    async def wait_listening(self, timeout: float = 10.0) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout)

    def subscribe(self, run_id: int, key: TaskKey, after: int) -> Subscription:
        topic = self._topics.get(run_id)
        if topic is None:
            topic = self._topics[run_id] = _Topic(run_id, key)
        sub = Subscription(self, topic, after, self.buffer, self.buffer_bytes)
        topic.subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        sub.close()
        topic = sub.topic
        topic.subs.discard(sub)
        if not topic.subs and self._topics.get(topic.run_id) is topic:
            del self._topics[topic.run_id]
            if topic.fetching is not None:
                topic.fetching.cancel()

    def caught_up(self, topic: _Topic, seq: int) -> None:
        if (topic.fetching is None or topic.fetching.done()) and seq > topic.fetched:
            topic.fetched = seq
            # A notification for rows up to ``seq`` now counts as fetched and hands nothing
            # to the other subscribers: tell them the rows exist, or one that was waiting
            # would miss them (and hang, if the last of them was the task's end).
            for sub in topic.subs:
                sub.poke(seq)

    def committed(self, run_id: int, seq: int) -> None:
        """Rows up to ``seq`` are committed for this run (a local append or a NOTIFY)."""
        topic = self._topics.get(run_id)
        if topic is None or seq <= max(topic.fetched, topic.target):
            return
        topic.target = seq
        if topic.fetching is None or topic.fetching.done():
            topic.fetching = asyncio.get_running_loop().create_task(self._fetch(topic))

    async def _fetch(self, topic: _Topic) -> None:
        try:
            while topic.subs and topic.target > topic.fetched:
                start = topic.fetched
                if start < 0:
                    start = max(sub.last for sub in topic.subs)
                batch = await self.log.read(topic.key, start)
                self.fetches += 1
                if not batch:
                    topic.fetched = max(start, topic.fetched)
                    break
                topic.fetched = batch[-1].seq
                size = sum(len(ev.frame) for ev in batch)  # once, not once per subscriber
                for sub in list(topic.subs):
                    sub.offer(batch, size)
        except DatabaseUnavailable:
            logger.warning(
                "reading run %s for subscribers failed; the poll will retry", topic.run_id
            )
            for sub in list(topic.subs):
                sub.poke(topic.target)

    def _dispatch(self, payload: str) -> None:
        msg = decode(payload)
        if not self.origin or msg.origin != self.origin:
            # Our own commits were announced to us directly: their echo would be a no-op.
            for run_id, seq in msg.events.items():
                self.committed(run_id, seq)
        for run_id in msg.queued:
            self.on_queued(run_id)
        for run_id in msg.cancels:
            self.on_cancel(run_id)

    async def _listen(self) -> None:
        backoff = 0.1
        while True:
            try:
                await self.listener.connect()
                self.listening = True
                self._connected.set()
                backoff = 0.1
                try:
                    await self.poll_once()  # whatever was missed while not listening
                except DatabaseUnavailable:
                    # The pool, not this connection, failed (it may be reconnecting after
                    # the same outage): keep listening; the periodic poll reads it later.
                    logger.warning("catching up after reconnecting failed; the poll will retry")
                while True:
                    async for payload in self.listener.payloads(self.health_interval):
                        self._dispatch(payload)
                    await self.listener.ping(self.health_interval)
            except Exception as exc:
                # DatabaseUnavailable is the expected way out; anything else is logged, but
                # must not end the loop either: this process would stop following for good.
                if not isinstance(exc, DatabaseUnavailable):
                    logger.exception("LISTEN loop failed; reconnecting")
                if self.listening:
                    self.reconnects += 1
                    logger.warning("LISTEN connection lost (%s); reconnecting", exc)
                self.listening = False
                await self.listener.close()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval if self.listening else 0.5)
            try:
                await self.poll_once()
            except DatabaseUnavailable:
                logger.debug("log poll failed; the database is unreachable")
            except Exception:  # loop boundary: the poll is the fallback for lost NOTIFYs
                logger.exception("log poll failed")

    async def poll_once(self) -> None:
        """Read each subscribed run's last seq and fetch what was not announced."""
        if not self._topics:
            return
        last = await self.last_seqs(list(self._topics))
        for run_id, last_seq in last.items():
            self.committed(run_id, last_seq)

    def counters(self) -> dict[str, int]:
        return {
            "listener_reconnects_total": self.reconnects,
            "listener_up": int(self.listening),
            "hub_fetches_total": self.fetches,
            "hub_subscribers": self.subscriber_count,
        }

    async def aclose(self) -> None:
        for topic in list(self._topics.values()):
            for sub in list(topic.subs):
                sub.close()
        tasks = self._tasks + [t.fetching for t in self._topics.values() if t.fetching]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks = []
        await self.listener.close()
