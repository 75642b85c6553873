"""The HTTP API: routing, and SSE streaming from the hub (one small asgineer handler per route)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import asgineer
from asgiref.sync import sync_to_async
from django.db import OperationalError as DjangoOperationalError

from streaming import conf, creation, events, metrics, page, registry, runtime
from streaming.coordinator import coordinator
from streaming.db import retrying
from streaming.events import Status, TaskKey
from streaming.exceptions import DatabaseUnavailable, InvalidFields, NotFound
from streaming.hub import Subscription
from streaming.orm import discard_broken_django_connections
from streaming.runs import Run

logger = logging.getLogger(__name__)

Response = tuple[int, dict[str, str], str | bytes]
JSON = {"content-type": "application/json"}
NOT_FOUND: Response = (404, JSON, '{"error": "not found"}')
SSE_HEADERS = {
    "content-type": "text/event-stream",
    "cache-control": "no-cache",
    "x-accel-buffering": "no",
}
_INT = re.compile(r"\d{1,18}")


class BadRequest(Exception):
    """Malformed input: answered with a 400 and the message."""


def _json(status: int, body: Any, **headers: str) -> Response:
    return status, {**JSON, **headers}, json.dumps(body)


def _int(text: str, what: str) -> int:
    if not _INT.fullmatch(text):
        raise BadRequest(f"{what} must be a non-negative integer")
    return int(text)


@dataclass(frozen=True)
class Found:
    """A task the caller may see: its model, identity and run (None: never started)."""

    model: registry.TaskModel
    key: TaskKey
    run: Run | None


class StreamServer:
    """The routes, plus the open streams so that shutdown can close them."""

    def __init__(self) -> None:
        self.streams: set[Subscription] = set()
        self.requests = 0

    async def __call__(self, request: asgineer.HttpRequest) -> Response | None:
        self.requests += 1
        parts = [p for p in request.path.split("/") if p]
        try:
            return await self._route_waiting(request, parts)
        except BadRequest as exc:
            return _json(400, {"error": str(exc)})
        except NotFound:
            return NOT_FOUND
        except InvalidFields as exc:
            return _json(400, {"error": "invalid fields", "errors": exc.errors})
        except (DatabaseUnavailable, DjangoOperationalError):
            # Postgres is restarting or unreachable: a clear, retryable answer, not a 500.
            logger.warning("%s %s: database unavailable", request.method, request.path)
            return _json(503, {"error": "database unavailable, retry"}, **{"retry-after": "1"})

    async def _route_waiting(
        self, request: asgineer.HttpRequest, parts: list[str]
    ) -> Response | None:
        """Route, waiting out a database blip (a restart, a failover) for DATABASE_WAIT s.

        Safe to repeat: every route reads, or writes idempotently (a GET's enqueue, a
        cancel request), before it answers. Creation is the exception: it waits inside, for
        what may be repeated only. A stream that has started answering handles outages
        itself and never comes back here.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + conf.get().DATABASE_WAIT
        creating = request.method == "POST" and len(parts) == 3 and parts[0] == "tasks"
        delay = 0.05
        while True:
            try:
                return await self._route(request, parts)
            except (DatabaseUnavailable, DjangoOperationalError):
                if creating or loop.time() + delay > deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
            await sync_to_async(discard_broken_django_connections)()

    async def _route(self, request: asgineer.HttpRequest, parts: list[str]) -> Response | None:
        method = request.method
        head, rest = (parts[0], parts[1:]) if parts else ("", [])
        if parts == ["health"] and method in ("GET", "HEAD"):
            return 200, {"content-type": "text/plain"}, "OK"
        if parts == ["metrics"] and method == "GET":
            return await self.metrics()
        if head == "stream" and len(rest) in (2, 3) and method == "GET":
            return await self.stream(request, await self._find(request, rest))
        if head == "watch" and len(rest) in (2, 3) and method == "GET":
            return await self.watch(request, await self._find(request, rest))
        if head == "tasks" and len(rest) == 2 and method == "POST":
            return await self.create(request, rest[0], rest[1])
        if head == "tasks" and len(rest) == 3 and method == "GET":
            return await self.status(await self._find(request, rest))
        if head == "tasks" and len(rest) == 4 and rest[3] == "cancel" and method == "POST":
            return await self.cancel(await self._find(request, rest[:3]))
        return NOT_FOUND

    async def _find(self, request: asgineer.HttpRequest, names: list[str]) -> Found:
        """The task ``[app,] model, id`` names, if the caller may see it; else NotFound."""
        app = names[0] if len(names) == 3 else None
        task_id = _int(names[-1], "task id")
        model = registry.resolve(app, names[-2])
        key = registry.key_of_model(model, task_id)
        token = request.querydict.get("token")
        if model.require_signed_url and not (token and coordinator.check_token(key, token)):
            raise NotFound(key.path)
        if not model.can_view(task_id, dict(request.headers)):
            raise NotFound(key.path)
        rt = await runtime.current()
        run = await rt.store.get(key)
        # A run is only ever created for an existing task (and deleted with it), so a task
        # that has one needs no ORM query: the SSE server then holds no Django connection.
        if run is None and not await model._default_manager.filter(pk=task_id).aexists():
            raise NotFound(key.path)
        return Found(model, key, run)

    # -- routes ---------------------------------------------------------------------------

    async def stream(self, request: asgineer.HttpRequest, found: Found) -> Response | None:
        after = _last_event_id(request)
        run = found.run
        if run is not None and run.finished:
            wants_sse = "text/event-stream" in request.headers.get("accept", "")
            if after is None and not wants_sse:
                return _json(200, _finished_json(run))
            if after is not None and after >= run.last_seq:
                return 204, {}, b""
        if run is None:  # a GET on a never-started task queues it
            queued = await coordinator.enqueue_key(found.model, found.key)
            rt = await runtime.current()
            await rt.notifier.flush()
            run_id, last_seq = queued.run_id, 0
        else:
            run_id, last_seq = run.id, run.last_seq
        # A Last-Event-ID past the log's end (a client that followed another database, or a
        # task whose log was deleted) resumes from the end: the client then gets what comes
        # next, the task's ``end`` included, so its stream closes once the task finishes.
        await self._follow(request, run_id, found.key, min(after or 0, last_seq))
        return None

    async def _follow(
        self, request: asgineer.HttpRequest, run_id: int, key: TaskKey, after: int
    ) -> None:
        rt = await runtime.current()
        sub = rt.hub.subscribe(run_id, key, after)
        self.streams.add(sub)
        watcher = asyncio.get_running_loop().create_task(_watch_disconnect(request, sub))
        try:
            await request.accept(200, SSE_HEADERS)
            await request.send(events.retry_frame(rt.settings.SSE_RETRY_MS))
            async for batch in sub.batches(rt.settings.KEEPALIVE_INTERVAL):
                if sub.closed:
                    break
                # Pending events go out joined, in one write: one send per wake-up, not per event.
                await request.send(
                    batch[0].frame
                    if len(batch) == 1
                    else b"".join([ev.frame for ev in batch]) or events.KEEPALIVE_FRAME
                )
        finally:
            watcher.cancel()
            self.streams.discard(sub)
            rt.hub.unsubscribe(sub)

    async def watch(self, request: asgineer.HttpRequest, found: Found) -> Response:
        """An HTML page that follows the task's stream with EventSource."""
        rt = await runtime.current()
        logged = await rt.log.event_types(found.key)
        wanted = [
            t
            for t in request.querydict.get("types", "").split(",")
            if events.EVENT_TYPE_RE.fullmatch(t)
        ]
        stream_url = found.key.stream_path
        if request.querydict.get("token"):
            stream_url += "?token=" + quote(request.querydict["token"], safe="")
        body = page.render(found.key, stream_url, tuple(logged) + tuple(wanted))
        return 200, {"content-type": "text/html; charset=utf-8"}, body

    async def status(self, found: Found) -> Response:
        return _json(200, _status_json(found.key, found.run))

    async def cancel(self, found: Found) -> Response:
        key = found.key
        if not await coordinator.cancel_task(key.app_label, key.model_name, key.task_id):
            return _json(409, {"error": "the task is finished or was never started"})
        return _json(202, {"id": key.task_id, "cancel_requested": True})

    async def create(self, request: asgineer.HttpRequest, app: str, model_name: str) -> Response:
        model = registry.resolve(app, model_name)
        if not model.allow_http_create:
            raise NotFound(model_name)
        try:
            body = await request.get_json(limit=1 << 20)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"body must be a JSON object: {exc}") from exc
        if not isinstance(body, dict):
            raise BadRequest("body must be a JSON object of field values")
        wait = conf.get().DATABASE_WAIT
        task = await creation.create(model, body, wait)
        rt = await runtime.current()
        await retrying(lambda: coordinator.start_task(task, run_here=rt.worker.claiming), wait)
        key = registry.key_of(task)
        return _json(
            201,
            {
                "id": key.task_id,
                "app": key.app_label,
                "model": key.model_name,
                "status": Status.PENDING,
                "stream_url": key.stream_path,
            },
        )

    async def metrics(self) -> Response:
        rt = await runtime.current()
        text = metrics.render(
            rt.counters(),
            {"connected_clients": len(self.streams), "http_requests_total": self.requests},
        )
        return 200, {"content-type": "text/plain; version=0.0.4"}, text

    def close_streams(self) -> None:
        """End every open stream (shutdown): clients reconnect, to another host if need be."""
        for sub in list(self.streams):
            sub.close()


