"""The run store: every statement on ``streaming_taskrun``, returning frozen typed values.

Each write that appends events (a claim's ``retry``, the terminal events of a finish) is
announced through the event log at once, here, so that no caller can forget to.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from streaming.db import Database, Row, SyncReader
from streaming.events import Status, TaskKey
from streaming.log import EventLog

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RunSpec:
    """What queuing a task needs to know about its model: table, primary key, limits."""

    db_table: str
    pk_column: str
    max_attempts: int
    timeout: float | None


@dataclass(frozen=True, slots=True)
class Enqueued:
    run_id: int
    status: Status
    created: bool


@dataclass(frozen=True, slots=True)
class Run:
    """One run's state, as ``streaming_taskrun`` holds it."""

    id: int
    key: TaskKey
    status: Status
    attempt: int
    last_seq: int
    final_value: Any
    error: Any
    started_at: datetime | None
    finished_at: datetime | None
    lease_owner: str | None
    lease_expires_at: datetime | None
    cancel_requested_at: datetime | None
    created_at: datetime

    @property
    def finished(self) -> bool:
        return self.status.finished


@dataclass(frozen=True, slots=True)
class Claim:
    """A run this worker now holds under a lease, as attempt ``attempt``."""

    run_id: int
    key: TaskKey
    attempt: int
    timeout: float | None
    last_seq: int
    cancel_requested: bool


@dataclass(frozen=True, slots=True)
class Claimed:
    """What one claim statement did: the run it claimed (if any), and how many it failed.

    A run whose attempts are used up is failed by the claim that finds it (``error`` and
    ``end`` written, and announced at once); the search then goes on.
    """

    claim: Claim | None
    failed: int = 0


@dataclass(frozen=True, slots=True)
class CancelTarget:
    """A run asked to cancel: whether a live worker holds it decides who finishes it."""

    run_id: int
    status: Status
    owner: str | None
    lease_expired: bool

    @property
    def held(self) -> bool:
        return self.status == Status.RUNNING and self.owner is not None and not self.lease_expired


@dataclass(frozen=True, slots=True)
class Expired:
    """A finished run old enough to be deleted, with what deleting its task's row needs."""

    run_id: int
    key: TaskKey
    db_table: str
    pk_column: str


def _key(row: Row, at: int) -> TaskKey:
    return TaskKey(row[at], row[at + 1], row[at + 2])


def _run(row: Row) -> Run:
    return Run(
        id=row[0],
        key=_key(row, 1),
        status=Status(row[4]),
        attempt=row[5],
        last_seq=row[6],
        final_value=row[7],
        error=row[8],
        started_at=row[9],
        finished_at=row[10],
        lease_owner=row[11],
        lease_expires_at=row[12],
        cancel_requested_at=row[13],
        created_at=row[14],
    )


def _claim(row: Row) -> Claim:
    """A row of the claim query, after its leading ``claimed`` flag."""
    return Claim(
        run_id=row[1],
        key=TaskKey(row[2], row[3], row[4]),
        attempt=row[5],
        timeout=row[6],
        last_seq=row[7],
        cancel_requested=row[8],
    )


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, allow_nan=False)


