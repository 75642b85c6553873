"""The public task API: start, look up, cancel, append and follow tasks (one per process)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any
from urllib.parse import quote

from asgiref.sync import sync_to_async

from streaming import conf, context, events, registry, runtime, syncdb, tokens
from streaming.context import RunContext
from streaming.db import SyncReader, conninfo_from_django
from streaming.events import CANCELLED_ERROR, Append, Status, TaskKey
from streaming.exceptions import DatabaseUnavailable, LeaseLost, TaskNotStarted
from streaming.hub import Subscription
from streaming.runs import Enqueued, RunSpec, status_now

logger = logging.getLogger(__name__)


def run_spec(model: registry.TaskModel, settings: Any) -> RunSpec:
    """What the run store needs to queue a task of ``model``."""
    return RunSpec(
        model._meta.db_table,
        model._meta.pk.column,
        model.max_attempts or settings.MAX_ATTEMPTS,
        model.timeout or settings.DEFAULT_TASK_TIMEOUT,
    )


class TaskCoordinator:
    """Starts tasks durably and runs them here when this process claims them first."""

    def __init__(self) -> None:
        self._sync: SyncReader | None = None
        self._clients: dict[int, asyncio.Task[None]] = {}
        self._specs: dict[registry.TaskModel, RunSpec] = {}  # per model, built once

    # -- starting -------------------------------------------------------------------------

    async def start_task(
        self,
        task: Any,
        app_name: str | None = None,
        model_name: str | None = None,
        *,
        run_here: bool = True,
    ) -> None:
        """Queue ``task`` durably (idempotent); claim it here when this loop runs a worker.

        Accepts the seed's ``(task, app, model)`` and ``(task, model)`` forms and ``(task)``.
        On a loop without a runtime (``asyncio.run`` in a shell, a Django async view) the
        task is queued through Django's connection, and a worker elsewhere runs it.
        """
        key = registry.key_of(task)
        _check_names(key, app_name, model_name)
        rt = runtime.existing()
        if rt is None:
            await sync_to_async(self.enqueue_sync_key)(type(task), key)
            return
        run = await self.enqueue_key(type(task), key)
        if run.status == Status.PENDING:
            await rt.notifier.flush()  # wake workers now: this loop may end on return
            if run_here:
                rt.spawn(self._claim_soon(rt, run.run_id))

    def start_task_sync(
        self, task: Any, app_name: str | None = None, model_name: str | None = None
    ) -> None:
        """``start_task`` for sync code: queued in the caller's transaction, for any worker."""
        key = registry.key_of(task)
        _check_names(key, app_name, model_name)
        self.enqueue_sync_key(type(task), key)

    async def enqueue(self, task: Any) -> int:
        """Queue ``task`` for any worker without running it here; returns its run id."""
        rt = runtime.existing()
        if rt is None:
            return await sync_to_async(self.enqueue_sync)(task)
        run = await self.enqueue_key(type(task), registry.key_of(task))
        await rt.notifier.flush()
        return run.run_id

    def enqueue_sync(self, task: Any) -> int:
        """``enqueue`` for sync code (in the caller's transaction); returns the run id."""
        return self.enqueue_sync_key(type(task), registry.key_of(task)).run_id

    def enqueue_sync_key(self, model: registry.TaskModel, key: TaskKey) -> Enqueued:
        """``enqueue_key`` for sync code."""
        settings = conf.get()
        run = syncdb.enqueue(key, self._spec(model, settings), settings.CHANNEL)
        if run.created:
            logger.info("queued task %s (run %s)", key.path, run.run_id)
        return run

    def _spec(self, model: registry.TaskModel, settings: Any) -> RunSpec:
        spec = self._specs.get(model)
        if spec is None:
            spec = self._specs[model] = run_spec(model, settings)
        return spec

    async def enqueue_key(self, model: registry.TaskModel, key: TaskKey) -> Enqueued:
        """Queue the task ``key`` of ``model`` if it never was; its run either way."""
        rt = await runtime.current()
        run = await rt.store.enqueue(key, self._spec(model, rt.settings))
        if run.created:
            logger.info("queued task %s (run %s)", key.path, run.run_id)
        return run

    @staticmethod
    async def _claim_soon(rt: runtime.Runtime, run_id: int) -> None:
        # Two yields first: under ``asyncio.run(start_task(...))`` the loop stops before
        # this runs, so a short-lived process never claims a task it cannot keep.
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        try:
            await rt.worker.claim(run_id)
        except DatabaseUnavailable:
            # It stays queued: a worker's claim loop (here or elsewhere) takes it later.
            logger.warning("claiming run %s here failed: database unavailable", run_id)

    async def get_task_instance(self, *args: Any) -> Any:
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

    def get_task_instance_sync(self, *args: Any) -> Any:
        """``get_task_instance`` for sync code."""
        app, model_name, task_id = _split_args(args)
        try:
            model = registry.resolve(app, model_name)
        except LookupError:
            return None
        task = model._default_manager.filter(pk=task_id).first()
        if task is not None:
            self.start_task_sync(task)
        return task

    def is_task_running(self, *args: Any) -> bool:
        """``(app, model, id)`` or ``(model, id)``: started and not finished, on any host."""
        app, model_name, task_id = _split_args(args)
        key = registry.key_for(app, model_name, task_id)
        if _in_event_loop():
            # Django's connection is off limits here; a connection of this thread's own.
            status = status_now(self._sync_reader(), key)
        else:
            status = syncdb.status(key)
        return status is not None and not status.finished

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
        rt = runtime.existing()
        if rt is None:
            return await sync_to_async(self.cancel_task_sync)(*args)
        target = await rt.store.request_cancel(key)
        if target is None:
            return False
        if not target.held:
            await rt.store.finish_unowned(target.run_id, Status.CANCELLED, CANCELLED_ERROR)
        elif not rt.worker.stop_local(target.run_id, "cancelled"):
            rt.notifier.cancel(target.run_id)
        await rt.notifier.flush()
        return True

    def cancel_task_sync(self, *args: Any) -> bool:
        """``cancel_task`` for sync code (in the caller's transaction)."""
        app, model_name, task_id = _split_args(args)
        key = registry.key_for(app, model_name, task_id)
        return syncdb.cancel(key, conf.get().CHANNEL, CANCELLED_ERROR)

    # -- re-running -----------------------------------------------------------------------

    async def rerun_task(self, *args: Any) -> bool:
        """Run a finished task again, as a new attempt appended to its log (the earlier
        ``end`` events become ``previous_end``); False when it is not finished."""
        return await sync_to_async(self.rerun_task_sync)(*args)

    def rerun_task_sync(self, *args: Any) -> bool:
        """``rerun_task`` for sync code (in the caller's transaction)."""
        app, model_name, task_id = _split_args(args)
        key = registry.key_for(app, model_name, task_id)
        run_id = syncdb.rerun(key, conf.get().CHANNEL)
        if run_id is None:
            return False
        logger.info("queued task %s again (run %s)", key.path, run_id)
        return True

    # -- writing --------------------------------------------------------------------------

    async def append_event(self, task: Any, event_type: str, data: dict[str, Any]) -> int:
        data_json = events.validate(event_type, data)
        ctx = _context(task)
        seq = await ctx.append(Append(ctx.run_id, ctx.attempt, event_type, data_json))
        if seq is None:
            raise LeaseLost(f"task {ctx.key.path} attempt {ctx.attempt} no longer holds its run")
        return seq

    async def complete(self, task: Any, final_value: Any = None) -> None:
        ctx = _context(task)
        if ctx.finished:
            return
        json.dumps(final_value, allow_nan=False)  # an error before anything is written
        rt = await runtime.current()
        if await rt.worker.finish(ctx, Status.COMPLETED, final_value) is None:
            raise LeaseLost(f"task {ctx.key.path} attempt {ctx.attempt} no longer holds its run")

    # -- reading --------------------------------------------------------------------------

    async def history(self, task: Any, after: int = 0) -> list[dict[str, Any]]:
        """The task's logged events after seq ``after``, as seed queue items."""
        rt = runtime.existing()
        if rt is None:
            return await sync_to_async(self.history_sync)(task, after)
        return [ev.as_message() for ev in await rt.log.read_all(registry.key_of(task), after)]

    def history_sync(self, task: Any, after: int = 0) -> list[dict[str, Any]]:
        """``history`` for sync code."""
        return [ev.as_message() for ev in syncdb.read_all(registry.key_of(task), after)]

    async def subscribe(self, run_id: int, key: TaskKey, after: int) -> Subscription:
        """Follow a task's events after seq ``after`` (call ``unsubscribe`` when done)."""
        rt = await runtime.current()
        return rt.hub.subscribe(run_id, key, after)

    async def add_client(self, task: Any, queue: asyncio.Queue[dict[str, Any]]) -> None:
        """Seed API: the latest event, then every live one, into ``queue``."""
        rt = await runtime.current()
        key = registry.key_of(task)
        run = await self.enqueue_key(type(task), key)
        last = await rt.log.read_last(key)
        if last is not None:
            queue.put_nowait(last.as_message())
        sub = rt.hub.subscribe(run.run_id, key, last.seq if last else 0)
        self._clients[id(queue)] = rt.spawn(self._pump(rt, sub, queue, last))

    @staticmethod
    async def _pump(
        rt: runtime.Runtime,
        sub: Subscription,
        queue: asyncio.Queue[dict[str, Any]],
        last: events.Event | None,
    ) -> None:
        try:
            if last is not None and last.is_terminal:
                return
            async for batch in sub.batches(rt.settings.KEEPALIVE_INTERVAL):
                for ev in batch:
                    await queue.put(ev.as_message())  # a full queue holds only this pump
        finally:
            rt.hub.unsubscribe(sub)

    async def remove_client(self, task: Any, queue: asyncio.Queue[dict[str, Any]]) -> None:
        pump = self._clients.pop(id(queue), None)
        if pump is not None:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump

    # -- URLs -----------------------------------------------------------------------------

    def stream_url(self, task: Any, signed: bool = False, expires_in: float | None = None) -> str:
        key = registry.key_of(task)
        if not signed:
            return key.stream_path
        return f"{key.stream_path}?token={_token(key, 'view', expires_in)}"

    def cancel_url(self, task: Any, expires_in: float | None = None) -> str:
        key = registry.key_of(task)
        return f"/tasks/{key.path}/cancel?token={_token(key, 'cancel', expires_in)}"


def _token(key: TaskKey, action: str, expires_in: float | None) -> str:
    seconds = conf.get().TOKEN_EXPIRES_IN if expires_in is None else expires_in
    return quote(tokens.make(key, action, seconds), safe="")


def _context(task: Any) -> RunContext:
    """The run ``task``'s own ``process()`` holds; TaskNotStarted anywhere else."""
    ctx = context.current()
    # The identity compared field by field, without building a TaskKey: once per event.
    if (
        ctx is None
        or ctx.key.task_id != task.pk
        or (ctx.key.model_name != type(task)._meta.object_name)
    ):
        raise TaskNotStarted(
            f"{type(task).__name__} {task.pk}: events are sent from inside the task's own "
            "process(), while a worker runs it; start it with coordinator.start_task(task)"
        )
    return ctx


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
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
