"""The HTTP client for a streaming server: task status, task creation and resumable event streams.

Built on httpx and httpx-sse only (no Django), so any Python program can use it. Every
error it raises is also an ``httpx`` error, so code that already handles ``httpx.HTTPError``
keeps working.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
from httpx_sse import ServerSentEvent, aconnect_sse, connect_sse

from streaming.exceptions import StreamingError

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "http://127.0.0.1:8888"
END_EVENT = "end"
# Answers worth another try: the server or a proxy in front of it is briefly unavailable.
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class TaskNotFound(StreamingError, httpx.HTTPStatusError):
    """The server answered 404: no such task or task model, or the caller may not see it."""


class InvalidTaskFields(StreamingError, httpx.HTTPStatusError):
    """The server refused to create a task (400); ``errors`` maps each field to its messages."""

    def __init__(
        self,
        message: str,
        *,
        request: httpx.Request,
        response: httpx.Response,
        errors: dict[str, list[str]],
    ) -> None:
        super().__init__(message, request=request, response=response)
        self.errors = errors


class InvalidStreamEvent(StreamingError, httpx.DecodingError):
    """An SSE event without an integer id or whose data is not a JSON object."""


class StreamInterrupted(StreamingError, httpx.TransportError):
    """The stream broke and could not be resumed within the reconnect policy's limits."""


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One event of a task's stream: its sequence number, type and decoded data."""

    id: int
    event: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ReconnectPolicy:
    """How ``stream``/``astream`` resume a broken stream.

    ``max_retries`` counts consecutive reconnects that brought no new event; any new event
    resets the count. The wait doubles from the server's ``retry:`` value (or ``backoff``
    seconds) up to ``max_backoff``. ``read_timeout`` is the silence after which the
    connection counts as lost (the server sends a keep-alive every 15 s).
    """

    max_retries: int = 8
    backoff: float = 0.25
    max_backoff: float = 5.0
    read_timeout: float = 45.0

    @property
    def timeout(self) -> httpx.Timeout:
        return httpx.Timeout(10.0, read=self.read_timeout)


class _Resume:
    """The I/O-free part of following a stream, shared by the sync and async loops.

    It decides what a response means, decodes and de-duplicates events, and paces
    reconnects, so the loops only move bytes.
    """

    def __init__(self, url: str, last_id: int | None, policy: ReconnectPolicy) -> None:
        self.url = url
        self.last_id = last_id
        self.policy = policy
        self.done = False
        self.failures = 0
        self.retry_ms: int | None = None
        self.reason = "stream ended before the end event"
        self.error: Exception | None = None

    def headers(self) -> dict[str, str]:
        headers = {"Accept": "text/event-stream"}
        if self.last_id is not None:
            headers["Last-Event-ID"] = str(self.last_id)
        return headers

    def opened(self, response: httpx.Response) -> bool:
        """True if the response is an event stream to read; raise if retrying cannot help."""
        status = response.status_code
        content_type = response.headers.get("content-type", "")
        if status == 204 or (status == 200 and content_type.startswith("application/json")):
            self.done = True  # Nothing left after last_id, or a finished task's summary.
        elif status == 200 and content_type.startswith("text/event-stream"):
            self.reason = "stream ended before the end event"
            return True
        elif status == 404:
            raise _not_found(response)
        elif status in _RETRY_STATUSES or status == 200:  # 200: a proxy's page, say
            self.reason = f"HTTP {status} {content_type}".rstrip()
        else:
            response.raise_for_status()
            self.reason = f"unexpected HTTP {status}"
        return False

    def accept(self, sse: ServerSentEvent) -> StreamEvent | None:
        """The event to yield, or None for a retry-only message or an id already yielded."""
        if sse.retry is not None:
            self.retry_ms = sse.retry
        if not sse.data:
            return None
        event = _decode(sse)
        if self.last_id is not None and event.id <= self.last_id:
            return None
        self.last_id = event.id
        self.failures = 0
        self.done = event.event == END_EVENT
        return event

    def interrupted(self, error: httpx.TransportError) -> None:
        self.reason = f"{type(error).__name__}: {error}"
        self.error = error

    def next_delay(self) -> float:
        """Seconds to wait before reconnecting; raise StreamInterrupted when out of retries."""
        self.failures += 1
        if self.failures > self.policy.max_retries:
            message = f"gave up on {self.url} after {self.policy.max_retries} reconnects"
            raise StreamInterrupted(f"{message}; last event id {self.last_id}") from self.error
        base = self.retry_ms / 1000 if self.retry_ms is not None else self.policy.backoff
        delay = min(base * 2 ** (self.failures - 1), self.policy.max_backoff)
        logger.info(
            "reconnecting to %s after %.2fs (%s; last event id %s)",
            self.url,
            delay,
            self.reason,
            self.last_id,
        )
        self.error = None
        return delay


