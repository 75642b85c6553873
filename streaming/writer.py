"""Group commit: concurrent appends from one process share a transaction, at most once each."""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid

from streaming.db import Database, retrying
from streaming.events import Append, TaskKey
from streaming.exceptions import DatabaseUnavailable
from streaming.log import EventLog

logger = logging.getLogger(__name__)


class Appender:
    """Collects appends while a commit is in flight and writes them as one statement.

    Each caller awaits its own future, which resolves only after the shared commit, to the
    event's seq, or to None when the append was fenced off (the run is no longer its own).
    There is no artificial delay: a lone writer commits at once, and concurrent writers
    batch up behind the commit in flight (measured in BENCHMARKS.md).

    Batches are numbered per appender (``writer``): a batch retried after its commit's
    acknowledgement was lost is recognised by the database, which writes nothing and returns
    the first commit's rows. A batch that Postgres refuses is split, so that only the
    offending append's caller gets the error.
    """

    def __init__(
        self, db: Database, log: EventLog, max_batch: int = 512, retry_for: float = 30.0
    ) -> None:
        self.db = db
        self.log = log
        self.retry_for = retry_for
        self.max_batch = max_batch
        self.writer = uuid.uuid4().hex
        self.batches = 0
        self.appended = 0
        self.isolated = 0
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
            await self._commit(batch)
            # One turn of the loop lets the writers just released append again, so that the
            # next batch carries them all (not half of them), and a lone writer's next event
            # finds this flusher still running.
            await asyncio.sleep(0)

    async def _commit(self, batch: list[tuple[Append, asyncio.Future[int | None]]]) -> None:
        items = [item for item, _ in batch]
        self.batches += 1
        number = self.batches  # the same number on every retry of this batch
        try:
            try:
                seqs = await self._write(items, number)
            except DatabaseUnavailable:
                # Safe to repeat: a batch that did commit is recognised by its number.
                seqs = await retrying(functools.partial(self._write, items, number), self.retry_for)
        except DatabaseUnavailable as exc:
            _fail(batch, exc)
            return
        except Exception as exc:
            if len(batch) == 1:
                _fail(batch, exc)
                return
            # Postgres refused the batch: one append in it is bad. Write each on its own, so
            # that the others go through and only the offender's caller sees the error.
            logger.warning(
                "an append batch of %s failed (%s); writing them one by one",
                len(batch),
                type(exc).__name__,
            )
            self.isolated += 1
            for one in batch:
                await self._commit([one])
            return
        for (item, fut), seq in zip(batch, seqs, strict=True):
            if seq is not None:
                self.log.committed(item.run_id, seq)
            if not fut.done():
                fut.set_result(seq)

    async def _write(self, items: list[Append], number: int) -> list[int | None]:
        rows = await self.db.fetchall(
            "append_batch",
            {
                "writer": self.writer,
                "batch": number,
                "run_ids": [i.run_id for i in items],
                "attempts": [i.attempt for i in items],
                "types": [i.event_type for i in items],
                "datas": [i.data_json for i in items],
            },
        )
        self.appended += len(items)
        seqs: list[int | None] = [None] * len(items)
        for ordinal, seq, created_at, data_text, app_label, model_name, task_id in rows:
            if seq is not None:
                item = items[ordinal - 1]
                seqs[ordinal - 1] = seq
                # Before the commit is announced: the hub's read of it is then served from
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
        return {
            "events_appended_total": self.appended,
            "append_batches_total": self.batches,
            "append_batches_split_total": self.isolated,
        }

    async def aclose(self) -> None:
        """Finish the batches in flight and drop this writer's batch record."""
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        if self.batches:
            try:
                await self.db.execute("forget_writer", {"writer": self.writer})
            except DatabaseUnavailable:
                logger.debug("could not drop writer %s's record; retention will", self.writer)


def _fail(batch: list[tuple[Append, asyncio.Future[int | None]]], exc: BaseException) -> None:
    for _, fut in batch:
        if not fut.done():
            fut.set_exception(exc)
