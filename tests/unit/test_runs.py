"""The run store's row mapping and announcements, against canned rows in the SQL's order.

The rows are built from the column lists of streaming/sql/queries.sql, so a query whose
columns move, or a mapping that reads the wrong index, fails here and not in production.
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Mapping
from dataclasses import fields
from datetime import UTC, datetime
from importlib import resources
from typing import Any, cast

import pytest

import streaming.runs
from streaming import queries
from streaming.db import Row, SyncReader
from streaming.events import CANCELLED_ERROR, Status, TaskKey
from streaming.runs import (
    CancelTarget,
    Claim,
    Claimed,
    Enqueued,
    Expired,
    Run,
    RunSpec,
    RunStore,
    _claim,
    _run,
    status_now,
)
from tests.unit.fakes import (
    FakeSink,
    as_database,
    as_log,
    check_params,
    function_columns,
    select_columns,
    table_columns,
)

KEY = TaskKey("app", "Model", 33)
T = [datetime(2026, 1, d, tzinfo=UTC) for d in range(1, 6)]

#: One distinct value per column name that the run store's queries return.
SAMPLE: dict[str, Any] = {
    "id": 11,
    "app_label": "app",
    "model_name": "Model",
    "task_id": 33,
    "status": "running",
    "attempt": 4,
    "last_seq": 55,
    "final_value": {"v": 1},
    "error": {"e": 2},
    "started_at": T[0],
    "finished_at": T[1],
    "lease_owner": "host:1:abc",
    "lease_expires_at": T[2],
    "cancel_requested_at": T[3],
    "created_at": T[4],
    "timeout_seconds": 6.5,
    "cancel_requested": True,
    "claimed": True,
    "created": True,
    "lease_expired": True,
    "db_table": "tests_model",
    "pk_column": "pk",
}


def row_of(name: str, **override: Any) -> Row:
    values = {**SAMPLE, **override}
    return tuple(values[c] for c in select_columns(name))


class FakeRunDb:
    """Canned rows per query name; every call is checked against the SQL's parameters."""

    def __init__(self) -> None:
        self.rows: dict[str, list[Row]] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.deleted: list[tuple[int, dict[str, Any], str, str]] = []

    async def fetchall(self, name: str, params: Mapping[str, Any] | None = None) -> list[Row]:
        check_params(name, params)
        self.calls.append((name, dict(params or {})))
        return list(self.rows.get(name, []))

    async def fetchone(self, name: str, params: Mapping[str, Any] | None = None) -> Row | None:
        rows = await self.fetchall(name, params)
        return rows[0] if rows else None

    async def delete_task(
        self, run_id: int, ident: Mapping[str, Any], db_table: str, pk_column: str
    ) -> None:
        self.deleted.append((run_id, dict(ident), db_table, pk_column))

    def params(self, name: str) -> dict[str, Any]:
        (params,) = [p for n, p in self.calls if n == name]
        return params


class FakeReader:
    def __init__(self, row: Row | None) -> None:
        self.row = row
        self.calls: list[tuple[str, Mapping[str, Any] | None]] = []

    def fetchone(self, name: str, params: Mapping[str, Any] | None = None) -> Row | None:
        check_params(name, params)
        self.calls.append((name, params))
        return self.row


@pytest.fixture
def db() -> FakeRunDb:
    return FakeRunDb()


@pytest.fixture
def sink() -> FakeSink:
    return FakeSink()


@pytest.fixture
def store(db: FakeRunDb, sink: FakeSink) -> RunStore:
    return RunStore(as_database(db), as_log(sink))


# -- the queries exist -------------------------------------------------------------------


def test_every_query_the_run_store_names_exists() -> None:
    source = resources.files("streaming").joinpath("runs.py").read_text()
    names = set(re.findall(r"\.(?:fetchone|fetchall|execute)\(\s*\"(\w+)\"", source))
    assert {
        "enqueue",
        "get_run",
        "claim",
        "heartbeat",
        "release",
        "finish",
        "finish_unowned",
        "request_cancel",
        "old_runs",
        "last_seqs",
        "run_status",
    } <= names
    assert names <= set(queries.all_queries())