def _decode(sse: ServerSentEvent) -> StreamEvent:
    try:
        event_id = int(sse.id)
        data = json.loads(sse.data)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise InvalidStreamEvent(f"undecodable event {sse!r}") from exc
    if not isinstance(data, dict):
        raise InvalidStreamEvent(f"event data is not a JSON object: {sse!r}")
    return StreamEvent(id=event_id, event=sse.event, data=data)


def _not_found(response: httpx.Response) -> TaskNotFound:
    return TaskNotFound(
        f"not found: {response.request.url}", request=response.request, response=response
    )


def _json(response: httpx.Response) -> dict[str, Any]:
    if response.status_code == 404:
        raise _not_found(response)
    response.raise_for_status()
    return response.json()


def _field_errors(response: httpx.Response) -> dict[str, list[str]]:
    try:
        body = response.json()
    except ValueError:  # not JSON: a proxy's error page, say
        return {}
    errors = body.get("errors") if isinstance(body, dict) else None
    return errors if isinstance(errors, dict) else {}


def _created(response: httpx.Response) -> dict[str, Any]:
    if response.status_code == 400:
        errors = _field_errors(response)
        raise InvalidTaskFields(
            f"invalid task fields: {errors}",
            request=response.request,
            response=response,
            errors=errors,
        )
    return _json(response)


def _follow(client: httpx.Client, resume: _Resume) -> Iterator[StreamEvent]:
    while True:
        try:
            with connect_sse(
                client, "GET", resume.url, headers=resume.headers(), timeout=resume.policy.timeout
            ) as source:
                if resume.opened(source.response):
                    for sse in source.iter_sse():
                        if (event := resume.accept(sse)) is not None:
                            yield event
                        if resume.done:
                            return
        except httpx.TransportError as exc:
            resume.interrupted(exc)
        if resume.done:
            return
        time.sleep(resume.next_delay())


async def _afollow(client: httpx.AsyncClient, resume: _Resume) -> AsyncIterator[StreamEvent]:
    while True:
        try:
            async with aconnect_sse(
                client, "GET", resume.url, headers=resume.headers(), timeout=resume.policy.timeout
            ) as source:
                if resume.opened(source.response):
                    async with aclosing(source.aiter_sse()) as events:
                        async for sse in events:
                            if (event := resume.accept(sse)) is not None:
                                yield event
                            if resume.done:
                                return
        except httpx.TransportError as exc:
            resume.interrupted(exc)
        if resume.done:
            return
        await asyncio.sleep(resume.next_delay())


