"""The HTTP API: one small asgineer handler per route, SSE streaming from the hub."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from typing import Any
from urllib.parse import quote

import asgineer
from asgiref.sync import sync_to_async
from django.core.exceptions import FieldDoesNotExist, ValidationError
from django.db import OperationalError as DjangoOperationalError

from streaming import events, log, page, registry, runtime
from streaming.coordinator import coordinator
from streaming.events import FINISHED, TaskKey
from streaming.exceptions import DatabaseUnavailable, UnknownTaskModel
from streaming.hub import Subscription
from streaming.models import StreamTask

logger = logging.getLogger(__name__)

Response = tuple[int, dict[str, str], Any]
Row = tuple[Any, ...]
NOT_FOUND: Response = (404, {"content-type": "application/json"}, '{"error": "not found"}')
SSE_HEADERS = {"content-type": "text/event-stream", "cache-control": "no-cache",
               "x-accel-buffering": "no"}
_INT = re.compile(r"\d{1,18}")


class BadRequest(Exception):
    """Malformed input: answered with a 400 and the message."""


def _error(status: int, message: str, **extra: Any) -> Response:
    return status, {"content-type": "application/json"}, json.dumps({"error": message, **extra})


def _int(text: str, what: str) -> int:
    if not _INT.fullmatch(text):
        raise BadRequest(f"{what} must be a non-negative integer")
    return int(text)


class StreamServer:
    """The routes, plus the open streams so that shutdown can close them."""

    def __init__(self) -> None:
        self.streams: set[Subscription] = set()
        self.closing = False
        self.requests = 0

    async def __call__(self, request: asgineer.HttpRequest) -> Any:
        self.requests += 1
        parts = [p for p in request.path.split("/") if p]
        try:
            return await self._route(request, parts)
        except BadRequest as exc:
            return _error(400, str(exc))
        except UnknownTaskModel:
            return NOT_FOUND
        except (DatabaseUnavailable, DjangoOperationalError):
            # Postgres is restarting or unreachable: a clear, retryable answer, not a 500.
            logger.warning("%s %s: database unavailable", request.method, request.path)
            return 503, {"content-type": "application/json", "retry-after": "1"}, (
                '{"error": "database unavailable, retry"}')

    async def _route(self, request: asgineer.HttpRequest, parts: list[str]) -> Any:
        method = request.method
        if parts == ["health"] and method in ("GET", "HEAD"):
            return 200, {"content-type": "text/plain"}, "OK"
        if parts == ["metrics"] and method == "GET":
            return await self.metrics()
        if parts[:1] == ["stream"] and len(parts) in (3, 4) and method == "GET":
            app = parts[1] if len(parts) == 4 else None
            return await self.stream(request, app, parts[-2], parts[-1])
        if parts[:1] == ["tasks"]:
            return await self._route_tasks(request, parts[1:], method)
        if parts[:1] == ["watch"] and len(parts) in (3, 4) and method == "GET":
            return await self.watch(request, parts[1] if len(parts) == 4 else None, *parts[-2:])
        return NOT_FOUND

    async def _route_tasks(self, request: asgineer.HttpRequest, rest: list[str],
                           method: str) -> Any:
        if len(rest) == 2 and method == "POST":
            return await self.create(request, rest[0], rest[1])
        if len(rest) == 3 and method == "GET":
            return await self.status(request, *rest)
        if len(rest) == 4 and rest[3] == "cancel" and method == "POST":
            return await self.cancel(request, *rest[:3])
        return NOT_FOUND

    # -- lookups --------------------------------------------------------------------------

    async def _visible(self, request: asgineer.HttpRequest, app: str | None, model_name: str,
                       raw_id: str) -> tuple[type[StreamTask], TaskKey, Row | None] | None:
        """The model, key and run row of a task the caller may see; None answers a 404."""
        task_id = _int(raw_id, "task id")
        model = registry.resolve(app, model_name)
        key = TaskKey(model._meta.app_label, model._meta.object_name or "", task_id)
        token = request.querydict.get("token")
        if getattr(model, "require_signed_url", False) and not (
                token and coordinator.check_token(key, token)):
            return None
        if not model.can_view(task_id, dict(request.headers)):
            return None
        rt = await runtime.current()
        run = await rt.db.fetchone("get_run", {"app_label": key.app_label,
                                               "model_name": key.model_name,
                                               "task_id": key.task_id})
        # A run is only ever created for an existing task (and deleted with it), so a task
        # that has one needs no ORM query: the SSE server then holds no Django connection.
        if run is None and not await model._default_manager.filter(pk=task_id).aexists():
            return None
        return model, key, run

    # -- routes ---------------------------------------------------------------------------

    async def stream(self, request: asgineer.HttpRequest, app: str | None, model_name: str,
                     raw_id: str) -> Any:
        after = self._last_event_id(request)
        found = await self._visible(request, app, model_name, raw_id)
        if found is None:
            return NOT_FOUND
        model, key, run = found
        rt = await runtime.current()
        run_id, status, last_seq = await self._run_of(rt, model, key, run)
        wants_sse = "text/event-stream" in request.headers.get("accept", "") or after is not None
        if status in FINISHED and not wants_sse:
            return 200, {"content-type": "application/json"}, _finished_json(run)
        if status in FINISHED and after is not None and after >= last_seq:
            return 204, {}, b""
        await self._follow(request, rt, run_id, key, after or 0)
        return None

    @staticmethod
    def _last_event_id(request: asgineer.HttpRequest) -> int | None:
        raw = request.headers.get("last-event-id")
        if raw is None:
            raw = request.querydict.get("last_event_id")
        if raw is None or raw.strip() == "":
            return None
        return _int(raw.strip(), "Last-Event-ID")

    @staticmethod
    async def _run_of(rt: runtime.Runtime, model: type[StreamTask], key: TaskKey,
                      run: Row | None) -> tuple[int, str, int]:
        if run is None:  # a GET on a never-started task queues it
            run_id, _ = await coordinator.enqueue_key(model, key)
            await rt.notifier.flush()
            return run_id, "pending", 0
        return run[0], run[1], run[3]

    async def _follow(self, request: asgineer.HttpRequest, rt: runtime.Runtime, run_id: int,
                      key: TaskKey, after: int) -> None:
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
                await request.send(batch[0].frame if len(batch) == 1 else
                                   b"".join([ev.frame for ev in batch]) or events.KEEPALIVE_FRAME)
        finally:
            watcher.cancel()
            self.streams.discard(sub)
            rt.hub.unsubscribe(sub)

    async def watch(self, request: asgineer.HttpRequest, app: str | None, model_name: str,
                    raw_id: str) -> Any:
        """An HTML page that follows the task's stream with EventSource."""
        found = await self._visible(request, app, model_name, raw_id)
        if found is None:
            return NOT_FOUND
        _, key, _run = found
        rt = await runtime.current()
        rows = await rt.db.fetchall("event_types", {"app_label": key.app_label,
                                                    "model_name": key.model_name,
                                                    "task_id": key.task_id})
        wanted = [t for t in request.querydict.get("types", "").split(",")
                  if events.EVENT_TYPE_RE.fullmatch(t)]
        stream_url = f"/stream/{key.path}"
        if request.querydict.get("token"):
            stream_url += "?token=" + quote(request.querydict["token"], safe="")
        body = page.render(key, stream_url, tuple(r[0] for r in rows) + tuple(wanted))
        return 200, {"content-type": "text/html; charset=utf-8"}, body

    async def status(self, request: asgineer.HttpRequest, app: str, model_name: str,
                     raw_id: str) -> Any:
        found = await self._visible(request, app, model_name, raw_id)
        if found is None:
            return NOT_FOUND
        _, key, run = found
        return 200, {"content-type": "application/json"}, json.dumps(_status_json(key, run))

    async def cancel(self, request: asgineer.HttpRequest, app: str, model_name: str,
                     raw_id: str) -> Any:
        found = await self._visible(request, app, model_name, raw_id)
        if found is None:
            return NOT_FOUND
        _, key, _run = found
        if not await coordinator.cancel_task(key.app_label, key.model_name, key.task_id):
            return _error(409, "the task is finished or was never started")
        return 202, {"content-type": "application/json"}, json.dumps(
            {"id": key.task_id, "cancel_requested": True})

    async def create(self, request: asgineer.HttpRequest, app: str, model_name: str) -> Any:
        model = registry.resolve(app, model_name)
        if not model.allow_http_create:
            return NOT_FOUND
        try:
            body = await request.get_json(limit=1 << 20)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"body must be a JSON object: {exc}") from exc
        if not isinstance(body, dict):
            raise BadRequest("body must be a JSON object of field values")
        task, errors = await sync_to_async(_build_task)(model, body)
        if errors:
            return _error(400, "invalid fields", errors=errors)
        assert task is not None
        await task.asave()
        rt = await runtime.current()
        await coordinator.start_task(task, run_here=rt.worker.claiming)
        await rt.notifier.flush()
        key = registry.key_of(task)
        return 201, {"content-type": "application/json"}, json.dumps({
            "id": key.task_id, "app": key.app_label, "model": key.model_name,
            "status": "pending", "stream_url": f"/stream/{key.path}"})

    async def metrics(self) -> Any:
        rt = await runtime.current()
        lines = [f"streaming_worker_tasks_{k}_total {v}" for k, v in rt.worker.counters.items()]
        lines += [
            f"streaming_worker_running_tasks {len(rt.worker.running)}",
            f"streaming_listener_reconnects_total {rt.hub.reconnects}",
            f"streaming_listener_up {int(rt.hub.listening)}",
            f"streaming_connected_clients {len(self.streams)}",
            f"streaming_hub_fetches_total {rt.hub.fetches}",
            f"streaming_db_queries_total {rt.db.queries_run}",
            f"streaming_log_recent_hits_total {log.recent(rt.db).hits}",
            f"streaming_log_readahead_hits_total {log.read_ahead(rt.db).hits}",
            f"streaming_events_appended_total {rt.appender.appended}",
            f"streaming_append_batches_total {rt.appender.batches}",
            f"streaming_notifications_sent_total {rt.notifier.sent}",
            f"streaming_http_requests_total {self.requests}",
        ]
        return 200, {"content-type": "text/plain; version=0.0.4"}, "\n".join(lines) + "\n"

    def close_streams(self) -> None:
        """End every open stream (shutdown): clients reconnect, to another host if need be."""
        self.closing = True
        for sub in list(self.streams):
            sub.close()


