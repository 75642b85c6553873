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

import json
from collections.abc import Sequence
from typing import Any

from django.db import DEFAULT_DB_ALIAS, InterfaceError, OperationalError, connections, transaction

from streaming import events, notifier, queries
from streaming.events import Event, Status, TaskKey
from streaming.exceptions import DatabaseUnavailable
from streaming.runs import CancelTarget, Enqueued, RunSpec

PAGE = 1000  # rows read at a time by ``read_all``

Row = Sequence[Any]


def _run(name: str, params: dict[str, Any]) -> list[Row]:
    """Run the named statement on Django's connection; its rows."""
    try:
        with connections[DEFAULT_DB_ALIAS].cursor() as cursor:
            cursor.execute(queries.get(name), params)
            return list(cursor.fetchall()) if cursor.description else []
    except (OperationalError, InterfaceError) as exc:
        raise DatabaseUnavailable(f"{name}: {exc}") from exc


def _notify(channel: str, payloads: list[str]) -> None:
    for payload in payloads:
        _run("notify_in_transaction", {"channel": channel, "payload": payload})


def enqueue(key: TaskKey, spec: RunSpec, channel: str) -> Enqueued:
    """Create the task's run (pending) unless it exists, and wake workers when it commits."""
    with transaction.atomic(using=DEFAULT_DB_ALIAS):
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


def cancel(key: TaskKey, channel: str, error: dict[str, Any]) -> bool:
    """Cancel a task wherever it runs; False when it is finished or was never started.

    A run no live worker holds is finished here (``cancelled`` and ``end`` are written in
    this transaction); a held one is asked to stop, and its worker writes them.
    """
    with transaction.atomic(using=DEFAULT_DB_ALIAS):
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


def rerun(key: TaskKey, channel: str) -> int | None:
    """Queue a finished task again as a new attempt; its run id, None if it is not finished."""
    with transaction.atomic(using=DEFAULT_DB_ALIAS):
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
