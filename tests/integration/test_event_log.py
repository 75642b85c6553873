"""The event log's two frame builders agree: SQL (replays) and Python (live events)."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest

from streaming import events, queries
from streaming.events import TaskKey
from tests.support import database_url_from_settings, sql

pytestmark = pytest.mark.django_db(transaction=True)

# Data whose jsonb rendering is not what json.dumps would write: key order, spacing, escapes,
# numbers, non-ASCII text, nesting, the empty object.
AWKWARD: list[dict[str, Any]] = [
    {},
    {"b": 1, "a": 2, "aa": [1, 2.5, -0.0, 1e20, 123456789012345678901234567890]},
    {"text": 'quote " backslash \\ tab \t newline \n nul-ish \\u0000 é ü 中文 😀'},
    {"nested": {"deep": [{"x": None, "y": True, "z": False}]}, "": "empty key"},
    {"html": "</script><b>&amp;</b>", "ctrl": "\u0001\u001f"},
]


def test_sql_composed_frames_equal_the_python_ones() -> None:
    (run_id,) = sql(
        "INSERT INTO streaming_taskrun (app_label, model_name, task_id, db_table, "
        "status, attempt) VALUES ('tests', 'ScriptedTask', 4242, 'x', 'running', 1) "
        "RETURNING id"
    )[0]
    datas = [json.dumps(d) for d in AWKWARD]
    n = len(datas)
    _named(
        "append_batch",
        {
            "writer": "test",
            "batch": 1,
            "run_ids": [run_id] * n,
            "attempts": [1] * n,
            "types": ["t"] * n,
            "datas": datas,
        },
    )
    key = TaskKey("tests", "ScriptedTask", 4242)
    params = {
        **key.params,
        "after": 0,
        "limit": 100,
        "meta": events.meta_prefix(key),
        "max_bytes": 1 << 30,
    }
    rows = _named("read_events", params)
    frames = _named("read_frames", params)
    assert len(rows) == len(AWKWARD) == len(frames)
    built = [events.build(key, *row).frame for row in rows]
    assert built == [frame.encode() for _seq, _type, frame in frames]
    # And what a client parses back is the user's data plus the metadata.
    for row, data in zip(rows, AWKWARD, strict=True):
        payload = events.build(key, *row).payload()
        assert {k: v for k, v in payload.items() if not k.startswith("_")} == json.loads(
            json.dumps(data)
        )
        assert payload["_seq"] == row[0] and payload["_task_id"] == 4242


def _named(name: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url_from_settings(), autocommit=True) as conn:
        return conn.execute(queries.get(name).encode(), params).fetchall()


def test_a_page_stops_after_its_byte_bound_and_reading_on_gets_the_rest() -> None:
    (run_id,) = sql(
        "INSERT INTO streaming_taskrun (app_label, model_name, task_id, db_table, "
        "status, attempt) VALUES ('tests', 'ScriptedTask', 4343, 'x', 'running', 1) "
        "RETURNING id"
    )[0]
    datas = [json.dumps({"pad": "x" * 1000, "i": i}) for i in range(50)]
    n = len(datas)
    _named(
        "append_batch",
        {
            "writer": "t2",
            "batch": 1,
            "run_ids": [run_id] * n,
            "attempts": [1] * n,
            "types": ["t"] * n,
            "datas": datas,
        },
    )
    key = TaskKey("tests", "ScriptedTask", 4343)
    seen: list[int] = []
    pages = 0
    after = 0
    while True:
        params = {
            **key.params,
            "after": after,
            "limit": 1000,
            "meta": events.meta_prefix(key),
            "max_bytes": 5000,
        }
        page = _named("read_frames", params)
        if not page:
            break
        pages += 1
        sizes = [len(frame.encode()) for _seq, _type, frame in page]
        assert sum(sizes[:-1]) < 5000 <= sum(sizes) or page[-1][0] == 50  # at most one over
        seen.extend(seq for seq, _type, _frame in page)
        after = page[-1][0]
    assert seen == list(range(1, 51)) and pages >= 10
