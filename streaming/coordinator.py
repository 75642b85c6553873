"""The public task API: start, look up, cancel, append and follow tasks (one per process)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import TYPE_CHECKING, Any

from django.core import signing

from streaming import events, log, registry, runtime
from streaming.db import SyncReader, conninfo_from_django
from streaming.events import TaskKey
from streaming.exceptions import LeaseLost, TaskNotStarted
from streaming.writer import Append

if TYPE_CHECKING:
    from streaming.models import StreamTask
    from streaming.worker import RunContext

logger = logging.getLogger(__name__)

_SIGNER_SALT = "streaming.stream_url"


class TaskCoordinator:
    """Starts tasks durably and runs them here when this process claims them first."""

    def __init__(self) -> None:
        self._sync: SyncReader | None = None
        self._clients: dict[int, asyncio.Task[None]] = {}

    # -- starting -------------------------------------------------------------------------

    async def start_task(self, task: StreamTask, app_name: str | None = None,
                         model_name: str | None = None, *, run_here: bool = True) -> None:
        """Queue ``task`` durably (idempotent) and try to claim it in this process.

        Accepts the seed's ``(task, app, model)`` and ``(task, model)`` forms and ``(task)``.
        """
        key = registry.key_of(task)
        _check_names(key, app_name, model_name)
        rt = await runtime.current()
        run_id, status = await self._enqueue(rt, type(task), key)
        if status == "pending":
            await rt.notifier.flush()  # wake workers now: this loop may end on return
            if run_here:
                rt.spawn(self._claim_soon(rt, run_id))

    async def enqueue(self, task: StreamTask) -> int:
        """Queue ``task`` for any worker without running it here; returns its run id."""
        rt = await runtime.current()
        run_id, _ = await self._enqueue(rt, type(task), registry.key_of(task))
        await rt.notifier.flush()
        return run_id

    async def enqueue_key(self, cls: type[StreamTask], key: TaskKey) -> tuple[int, str]:
        """Queue the task ``key`` of model ``cls`` if it never was; (run id, status)."""
        rt = await runtime.current()
        return await self._enqueue(rt, cls, key)

    async def _enqueue(self, rt: runtime.Runtime, cls: type[StreamTask], key: TaskKey
                       ) -> tuple[int, str]:
        row = await rt.db.fetchone("enqueue", {
            "app_label": key.app_label, "model_name": key.model_name, "task_id": key.task_id,
            "db_table": cls._meta.db_table, "pk_column": cls._meta.pk.column,
            "max_attempts": cls.max_attempts or rt.settings.MAX_ATTEMPTS,
            "timeout_seconds": cls.timeout or rt.settings.DEFAULT_TASK_TIMEOUT,
        })
        assert row is not None
        run_id, status, _attempt, _last, created = row
        if created:
            logger.info("queued task %s (run %s)", key.path, run_id)
        if status == "pending":
            rt.notifier.queued(run_id)
        return run_id, status

    @staticmethod
    async def _claim_soon(rt: runtime.Runtime, run_id: int) -> None:
        # Two yields first: under ``asyncio.run(start_task(...))`` the loop stops before
        # this runs, so a short-lived process never claims a task it cannot keep.
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        await rt.worker.claim(run_id)

    async def get_task_instance(self, *args: Any) -> StreamTask | None:
        """``(app, model, id)`` or ``(model, id)``: the task, started if it never was."""
        app, model_name, task_id = _split_args(args)
        try:
            model = registry.resolve(app, model_name)
        except LookupError:
            return None
        task = await model._default_manager.filter(pk=task_id).afirst()
        if task is not None:
            await self.start_task(task)
        return task

    def is_task_running(self, *args: Any) -> bool:
        """``(app, model, id)`` or ``(model, id)``: started and not finished, on any host."""
        app, model_name, task_id = _split_args(args)
        key = registry.key_for(app, model_name, task_id)
        row = self._sync_reader().fetchone("run_status", {
            "app_label": key.app_label, "model_name": key.model_name, "task_id": key.task_id})
        return row is not None and row[0] in ("pending", "running")

    def close(self) -> None:
        """Close this process's sync connection (the async ones close with their runtime)."""
        if self._sync is not None:
            self._sync.close()
            self._sync = None

    def _sync_reader(self) -> SyncReader:
        if self._sync is None:
            self._sync = SyncReader(conninfo_from_django())
        return self._sync

    # -- cancelling -----------------------------------------------------------------------

    async def cancel_task(self, *args: Any) -> bool:
        """Cancel a task wherever it runs; False when it is finished or was never started."""
        app, model_name, task_id = _split_args(args)
        key = registry.key_for(app, model_name, task_id)
        rt = await runtime.current()
        row = await rt.db.fetchone("request_cancel", {
            "app_label": key.app_label, "model_name": key.model_name, "task_id": key.task_id})
        if row is None:
            return False
        run_id, status, owner, lease_expired = row
        if status == "pending" or owner is None or lease_expired:
            out = await rt.db.fetchone("finish_unowned", {
                "run_id": run_id, "status": "cancelled", "final_value": None,
                "error": json.dumps({"message": "cancelled", "error_type": "CancelledError"})})
            if out and out[0] is not None:
                rt.committed(run_id, out[0])
        elif not rt.worker.stop_local(run_id, "cancelled"):
            rt.notifier.cancel(run_id)
        await rt.notifier.flush()
        return True

    # -- writing --------------------------------------------------------------------------

    async def append_event(self, task: StreamTask, event_type: str, data: dict[str, Any]
                           ) -> int:
        data_json = events.validate(event_type, data)
        rt = await runtime.current()
        ctx = self._context(rt, task)
        seq = await rt.appender.append(Append(ctx.run_id, ctx.attempt, event_type, data_json))
        if seq is None:
            raise LeaseLost(f"task {ctx.key.path} attempt {ctx.attempt} no longer holds its run")
        return seq

    async def complete(self, task: StreamTask, final_value: Any = None) -> None:
        rt = await runtime.current()
        ctx = self._context(rt, task)
        if ctx.finished:
            return
        json.dumps(final_value)  # TypeError before anything is written
        seq = await rt.finish(ctx.run_id, ctx.attempt, "completed", final_value, None)
        ctx.finished = True
        if seq is None:
            raise LeaseLost(f"task {ctx.key.path} attempt {ctx.attempt} no longer holds its run")

    def _context(self, rt: runtime.Runtime, task: StreamTask) -> RunContext:
        ctx: RunContext | None = getattr(task, "_stream_run", None)
        if ctx is None:
            key = registry.key_of(task)
            ctx = next((c for c in rt.worker.running.values() if c.key == key), None)
        if ctx is None:
            raise TaskNotStarted(
                "this task is not running in this process: start it with "
                "coordinator.start_task(task); events are sent from its process()")
        return ctx

    # -- reading --------------------------------------------------------------------------

    async def history(self, task: StreamTask, after: int = 0) -> list[dict[str, Any]]:
        rt = await runtime.current()
        key = registry.key_of(task)
        out: list[dict[str, Any]] = []
        while True:
            page = await log.read(rt.db, key, after)
            out.extend(ev.as_message() for ev in page)
            if len(page) < log.PAGE:
                return out
            after = page[-1].seq

    async def add_client(self, task: StreamTask, queue: asyncio.Queue[dict[str, Any]]) -> None:
        """Seed API: the latest event, then every live one, into ``queue``."""
        rt = await runtime.current()
        key = registry.key_of(task)
        run_id, _ = await self._enqueue(rt, type(task), key)
        last = await log.read_last(rt.db, key)
        if last is not None:
            queue.put_nowait(last.as_message())
        sub = rt.hub.subscribe(run_id, key, last.seq if last else 0)
        self._clients[id(queue)] = rt.spawn(self._pump(rt, sub, queue, last))

    @staticmethod
    async def _pump(rt: runtime.Runtime, sub: Any, queue: asyncio.Queue[dict[str, Any]],
                    last: events.Event | None) -> None:
        try:
            if last is not None and last.is_terminal:
                return
            async for batch in sub.batches(rt.settings.KEEPALIVE_INTERVAL):
                for ev in batch:
                    await queue.put(ev.as_message())  # a full queue holds only this pump
        finally:
            rt.hub.unsubscribe(sub)

    async def remove_client(self, task: StreamTask, queue: asyncio.Queue[dict[str, Any]]
                            ) -> None:
        pump = self._clients.pop(id(queue), None)
        if pump is not None:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump

    # -- URLs -----------------------------------------------------------------------------

    def stream_url(self, task: StreamTask, signed: bool = False) -> str:
        key = registry.key_of(task)
        path = f"/stream/{key.path}"
        if signed:
            path += "?token=" + signing.Signer(salt=_SIGNER_SALT).sign(key.path).split(":")[-1]
        return path

    @staticmethod
    def check_token(key: TaskKey, token: str) -> bool:
        try:
            signing.Signer(salt=_SIGNER_SALT).unsign(f"{key.path}:{token}")
        except signing.BadSignature:
            return False
        return True


def _check_names(key: TaskKey, app_name: str | None, model_name: str | None) -> None:
    if model_name is None and app_name is not None:
        app_name, model_name = None, app_name  # the seed's (task, model_name) form
    if app_name is not None and app_name != key.app_label:
        raise ValueError(f"app {app_name!r} does not match the task's app {key.app_label!r}")
    if model_name is not None and model_name.lower() != key.model_name.lower():
        raise ValueError(f"model {model_name!r} does not match the task's {key.model_name!r}")


def _split_args(args: tuple[Any, ...]) -> tuple[str | None, str, int]:
    if len(args) == 3:
        return args[0], args[1], int(args[2])
    if len(args) == 2:
        return None, args[0], int(args[1])
    raise TypeError("expected (app_label, model_name, task_id) or (model_name, task_id)")


coordinator = TaskCoordinator()
