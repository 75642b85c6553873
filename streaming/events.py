"""Events as values: validation of what users send, and their wire formats (SSE, JSON)."""

from __future__ import annotations

import enum
import functools
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from streaming.exceptions import InvalidEventData, InvalidEventType

EVENT_TYPE_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
TERMINAL_EVENT = "end"
#: The metadata keys every event's data gets (``meta_prefix``); user data may not use them.
RESERVED_KEYS = frozenset({"_task_id", "_app", "_model", "_timestamp", "_seq"})
_ZERO = timedelta(0)


class Status(enum.StrEnum):
    """A task's run state (after django-tasks' ``TaskResultStatus``); a ``str`` in JSON and SQL."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in FINISHED


FINISHED = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED})

#: The error a cancelled task finishes with (its ``cancelled`` event and ``error`` field).
CANCELLED_ERROR: dict[str, str] = {"message": "cancelled", "error_type": "CancelledError"}


@dataclass(frozen=True, slots=True)
class TaskKey:
    """A task's identity: app label, model name (as in the class) and primary key."""

    app_label: str
    model_name: str
    task_id: int

    @property
    def path(self) -> str:
        return f"{self.app_label}/{self.model_name}/{self.task_id}"

    @property
    def stream_path(self) -> str:
        """The URL path of this task's SSE stream: built here, and nowhere else."""
        return f"/stream/{self.path}"

    @property
    def params(self) -> dict[str, Any]:
        """The SQL parameters that name this task (``%(app_label)s`` and so on)."""
        return {"app_label": self.app_label, "model_name": self.model_name, "task_id": self.task_id}


@dataclass(frozen=True, slots=True)
class Append:
    """One event to append: to a run, under the attempt that holds it."""

    run_id: int
    attempt: int
    event_type: str
    data_json: str


class Event:
    """One committed row of the event log, as its SSE frame (encoded once, shared by all).

    Immutable by convention; a plain slotted class rather than a frozen dataclass because a
    replay builds one per row and a frozen dataclass's ``__init__`` costs three times as much.
    """

    __slots__ = ("frame", "seq", "type")

    def __init__(self, seq: int, type: str, frame: bytes) -> None:
        self.seq = seq
        self.type = type
        self.frame = frame

    def __repr__(self) -> str:
        return f"Event(seq={self.seq!r}, type={self.type!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Event) and (self.seq, self.type, self.frame) == (
            other.seq,
            other.type,
            other.frame,
        )

    def __hash__(self) -> int:
        return hash((self.seq, self.type, self.frame))

    @property
    def is_terminal(self) -> bool:
        return self.type == TERMINAL_EVENT

    def payload(self) -> dict[str, Any]:
        """The data as clients see it: the user's dict plus the ``_``-prefixed metadata."""
        data: dict[str, Any] = json.loads(_sse_data(self.frame))
        return data

    def as_message(self) -> dict[str, Any]:
        """The seed's in-process queue item."""
        data = self.payload()
        return {"type": self.type, "data": data, "timestamp": data["_timestamp"], "seq": self.seq}


def validate(event_type: object, data: object) -> str:
    """Check an event before anything is written; returns the data as JSON text."""
    if not isinstance(event_type, str) or not EVENT_TYPE_RE.fullmatch(event_type):
        raise InvalidEventType(f"event_type must match [A-Za-z0-9_.:-]{{1,64}}, got {event_type!r}")
    if not isinstance(data, dict):
        raise InvalidEventData(f"event data must be a dict, got {type(data).__name__}")
    if not RESERVED_KEYS.isdisjoint(data):
        taken = ", ".join(sorted(RESERVED_KEYS.intersection(data)))
        raise InvalidEventData(f"event data must not use the metadata keys ({taken})")
    try:
        text = json.dumps(data, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InvalidEventData(f"event data is not JSON-serialisable: {exc}") from exc
    except RecursionError as exc:
        raise InvalidEventData("event data is nested too deeply") from exc
    if ("\\u0000" in text or "\\ud" in text) and jsonb_refuses(data):
        raise InvalidEventData(
            "event data must not contain NUL characters or unpaired UTF-16 surrogates "
            "(jsonb cannot store them)"
        )
    return text


# A NUL, a high surrogate not followed by a low one, or a low one not preceded by a high one.
_JSONB_REFUSES = re.compile(
    "\x00|[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]"
)


def jsonb_refuses(value: object) -> bool:
    """Whether any string in ``value`` (keys included) holds what jsonb refuses to store.

    Only called when the JSON text has an escape that may be one of those (rare), so the
    common event pays one substring test. The six characters ``\\u0000`` are fine. Walks
    with a stack of its own, not by recursion: since Python 3.12 ``json.loads`` parses
    nesting far deeper than the interpreter's recursion limit.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _JSONB_REFUSES.search(item) is not None:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return False


def nesting_depth(value: object) -> int:
    """How deeply lists and dicts nest in ``value`` (a scalar: 0), without recursion."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list | tuple):
            depth += 1
            deepest = max(deepest, depth)
            stack.extend((child, depth) for child in item if isinstance(child, dict | list | tuple))
    return deepest


def iso(moment: datetime) -> str:
    """UTC ISO 8601 with a ``Z``, as the seed prints timestamps."""
    if moment.utcoffset() != _ZERO:
        moment = moment.astimezone(UTC)
    return moment.isoformat(timespec="microseconds")[:26] + "Z"


@functools.lru_cache(maxsize=4096)
def meta_prefix(key: TaskKey) -> str:
    """The metadata every event of a task carries, up to its timestamp's opening quote.

    The log's ``read_frames`` query composes frames in SQL from this prefix: keep the two
    formats identical (the benchmark checks them against each other).
    """
    return (
        f'"_task_id": {key.task_id}, "_app": {json.dumps(key.app_label)}, '
        f'"_model": {json.dumps(key.model_name)}, "_timestamp": "'
    )


def build(
    key: TaskKey, seq: int, event_type: str, data_json: str, created_at: datetime, attempt: int = 0
) -> Event:
    """An Event from a log row's fields; the SSE frame is composed here, once per event.

    ``data_json`` is the stored data text (jsonb's rendering). ``attempt`` is accepted for the
    row's sake and not part of the frame.
    """
    meta = f'{meta_prefix(key)}{iso(created_at)}", "_seq": {seq}}}'
    body = data_json.rstrip()
    merged = "{" + meta if body == "{}" else body[:-1] + ", " + meta
    return Event(seq, event_type, f"id: {seq}\nevent: {event_type}\ndata: {merged}\n\n".encode())


def _sse_data(frame: bytes) -> str:
    text = frame.decode()
    start = text.index("\ndata: ") + len("\ndata: ")
    return text[start : text.index("\n", start)]


def retry_field(retry_ms: int) -> bytes:
    """The ``retry:`` line, to put at the head of an event's block (not a block of its own)."""
    return f"retry: {retry_ms}\n".encode()


#: The first bytes of every stream: a comment (every client skips it).
OPEN_FRAME = b": stream\n\n"


KEEPALIVE_FRAME = b": keep-alive\n\n"
