"""Running tasks: claim under a lease, heartbeat, cancel, finish, release on shutdown.

The worker knows nothing of Django, HTTP or the runtime: it is handed a run store (the
statements it needs), a loader (a task's identity to something with ``async process()``) and
its settings, so its logic can be tested against fakes of each.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from streaming import context
from streaming.context import Appender, RunContext
from streaming.db import retrying
from streaming.events import CANCELLED_ERROR, Status, TaskKey
from streaming.exceptions import DatabaseUnavailable, LeaseLost, NotFound
from streaming.runs import Claimed


class Runnable(Protocol):
    async def process(self) -> Any: ...


class Store(Protocol):
    """The statements of the run store that a worker uses."""

    async def claim(self, owner: str, ttl: float, run_id: int | None = None) -> Claimed: ...

    async def heartbeat(
        self, owner: str, ttl: float, held: Sequence[tuple[int, int]]
    ) -> dict[int, bool]: ...

    async def release(self, run_id: int, attempt: int) -> bool: ...

    async def finish(
        self,
        run_id: int,
        attempt: int,
        status: Status,
        final_value: Any = None,
        error: dict[str, Any] | None = None,
    ) -> int | None: ...


Loader = Callable[[TaskKey], Awaitable[Runnable]]
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSettings:
    lease_ttl: float = 30.0
    heartbeat_interval: float = 5.0
    concurrency: int = 64
    poll_interval: float = 2.0
    finish_retry_for: float = 30.0  # seconds a terminal write is retried through an outage


@dataclass(eq=False)
class _Held:
    """A run this worker executes: its context, its asyncio task, and why it was stopped."""

    ctx: RunContext
    task: asyncio.Task[None] | None = None
    stop_reason: str | None = None  # cancelled | lease_lost | shutdown
    started: bool = False  # whether ``_execute`` began: a task cancelled before never runs


def make_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def error_info(exc: BaseException) -> dict[str, str]:
    """The seed's error event payload for an exception."""
    return {"message": str(exc) or type(exc).__name__, "error_type": type(exc).__name__}