def test_get_run_reads_columns_of_the_run_table() -> None:
    table = table_columns("streaming_taskrun")
    assert {"id", "status", "attempt", "lease_owner"} <= set(table)
    assert set(select_columns("get_run")) <= set(table)
    assert set(select_columns("old_runs")) <= set(table)


def test_the_claim_query_selects_what_streaming_claim_returns() -> None:
    assert select_columns("claim") == function_columns("streaming_claim")
    assert select_columns("claim")[0] == "claimed"


# -- the row mapping ---------------------------------------------------------------------

RUN_FIELDS = {
    "id": "id",
    "app_label": "key.app_label",
    "model_name": "key.model_name",
    "task_id": "key.task_id",
    "status": "status",
    "attempt": "attempt",
    "last_seq": "last_seq",
    "final_value": "final_value",
    "error": "error",
    "started_at": "started_at",
    "finished_at": "finished_at",
    "lease_owner": "lease_owner",
    "lease_expires_at": "lease_expires_at",
    "cancel_requested_at": "cancel_requested_at",
    "created_at": "created_at",
}
CLAIM_FIELDS = {
    "id": "run_id",
    "app_label": "key.app_label",
    "model_name": "key.model_name",
    "task_id": "key.task_id",
    "attempt": "attempt",
    "timeout_seconds": "timeout",
    "last_seq": "last_seq",
    "cancel_requested": "cancel_requested",
}


def _mapped(value: object, mapping: dict[str, str], query: str, cls: type, skip: set[str]) -> None:
    cols = [c for c in select_columns(query) if c not in skip]
    assert set(cols) == set(mapping), query
    targets = {path.split(".")[0] for path in mapping.values()}
    assert targets == {f.name for f in fields(cls)}, "every field is read from a column"
    for col in cols:
        assert operator.attrgetter(mapping[col])(value) == SAMPLE[col], col


def test_run_maps_get_run_columns_in_order() -> None:
    run = _run(row_of("get_run"))
    _mapped(run, RUN_FIELDS, "get_run", Run, set())
    assert run.status is Status.RUNNING and run.key == KEY and not run.finished


def test_claim_maps_the_claim_select_list_in_order() -> None:
    claim = _claim(row_of("claim"))
    _mapped(claim, CLAIM_FIELDS, "claim", Claim, {"claimed"})  # the flag is the store's
    assert claim.key == KEY


def test_returning_lists_the_store_reads_by_position() -> None:
    assert select_columns("request_cancel") == ["id", "status", "lease_owner", "lease_expired"]
    assert select_columns("enqueue") == ["id", "status", "created"]
    assert select_columns("old_runs") == [
        "id",
        "app_label",
        "model_name",
        "task_id",
        "db_table",
        "pk_column",
    ]
    assert select_columns("heartbeat") == ["id", "cancel_requested"]
    assert select_columns("last_seqs") == ["id", "last_seq"]
    assert select_columns("release") == ["id"]


# -- the store ---------------------------------------------------------------------------


async def test_get_returns_the_run_or_none(store: RunStore, db: FakeRunDb) -> None:
    assert await store.get(KEY) is None
    db.rows["get_run"] = [row_of("get_run", status="completed")]
    run = await store.get(KEY)
    assert run is not None and run.id == 11 and run.finished
    assert db.calls[-1] == ("get_run", KEY.params)


async def test_enqueue_of_a_new_run_announces_it_queued(
    store: RunStore, db: FakeRunDb, sink: FakeSink
) -> None:
    db.rows["enqueue"] = [row_of("enqueue", status="pending")]
    spec = RunSpec("tests_model", "pk", 3, 12.5)
    out = await store.enqueue(KEY, spec)
    assert out == Enqueued(11, Status.PENDING, True)
    assert sink.calls == [("requeued", 11, 0)]
    assert db.params("enqueue") == {
        **KEY.params,
        "db_table": "tests_model",
        "pk_column": "pk",
        "max_attempts": 3,
        "timeout_seconds": 12.5,
    }


