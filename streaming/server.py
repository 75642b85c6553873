"""The HTTP API: routing, guards and SSE streaming from the hub (one small handler per route)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import parse_qsl, quote

import asgineer
from asgiref.sync import sync_to_async
from django.conf import settings as django_settings
from django.core.exceptions import ImproperlyConfigured
from django.db import OperationalError as DjangoOperationalError

from streaming import conf, creation, events, guard, metrics, page, registry, runtime, tokens
from streaming.coordinator import coordinator
from streaming.db import retrying
from streaming.events import Status, TaskKey
from streaming.exceptions import (
    DatabaseUnavailable,
    InvalidFields,
    NotFound,
)
from streaming.hub import Subscription
from streaming.orm import discard_broken_django_connections
from streaming.policy import Action, Policy, Request, uses_tokens
from streaming.policy import load as load_policy
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
_INT = re.compile(r"[0-9]{1,18}")  # ASCII digits only, not any Unicode digit


class HttpError(Exception):
    """An answer other than a 2xx: status, message, extra headers."""

    def __init__(self, status: int, message: str, **headers: str) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


class BadRequest(HttpError):
    """Malformed input: answered with a 400 and the message."""

    def __init__(self, message: str) -> None:
        super().__init__(400, message)


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


@dataclass
class Call:
    """One request as the routes see it: the asgineer request, the policy's view of it,
    and the headers every answer to it carries (CORS)."""

    http: asgineer.HttpRequest
    who: Request
    headers: dict[str, str] = field(default_factory=dict)


class StreamServer:
    """The routes, plus the open streams so that shutdown can close them."""

    def __init__(
        self, policy: Policy | None = None, settings: conf.StreamingSettings | None = None
    ) -> None:
        settings = settings or conf.get()
        self.policy = policy or load_policy(settings)
        self.settings = settings
        check_secret_key(self.policy)
        self.streams: set[Subscription] = set()
        self.closing = False  # shutting down: a stream that opens now ends at once
        self.requests = 0
        self.refused = 0
        self.quotas = guard.Quotas(settings.MAX_STREAMS_PER_CLIENT, settings.CREATES_PER_MINUTE)

    async def __call__(self, request: asgineer.HttpRequest) -> Response | None:
        self.requests += 1
        call = self._call(request)
        try:
            answer = await self._guarded(call)
        except HttpError as exc:
            answer = _json(exc.status, {"error": str(exc)}, **exc.headers)
        except NotFound:
            answer = NOT_FOUND
        except InvalidFields as exc:
            answer = _json(400, {"error": "invalid fields", "errors": exc.errors})
        except (DatabaseUnavailable, DjangoOperationalError):
            # Postgres is restarting or unreachable: a clear, retryable answer, not a 500.
            logger.warning("%s %s: database unavailable", request.method, request.path)
            answer = _json(503, {"error": "database unavailable, retry"}, **{"retry-after": "1"})
        except Exception:
            # The handler's boundary: a bug. Logged with its traceback; the client gets no
            # internals (asgineer's own 500 would echo the exception).
            logger.exception("%s %s failed", request.method, request.path)
            answer = _json(500, {"error": "internal error"})
        if answer is None:
            return None
        status, headers, body = answer
        if status >= 400:
            self.refused += 1
        return status, {**headers, **call.headers}, body

    def _call(self, request: asgineer.HttpRequest) -> Call:
        headers = headers_of(request.scope)
        peer = (request.scope.get("client") or ("", 0))[0] or ""
        who = Request(
            method=request.method,
            path=request.path,
            headers=headers,
            query=_query(request.scope),
            cookies=_cookies(headers.get("cookie", "")),
            client=guard.client_address(peer, headers, self.settings),
        )
        return Call(request, who, guard.cors_headers(headers.get("origin"), self.settings))

    async def _guarded(self, call: Call) -> Response | None:
        request = call.http
        if not guard.host_allowed(
            call.who.headers.get("host"), list(django_settings.ALLOWED_HOSTS), django_settings.DEBUG
        ):
            raise BadRequest("invalid Host header")
        if request.method == "OPTIONS":
            return self._preflight(call)
        parts = [p for p in request.path.split("/") if p]
        return await self._route_waiting(call, parts)

    @staticmethod
    def _preflight(call: Call) -> Response:
        if "access-control-allow-origin" not in call.headers:  # not an allowed origin
            raise HttpError(403, "origin not allowed")
        return 204, dict(guard.PREFLIGHT), b""

    async def _route_waiting(self, call: Call, parts: list[str]) -> Response | None:
        """Route, waiting out a database blip (a restart, a failover) for DATABASE_WAIT s.

        Safe to repeat: every route reads, or writes idempotently (a GET's enqueue, a
        cancel request), before it answers. Creation is the exception: it waits inside, for
        what may be repeated only. A stream that has started answering handles outages
        itself and never comes back here.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.DATABASE_WAIT
        creating = call.http.method == "POST" and len(parts) == 3 and parts[0] == "tasks"
        delay = 0.05
        while True:
            try:
                return await self._route(call, parts)
            except (DatabaseUnavailable, DjangoOperationalError):
                if creating or loop.time() + delay > deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
            await sync_to_async(discard_broken_django_connections)()

    async def _route(self, call: Call, parts: list[str]) -> Response | None:
        method = call.http.method
        head, rest = (parts[0], parts[1:]) if parts else ("", [])
        if parts == ["health"] and method in ("GET", "HEAD"):
            return 200, {"content-type": "text/plain"}, "OK"
        if parts == ["metrics"] and method == "GET":
            return await self.metrics(call)
        if head == "stream" and len(rest) in (2, 3) and method == "GET":
            return await self.stream(call, await self._find(call, rest))
        if head == "watch" and len(rest) in (2, 3) and method == "GET":
            return await self.watch(call, await self._find(call, rest))
        if head == "tasks" and len(rest) == 2 and method == "POST":
            _check_post(call, self.settings, body=True)
            return await self.create(call, rest[0], rest[1])
        if head == "tasks" and len(rest) == 3 and method == "GET":
            return await self.status(await self._find(call, rest))
        if head == "tasks" and len(rest) == 4 and rest[3] == "cancel" and method == "POST":
            _check_post(call, self.settings, body=False)
            return await self.cancel(call, await self._find(call, rest[:3], Action.CANCEL))
        return NOT_FOUND

    async def _allowed(self, call: Call, action: Action, model: Any, key: TaskKey | None) -> bool:
        return await self.policy(call.who, action, model, key)

    async def _find(self, call: Call, names: list[str], action: Action = Action.VIEW) -> Found:
        """The task ``[app,] model, id`` names, if the caller may ``action`` it.

        Refusals of ``view`` are the same 404 as an unknown task; of another action, a 403
        when the caller may view the task, else the same 404.
        """
        app = names[0] if len(names) == 3 else None
        task_id = _int(names[-1], "task id")
        model = registry.resolve(app, names[-2])
        key = registry.key_of_model(model, task_id)
        if not await self._allowed(call, action, model, key):
            if action != Action.VIEW and await self._allowed(call, Action.VIEW, model, key):
                raise HttpError(403, f"not allowed to {action} this task")
            raise NotFound(key.path)
        rt = await runtime.current()
        run = await rt.store.get(key)
        # A run is only ever created for an existing task (and deleted with it), so a task
        # that has one needs no ORM query: the SSE server then holds no Django connection.
        if run is None and not await model._default_manager.filter(pk=task_id).aexists():
            raise NotFound(key.path)
        return Found(model, key, run)

    # -- routes ---------------------------------------------------------------------------

    async def stream(self, call: Call, found: Found) -> Response | None:
        after = _last_event_id(call)
        run = found.run
        if run is not None and run.finished:
            wants_sse = "text/event-stream" in call.who.headers.get("accept", "")
            if after is None and not wants_sse:
                return _json(200, _finished_json(run))
            if after is not None and after >= run.last_seq:
                return 204, {}, b""
        if run is None:  # a GET on a never-started task queues it, if the caller may start it
            if not await self._allowed(call, Action.START, found.model, found.key):
                # The caller may view it (``_find`` checked), so the refusal is no secret.
                raise HttpError(403, "not allowed to start this task")
            queued = await coordinator.enqueue_key(found.model, found.key)
            rt = await runtime.current()
            await rt.notifier.flush()
            run_id, last_seq = queued.run_id, 0
        else:
            run_id, last_seq = run.id, run.last_seq
        # A Last-Event-ID past the log's end (a client that followed another database, or a
        # task whose log was deleted) resumes from the end: the client then gets what comes
        # next, the task's ``end`` included, so its stream closes once the task finishes.
        if not self.quotas.open_stream(call.who.client):
            raise HttpError(429, "too many open streams from this address", **{"retry-after": "5"})
        try:
            await self._follow(call, found, run_id, min(after or 0, last_seq))
        finally:
            self.quotas.close_stream(call.who.client)
        return None

    async def _follow(self, call: Call, found: Found, run_id: int, after: int) -> None:
        rt = await runtime.current()
        sub = rt.hub.subscribe(run_id, found.key, after)
        self.streams.add(sub)
        if self.closing:
            # Accepted before shutdown began, streaming only now: it opens and ends at once,
            # so its client reconnects (elsewhere) instead of holding the shutdown up.
            sub.close()
        request = call.http
        loop = asyncio.get_running_loop()
        watchers = [
            loop.create_task(_watch_disconnect(request, sub)),
            loop.create_task(self._recheck(call, found, sub)),
        ]
        try:
            await request.accept(200, {**SSE_HEADERS, **call.headers})
            # A comment first, so that the headers go out now (uvicorn sends them with the
            # first body bytes); the ``retry:`` field rides in the first event's block, as a
            # block of its own would be a data-less event to some clients (httpx-sse).
            await request.send(events.OPEN_FRAME)
            retry: bytes | None = events.retry_field(rt.settings.SSE_RETRY_MS)
            async for batch in sub.batches(rt.settings.KEEPALIVE_INTERVAL):
                if sub.closed:
                    break
                # Pending events go out joined, in one write: one send per wake-up, not per event.
                data = (
                    batch[0].frame
                    if len(batch) == 1
                    else b"".join([ev.frame for ev in batch]) or events.KEEPALIVE_FRAME
                )
                if retry is not None and batch:
                    data, retry = retry + data, None
                # A client that does not read holds this send: past SEND_TIMEOUT it is cut,
                # and resumes with its Last-Event-ID, rather than pinning what it was sent.
                async with asyncio.timeout(self.settings.SEND_TIMEOUT):
                    await request.send(data)
        except TimeoutError:
            logger.info("stream of %s: client not reading; closed", found.key.path)
        finally:
            for watcher in watchers:
                watcher.cancel()
            self.streams.discard(sub)
            rt.hub.unsubscribe(sub)

    async def _recheck(self, call: Call, found: Found, sub: Subscription) -> None:
        """Ask the policy again every POLICY_RECHECK_INTERVAL s: revoked access ends the stream."""
        while not sub.closed:
            await asyncio.sleep(self.settings.POLICY_RECHECK_INTERVAL)
            # Asked afresh: a new Request, so the user (and Django's permission cache on
            # it) is loaded again and a revoked permission or session is seen.
            call = dataclasses.replace(
                call, who=dataclasses.replace(call.who, _user=None, _user_loaded=False)
            )
            try:
                allowed = await self._allowed(call, Action.VIEW, found.model, found.key)
            except Exception:  # a loop boundary: a failing policy is a refusal
                logger.exception("policy check of an open stream of %s failed", found.key.path)
                allowed = False
            if not allowed:
                logger.info("stream of %s: access revoked; closed", found.key.path)
                sub.close()

    async def watch(self, call: Call, found: Found) -> Response:
        """An HTML page that follows the task's stream with EventSource."""
        rt = await runtime.current()
        logged = await rt.log.event_types(found.key)
        query = call.who.query
        wanted = [t for t in query.get("types", "").split(",") if events.EVENT_TYPE_RE.fullmatch(t)]
        stream_url = found.key.stream_path
        if query.get("token"):
            stream_url += "?token=" + quote(query["token"], safe="")
        nonce = secrets.token_urlsafe(16)
        body = page.render(found.key, stream_url, tuple(logged) + tuple(wanted), nonce)
        return 200, page.headers(nonce), body

    async def status(self, found: Found) -> Response:
        return _json(200, _status_json(found.key, found.run))

    async def cancel(self, call: Call, found: Found) -> Response:
        key = found.key
        if not await coordinator.cancel_task(key.app_label, key.model_name, key.task_id):
            return _json(409, {"error": "the task is finished or was never started"})
        return _json(202, {"id": key.task_id, "cancel_requested": True})

    async def create(self, call: Call, app: str, model_name: str) -> Response:
        model = registry.resolve(app, model_name)
        if not model.allow_http_create:
            raise NotFound(model_name)
        if not await self._allowed(call, Action.CREATE, model, None):
            raise HttpError(403, "not allowed to create tasks of this model")
        body = await _json_body(call.http, self.settings.MAX_BODY_BYTES)
        if not self.quotas.create(call.who.client):
            raise HttpError(
                429, "too many tasks created from this address", **{"retry-after": "60"}
            )
        rt = await runtime.current()
        key = registry.key_of_model(model, 0)
        wait = self.settings.DATABASE_WAIT
        # Creation waits out a database blip step by step (it is not retried as a whole).
        active = await retrying(lambda: rt.store.active_count(key), wait)
        if active >= self.settings.MAX_ACTIVE_PER_MODEL:
            raise HttpError(
                429, "too many tasks of this model queued or running", **{"retry-after": "10"}
            )
        task = await creation.create(model, body, wait)
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

    async def metrics(self, call: Call) -> Response:
        if not guard.metrics_allowed(
            call.who.client, call.who.headers.get("authorization"), self.settings
        ):
            raise NotFound("metrics")
        rt = await runtime.current()
        text = metrics.render(
            rt.counters(),
            {
                "connected_clients": len(self.streams),
                "http_requests_total": self.requests,
                "http_refused_total": self.refused,
            },
        )
        return 200, {"content-type": "text/plain; version=0.0.4"}, text

    def close_streams(self) -> None:
        """End every open stream, and any that opens from now on (shutdown): clients
        reconnect, to another host if need be."""
        self.closing = True
        for sub in list(self.streams):
            sub.close()


