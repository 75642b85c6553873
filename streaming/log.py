"""Reading the event log: rows to Event values, one page at a time."""

from __future__ import annotations

from streaming import events
from streaming.db import Database, Row
from streaming.events import Event, TaskKey

PAGE = 1000


def to_event(key: TaskKey, row: Row) -> Event:
    seq, event_type, data_json, created_at, attempt = row
    return events.build(key, seq, event_type, data_json, created_at, attempt)


async def read(db: Database, key: TaskKey, after: int, limit: int = PAGE) -> list[Event]:
    """Events of one task with seq > ``after``, in seq order, at most ``limit``."""
    rows = await db.fetchall("read_events", {
        "app_label": key.app_label, "model_name": key.model_name, "task_id": key.task_id,
        "after": after, "limit": limit,
    })
    return [to_event(key, row) for row in rows]


async def read_last(db: Database, key: TaskKey) -> Event | None:
    row = await db.fetchone("read_last_event", {
        "app_label": key.app_label, "model_name": key.model_name, "task_id": key.task_id,
    })
    return to_event(key, row) if row else None
