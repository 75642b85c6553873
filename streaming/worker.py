"""Running tasks: claim under a lease, heartbeat, cancel, finish, release on shutdown."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from asgiref.sync import sync_to_async
from django.core.exceptions import ObjectDoesNotExist
from django.db import connections

from streaming import registry
from streaming.events import TaskKey
from streaming.exceptions import DatabaseUnavailable, LeaseLost, UnknownTaskModel

if TYPE_CHECKING:
    from streaming.models import StreamTask
    from streaming.runtime import Runtime

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class RunContext:
    """What a running task holds: its run, the fencing attempt, and how it was stopped."""

    run_id: int
    attempt: int
    key: TaskKey
    timeout: float | None = None
    finished: bool = False
    stop_reason: str | None = None  # cancelled | lease_lost | shutdown
    task: asyncio.Task[None] | None = None


def make_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def error_info(exc: BaseException) -> dict[str, str]:
    """The seed's error event payload for an exception."""
    return {"message": str(exc) or type(exc).__name__, "error_type": type(exc).__name__}


def discard_broken_django_connections() -> None:
    """Close this thread's Django connections that no longer answer (the server restarted).

    Django checks its connections when each of its own requests starts; our task runs and
    HTTP handlers are not Django requests, so without this one database restart would
    leave the ORM's connection broken for good: every later task load, every ORM call in
    ``process()`` and every stream lookup would fail. Call it in the ORM's thread.
    """
    for conn in connections.all(initialized_only=True):
        if conn.connection is not None and not conn.is_usable():
            conn.close()


def _load_instance(model: type[StreamTask], task_id: int) -> StreamTask:
    discard_broken_django_connections()
    return model._default_manager.get(pk=task_id)