async def _watch_disconnect(request: asgineer.HttpRequest, sub: Subscription) -> None:
    # uvicorn drops writes to a gone client silently: notice the disconnect ourselves. Wait on
    # the request's receive channel (whose last message is the disconnect) rather than with
    # sleep_while_connected, which runs three more tasks per call: at thousands of idle
    # streams those are a third of the memory each one costs (asgineer is pinned, 0.9.5).
    with contextlib.suppress(asgineer.DisconnectedError, OSError):
        while True:
            await request._receive_chunk()
    sub.close()


def _build_task(model: type[StreamTask], body: dict[str, Any]
                ) -> tuple[StreamTask | None, dict[str, list[str]]]:
    errors: dict[str, list[str]] = {}
    values: dict[str, Any] = {}
    for name, value in body.items():
        try:
            field = model._meta.get_field(name)
        except FieldDoesNotExist:
            errors[name] = ["unknown field"]
            continue
        if not getattr(field, "editable", False) or getattr(field, "primary_key", False) or (
                name in ("created_at", "updated_at", "completed_at", "final_value")):
            errors[name] = ["this field cannot be set"]
            continue
        values[getattr(field, "attname", name)] = value
    if errors:
        return None, errors
    task = model(**values)
    try:
        task.full_clean(exclude=["created_at", "updated_at"])
    except ValidationError as exc:
        return None, {k: [str(m) for m in v] for k, v in exc.message_dict.items()}
    return task, {}


