"""Event validation and wire formats, without a database."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from streaming import events
from streaming.events import TaskKey
from streaming.exceptions import InvalidEventData, InvalidEventType, StreamingError

KEY = TaskKey("tests", "ExampleTask", 42)
WHEN = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)


@pytest.mark.parametrize("event_type", ["progress", "a", "x" * 64, "step.done", "a:b-c_d"])
def test_valid_event_types(event_type: str) -> None:
    assert json.loads(events.validate(event_type, {"k": 1})) == {"k": 1}


@pytest.mark.parametrize("event_type", ["", "x" * 65, "has space", "new\nline", "é", 5, None])
def test_invalid_event_types_raise_value_errors(event_type: object) -> None:
    with pytest.raises(InvalidEventType) as info:
        events.validate(event_type, {})
    assert isinstance(info.value, ValueError) and isinstance(info.value, StreamingError)


@pytest.mark.parametrize(
    "data", [[1], "s", None, 3, {"x": {1, 2}}, {"x": float("inf")}, {"x": "\x00"}]
)
def test_invalid_data_raises_type_errors(data: object) -> None:
    with pytest.raises(InvalidEventData) as info:
        events.validate("ok", data)
    assert isinstance(info.value, TypeError)


def test_large_data_is_accepted() -> None:
    text = events.validate("big", {"pad": "y" * 100_000})
    assert len(text) > 100_000


def test_frame_has_id_event_and_merged_metadata() -> None:
    ev = events.build(KEY, 7, "progress", '{"step": 1}', WHEN, 1)
    text = ev.frame.decode()
    assert text.startswith("id: 7\nevent: progress\ndata: {")
    assert text.endswith("}\n\n")
    assert text.count("\n") == 4
    payload = ev.payload()
    assert payload == {
        "step": 1,
        "_task_id": 42,
        "_app": "tests",
        "_model": "ExampleTask",
        "_timestamp": "2026-01-02T03:04:05.678000Z",
        "_seq": 7,
    }


def test_empty_data_gets_metadata_only() -> None:
    ev = events.build(KEY, 1, "start", "{}", WHEN, 1)
    assert ev.payload()["_seq"] == 1 and len(ev.payload()) == 5


def test_message_is_the_seed_queue_item() -> None:
    ev = events.build(KEY, 3, "end", '{"status": "completed"}', WHEN, 2)
    msg = ev.as_message()
    assert set(msg) == {"type", "data", "timestamp", "seq"}
    assert msg["type"] == "end" and msg["seq"] == 3 and ev.is_terminal
    assert msg["data"]["status"] == "completed"


def test_names_needing_json_escapes_stay_valid_json() -> None:
    key = TaskKey('we"ird', "M\\odel", 1)
    ev = events.build(key, 1, "x", '{"a": "b"}', WHEN, 1)
    assert ev.payload()["_app"] == 'we"ird' and ev.payload()["_model"] == "M\\odel"


def test_the_package_exports_what_the_seed_exports() -> None:
    import streaming
    from streaming.client import StreamingClient, get_client

    assert streaming.StreamingClient is StreamingClient and streaming.get_client is get_client
    assert streaming.__version__.count(".") == 2
    assert {"StreamTask", "StreamingClient", "get_client", "__version__"} <= set(streaming.__all__)


def test_nesting_depth_and_jsonb_refuses_walk_deeper_than_the_recursion_limit() -> None:
    import sys

    from streaming.events import jsonb_refuses, nesting_depth

    def nested(levels: int, leaf: object) -> dict[str, object]:
        value: object = leaf
        for _ in range(levels):  # what json.loads gives on Python 3.12+, built without it
            value = [value]
        return {"a": value}

    levels = sys.getrecursionlimit() * 3
    assert nesting_depth(nested(levels, "\x00")) == levels + 1
    assert jsonb_refuses(nested(levels, "\x00")) is True
    assert jsonb_refuses(nested(levels, 1)) is False
    assert jsonb_refuses({"k\x00": 1}) is True  # keys too
    values: list[object] = [1, "s", [], {}, {"a": [1, {"b": 2}]}]
    assert [nesting_depth(v) for v in values] == [0, 0, 1, 1, 3]