class Worker:
    """Claims runs (all of them, or one that this process started) and executes them."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.cfg = runtime.settings
        self.owner = make_owner()
        self.running: dict[int, RunContext] = {}
        self.counters = {"claimed": 0, "reclaimed": 0, "completed": 0, "failed": 0,
                         "cancelled": 0, "released": 0, "lease_lost": 0}
        self.claiming = False
        self._wake = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self._last_renewal = time.monotonic()

    def wake(self, run_id: int | None = None) -> None:
        self._wake.set()

    def start(self) -> None:
        """Claim any queued run from now on (runserver_stream and the worker command)."""
        self.claiming = True
        self._ensure_loops(claim=True)

    def _ensure_loops(self, claim: bool = False) -> None:
        loop = asyncio.get_running_loop()
        if not self._loops:
            self._loops.append(loop.create_task(self._heartbeat_loop()))
        if claim and len(self._loops) == 1:
            self._loops.append(loop.create_task(self._claim_loop()))

    async def _claim_loop(self) -> None:
        while self.claiming:
            try:
                while self.claiming and len(self.running) < self.cfg.WORKER_CONCURRENCY:
                    if not await self.claim():
                        break
            except DatabaseUnavailable:
                logger.warning("claiming failed: database unavailable; retrying")
                await asyncio.sleep(1.0)
            except Exception:
                # Loop boundary: anything else (an SQL error in the claim, say) must not end
                # the loop, or this process would silently never claim again.
                logger.exception("claiming failed; retrying")
                await asyncio.sleep(1.0)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.cfg.WORKER_POLL_INTERVAL)
            except TimeoutError:
                pass

    async def claim(self, run_id: int | None = None) -> bool:
        """Claim one run (a given one, or the oldest claimable) and start it; False if none."""
        row = await self.rt.db.fetchone("claim", {
            "owner": self.owner, "ttl": self.cfg.LEASE_TTL, "run_id": run_id})
        if row is None:
            return False
        rid, app_label, model_name, task_id, attempt, timeout, last_seq, cancel_req = row
        ctx = RunContext(rid, attempt, TaskKey(app_label, model_name, task_id), timeout)
        self.counters["claimed"] += 1
        if attempt > 1:
            self.counters["reclaimed"] += 1
            self.rt.committed(rid, last_seq)
        logger.info("claimed task %s (run %s, attempt %s)", ctx.key.path, rid, attempt)
        stale = self.running.get(rid)
        if stale is not None:
            # This process retook its own run (its lease expired while the heartbeat was
            # late): the older attempt is fenced off in SQL; stop it here too.
            self._stop(stale, "lease_lost")
        self.running[rid] = ctx
        self._ensure_loops()
        ctx.task = asyncio.get_running_loop().create_task(self._execute(ctx, cancel_req))
        return True

    async def _execute(self, ctx: RunContext, cancel_requested: bool) -> None:
        try:
            if cancel_requested:
                await self._finish(ctx, "cancelled", None, {"message": "cancelled",
                                                           "error_type": "CancelledError"})
                return
            instance = await self._load(ctx)
            if instance is not None:
                await self._run_process(ctx, instance)
        except Exception:
            logger.exception("task %s: worker error", ctx.key.path)
        finally:
            # Only our own entry: a newer attempt of the same run may have replaced it.
            if self.running.get(ctx.run_id) is ctx:
                del self.running[ctx.run_id]
            self.wake()

    async def _load(self, ctx: RunContext) -> StreamTask | None:
        try:
            model = registry.resolve(ctx.key.app_label, ctx.key.model_name)
            instance = await sync_to_async(_load_instance)(model, ctx.key.task_id)
        except (UnknownTaskModel, LookupError, ObjectDoesNotExist) as exc:
            # ObjectDoesNotExist: the task's row was deleted; fail now rather than leave
            # the run to expire and be retried until its attempts are used up.
            await self._finish(ctx, "failed", None, error_info(exc))
            return None
        instance._stream_run = ctx  # type: ignore[attr-defined]
        return instance

    async def _run_process(self, ctx: RunContext, instance: StreamTask) -> None:
        try:
            async with asyncio.timeout(ctx.timeout):
                result = await instance.process()
        except asyncio.CancelledError:
            await self._stopped(ctx)
            return
        except LeaseLost:
            self._lost(ctx)
            return
        except Exception as exc:
            logger.info("task %s raised %s", ctx.key.path, type(exc).__name__)
            await self._finish(ctx, "failed", None, error_info(exc))
            return
        if not ctx.finished:
            await self._complete(ctx, result)

    async def _complete(self, ctx: RunContext, result: Any) -> None:
        try:
            json.dumps(result)
        except (TypeError, ValueError) as exc:
            await self._finish(ctx, "failed", None, error_info(
                TypeError(f"process() returned a value that is not JSON: {exc}")))
            return
        await self._finish(ctx, "completed", result, None)

    async def _stopped(self, ctx: RunContext) -> None:
        task = asyncio.current_task()
        reason = ctx.stop_reason
        if task is not None and reason is not None:
            task.uncancel()
        if reason == "cancelled":
            await self._finish(ctx, "cancelled", None,
                               {"message": "cancelled", "error_type": "CancelledError"})
        elif reason == "lease_lost":
            self._lost(ctx)
        else:
            # Shutdown, or the event loop is closing under us: hand the run back at once.
            await asyncio.shield(self._release(ctx))
            if reason is None:
                raise asyncio.CancelledError

    def _lost(self, ctx: RunContext) -> None:
        self.counters["lease_lost"] += 1
        logger.warning("task %s: lease lost (attempt %s); stopped", ctx.key.path, ctx.attempt)

    async def _finish(self, ctx: RunContext, status: str, final_value: Any,
                      error: dict[str, Any] | None) -> None:
        seq = await self.rt.finish(ctx.run_id, ctx.attempt, status, final_value, error)
        ctx.finished = True
        if seq is None:
            self._lost(ctx)
            return
        self.counters[status] += 1
        logger.info("task %s %s (attempt %s)", ctx.key.path, status, ctx.attempt)

    async def _release(self, ctx: RunContext) -> None:
        try:
            row = await self.rt.db.fetchone("release", {"run_id": ctx.run_id,
                                                        "attempt": ctx.attempt})
        except DatabaseUnavailable:
            logger.warning("task %s: release failed; it is reclaimed when its lease expires",
                           ctx.key.path)
            return
        if row is not None:
            self.counters["released"] += 1
            self.rt.notifier.queued(ctx.run_id)
            await self.rt.notifier.flush()

    def stop_local(self, run_id: int, reason: str) -> bool:
        """Cancel the process() of a run held here; False when it is not held here."""
        ctx = self.running.get(run_id)
        return ctx is not None and self._stop(ctx, reason)

    @staticmethod
    def _stop(ctx: RunContext, reason: str) -> bool:
        if ctx.task is None or ctx.finished:
            return False
        ctx.stop_reason = ctx.stop_reason or reason
        ctx.task.cancel()
        return True

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.HEARTBEAT_INTERVAL)
            try:
                await self.heartbeat()
            except Exception as exc:
                # Loop boundary: a dead heartbeat loop would let every lease here expire
                # while the tasks go on running (fenced off, their work lost).
                if not isinstance(exc, DatabaseUnavailable):
                    logger.exception("heartbeat failed")
                if time.monotonic() - self._last_renewal > self.cfg.LEASE_TTL:
                    for run_id in list(self.running):
                        self.stop_local(run_id, "lease_lost")

    async def heartbeat(self) -> None:
        """Renew every lease held here; stop the runs whose lease is gone or cancelled."""
        held = [c for c in self.running.values() if not c.finished]
        if not held:
            self._last_renewal = time.monotonic()
            return
        rows = await self.rt.db.fetchall("heartbeat", {
            "ttl": self.cfg.LEASE_TTL, "owner": self.owner,
            "run_ids": [c.run_id for c in held], "attempts": [c.attempt for c in held]})
        self._last_renewal = time.monotonic()
        renewed = {run_id: cancel for run_id, cancel in rows}
        for ctx in held:
            if ctx.run_id not in renewed:
                self.stop_local(ctx.run_id, "lease_lost")
            elif renewed[ctx.run_id]:
                self.stop_local(ctx.run_id, "cancelled")

    async def shutdown(self, grace: float) -> None:
        """Stop claiming, let running tasks finish for ``grace`` s, release the rest."""
        self.claiming = False
        self._wake.set()
        pending = [c.task for c in self.running.values() if c.task is not None]
        if pending:
            logger.info("waiting up to %ss for %s running task(s)", grace, len(pending))
            _, still = await asyncio.wait(pending, timeout=grace)
            for ctx in list(self.running.values()):
                self.stop_local(ctx.run_id, "shutdown")
            if still:
                await asyncio.wait(still, timeout=5)
        for loop_task in self._loops:
            loop_task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops = []
