"""The sync side of the public API: statements on Django's own database connection.

Sync callers (a WSGI view, ``manage.py shell``, a thread pool, the admin) queue, cancel and
read tasks through the connection Django already holds for their thread, inside whatever
transaction they are in. So they open nothing of their own: no pool, no LISTEN, no event
loop; Django closes the connection as it always does (at the end of each request, or with
``CONN_MAX_AGE``). Notifications go out with ``pg_notify`` in the same transaction, so
workers and streams hear of a change exactly when it commits, and never of one rolled back.

Async callers on an event loop without a runtime (``asyncio.run(...)`` in a shell, a Django
async view, ``async_to_sync``) come here too, through ``sync_to_async``: see coordinator.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, TypeVar

from django.db import DEFAULT_DB_ALIAS, InterfaceError, OperationalError, connections, transaction

from streaming import events, notifier, queries
from streaming.events import Event, Status, TaskKey
from streaming.exceptions import DatabaseUnavailable
from streaming.runs import CancelTarget, Enqueued, RunSpec

P = ParamSpec("P")
T = TypeVar("T")

PAGE = 1000  # rows read at a time by ``read_all``

Row = Sequence[Any]


def _run(name: str, params: dict[str, Any]) -> list[Row]:
    """Run the named statement on Django's connection; its rows.

    A connection that broke since its last use (Postgres restarted, the backend was
    terminated) is replaced once, outside a transaction: Django does that only at request
    boundaries, and a shell or a thread has none. Inside the caller's transaction the error
    is the caller's to handle, as any other in it.
    """
    conn = connections[DEFAULT_DB_ALIAS]
    for attempt in (1, 2):
        try:
            with conn.cursor() as cursor:
                cursor.execute(queries.get(name), params)
                return list(cursor.fetchall()) if cursor.description else []
        except (OperationalError, InterfaceError) as exc:
            if attempt == 2 or conn.in_atomic_block:
                raise DatabaseUnavailable(f"{name}: {exc}") from exc
            conn.close()
    raise AssertionError("unreachable")


def _discard_if_broken() -> None:
    """Close Django's connection if an error broke it (checked only after an error), so the
    next statement opens a fresh one; never inside the caller's transaction."""
    conn = connections[DEFAULT_DB_ALIAS]
    if conn.connection is not None and conn.errors_occurred and not conn.in_atomic_block:
        if not conn.is_usable():
            conn.close()


def _transactional(fn: Callable[P, T]) -> Callable[P, T]:
    """Run ``fn`` in one transaction on Django's connection (a savepoint inside the
    caller's). On its own (outside the caller's transaction) it is repeated once on a fresh
    connection when the first one was broken: every statement it runs is idempotent."""

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        conn = connections[DEFAULT_DB_ALIAS]
        outermost = not conn.in_atomic_block
        for attempt in (1, 2):
            _discard_if_broken()
            try:
                with transaction.atomic(using=DEFAULT_DB_ALIAS):
                    return fn(*args, **kwargs)
            except (OperationalError, InterfaceError, DatabaseUnavailable) as exc:
                if attempt == 2 or not outermost:
                    if isinstance(exc, DatabaseUnavailable):
                        raise
                    raise DatabaseUnavailable(str(exc)) from exc
                conn.close()
        raise AssertionError("unreachable")

    return run


def _notify(channel: str, payloads: list[str]) -> None:
    for payload in payloads:
        _run("notify_in_transaction", {"channel": channel, "payload": payload})


@_transactional
def enqueue(key: TaskKey, spec: RunSpec, channel: str) -> Enqueued:
    """Create the task's run (pending) unless it exists, and wake workers when it commits."""
    (row,) = _run(
        "enqueue",
        {
            **key.params,
            "db_table": spec.db_table,
            "pk_column": spec.pk_column,
            "max_attempts": spec.max_attempts,
            "timeout_seconds": spec.timeout,
        },
    )
    out = Enqueued(int(row[0]), Status(row[1]), bool(row[2]))
    if out.status == Status.PENDING:
        _notify(channel, notifier.encode({}, [out.run_id], []))
    return out


@_transactional
def cancel(key: TaskKey, channel: str, error: dict[str, Any]) -> bool:
    """Cancel a task wherever it runs; False when it is finished or was never started.

    A run no live worker holds is finished here (``cancelled`` and ``end`` are written in
    this transaction); a held one is asked to stop, and its worker writes them.
    """
    rows = _run("request_cancel", key.params)
    if not rows:
        return False
    row = rows[0]
    target = CancelTarget(int(row[0]), Status(row[1]), row[2], bool(row[3]))
    if target.held:
        _notify(channel, notifier.encode({}, [], [target.run_id]))
        return True
    (done,) = _run(
        "finish_unowned",
        {
            "run_id": target.run_id,
            "status": str(Status.CANCELLED),
            "final_value": None,
            "error": json.dumps(error),
        },
    )
    if done[0] is not None:
        _notify(channel, notifier.encode({target.run_id: int(done[0])}, [], []))
    return True


@_transactional
def rerun(key: TaskKey, channel: str) -> int | None:
    """Queue a finished task again as a new attempt; its run id, None if it is not finished."""
    rows = _run("rerun", key.params)
    if not rows:
        return None
    run_id = int(rows[0][0])
    _notify(channel, notifier.encode({}, [run_id], []))
    return run_id


def status(key: TaskKey) -> Status | None:
    """The task's run status; None when it was never started."""
    rows = _run("run_status", key.params)
    return Status(rows[0][0]) if rows else None


def read_all(key: TaskKey, after: int = 0) -> list[Event]:
    """Every event of the task after seq ``after``, in order."""
    out: list[Event] = []
    while True:
        rows = _run("read_events", {**key.params, "after": after, "limit": PAGE})
        out.extend(events.build(key, *row) for row in rows)
        if len(rows) < PAGE:
            return out
        after = out[-1].seq