class RunStore:
    """The run lifecycle in SQL: enqueue, claim, heartbeat, release, finish, cancel, retention."""

    def __init__(self, db: Database, log: EventLog) -> None:
        self.db = db
        self.log = log

    async def enqueue(self, key: TaskKey, spec: RunSpec) -> Enqueued:
        """Create the task's run (pending) unless it exists; the run either way."""
        row = await self.db.fetchone(
            "enqueue",
            {
                **key.params,
                "db_table": spec.db_table,
                "pk_column": spec.pk_column,
                "max_attempts": spec.max_attempts,
                "timeout_seconds": spec.timeout,
            },
        )
        assert row is not None  # INSERT … ON CONFLICT DO UPDATE … RETURNING always returns
        out = Enqueued(row[0], Status(row[1]), row[2])
        if out.status == Status.PENDING:
            self.log.requeued(out.run_id)
        return out

    async def get(self, key: TaskKey) -> Run | None:
        row = await self.db.fetchone("get_run", key.params)
        return _run(row) if row else None

    async def active_count(self, key: TaskKey) -> int:
        """How many tasks of ``key``'s model are queued or running (its id is ignored)."""
        row = await self.db.fetchone("active_runs", key.params)
        return int(row[0]) if row else 0

    async def last_seqs(self, run_ids: Sequence[int]) -> dict[int, int]:
        """The last seq of each of these runs."""
        rows = await self.db.fetchall("last_seqs", {"run_ids": list(run_ids)})
        return {run_id: last_seq for run_id, last_seq in rows}

    async def claim(self, owner: str, ttl: float, run_id: int | None = None) -> Claimed:
        """Claim one run (this one, or the oldest claimable) under a lease of ``ttl`` s."""
        rows = await self.db.fetchall("claim", {"owner": owner, "ttl": ttl, "run_id": run_id})
        claim: Claim | None = None
        failed = 0
        for row in rows:
            one = _claim(row)
            if row[0]:
                claim = one
                if one.attempt > 1:
                    self.log.committed(one.run_id, one.last_seq)  # its ``retry`` event
            else:
                failed += 1
                logger.warning("task %s failed: attempts used up", one.key.path)
                if one.last_seq is not None:
                    self.log.committed(one.run_id, one.last_seq)  # its error and end
        return Claimed(claim, failed)

    async def heartbeat(
        self, owner: str, ttl: float, held: Sequence[tuple[int, int]]
    ) -> dict[int, bool]:
        """Renew the leases of ``(run_id, attempt)``; {run_id: cancel requested} of the kept."""
        rows = await self.db.fetchall(
            "heartbeat",
            {
                "ttl": ttl,
                "owner": owner,
                "run_ids": [r for r, _ in held],
                "attempts": [a for _, a in held],
            },
        )
        return {run_id: cancel for run_id, cancel in rows}

    async def release(self, run_id: int, attempt: int) -> bool:
        """Hand a held run back (shutdown), claimable at once; False if it was not held."""
        row = await self.db.fetchone("release", {"run_id": run_id, "attempt": attempt})
        if row is not None:
            self.log.requeued(run_id)
        return row is not None

    async def finish(
        self,
        run_id: int,
        attempt: int,
        status: Status,
        final_value: Any = None,
        error: dict[str, Any] | None = None,
    ) -> int | None:
        """Terminal events and final state in one transaction; the last seq, None if fenced."""
        row = await self.db.fetchone(
            "finish",
            {
                "run_id": run_id,
                "attempt": attempt,
                "status": str(status),
                "final_value": _json(final_value),
                "error": _json(error),
            },
        )
        return self._announced(run_id, row)

    async def finish_unowned(
        self, run_id: int, status: Status, error: dict[str, Any] | None
    ) -> int | None:
        """Finish a run that no live worker holds; the last seq, None if already finished."""
        row = await self.db.fetchone(
            "finish_unowned",
            {"run_id": run_id, "status": str(status), "final_value": None, "error": _json(error)},
        )
        return self._announced(run_id, row)

    def _announced(self, run_id: int, row: Row | None) -> int | None:
        seq: int | None = row[0] if row else None
        if seq is not None:
            self.log.committed(run_id, seq)
        return seq

    async def request_cancel(self, key: TaskKey) -> CancelTarget | None:
        """Mark an unfinished task's run as cancel-requested; None when there is none."""
        row = await self.db.fetchone("request_cancel", key.params)
        if row is None:
            return None
        return CancelTarget(row[0], Status(row[1]), row[2], bool(row[3]))

    async def expired(self, hours: float) -> list[Expired]:
        """Runs that finished more than ``hours`` ago."""
        rows = await self.db.fetchall("old_runs", {"hours": hours})
        return [Expired(row[0], _key(row, 1), row[4], row[5]) for row in rows]

    async def delete(self, expired: Expired) -> None:
        """Delete a finished task's events, run and own row, in one transaction."""
        await self.db.delete_task(
            expired.run_id, expired.key.params, expired.db_table, expired.pk_column
        )
        logger.info("deleted task %s", expired.key.path)


def status_now(reader: SyncReader, key: TaskKey) -> Status | None:
    """A task's status, read synchronously (``is_task_running``); None if never started."""
    row = reader.fetchone("run_status", key.params)
    return Status(row[0]) if row else None
