"""Group commit: the appender batches concurrent appends, against a fake database."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from streaming.events import Append
from streaming.exceptions import DatabaseUnavailable
from streaming.writer import Appender
from tests.unit.fakes import (
    APPEND_BATCH_COLUMNS,
    FakeAppendDb,
    FakeSink,
    as_database,
    as_log,
    function_columns,
    key,
    select_columns,
    settle,
    wait_until,
)

RUN, OTHER = 1, 2


@pytest.fixture
def db() -> FakeAppendDb:
    fake = FakeAppendDb()
    fake.add_run(RUN, key(10))
    fake.add_run(OTHER, key(20), attempt=3)
    return fake


@pytest.fixture
def sink() -> FakeSink:
    return FakeSink()


def appender(
    db: FakeAppendDb, sink: FakeSink, max_batch: int = 512, retry_for: float = 1.0
) -> Appender:
    return Appender(as_database(db), as_log(sink), max_batch=max_batch, retry_for=retry_for)


def item(n: int, run_id: int = RUN, attempt: int = 1) -> Append:
    return Append(run_id, attempt, "progress", json.dumps({"n": n}))


def test_the_fake_returns_the_columns_of_the_sql() -> None:
    assert tuple(select_columns("append_batch")) == APPEND_BATCH_COLUMNS
    assert tuple(function_columns("streaming_append_batch_once")) == APPEND_BATCH_COLUMNS


async def test_a_lone_append_commits_at_once(db: FakeAppendDb, sink: FakeSink) -> None:
    app = appender(db, sink)
    assert await asyncio.wait_for(app.append(item(1)), 0.5) == 1
    assert db.batch_sizes == [1]
    assert sink.of("committed") == [(RUN, 1)]
    assert app.counters()["events_appended_total"] == 1
    assert app.counters()["append_batches_total"] == 1


async def test_sequential_appends_get_consecutive_seqs(db: FakeAppendDb, sink: FakeSink) -> None:
    app = appender(db, sink)
    seqs = [await app.append(item(n)) for n in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    assert db.batch_sizes == [1] * 5
    assert [c["batch"] for c in db.calls] == [1, 2, 3, 4, 5]  # numbered per writer
    assert len({c["writer"] for c in db.calls}) == 1


async def test_two_appenders_are_two_writers(db: FakeAppendDb, sink: FakeSink) -> None:
    a, b = appender(db, sink), appender(db, sink)
    assert [await a.append(item(1)), await b.append(item(2))] == [1, 2]
    assert db.calls[0]["writer"] != db.calls[1]["writer"]
    assert [c["batch"] for c in db.calls] == [1, 1]


async def test_appends_made_together_share_one_batch(db: FakeAppendDb, sink: FakeSink) -> None:
    app = appender(db, sink)
    seqs = await asyncio.gather(*(app.append(item(n)) for n in range(10)))
    assert seqs == list(range(1, 11))  # each caller its own seq, in the order of appends
    assert db.batch_sizes == [10]


async def test_appends_during_a_commit_in_flight_share_the_next_batch(
    db: FakeAppendDb, sink: FakeSink
) -> None:
    db.gate = asyncio.Event()
    app = appender(db, sink)
    first = asyncio.ensure_future(app.append(item(0)))
    await wait_until(lambda: db.in_flight == 1)
    rest = [
        asyncio.ensure_future(app.append(item(n, RUN if n % 2 else OTHER, 1 if n % 2 else 3)))
        for n in range(1, 7)
    ]
    await settle()
    assert len(db.calls) == 1  # nobody else wrote while the first commit was in flight
    db.gate.set()
    assert await first == 1
    results = await asyncio.gather(*rest)
    assert db.batch_sizes == [1, 6]
    assert db.calls[1]["run_ids"] == [RUN, OTHER, RUN, OTHER, RUN, OTHER]
    assert results == [2, 1, 3, 2, 4, 3]  # each run its own seqs: RUN 2, 3, 4; OTHER 1, 2, 3


async def test_max_batch_is_respected(db: FakeAppendDb, sink: FakeSink) -> None:
    app = appender(db, sink, max_batch=4)
    seqs = await asyncio.gather(*(app.append(item(n)) for n in range(10)))
    assert db.batch_sizes == [4, 4, 2]
    assert seqs == list(range(1, 11))
    assert all(len(call["run_ids"]) <= 4 for call in db.calls)


async def test_a_fenced_append_returns_none_and_announces_nothing(
    db: FakeAppendDb, sink: FakeSink
) -> None:
    app = appender(db, sink)
    stale, ok = await asyncio.gather(
        app.append(item(1, OTHER, attempt=2)), app.append(item(2, RUN))
    )
    assert stale is None and ok == 1
    assert db.batch_sizes == [2]
    assert sink.calls and all(run_id == RUN for _, run_id, _ in sink.calls)


async def test_an_append_to_an_unknown_run_is_fenced(db: FakeAppendDb, sink: FakeSink) -> None:
    app = appender(db, sink)
    assert await app.append(item(1, run_id=99)) is None
    assert sink.calls == []


async def test_each_row_is_recorded_before_its_commit_is_announced(
    db: FakeAppendDb, sink: FakeSink
) -> None:
    app = appender(db, sink)
    await asyncio.gather(
        *(app.append(item(n, RUN if n % 3 else OTHER, 1 if n % 3 else 3)) for n in range(9))
    )
    rows = sink.of("committed")
    assert len(rows) == 9
    for row in rows:
        assert sink.calls.index(("record", *row)) < sink.calls.index(("committed", *row))
    first = sink.records[0]
    assert (first.run_id, first.key, first.seq, first.event_type, first.attempt) == (
        OTHER,
        key(20),
        1,
        "progress",
        3,
    )
    assert json.loads(first.data_json) == {"n": 0}


async def test_record_gets_the_row_as_the_database_returned_it(
    db: FakeAppendDb, sink: FakeSink
) -> None:
    app = appender(db, sink)
    await app.append(Append(RUN, 1, "step", '{"a":1,"b":[1,2]}'))
    (rec,) = sink.records
    assert rec.data_json == '{"a": 1, "b": [1, 2]}'  # the stored text, not the sent one
    assert rec.key == key(10) and rec.event_type == "step" and rec.seq == 1
    assert rec.created_at is not None


# -- outages and errors ------------------------------------------------------------------


async def test_an_outage_is_retried_then_succeeds(db: FakeAppendDb, sink: FakeSink) -> None:
    app = appender(db, sink, retry_for=1.0)
    db.failures.fail(1)
    seqs = await asyncio.gather(app.append(item(1)), app.append(item(2)))
    assert seqs == [1, 2]
    assert len(db.calls) == 2  # one failed, one committed: the same batch twice
    assert db.calls[0] == db.calls[1]
    assert db.batch_sizes == [2] and sink.of("committed") == [(RUN, 1), (RUN, 2)]


async def test_a_retry_after_a_lost_acknowledgement_writes_nothing_twice(
    db: FakeAppendDb, sink: FakeSink
) -> None:
    app = appender(db, sink, retry_for=1.0)
    db.lost_acks.fail(1)  # committed, but the reply never arrived
    seqs = await asyncio.gather(*(app.append(item(n)) for n in range(3)))
    assert seqs == [1, 2, 3]
    assert db.calls[0] == db.calls[1]  # the same writer and batch number, retried
    assert db.runs[RUN].last_seq == 3 and db.batch_sizes == [3]
    assert sink.of("committed") == [(RUN, 1), (RUN, 2), (RUN, 3)]
    assert await app.append(item(4)) == 4
    assert db.calls[-1]["batch"] == 2


async def test_an_outage_past_retry_for_reaches_every_caller(
    db: FakeAppendDb, sink: FakeSink
) -> None:
    app = appender(db, sink, retry_for=0.05)
    db.failures.fail(100)
    results = await asyncio.gather(*(app.append(item(n)) for n in range(3)), return_exceptions=True)
    assert all(isinstance(r, DatabaseUnavailable) for r in results)
    # Retried as the same batch, never split into single appends.
    assert db.calls and all(c == db.calls[0] for c in db.calls)
    assert len(db.calls[0]["run_ids"]) == 3
    assert sink.calls == []


async def test_a_persistent_error_reaches_every_caller_of_its_batch(
    db: FakeAppendDb, sink: FakeSink
) -> None:
    db.gate = asyncio.Event()
    app = appender(db, sink, retry_for=1.0)
    first = asyncio.ensure_future(app.append(item(0)))
    await wait_until(lambda: db.in_flight == 1)
    db.refuse = lambda params: RuntimeError("boom")
    batch = [asyncio.ensure_future(app.append(item(n))) for n in range(1, 4)]
    await settle()
    db.gate.set()
    results = await asyncio.gather(first, *batch, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) and str(r) == "boom" for r in results)
    assert sink.calls == []
    db.refuse = lambda params: None
    assert await app.append(item(9)) == 1  # the appender still works


async def test_a_refused_batch_fails_only_the_offending_append(
    db: FakeAppendDb, sink: FakeSink
) -> None:
    def refuse(params: dict[str, Any]) -> BaseException | None:
        bad = any(json.loads(d).get("n") == 2 for d in params["datas"])
        return ValueError("invalid input syntax for type json") if bad else None

    db.refuse = refuse
    app = appender(db, sink)
    results = await asyncio.gather(*(app.append(item(n)) for n in range(5)), return_exceptions=True)
    assert results[:2] == [1, 2] and results[3:] == [3, 4]
    assert isinstance(results[2], ValueError)
    assert db.batch_sizes == [1, 1, 1, 1]  # the batch of 5 failed; each written alone
    assert app.counters()["append_batches_split_total"] == 1
    assert sink.of("committed") == [(RUN, 1), (RUN, 2), (RUN, 3), (RUN, 4)]


async def test_appends_queued_behind_a_failed_batch_are_written(
    db: FakeAppendDb, sink: FakeSink
) -> None:
    db.gate = asyncio.Event()
    app = appender(db, sink)
    db.failures.fail(1, lambda: RuntimeError("boom"))
    first = asyncio.ensure_future(app.append(item(0)))
    await wait_until(lambda: db.in_flight == 1)
    behind = [asyncio.ensure_future(app.append(item(n))) for n in range(1, 3)]
    await settle()
    db.gate.set()
    with pytest.raises(RuntimeError, match="boom"):
        await first
    assert await asyncio.wait_for(asyncio.gather(*behind), 0.5) == [1, 2]


async def test_a_cancelled_caller_does_not_break_its_batch(
    db: FakeAppendDb, sink: FakeSink
) -> None:
    db.gate = asyncio.Event()
    app = appender(db, sink)
    first = asyncio.ensure_future(app.append(item(0)))
    await wait_until(lambda: db.in_flight == 1)
    first.cancel()
    other = asyncio.ensure_future(app.append(item(1)))
    await settle()
    db.gate.set()
    assert await other == 2
    assert first.cancelled()
    assert sink.of("committed") == [(RUN, 1), (RUN, 2)]  # its row was committed all the same


# -- closing -----------------------------------------------------------------------------


async def test_aclose_finishes_the_batch_in_flight_and_forgets_the_writer(
    db: FakeAppendDb, sink: FakeSink
) -> None:
    db.gate = asyncio.Event()
    app = appender(db, sink)
    pending = asyncio.ensure_future(app.append(item(0)))
    await wait_until(lambda: db.in_flight == 1)
    closing = asyncio.ensure_future(app.aclose())
    await settle()
    assert not closing.done() and db.executed == []
    db.gate.set()
    await closing
    assert pending.done() and pending.result() == 1
    assert db.executed == [("forget_writer", {"writer": app.writer})]


async def test_aclose_of_an_unused_appender_asks_nothing(db: FakeAppendDb, sink: FakeSink) -> None:
    await appender(db, sink).aclose()
    assert db.executed == [] and db.calls == []


async def test_aclose_survives_an_outage(db: FakeAppendDb, sink: FakeSink) -> None:
    app = appender(db, sink)
    await app.append(item(0))
    db.execute_failures.fail(1)
    await app.aclose()  # no error: retention drops the record later
    assert db.executed == []