def _finished_json(run: tuple[Any, ...] | None) -> str:
    assert run is not None
    _id, status, _attempt, _last, final_value, error, _started, finished_at, *_ = run
    out: dict[str, Any] = {"status": status, "final_value": final_value,
                           "completed_at": events.iso(finished_at) if finished_at else None}
    if status != "completed":
        out["error"] = error
    return json.dumps(out)


def _status_json(key: TaskKey, row: tuple[Any, ...] | None) -> dict[str, Any]:
    out: dict[str, Any] = {"id": key.task_id, "app": key.app_label, "model": key.model_name,
                           "status": "pending", "started": False, "attempt": 0, "started_at": None,
                           "completed_at": None, "final_value": None, "error": None,
                           "last_seq": 0, "stream_url": f"/stream/{key.path}"}
    if row is not None:
        _id, status, attempt, last_seq, final_value, error, started, finished, *_ = row
        out.update(status=status, started=True, attempt=attempt, last_seq=last_seq,
                   final_value=final_value, error=error,
                   started_at=events.iso(started) if started else None,
                   completed_at=events.iso(finished) if finished else None)
    return out


def build_app(server: StreamServer | None = None) -> Any:
    """The ASGI application (call after Django is set up)."""
    server = server or StreamServer()

    async def handler(request: asgineer.HttpRequest) -> Any:
        return await server(request)

    app = asgineer.to_asgi(handler)
    app.stream_server = server
    return app
