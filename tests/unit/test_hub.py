"""The hub and its subscriptions against a list-backed log: one catch-up rule, no database.

A subscriber replays the log after its ``after``, then takes the events the hub hands over,
and reads the log itself whenever what it holds does not follow on from what it sent: the
events it yields are every seq, in order, once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from streaming.events import Event, TaskKey
from streaming.hub import Hub, Subscription
from streaming.notifier import encode
from tests.unit.fakes import FakeListener, FakeLog, key, settle, wait_until

RUN = 7
TASK = key(70)


class Collector:
    """Runs ``sub.batches()`` in a task and keeps what it yields."""

    def __init__(self, sub: Subscription, keepalive: float = 5.0) -> None:
        self.sub = sub
        self.batches: list[list[Event]] = []
        self.ended = False
        self.task = asyncio.get_running_loop().create_task(self._run(keepalive))

    async def _run(self, keepalive: float) -> None:
        async for batch in self.sub.batches(keepalive):
            self.batches.append(batch)
        self.ended = True

    @property
    def seqs(self) -> list[int]:
        return [ev.seq for batch in self.batches for ev in batch]

    async def until_seq(self, seq: int, timeout: float = 1.0) -> None:
        await wait_until(lambda: bool(self.seqs) and self.seqs[-1] >= seq, timeout)

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


@pytest.fixture
def log() -> FakeLog:
    fake = FakeLog()
    fake.add_run(RUN, TASK)
    return fake


@pytest.fixture
def listener() -> FakeListener:
    return FakeListener()


@pytest.fixture
async def hub(log: FakeLog, listener: FakeListener) -> AsyncIterator[Hub]:
    h = Hub(
        log,
        log.last_seqs,
        listener,
        buffer=64,
        health_interval=0.05,
        poll_interval=60.0,
        origin="me",
    )
    yield h
    await h.aclose()


async def collect(
    hub: Hub, after: int = 0, run_id: int = RUN, task: TaskKey = TASK, keepalive: float = 5.0
) -> Collector:
    return Collector(hub.subscribe(run_id, task, after), keepalive)


def commit(hub: Hub, log: FakeLog, count: int = 1, end: bool = False) -> int:
    """Append ``count`` events (and an ``end``) and announce them, as a local writer does."""
    log.extend(TASK, count, end)
    hub.committed(RUN, log.last(TASK))
    return log.last(TASK)


# -- replay ------------------------------------------------------------------------------


async def test_replay_starts_after_the_given_seq(hub: Hub, log: FakeLog) -> None:
    log.extend(TASK, 5)
    c = await collect(hub, after=2)
    await c.until_seq(5)
    assert c.seqs == [3, 4, 5]
    assert log.read_calls[0][1] == 2
    await c.close()


async def test_replay_of_a_finished_task_ends_with_its_end_event(hub: Hub, log: FakeLog) -> None:
    log.extend(TASK, 3, end=True)
    sub = hub.subscribe(RUN, TASK, 0)
    got = [b async for b in sub.batches(5.0)]
    assert [ev.seq for b in got for ev in b] == [1, 2, 3, 4]
    assert got[-1][-1].type == "end"


async def test_replay_pages_through_a_long_log(hub: Hub) -> None:
    paged = FakeLog(page=3)
    paged.add_run(RUN, TASK)
    paged.extend(TASK, 10, end=True)
    hub.log = paged
    sub = hub.subscribe(RUN, TASK, 0)
    got = [b async for b in sub.batches(5.0)]
    assert [len(b) for b in got] == [3, 3, 3, 2]
    assert [ev.seq for b in got for ev in b] == list(range(1, 12))


async def test_a_subscriber_after_the_end_gets_nothing_more(hub: Hub, log: FakeLog) -> None:
    log.extend(TASK, 3, end=True)
    c = await collect(hub, after=4, keepalive=0.02)
    await wait_until(lambda: bool(c.batches))
    assert c.batches[0] == [] and c.seqs == []
    await c.close()


# -- live events -------------------------------------------------------------------------


async def test_live_events_arrive_in_order_without_gap_or_duplicate(hub: Hub, log: FakeLog) -> None:
    c = await collect(hub)
    await settle()
    for i in range(40):
        commit(hub, log, count=1 + i % 3)
        if i % 4 == 0:
            await settle(i % 5)
    last = commit(hub, log, end=True)
    await wait_until(lambda: c.ended)
    assert c.seqs == list(range(1, last + 1))
    assert all(batch for batch in c.batches)


async def test_events_committed_during_the_replay_are_not_repeated(hub: Hub, log: FakeLog) -> None:
    log.extend(TASK, 2)
    log.gate = asyncio.Event()
    c = await collect(hub)
    await settle()  # the replay is reading
    commit(hub, log, count=3)  # the hub's fetch reads too, behind the same gate
    await settle()
    log.gate.set()
    await c.until_seq(5)
    commit(hub, log, count=0, end=True)
    await wait_until(lambda: c.ended)
    assert c.seqs == [1, 2, 3, 4, 5, 6]
    # The replay, the hub's fetch of 3..5 (handed over and skipped), the fetch of the end:
    # what was handed over twice was dropped, not taken for a gap and read again.
    assert log.reads == 3


async def test_the_terminal_event_ends_batches_live(hub: Hub, log: FakeLog) -> None:
    c = await collect(hub)
    await settle()
    commit(hub, log, count=2, end=True)
    await wait_until(lambda: c.ended)
    assert c.task.done() and c.batches[-1][-1].is_terminal
    assert c.seqs == [1, 2, 3]


async def test_keepalive_yields_an_empty_batch_after_silence(hub: Hub, log: FakeLog) -> None:
    c = await collect(hub, keepalive=0.02)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await wait_until(lambda: bool(c.batches))
    assert c.batches[0] == []
    assert loop.time() - started >= 0.015
    commit(hub, log)
    await c.until_seq(1)
    assert c.seqs == [1]
    await c.close()


async def test_an_unsubscribed_subscriber_stops(hub: Hub, log: FakeLog) -> None:
    sub = hub.subscribe(RUN, TASK, 0)
    c = Collector(sub)
    await settle()
    assert hub.subscriber_count == 1
    hub.unsubscribe(sub)
    await wait_until(lambda: c.ended)
    assert hub.subscriber_count == 0
    reads = log.reads
    commit(hub, log)
    await settle()
    assert log.reads == reads  # nobody follows the run any more: nothing is read


# -- falling behind ----------------------------------------------------------------------


async def test_overflow_makes_the_subscriber_read_the_log_itself(
    log: FakeLog, listener: FakeListener
) -> None:
    hub = Hub(log, log.last_seqs, listener, buffer=4)
    log.extend(TASK, 1)
    sub = hub.subscribe(RUN, TASK, 0)
    it = sub.batches(5.0)
    first = await asyncio.wait_for(anext(it), 1)
    assert [ev.seq for ev in first] == [1]
    # The consumer is busy (not iterating) while the hub hands over more than its buffer.
    for _ in range(3):
        commit(hub, log, count=4)
        await settle()
    assert sub.overflowed
    reads = log.reads
    seqs: list[int] = [1]
    commit(hub, log, count=1, end=True)
    async for batch in it:
        seqs.extend(ev.seq for ev in batch)
    assert seqs == list(range(1, 16))
    assert log.reads > reads  # it read the log itself
    await hub.aclose()


async def test_a_failed_hub_read_leaves_the_subscriber_to_read_itself(
    hub: Hub, log: FakeLog
) -> None:
    c = await collect(hub)
    await settle()
    log.failures.fail(1)  # the hub's fetch for this commit fails
    commit(hub, log, count=3)
    await c.until_seq(3)
    assert c.seqs == [1, 2, 3]


async def test_a_failed_catch_up_is_retried_until_the_log_answers(hub: Hub, log: FakeLog) -> None:
    log.extend(TASK, 2, end=True)
    log.failures.fail(1)
    c = await collect(hub)
    await wait_until(lambda: c.ended, timeout=2.0)  # the subscriber waits 0.5 s to retry
    assert c.seqs == [1, 2, 3]
    assert log.reads == 2


async def test_a_lost_notification_is_covered_by_the_poll(hub: Hub, log: FakeLog) -> None:
    c = await collect(hub)
    await settle()
    log.extend(TASK, 3)  # committed elsewhere; its NOTIFY never arrives
    await settle()
    assert c.seqs == []
    await hub.poll_once()
    assert log.last_seq_calls[-1] == [RUN]
    await c.until_seq(3)
    assert c.seqs == [1, 2, 3]
    await c.close()


async def test_the_poll_loop_finds_unannounced_rows(log: FakeLog, listener: FakeListener) -> None:
    hub = Hub(log, log.last_seqs, listener, poll_interval=0.02)
    hub.start()
    await hub.wait_listening(1)
    c = await collect(hub)
    await settle()
    log.extend(TASK, 2, end=True)
    await wait_until(lambda: c.ended)
    assert c.seqs == [1, 2, 3]
    await hub.aclose()


async def test_a_dropped_listener_reconnects_and_rereads(
    hub: Hub, log: FakeLog, listener: FakeListener
) -> None:
    hub.start()
    await hub.wait_listening(1)
    c = await collect(hub)
    await settle()
    polls = len(log.last_seq_calls)
    listener.drop()
    await wait_until(lambda: not hub.listening)
    log.extend(TASK, 2)  # committed while nobody listened: its NOTIFY is lost
    # Reconnecting (after a 0.1 s backoff) polls; the poll loop's own first poll is later.
    await c.until_seq(2, timeout=0.35)
    assert c.seqs == [1, 2]
    assert hub.reconnects == 1 and listener.connects == 2 and hub.listening
    assert len(log.last_seq_calls) > polls
    await c.close()


async def test_notifications_from_the_listener_wake_subscribers(
    hub: Hub, log: FakeLog, listener: FakeListener
) -> None:
    hub.start()
    await hub.wait_listening(1)
    c = await collect(hub)
    await settle()
    log.extend(TASK, 2)
    for payload in encode({RUN: 2}, [], [], origin="elsewhere"):
        listener.send(payload)
    await c.until_seq(2)
    assert c.seqs == [1, 2]
    await c.close()


# -- notifications -----------------------------------------------------------------------


async def test_the_echo_of_our_own_events_is_ignored(hub: Hub, log: FakeLog) -> None:
    c = await collect(hub)
    await settle()
    reads = log.reads
    log.extend(TASK, 2)
    for payload in encode({RUN: 2}, [], [], origin="me"):
        hub._dispatch(payload)
    await settle()
    assert log.reads == reads and c.seqs == []
    for payload in encode({RUN: 2}, [], [], origin="other"):
        hub._dispatch(payload)
    await c.until_seq(2)
    assert c.seqs == [1, 2] and log.reads == reads + 1
    await c.close()


async def test_a_hub_without_origin_follows_every_notification(
    log: FakeLog, listener: FakeListener
) -> None:
    hub = Hub(log, log.last_seqs, listener)
    c = await collect(hub)
    await settle()
    log.extend(TASK, 1)
    for payload in encode({RUN: 1}, [], [], origin="me"):
        hub._dispatch(payload)
    await c.until_seq(1)
    assert c.seqs == [1]
    await c.close()
    await hub.aclose()


async def test_queued_and_cancel_notifications_are_passed_on_whatever_their_origin(
    hub: Hub,
) -> None:
    queued: list[int] = []
    cancels: list[int] = []
    hub.on_queued = queued.append
    hub.on_cancel = cancels.append
    for origin in ("me", "other"):
        for payload in encode({}, [1, 2], [3], origin=origin):
            hub._dispatch(payload)
    assert queued == [1, 2, 1, 2] and cancels == [3, 3]


async def test_notifications_for_runs_nobody_follows_read_nothing(hub: Hub, log: FakeLog) -> None:
    for payload in encode({999: 5}, [], [], origin="other"):
        hub._dispatch(payload)
    await settle()
    assert log.reads == 0 and hub.fetches == 0


# -- shared reads ------------------------------------------------------------------------


async def test_caught_up_pokes_the_other_subscribers(hub: Hub, log: FakeLog) -> None:
    waiting = await collect(hub)
    await settle()  # replayed an empty log; now waits
    log.extend(TASK, 3)  # not announced yet
    late = await collect(hub)
    await late.until_seq(3)  # its replay reads rows 1..3: the topic now counts them fetched
    hub.committed(RUN, 3)  # so their notification hands nothing over
    await waiting.until_seq(3)
    assert waiting.seqs == [1, 2, 3] and late.seqs == [1, 2, 3]
    await waiting.close()
    await late.close()


async def test_caught_up_raises_what_subscribers_know_exists(hub: Hub) -> None:
    a = hub.subscribe(RUN, TASK, 0)
    b = hub.subscribe(RUN, TASK, 0)
    hub.caught_up(a.topic, 4)
    assert a.latest == 4 and b.latest == 4
    hub.caught_up(a.topic, 2)  # older news changes nothing
    assert b.latest == 4


async def test_many_subscribers_share_one_read_per_wake_up(hub: Hub, log: FakeLog) -> None:
    collectors = [await collect(hub) for _ in range(50)]
    await settle()
    reads = log.reads
    assert hub.subscriber_count == 50
    commit(hub, log, count=2)
    for c in collectors:
        await c.until_seq(2)
    assert log.reads == reads + 1
    hub.committed(RUN, 2)  # the same news again (a NOTIFY after the local announcement)
    await settle()
    assert log.reads == reads + 1
    commit(hub, log, count=1, end=True)
    for c in collectors:
        await wait_until(lambda c=c: c.ended)  # type: ignore[misc]
    assert log.reads == reads + 2
    assert all(c.seqs == [1, 2, 3, 4] for c in collectors)


async def test_two_runs_are_followed_independently(hub: Hub, log: FakeLog) -> None:
    other = key(71)
    log.add_run(8, other)
    a = await collect(hub)
    b = await collect(hub, run_id=8, task=other)
    await settle()
    log.extend(other, 2)
    hub.committed(8, 2)
    await b.until_seq(2)
    assert a.seqs == [] and b.seqs == [1, 2]
    await a.close()
    await b.close()


async def test_pages_cut_by_bytes_still_reach_every_event() -> None:
    """A log read bounded in bytes (a short page that is still full) is read on, not taken
    for the end: every event arrives once, in order."""
    log = FakeLog(page=1000, page_bytes=600)  # a few frames per page
    hub = Hub(log, log.last_seqs, FakeListener(), buffer=1024)
    log.add_run(RUN, TASK)
    log.extend(TASK, 40, end=True)
    sub = hub.subscribe(RUN, TASK, 0)
    got: list[int] = []
    async with asyncio.timeout(5):
        async for batch in sub.batches(5):
            got.extend(ev.seq for ev in batch)
    assert got == list(range(1, 42))
    assert log.reads > 5  # it really was read in several byte-bounded pages


async def test_a_slow_subscriber_buffers_at_most_its_bytes() -> None:
    log = FakeLog()
    hub = Hub(log, log.last_seqs, FakeListener(), buffer=1024, buffer_bytes=2000)
    log.add_run(RUN, TASK)
    sub = hub.subscribe(RUN, TASK, 0)
    batch = log.extend(TASK, 30)
    sub.offer(batch[:5])
    assert not sub.overflowed
    sub.offer(batch[5:])  # far past 2,000 bytes: dropped, to be read from the log
    assert sub.overflowed and sub._pending_bytes == 0 and not sub._pending
