"""The per-event-loop machinery: pool, event log, run store, writer, hub and worker.

Everything here is bound to the event loop that built it, and talks to any other loop (a
worker on a loop of its own, another process) only through Postgres: the log, the run table
and NOTIFY. So a second runtime on another loop is a complete, independent participant.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
import weakref
from collections.abc import Coroutine
from typing import Any

from streaming import conf, orm
from streaming.db import Database, Listener, conninfo_from_django
from streaming.hub import Hub
from streaming.log import EventLog
from streaming.notifier import Notifier
from streaming.runs import RunStore
from streaming.worker import Worker, WorkerSettings
from streaming.writer import Appender

logger = logging.getLogger(__name__)


def worker_settings(settings: conf.StreamingSettings) -> WorkerSettings:
    return WorkerSettings(
        lease_ttl=settings.LEASE_TTL,
        heartbeat_interval=settings.HEARTBEAT_INTERVAL,
        concurrency=settings.WORKER_CONCURRENCY,
        poll_interval=settings.WORKER_POLL_INTERVAL,
        finish_retry_for=settings.LEASE_TTL,
    )


class Runtime:
    """Everything one process needs to write, stream and run tasks on one event loop."""

    def __init__(self, settings: conf.StreamingSettings, conninfo: str) -> None:
        self.settings = settings
        origin = uuid.uuid4().hex[:8]
        # A short wait for a pooled connection: during an outage a request fails fast and
        # is retried until DATABASE_WAIT, instead of blocking in the pool past it.
        wait = min(10.0, max(0.5, settings.DATABASE_WAIT / 3))
        self.db = Database(conninfo, settings.POOL_MIN_SIZE, settings.POOL_MAX_SIZE, wait)
        self.notifier = Notifier(self.db, settings.CHANNEL, settings.NOTIFY_DELAY, origin)
        self.log = EventLog(self.db, self.notifier, settings.PAGE_BYTES)
        self.store = RunStore(self.db, self.log)
        self.appender = Appender(
            self.db, self.log, settings.GROUP_COMMIT_MAX_BATCH, settings.LEASE_TTL
        )
        self.hub = Hub(
            self.log,
            self.store.last_seqs,
            Listener(conninfo, settings.CHANNEL),
            buffer=settings.SUBSCRIBER_BUFFER,
            buffer_bytes=settings.SUBSCRIBER_BUFFER_BYTES,
            health_interval=settings.LISTEN_HEALTH_INTERVAL,
            poll_interval=settings.HUB_POLL_INTERVAL,
            origin=origin,
        )
        self.log.watch(self.hub.committed)
        self.worker = Worker(
            self.store, self.appender.append, orm.load_task, worker_settings(settings)
        )
        self.hub.on_queued = self._queued
        self.hub.on_cancel = self._cancel_here
        self.background: set[asyncio.Task[Any]] = set()

    def _queued(self, run_id: int) -> None:
        # Queued again elsewhere (released, or re-run: its earlier ``end`` renamed): rows
        # this process remembers of the run may be stale now.
        self.log.requeued_elsewhere(run_id)
        self.worker.wake(run_id)

    def _cancel_here(self, run_id: int) -> None:
        self.worker.stop_local(run_id, "cancelled")

    async def start(self) -> None:
        await self.db.open()
        self.hub.start()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """A background task that is kept referenced until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    def counters(self) -> dict[str, int]:
        """Every component's counters, by metric name (``metrics`` renders them)."""
        return {
            **self.worker.counters(),
            **self.hub.counters(),
            **self.log.counters(),
            **self.appender.counters(),
            **self.notifier.counters(),
            "db_queries_total": self.db.queries_run,
        }

    async def aclose(self, grace: float = 0.0) -> None:
        await self.worker.shutdown(grace)
        for task in list(self.background):
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        await self.appender.aclose()
        await self.hub.aclose()
        await self.notifier.aclose()
        await self.db.close()


_runtimes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Runtime] = (
    weakref.WeakKeyDictionary()
)
_starting: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Future[Runtime]] = (
    weakref.WeakKeyDictionary()
)


def existing() -> Runtime | None:
    """This event loop's runtime if one was started on it (None outside a running loop).

    A runtime is started by what runs on a loop for long: ``runserver_stream``,
    ``runworker_stream``, the ASGI mount, the test helpers. The coordinator's short calls
    (start, enqueue, cancel, history) use it when there is one and otherwise go through
    Django's own connection (``streaming.syncdb``), so a short-lived loop opens nothing.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    return _runtimes.get(loop)


async def current() -> Runtime:
    """This event loop's runtime, created and started on first use.

    For what needs one (streams, the seed's ``add_client``, running tasks). Whoever causes
    one to be created on a loop must close it with ``shutdown()`` before the loop ends.
    """
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


async def shutdown(grace: float = 0.0) -> None:
    """Close this loop's runtime (tests and commands call it before the loop ends)."""
    rt = _runtimes.pop(asyncio.get_running_loop(), None)
    if rt is not None:
        await rt.aclose(grace)
