"""Group commit: concurrent appends from one process share a transaction."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

from streaming.db import Database, retrying

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
    batch up behind the commit in flight.
    """

    def __init__(self, db: Database, on_commit: Callable[[int, int], None],
                 max_batch: int = 512, retry_for: float = 30.0) -> None:
        self.db = db
        self.retry_for = retry_for
        self.on_commit = on_commit
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
                    self.on_commit(item.run_id, seq)
                if not fut.done():
                    fut.set_result(seq)

    async def _write(self, items: list[Append]) -> list[int | None]:
        rows = await self.db.fetchall("append_many", {
            "run_ids": [i.run_id for i in items],
            "attempts": [i.attempt for i in items],
            "types": [i.event_type for i in items],
            "datas": [i.data_json for i in items],
        })
        self.batches += 1
        self.appended += len(items)
        by_ord = {ordinal: seq for ordinal, seq in rows}
        return [by_ord.get(n + 1) for n in range(len(items))]
