"""The run a task's ``process()`` executes under: set by the worker, read by ``send_event``."""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from streaming.events import Append, TaskKey

#: Appends one event: its seq once committed, or None if the attempt was fenced off. The
#: worker hands each run the appender of the runtime that claimed it.
Appender = Callable[[Append], Awaitable[int | None]]


@dataclass(eq=False)
class RunContext:
    """What a running task holds: its run, the fencing attempt, and how it ended.

    ``finished`` is set once a terminal write was made for this attempt (by the worker, or by
    ``mark_completed`` from inside ``process()``), so that nothing finishes it twice.
    """

    run_id: int
    attempt: int
    key: TaskKey
    append: Appender
    timeout: float | None = None
    finished: bool = False


#: The current run; the worker sets it around ``process()`` (and resets it with the token).
CURRENT: contextvars.ContextVar[RunContext | None] = contextvars.ContextVar(
    "streaming_run", default=None
)


def current() -> RunContext | None:
    """The run of the ``process()`` this code runs in (child tasks included), or None."""
    return CURRENT.get()