class StreamingClient:
    """A streaming server's client, holding one sync and one async httpx client, made lazily.

    Clients passed in are owned from then on: ``close``/``aclose`` close them.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        *,
        sync_client: httpx.Client | None = None,
        async_client: httpx.AsyncClient | None = None,
        reconnect: ReconnectPolicy | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.reconnect = reconnect or ReconnectPolicy()
        # Sent with every request: ``{"Authorization": "Bearer <token>"}``, a session cookie…
        self.headers = dict(headers or {})
        self._sync_client = sync_client
        self._async_client = async_client
        self._lock = threading.Lock()

    @property
    def sync_client(self) -> httpx.Client:
        with self._lock:
            if self._sync_client is None:
                self._sync_client = httpx.Client(base_url=self.base_url, **self._options())
            return self._sync_client

    @property
    def async_client(self) -> httpx.AsyncClient:
        with self._lock:
            if self._async_client is None:
                self._async_client = httpx.AsyncClient(base_url=self.base_url, **self._options())
            return self._async_client

    def _options(self) -> dict[str, Any]:
        # The seed's client defaults: follow redirects, 60 s (streams set their own timeout).
        return {"headers": self.headers, "follow_redirects": True, "timeout": 60.0}

    def close(self) -> None:
        """Close the sync httpx client; the next use makes a new one."""
        client, self._sync_client = self._sync_client, None
        if client is not None:
            client.close()

    async def aclose(self) -> None:
        """Close both httpx clients; the next use makes new ones."""
        client, self._async_client = self._async_client, None
        if client is not None:
            await client.aclose()
        self.close()

    def url(self, *parts: object) -> str:
        """The absolute URL of a path under the base URL, each part escaped."""
        return "/".join([self.base_url, *(quote(str(part), safe="") for part in parts)])

    async def get_task_status(self, app: str, model: str, task_id: int) -> dict[str, Any]:
        """The task's status JSON (``status``, ``final_value``, ``last_seq``, …)."""
        return _json(await self.async_client.get(self.url("tasks", app, model, task_id)))

    def get_task_status_sync(self, app: str, model: str, task_id: int) -> dict[str, Any]:
        """Sync twin of ``get_task_status``."""
        return _json(self.sync_client.get(self.url("tasks", app, model, task_id)))

    async def acreate_task(self, app: str, model: str, /, **fields: Any) -> dict[str, Any]:
        """Create and start a task; return ``{"id", "app", "model", "status", "stream_url"}``."""
        return _created(await self.async_client.post(self.url("tasks", app, model), json=fields))

    def create_task(self, app: str, model: str, /, **fields: Any) -> dict[str, Any]:
        """Sync twin of ``acreate_task``."""
        return _created(self.sync_client.post(self.url("tasks", app, model), json=fields))

    def astream(
        self,
        app: str,
        model: str,
        task_id: int,
        last_event_id: int | None = None,
        token: str | None = None,
    ) -> AsyncIterator[StreamEvent]:
        """The task's events after ``last_event_id``, through its ``end`` event, resuming on errors.

        ``token``: a view token (from ``task.stream_url(signed=True)``), sent on every
        reconnect. Close the iterator (``contextlib.aclosing``) to stop early.
        """
        resume = _Resume(
            self._stream_url(app, model, task_id, token), last_event_id, self.reconnect
        )
        return _afollow(self.async_client, resume)

    def stream(
        self,
        app: str,
        model: str,
        task_id: int,
        last_event_id: int | None = None,
        token: str | None = None,
    ) -> Iterator[StreamEvent]:
        """Sync twin of ``astream``."""
        resume = _Resume(
            self._stream_url(app, model, task_id, token), last_event_id, self.reconnect
        )
        return _follow(self.sync_client, resume)

    def _stream_url(self, app: str, model: str, task_id: int, token: str | None) -> str:
        url = self.url("stream", app, model, task_id)
        return f"{url}?token={quote(token, safe='')}" if token else url


_clients: dict[str, StreamingClient] = {}
_clients_lock = threading.Lock()


def get_client(base_url: str = DEFAULT_BASE_URL) -> StreamingClient:
    """The process-wide ``StreamingClient`` for ``base_url``: one per distinct base URL."""
    key = base_url.rstrip("/")
    with _clients_lock:
        if key not in _clients:
            _clients[key] = StreamingClient(key)
        return _clients[key]


# Module-level shortcuts talk to the default base URL; for another server use the
# methods of ``get_client(base_url)``.


async def get_task_status(app: str, model: str, task_id: int) -> dict[str, Any]:
    """``get_client().get_task_status``."""
    return await get_client().get_task_status(app, model, task_id)


def get_task_status_sync(app: str, model: str, task_id: int) -> dict[str, Any]:
    """``get_client().get_task_status_sync``."""
    return get_client().get_task_status_sync(app, model, task_id)


async def acreate_task(app: str, model: str, /, **fields: Any) -> dict[str, Any]:
    """``get_client().acreate_task``."""
    return await get_client().acreate_task(app, model, **fields)


def create_task(app: str, model: str, /, **fields: Any) -> dict[str, Any]:
    """``get_client().create_task``."""
    return get_client().create_task(app, model, **fields)


def astream(
    app: str, model: str, task_id: int, last_event_id: int | None = None, token: str | None = None
) -> AsyncIterator[StreamEvent]:
    """``get_client().astream``."""
    return get_client().astream(app, model, task_id, last_event_id, token)


def stream(
    app: str, model: str, task_id: int, last_event_id: int | None = None, token: str | None = None
) -> Iterator[StreamEvent]:
    """``get_client().stream``."""
    return get_client().stream(app, model, task_id, last_event_id, token)