@pytest.mark.parametrize("status", ["running", "completed"])
async def test_enqueue_of_a_started_run_announces_nothing(
    store: RunStore, db: FakeRunDb, sink: FakeSink, status: str
) -> None:
    db.rows["enqueue"] = [row_of("enqueue", status=status, created=False)]
    out = await store.enqueue(KEY, RunSpec("t", "id", 1, None))
    assert out == Enqueued(11, Status(status), False)
    assert sink.calls == []


async def test_claim_of_a_first_attempt_announces_nothing(
    store: RunStore, db: FakeRunDb, sink: FakeSink
) -> None:
    db.rows["claim"] = [row_of("claim", attempt=1, cancel_requested=False)]
    claimed = await store.claim("me", 30.0)
    assert claimed == Claimed(Claim(11, KEY, 1, 6.5, 55, False), 0)
    assert sink.calls == []
    assert db.params("claim") == {"owner": "me", "ttl": 30.0, "run_id": None}


async def test_claim_of_a_retry_announces_its_retry_event(
    store: RunStore, db: FakeRunDb, sink: FakeSink
) -> None:
    db.rows["claim"] = [row_of("claim", attempt=2, last_seq=9)]
    claimed = await store.claim("me", 30.0, run_id=11)
    assert claimed.claim is not None and claimed.claim.attempt == 2
    assert sink.calls == [("committed", 11, 9)]
    assert db.params("claim")["run_id"] == 11


async def test_claim_of_nothing_is_none(store: RunStore, sink: FakeSink) -> None:
    assert await store.claim("me", 30.0) == Claimed(None, 0)
    assert sink.calls == []


async def test_runs_failed_on_the_way_are_counted_and_announced(
    store: RunStore, db: FakeRunDb, sink: FakeSink
) -> None:
    db.rows["claim"] = [
        row_of("claim", claimed=False, id=5, attempt=4, last_seq=12, cancel_requested=False),
        row_of("claim", claimed=False, id=6, attempt=4, last_seq=None, cancel_requested=False),
        row_of("claim", claimed=True, id=7, attempt=1, last_seq=0, cancel_requested=False),
    ]
    claimed = await store.claim("me", 30.0)
    assert claimed.failed == 2
    assert claimed.claim is not None and claimed.claim.run_id == 7
    assert sink.calls == [("committed", 5, 12)]  # its error and end; none without a seq


async def test_a_claim_that_only_failed_runs_claims_nothing(
    store: RunStore, db: FakeRunDb, sink: FakeSink
) -> None:
    db.rows["claim"] = [row_of("claim", claimed=False, attempt=3, last_seq=8)]
    assert await store.claim("me", 30.0) == Claimed(None, 1)
    assert sink.calls == [("committed", 11, 8)]


async def test_heartbeat_sends_runs_and_attempts_and_maps_the_kept(
    store: RunStore, db: FakeRunDb
) -> None:
    db.rows["heartbeat"] = [(1, False), (3, True)]
    kept = await store.heartbeat("me", 30.0, [(1, 2), (2, 1), (3, 5)])
    assert kept == {1: False, 3: True}
    assert db.params("heartbeat") == {
        "ttl": 30.0,
        "owner": "me",
        "run_ids": [1, 2, 3],
        "attempts": [2, 1, 5],
    }


async def test_release_of_a_held_run_requeues_it(
    store: RunStore, db: FakeRunDb, sink: FakeSink
) -> None:
    db.rows["release"] = [(11,)]
    assert await store.release(11, 2) is True
    assert sink.calls == [("requeued", 11, 0)]
    assert db.params("release") == {"run_id": 11, "attempt": 2}


async def test_release_of_a_run_not_held_is_false(store: RunStore, sink: FakeSink) -> None:
    assert await store.release(11, 2) is False
    assert sink.calls == []


async def test_finish_announces_its_last_seq(
    store: RunStore, db: FakeRunDb, sink: FakeSink
) -> None:
    db.rows["finish"] = [(17,)]
    seq = await store.finish(11, 3, Status.COMPLETED, {"v": [1, "é"]})
    assert seq == 17
    assert sink.calls == [("committed", 11, 17)]
    params = db.params("finish")
    assert params["status"] == "completed" and params["attempt"] == 3
    assert json.loads(params["final_value"]) == {"v": [1, "é"]} and params["error"] is None


