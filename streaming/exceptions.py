"""The package's exceptions: one root, and the errors callers can catch."""

from __future__ import annotations


class StreamingError(Exception):
    """Root of every error this package raises."""


class InvalidEventType(StreamingError, ValueError):
    """An event type that does not match ``[A-Za-z0-9_.:-]{1,64}``."""


class InvalidEventData(StreamingError, TypeError):
    """Event data that is not a JSON-serialisable dict."""


class LeaseLost(StreamingError):
    """This worker no longer owns the task: another attempt took over, or it finished."""


class TaskNotStarted(StreamingError):
    """The task has no run yet, so it has nothing to report."""


class NotFound(StreamingError, LookupError):
    """Nothing the caller may see by that name: over HTTP, always the same 404."""


class UnknownTaskModel(NotFound):
    """An app/model pair that is not a concrete StreamTask subclass."""


class TaskNotFound(NotFound):
    """No task with that id (or its row was deleted while it was queued)."""


class InvalidFields(StreamingError, ValueError):
    """Field values for a new task that its model refuses; ``errors`` maps field to messages."""

    def __init__(self, errors: dict[str, list[str]]) -> None:
        super().__init__("invalid fields")
        self.errors = errors


class DatabaseUnavailable(StreamingError):
    """Postgres could not be reached; the operation may be retried."""


class DatabaseError(StreamingError):
    """Postgres refused a statement (not a connection problem: retrying will not help)."""


class DataRefused(DatabaseError, ValueError):
    """Postgres refused the data of a write, e.g. text that jsonb cannot store."""
