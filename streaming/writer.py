"""Group commit: concurrent appends from one process share a transaction."""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass

from streaming.db import Database, retrying
from streaming.events import TaskKey
from streaming.log import EventLog

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Append:
    run_id: int
    attempt: int
    event_type: str
    data_json: str


class Appender:
    """Collects appends while a commit is in flight and writes them as one statement.

    Each caller awaits its own future, which resolves only after the shared commit, to the
    event's seq, or to None when the append was fenced off (the run is no longer its own).
    There is no artificial delay: a lone writer commits at once, and concurrent writers
    batch up behind the commit in flight (measured in BENCHMARKS.md).
    """

    def __init__(
        self, db: Database, log: EventLog, max_batch: int = 512, retry_for: float = 30.0
    ) -> None:
        self.db = db
        self.log = log
        self.retry_for = retry_for
        self.max_batch = max_batch
        self.batches = 0
        self.appended = 0
        self._pending: list[tuple[Append, asyncio.Future[int | None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def append(self, item: Append) -> int | None:
        fut: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._pending.append((item, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_all())
        return await fut

    async def _flush_all(self) -> None:
        while self._pending:
            batch = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
            try:
                items = [item for item, _ in batch]
                seqs = await retrying(functools.partial(self._write, items), self.retry_for)
            except Exception as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (item, fut), seq in zip(batch, seqs, strict=True):
                if seq is not None:
                    self.log.committed(item.run_id, seq)
                if not fut.done():
                    fut.set_result(seq)
            # One turn of the loop lets the writers just released append again, so that the
            # next batch carries them all (not half of them), and a lone writer's next event
            # finds this flusher still running.
            await asyncio.sleep(0)

    async def _write(self, items: list[Append]) -> list[int | None]:
        rows = await self.db.fetchall(
            "append_batch",
            {
                "run_ids": [i.run_id for i in items],
                "attempts": [i.attempt for i in items],
                "types": [i.event_type for i in items],
                "datas": [i.data_json for i in items],
            },
        )
        self.batches += 1
        self.appended += len(items)
        seqs: list[int | None] = [None] * len(items)
        for ordinal, seq, created_at, data_text, app_label, model_name, task_id in rows:
            if seq is not None:
                item = items[ordinal - 1]
                seqs[ordinal - 1] = seq
                # Before on_commit announces it: the hub's read of it is then served from
                # memory, byte for byte the row (the data text is the jsonb's rendering).
                self.log.record(
                    item.run_id,
                    TaskKey(app_label, model_name, task_id),
                    seq,
                    item.event_type,
                    data_text,
                    created_at,
                    item.attempt,
                )
        return seqs

    def counters(self) -> dict[str, int]:
        return {"events_appended_total": self.appended, "append_batches_total": self.batches}
