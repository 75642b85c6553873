"""The per-event-loop machinery: pool, writer, notifier, hub and worker, built lazily."""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from typing import Any

from streaming import conf
from streaming.db import Database, Listener, conninfo_from_django, retrying
from streaming.hub import Hub
from streaming.notifier import Notifier
from streaming.worker import Worker
from streaming.writer import Appender

logger = logging.getLogger(__name__)


class Runtime:
    """Everything one process needs to write, stream and run tasks on one event loop."""

    def __init__(self, settings: conf.StreamingSettings, conninfo: str) -> None:
        self.settings = settings
        self.conninfo = conninfo
        self.db = Database(conninfo, settings.POOL_MIN_SIZE, settings.POOL_MAX_SIZE)
        self.notifier = Notifier(self.db, settings.CHANNEL, settings.NOTIFY_DELAY)
        self.hub = Hub(self.db, Listener(conninfo, settings.CHANNEL),
                       buffer=settings.SUBSCRIBER_BUFFER,
                       health_interval=settings.LISTEN_HEALTH_INTERVAL,
                       poll_interval=settings.HUB_POLL_INTERVAL)
        self.appender = Appender(self.db, self.committed, settings.GROUP_COMMIT_MAX_BATCH,
                                 settings.LEASE_TTL)
        self.worker = Worker(self)
        self.hub.on_queued = self.worker.wake
        self.hub.on_cancel = self._cancel_here
        self.background: set[asyncio.Task[Any]] = set()

    def _cancel_here(self, run_id: int) -> None:
        self.worker.stop_local(run_id, "cancelled")

    async def start(self) -> None:
        await self.db.open()
        self.hub.start()

    def committed(self, run_id: int, seq: int) -> None:
        """Rows up to ``seq`` of a run are committed: tell local subscribers and other hosts."""
        self.hub.committed(run_id, seq)
        self.notifier.events_committed(run_id, seq)

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """A background task that is kept referenced until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    async def finish(self, run_id: int, attempt: int, status: str, final_value: Any,
                     error: dict[str, Any] | None) -> int | None:
        """Write the terminal events and final state; the last seq, or None if fenced off."""
        params = {"run_id": run_id, "attempt": attempt, "status": status,
                  "final_value": _json(final_value), "error": _json(error)}
        row = await retrying(lambda: self.db.fetchone("finish", params), self.settings.LEASE_TTL)
        seq = row[0] if row else None
        if seq is not None:
            self.committed(run_id, seq)
        return seq

    async def aclose(self, grace: float = 0.0) -> None:
        await self.worker.shutdown(grace)
        for task in list(self.background):
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        await self.hub.aclose()
        await self.notifier.aclose()
        await self.db.close()


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


_runtimes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Runtime] = (
    weakref.WeakKeyDictionary())
_starting: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Future[Runtime]] = (
    weakref.WeakKeyDictionary())


async def current() -> Runtime:
    """This event loop's runtime, created and started on first use."""
    loop = asyncio.get_running_loop()
    rt = _runtimes.get(loop)
    if rt is not None:
        return rt
    fut = _starting.get(loop)
    if fut is not None:
        return await asyncio.shield(fut)
    fut = _starting[loop] = loop.create_future()
    try:
        rt = Runtime(conf.get(), conninfo_from_django())
        await rt.start()
    except BaseException as exc:
        fut.set_exception(exc)
        fut.exception()  # mark retrieved
        del _starting[loop]
        raise
    _runtimes[loop] = rt
    fut.set_result(rt)
    del _starting[loop]
    return rt


def peek() -> Runtime | None:
    """This loop's runtime if it exists (no side effect)."""
    try:
        return _runtimes.get(asyncio.get_running_loop())
    except RuntimeError:
        return None


async def shutdown(grace: float = 0.0) -> None:
    """Close this loop's runtime (tests and commands call it before the loop ends)."""
    rt = _runtimes.pop(asyncio.get_running_loop(), None)
    if rt is not None:
        await rt.aclose(grace)