async def test_a_fenced_finish_announces_nothing(
    store: RunStore, db: FakeRunDb, sink: FakeSink
) -> None:
    db.rows["finish"] = [(None,)]  # SELECT streaming_finish(…) is NULL when fenced off
    assert await store.finish(11, 3, Status.FAILED, None, {"message": "x"}) is None
    assert sink.calls == []
    assert db.params("finish")["final_value"] is None
    assert json.loads(db.params("finish")["error"]) == {"message": "x"}


async def test_finish_unowned_announces_its_last_seq(
    store: RunStore, db: FakeRunDb, sink: FakeSink
) -> None:
    db.rows["finish_unowned"] = [(4,)]
    assert await store.finish_unowned(11, Status.CANCELLED, CANCELLED_ERROR) == 4
    assert sink.calls == [("committed", 11, 4)]
    params = db.params("finish_unowned")
    assert params["status"] == "cancelled" and json.loads(params["error"]) == CANCELLED_ERROR
    assert params["final_value"] is None


async def test_finish_unowned_of_a_finished_run_announces_nothing(
    store: RunStore, db: FakeRunDb, sink: FakeSink
) -> None:
    db.rows["finish_unowned"] = [(None,)]
    assert await store.finish_unowned(11, Status.CANCELLED, None) is None
    assert sink.calls == []


async def test_request_cancel_maps_its_target(store: RunStore, db: FakeRunDb) -> None:
    assert await store.request_cancel(KEY) is None
    db.rows["request_cancel"] = [row_of("request_cancel", lease_expired=False)]
    target = await store.request_cancel(KEY)
    assert target == CancelTarget(11, Status.RUNNING, "host:1:abc", False)
    assert target.held
    assert db.calls[-1] == ("request_cancel", KEY.params)


@pytest.mark.parametrize(
    ("status", "owner", "expired", "held"),
    [
        ("running", "w", False, True),
        ("running", "w", True, False),
        ("running", None, False, False),
        ("pending", None, None, False),  # no lease: ``lease_expires_at < now()`` is NULL
    ],
)
async def test_cancel_target_held(
    store: RunStore,
    db: FakeRunDb,
    status: str,
    owner: str | None,
    expired: bool | None,
    held: bool,
) -> None:
    db.rows["request_cancel"] = [
        row_of("request_cancel", status=status, lease_owner=owner, lease_expired=expired)
    ]
    target = await store.request_cancel(KEY)
    assert target is not None and target.held is held
    assert target.lease_expired is bool(expired)


async def test_expired_maps_old_runs(store: RunStore, db: FakeRunDb) -> None:
    db.rows["old_runs"] = [row_of("old_runs"), row_of("old_runs", id=12, task_id=34)]
    out = await store.expired(24)
    assert out == [
        Expired(11, KEY, "tests_model", "pk"),
        Expired(12, TaskKey("app", "Model", 34), "tests_model", "pk"),
    ]
    assert db.params("old_runs") == {"hours": 24}


async def test_delete_removes_the_task_by_its_table(store: RunStore, db: FakeRunDb) -> None:
    await store.delete(Expired(11, KEY, "tests_model", "pk"))
    assert db.deleted == [(11, KEY.params, "tests_model", "pk")]


async def test_last_seqs_maps_each_run(store: RunStore, db: FakeRunDb) -> None:
    db.rows["last_seqs"] = [(1, 10), (2, 0)]
    assert await store.last_seqs((1, 2, 3)) == {1: 10, 2: 0}
    assert db.params("last_seqs") == {"run_ids": [1, 2, 3]}


def test_status_now_reads_the_status() -> None:
    reader = FakeReader(("failed",))
    assert status_now(cast(SyncReader, reader), KEY) is Status.FAILED
    assert reader.calls == [("run_status", KEY.params)]
    assert status_now(cast(SyncReader, FakeReader(None)), KEY) is None


def test_json_parameters_are_none_or_json_text() -> None:
    assert streaming.runs._json(None) is None
    assert json.loads(streaming.runs._json({"a": [1]}) or "") == {"a": [1]}