class Worker:
    """Claims runs (all of them, or one that this process started) and executes them."""

    def __init__(
        self,
        store: Store,
        appender: Appender,
        loader: Loader,
        settings: WorkerSettings,
        owner: str | None = None,
    ) -> None:
        self.store = store
        self.append = appender
        self.loader = loader
        self.cfg = settings
        self.owner = owner or make_owner()
        self.running: dict[int, _Held] = {}
        self.counts = {
            "claimed": 0,
            "reclaimed": 0,
            "completed": 0,
            "failed": 0,
            "cancelled": 0,
            "released": 0,
            "lease_lost": 0,
        }
        self.claiming = False
        self._reserved = 0
        self._wake = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self._last_renewal = time.monotonic()

    # -- claiming -------------------------------------------------------------------------

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

    @property
    def full(self) -> bool:
        # Claims in flight hold their slot: two concurrent claims must not both pass.
        return len(self.running) + self._reserved >= self.cfg.concurrency

    async def _claim_loop(self) -> None:
        while self.claiming:
            try:
                while self.claiming and not self.full and await self.claim():
                    pass
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
                async with asyncio.timeout(self.cfg.poll_interval):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def claim(self, run_id: int | None = None) -> bool:
        """Claim one run (a given one, or the oldest claimable) and start it; False if none.

        Never beyond the concurrency cap: a run left unclaimed stays queued for any worker.
        """
        if self.full:
            return False
        self._reserved += 1
        try:
            claimed = await self.store.claim(self.owner, self.cfg.lease_ttl, run_id)
        finally:
            self._reserved -= 1
        self.counts["failed"] += claimed.failed
        claim = claimed.claim
        if claim is None:
            return False
        self.counts["claimed"] += 1
        if claim.attempt > 1:
            self.counts["reclaimed"] += 1
        logger.info(
            "%s task %s (run %s, attempt %s)",
            "reclaimed" if claim.attempt > 1 else "claimed",
            claim.key.path,
            claim.run_id,
            claim.attempt,
        )
        stale = self.running.get(claim.run_id)
        if stale is not None:
            # This process retook its own run (its lease expired while the heartbeat was
            # late): the older attempt is fenced off in SQL; stop it here too.
            self._stop(stale, "lease_lost")
        ctx = RunContext(claim.run_id, claim.attempt, claim.key, self.append, claim.timeout)
        held = _Held(ctx)
        self.running[claim.run_id] = held
        self._ensure_loops()
        held.task = asyncio.get_running_loop().create_task(
            self._execute(held, claim.cancel_requested)
        )
        return True

    # -- executing ------------------------------------------------------------------------

    async def _execute(self, held: _Held, cancel_requested: bool) -> None:
        held.started = True
        try:
            if held.stop_reason is not None:  # stopped before this task had begun
                await self._stopped(held)
            elif cancel_requested:
                await self._finish(held.ctx, Status.CANCELLED, None, CANCELLED_ERROR)
            else:
                await self._load_and_run(held)
        except Exception:
            logger.exception("task %s: worker error", held.ctx.key.path)
        finally:
            # Only our own entry: a newer attempt of the same run may have replaced it.
            if self.running.get(held.ctx.run_id) is held:
                del self.running[held.ctx.run_id]
            self.wake()

    async def _load_and_run(self, held: _Held) -> None:
        try:
            instance = await self._load(held.ctx)
        except asyncio.CancelledError:  # stopped while the task's row was being read
            await self._stopped(held)
            return
        if instance is None:
            return
        token = context.CURRENT.set(held.ctx)
        try:
            await self._run_process(held, instance)
        finally:
            context.CURRENT.reset(token)

    async def _load(self, ctx: RunContext) -> Runnable | None:
        try:
            # Retried through an outage, as the terminal write is: a restart while the
            # task's row loads must not leave the run "running" until its lease expires.
            try:
                return await self.loader(ctx.key)
            except DatabaseUnavailable:
                loaded: Runnable = await retrying(
                    lambda: self.loader(ctx.key), self.cfg.finish_retry_for
                )
                return loaded
        except NotFound as exc:
            # The task's row (or model) is gone: fail now rather than leave the run to
            # expire and be retried until its attempts are used up. The error names the
            # cause (Django's DoesNotExist), as users of the ORM know it.
            await self._finish(ctx, Status.FAILED, None, error_info(exc.__cause__ or exc))
            return None

    async def _run_process(self, held: _Held, instance: Runnable) -> None:
        ctx = held.ctx
        try:
            async with asyncio.timeout(ctx.timeout):
                result = await instance.process()
        except asyncio.CancelledError:
            await self._stopped(held)
            return
        except LeaseLost:
            self._lost(ctx)
            return
        except Exception as exc:
            logger.info("task %s raised %s", ctx.key.path, type(exc).__name__)
            await self._finish(ctx, Status.FAILED, None, error_info(exc))
            return
        if not ctx.finished:
            await self._complete(ctx, result)

    async def _complete(self, ctx: RunContext, result: Any) -> None:
        try:
            json.dumps(result, allow_nan=False)  # what jsonb stores: no NaN, no Infinity
        except (TypeError, ValueError) as exc:
            await self._finish(
                ctx,
                Status.FAILED,
                None,
                error_info(TypeError(f"process() returned a value that is not JSON: {exc}")),
            )
            return
        await self._finish(ctx, Status.COMPLETED, result, None)

    async def _stopped(self, held: _Held) -> None:
        task = asyncio.current_task()
        reason = held.stop_reason
        if task is not None and reason is not None:
            task.uncancel()
        if reason == "cancelled":
            await self._finish(held.ctx, Status.CANCELLED, None, CANCELLED_ERROR)
        elif reason == "lease_lost":
            self._lost(held.ctx)
        else:
            # Shutdown, or the event loop is closing under us: hand the run back at once.
            await asyncio.shield(self._release(held.ctx))
            if reason is None:
                raise asyncio.CancelledError

    def _lost(self, ctx: RunContext) -> None:
        self.counts["lease_lost"] += 1
        logger.warning("task %s: lease lost (attempt %s); stopped", ctx.key.path, ctx.attempt)

    async def _finish(
        self, ctx: RunContext, status: Status, final_value: Any, error: dict[str, Any] | None
    ) -> None:
        if await self.finish(ctx, status, final_value, error) is None:
            self._lost(ctx)

    async def finish(
        self,
        ctx: RunContext,
        status: Status,
        final_value: Any = None,
        error: dict[str, Any] | None = None,
    ) -> int | None:
        """The terminal write of ``ctx``'s attempt, once, retried through an outage.

        The last seq, or None when the attempt was fenced off (or had finished already).
        """
        if ctx.finished:
            return None
        ctx.finished = True
        seq: int | None = await retrying(
            lambda: self.store.finish(ctx.run_id, ctx.attempt, status, final_value, error),
            self.cfg.finish_retry_for,
        )
        if seq is not None:
            self.counts[str(status)] += 1
            logger.info(
                "task %s %s (run %s, attempt %s)", ctx.key.path, status, ctx.run_id, ctx.attempt
            )
        return seq

    async def _release(self, ctx: RunContext) -> None:
        try:
            released = await self.store.release(ctx.run_id, ctx.attempt)
        except DatabaseUnavailable:
            logger.warning(
                "task %s: release failed; it is reclaimed when its lease expires", ctx.key.path
            )
            return
        if released:
            self.counts["released"] += 1
            logger.info(
                "task %s released for another worker (run %s, attempt %s)",
                ctx.key.path,
                ctx.run_id,
                ctx.attempt,
            )

    # -- stopping -------------------------------------------------------------------------

    def stop_local(self, run_id: int, reason: str) -> bool:
        """Cancel the process() of a run held here; False when it is not held here."""
        held = self.running.get(run_id)
        return held is not None and self._stop(held, reason)

    @staticmethod
    def _stop(held: _Held, reason: str) -> bool:
        if held.task is None or held.ctx.finished:
            return False
        if held.stop_reason is None:
            # Once only: a second cancel() would land in the finishing write of the first
            # and abort it, leaving the run "running" until its lease expired. A task that
            # has not begun is not cancelled (it would never run, nor clean up): it reads
            # the reason when it begins.
            held.stop_reason = reason
            if held.started:
                held.task.cancel()
        return True

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.heartbeat_interval)
            try:
                await self.heartbeat()
            except Exception as exc:
                # Loop boundary: a dead heartbeat loop would let every lease here expire
                # while the tasks go on running (fenced off, their work lost).
                if not isinstance(exc, DatabaseUnavailable):
                    logger.exception("heartbeat failed")
                if time.monotonic() - self._last_renewal > self.cfg.lease_ttl:
                    for run_id in list(self.running):
                        self.stop_local(run_id, "lease_lost")

    async def heartbeat(self) -> None:
        """Renew every lease held here; stop the runs whose lease is gone or cancelled."""
        held = [h.ctx for h in self.running.values() if not h.ctx.finished]
        if not held:
            self._last_renewal = time.monotonic()
            return
        renewed = await self.store.heartbeat(
            self.owner, self.cfg.lease_ttl, [(c.run_id, c.attempt) for c in held]
        )
        self._last_renewal = time.monotonic()
        for ctx in held:
            if ctx.run_id not in renewed:
                self.stop_local(ctx.run_id, "lease_lost")
            elif renewed[ctx.run_id]:
                self.stop_local(ctx.run_id, "cancelled")

    async def shutdown(self, grace: float) -> None:
        """Stop claiming, let running tasks finish for ``grace`` s, release the rest."""
        self.claiming = False
        self._wake.set()
        pending = [h.task for h in self.running.values() if h.task is not None]
        if pending:
            logger.info("waiting up to %ss for %s running task(s)", grace, len(pending))
            _, still = await asyncio.wait(pending, timeout=grace)
            for run_id in list(self.running):
                self.stop_local(run_id, "shutdown")
            if still:
                await asyncio.wait(still, timeout=5)
        for loop_task in self._loops:
            loop_task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops = []

    def counters(self) -> dict[str, int]:
        out = {f"worker_tasks_{k}_total": v for k, v in self.counts.items()}
        out["worker_running_tasks"] = len(self.running)
        return out