def check_secret_key(policy: Policy) -> None:
    """Refuse to serve tokens signed with a SECRET_KEY that is public: anyone could forge them."""
    if uses_tokens(policy) and tokens.secret_is_public(str(django_settings.SECRET_KEY)):
        raise ImproperlyConfigured(
            "STREAMING's policy accepts signed tokens, but SECRET_KEY is a public one (the "
            "example project's, or empty): set a secret SECRET_KEY, or name another policy "
            "in STREAMING['POLICY']"
        )


def _check_post(call: Call, settings: conf.StreamingSettings, body: bool) -> None:
    """A POST is JSON (so a cross-site form or ``text/plain`` body cannot be one) and comes
    from no page, the same origin, or an allowed one: together they stop CSRF. A cancel
    takes no body, or a JSON one."""
    kind = call.who.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json" and (body or kind):
        raise HttpError(415, "the body must be application/json")
    headers = call.who.headers
    if not guard.origin_may_post(headers.get("origin"), headers.get("host"), settings):
        raise HttpError(403, "cross-origin request refused")


# Deeper bodies are refused: Python 3.12+ parses nesting past the recursion limit, which
# Django's JSONField, the ORM and jsonb would then meet one by one.
MAX_BODY_DEPTH = 64


async def _json_body(request: asgineer.HttpRequest, limit: int) -> dict[str, Any]:
    """The body as a JSON object: strict (no NaN, no duplicate keys), bounded, storable."""
    try:
        raw = await request.get_body(limit)
    except OSError as exc:
        raise HttpError(413, f"the body is larger than {limit} bytes") from exc
    try:
        body = json.loads(
            raw.decode("utf-8"),
            parse_constant=_no_constant,
            parse_float=_finite,
            object_pairs_hook=_no_duplicates,
        )
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadRequest("the body must be a JSON object of field values") from exc
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object of field values")
    if events.nesting_depth(body) > MAX_BODY_DEPTH:
        raise BadRequest(f"the body nests deeper than {MAX_BODY_DEPTH} levels")
    if events.jsonb_refuses(body):
        raise BadRequest("the body holds NUL characters or unpaired surrogates")
    return body


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e400: JSON has no infinity
        raise ValueError(f"{text} is too large")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate keys")
    return out


def _cookies(header: str) -> dict[str, str]:
    jar: SimpleCookie = SimpleCookie()
    with contextlib.suppress(CookieError):
        jar.load(header)
    return {name: morsel.value for name, morsel in jar.items()}


def headers_of(scope: Mapping[str, Any]) -> dict[str, str]:
    """The request's headers, lower-case names, decoded as latin-1: any byte is valid there
    (asgineer's ``request.headers`` decodes UTF-8 and raises on the rest). A repeated header
    keeps its last value."""
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


def _query(scope: Mapping[str, Any]) -> dict[str, str]:
    """The query string's parameters; bytes that are not UTF-8 become U+FFFD (none of the
    parameters the server reads can hold them: they are refused later, as malformed)."""
    text = scope.get("query_string", b"").decode("latin-1")
    return dict(parse_qsl(text, keep_blank_values=True, encoding="utf-8", errors="replace"))


def _last_event_id(call: Call) -> int | None:
    raw = call.who.headers.get("last-event-id")
    if raw is None:
        raw = call.who.query.get("last_event_id")
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
