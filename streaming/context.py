"""The run a task's ``process()`` executes under: set by the worker, read by ``send_event``."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

from streaming.events import TaskKey


@dataclass(eq=False)
class RunContext:
    """What a running task holds: its run, the fencing attempt, and how it ended.

    ``finished`` is set once a terminal write was made for this attempt (by the worker, or by
    ``mark_completed`` from inside ``process()``), so that nothing finishes it twice.
    """

    run_id: int
    attempt: int
    key: TaskKey
    timeout: float | None = None
    finished: bool = False


_current: contextvars.ContextVar[RunContext | None] = contextvars.ContextVar(
    "streaming_run", default=None
)


def current() -> RunContext | None:
    """The run of the ``process()`` this code runs in (child tasks included), or None."""
    return _current.get()


@contextlib.contextmanager
def running(ctx: RunContext) -> Iterator[RunContext]:
    """Make ``ctx`` the current run for the code inside the block."""
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)