def _last_event_id(request: asgineer.HttpRequest) -> int | None:
    raw = request.headers.get("last-event-id")
    if raw is None:
        raw = request.querydict.get("last_event_id")
    if raw is None or raw.strip() == "":
        return None
    return _int(raw.strip(), "Last-Event-ID")


async def _watch_disconnect(request: asgineer.HttpRequest, sub: Subscription) -> None:
    # uvicorn drops writes to a gone client silently: notice the disconnect ourselves. Wait on
    # the request's receive channel (whose last message is the disconnect) rather than with
    # sleep_while_connected, which runs three more tasks per call: at thousands of idle
    # streams those are a third of the memory each one costs (asgineer is pinned, 0.9.5).
    with contextlib.suppress(asgineer.DisconnectedError, OSError):
        while True:
            await request._receive_chunk()
    sub.close()


def _finished_json(run: Run) -> dict[str, Any]:
    """The seed's summary of a finished task."""
    out: dict[str, Any] = {
        "status": run.status,
        "final_value": run.final_value,
        "completed_at": _iso(run.finished_at),
    }
    if run.status != Status.COMPLETED:
        out["error"] = run.error
    return out


def _status_json(key: TaskKey, run: Run | None) -> dict[str, Any]:
    return {
        "id": key.task_id,
        "app": key.app_label,
        "model": key.model_name,
        "status": run.status if run else Status.PENDING,
        "started": run is not None,
        "attempt": run.attempt if run else 0,
        "started_at": _iso(run.started_at) if run else None,
        "completed_at": _iso(run.finished_at) if run else None,
        "final_value": run.final_value if run else None,
        "error": run.error if run else None,
        "last_seq": run.last_seq if run else 0,
        "stream_url": key.stream_path,
    }


def _iso(moment: Any) -> str | None:
    return events.iso(moment) if moment else None


def build_app(server: StreamServer | None = None) -> Any:
    """The ASGI application (call after Django is set up)."""
    server = server or StreamServer()

    async def handler(request: asgineer.HttpRequest) -> Response | None:
        return await server(request)

    app = asgineer.to_asgi(handler)
    app.stream_server = server
    return app
