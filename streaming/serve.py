"""One server process: uvicorn with our app, the worker, signals and graceful shutdown.

Also what every way of serving streams shares (``streaming.asgi``'s mount included): the
stream server's ASGI app as served (``stream_app``) and the shutdown order (``wind_down``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import httptools
import uvicorn
from asgiref.sync import sync_to_async
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from streaming import conf, guard, runtime
from streaming.orm import discard_broken_django_connections
from streaming.server import StreamServer, build_app, headers_of

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("streaming.access")


@dataclass(frozen=True)
class ServeOptions:
    host: str | None = None
    port: int | None = None
    socket: str | None = None
    worker: bool = True
    http: bool = True
    grace: float = 10.0
    log_level: str = "warning"  # uvicorn's own loggers (ours follow the logging config)
    access_log: bool = False  # one ``streaming.access`` line per request


def stream_app(stream_server: StreamServer, *, access_log: bool = False) -> Any:
    """The stream server's ASGI app as it is served: Django's connections checked before each
    request that may use them, and, with ``access_log``, one access line per request."""
    app = _with_usable_connections(build_app(stream_server))
    return _with_access_log(app, conf.get()) if access_log else app


async def wind_down(
    rt: runtime.Runtime,
    stream_server: StreamServer,
    grace: float,
    stop_serving: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """The shutdown order of every process that serves streams or runs tasks.

    End the open streams (their clients reconnect, elsewhere if need be) and any that opens
    from now on; stop claiming and give running tasks ``grace`` seconds, then release the
    rest for immediate reclaim; ``stop_serving`` (the HTTP server's own end, when the
    caller runs one); close this loop's runtime. The caller stops accepting connections
    first, when it can: then reconnecting clients go to another host at once.
    """
    stream_server.close_streams()
    await rt.worker.shutdown(grace)
    # A request accepted just before we stopped listening may have become a stream since: it
    # was ended as it opened (close_streams marks the server closing); end any stray one too.
    stream_server.close_streams()
    if stop_serving is not None:
        await stop_serving()
    await runtime.shutdown()


class Process:
    """Runs the HTTP server and/or the worker until a signal; the second signal is final."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.stream_server = StreamServer()
        self.uvicorn: uvicorn.Server | None = None
        self._stop = asyncio.Event()
        self._signals = 0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        rt = await runtime.current()
        await rt.hub.wait_listening()
        if self.options.worker and not self._stop.is_set():  # no claims after a signal
            rt.worker.start()
        serving = loop.create_task(self._serve()) if self.options.http else None
        if serving is None:
            self._ready("no HTTP")
        await self._stop.wait()
        await self._shutdown(rt, serving)

    def _ready(self, where: str) -> None:
        o = self.options
        logger.info("ready: %s, worker %s, pid %s", where, "on" if o.worker else "off", os.getpid())

    def _listening(self, server: uvicorn.Server) -> None:
        """Called once uvicorn listens: the ready line names the address it is bound to."""
        if self.options.socket:
            self._ready(f"listening on unix:{self.options.socket}")
            return
        sockets = [s for srv in getattr(server, "servers", []) for s in srv.sockets or ()]
        where = ", ".join(_url(s) for s in sockets) or f"{self.options.host}:{self.options.port}"
        self._ready(f"listening on {where}")

    async def _serve(self) -> None:
        o = self.options
        app = stream_app(self.stream_server, access_log=o.access_log)
        settings = conf.get()
        config = uvicorn.Config(
            app,
            host=o.host or "127.0.0.1",
            port=o.port or 8888,
            uds=o.socket,
            lifespan="off",
            # uvicorn's loggers are left to the project's logging (or streaming.logs): no
            # handlers and format of its own, so that every line of the process looks alike.
            log_config=None,
            log_level=o.log_level,
            access_log=False,  # its access line holds the query string (a token, perhaps)
            # The client's address comes from guard.client_address (PROXY_HEADER and
            # PROXY_TRUSTED): uvicorn must not rewrite it from X-Forwarded-For first.
            proxy_headers=False,
            timeout_graceful_shutdown=2,
            loop="none",
            http=_GuardedHttpToolsProtocol,  # "auto" would fall back to h11, unguarded
            ws="none",  # WebSocket upgrades get a 400 from _GuardedHttpToolsProtocol
            # Typed int, but only ever handed to loop.call_later: a float is fine.
            timeout_keep_alive=settings.IDLE_TIMEOUT,  # type: ignore[arg-type]
        )
        self.uvicorn = _QuietServer(config, on_started=self._listening)
        await self.uvicorn.serve()

    def _stop_accepting(self) -> None:
        for server in getattr(self.uvicorn, "servers", []):
            server.close()  # uvicorn's own shutdown closes them again: harmless

    def _on_signal(self, sig: int) -> None:
        self._signals += 1
        if self._signals > 1:
            logger.warning("second signal: exiting now")
            os._exit(1)
        logger.info("signal %s: shutting down (grace %ss)", sig, self.options.grace)
        self._stop.set()

    async def _shutdown(self, rt: runtime.Runtime, serving: asyncio.Task[Any] | None) -> None:
        # Refuse new connections first, so that reconnecting clients (and a proxy's retries)
        # go to another host instead of opening a stream here that shutdown would cut.
        self._stop_accepting()

        async def stop_serving() -> None:
            if self.uvicorn is not None:
                self.uvicorn.should_exit = True
            if serving is not None:
                await serving

        await wind_down(rt, self.stream_server, self.options.grace, stop_serving)
        logger.info("stopped")


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


_NO_ORM_PATHS = frozenset({"/health", "/metrics"})


def _with_usable_connections(app: Any) -> Any:
    """The ASGI app, with Django's connections checked before each request that may use them.

    What Django's own handler does at request start (see
    ``orm.discard_broken_django_connections``): after a database restart the first
    lookup would otherwise fail with a 500, and so would every later one, for good.
    """

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in _NO_ORM_PATHS:
            await sync_to_async(discard_broken_django_connections)()
        await app(scope, receive, send)

    return wrapped


def _with_access_log(app: Any, settings: conf.StreamingSettings) -> Any:
    """The ASGI app, logging one ``streaming.access`` line per request as it ends.

    ``GET /stream/tests/ExampleTask/1 200 127.0.0.1 1.250s``: method, path, status ("-" when
    the client left before any answer), the client's address (from ``PROXY_HEADER`` when
    the peer is a trusted proxy) and the time taken. Never the query string: it may hold a
    signed token. Unprintable bytes of the path are escaped, so a line cannot be forged.
    """

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        started = time.monotonic()
        status = "-"

        async def sending(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        try:
            await app(scope, receive, sending)
        except Exception:
            if status == "-":
                status = "500"  # what uvicorn answers for an app that raised
            raise
        finally:
            peer = (scope.get("client") or ("", 0))[0] or "-"
            access_logger.info(
                "%s %s %s %s %.3fs",
                scope["method"],
                _printable(scope.get("raw_path") or scope["path"].encode()),
                status,
                guard.client_address(peer, headers_of(scope), settings),
                time.monotonic() - started,
            )

    return wrapped


def _printable(raw: bytes) -> str:
    """A path as logged: ASCII, with control characters, spaces and other bytes escaped."""
    text = raw.decode("latin-1").encode("unicode_escape").decode("ascii")
    return text.replace(" ", "\\x20")


# While no head is being read, bytes are fed to the parser this many at a time (at most), so
# that a head which begins inside a chunk (after the end of a body or a pipelined request)
# is counted to within one slice.
_SLICE = 8192


class _GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits a server facing the internet needs.

    uvicorn bounds neither the size of a request's head nor the time it takes to arrive, and
    arms its keep-alive timer only after a response: a connection that never completes a
    head (or never sends a byte) stays open for good. Here, per connection:

    - the head (request line and headers) may take ``MAX_HEADER_BYTES``: beyond, a 431 and
      the connection is closed, before the parser buffers more;
    - it must arrive within ``HEADER_TIMEOUT`` of its first byte (or of the previous
      response's end, on a keep-alive connection): then a 408, or a plain close if nothing
      of it came;
    - a connection waits at most ``IDLE_TIMEOUT`` for a request (uvicorn's keep-alive
      timer, armed here from the connection's start too);
    - a WebSocket upgrade is answered 400: there is no WebSocket endpoint.

    None of this runs while a response is in progress: an SSE stream may stay quiet for
    minutes. uvicorn internals relied on (0.54): the parser callbacks ``on_message_begin``,
    ``on_headers_complete`` and ``on_response_complete``, the attributes ``parser``,
    ``headers``, ``cycle`` (its ``response_complete`` and ``keep_alive``), ``transport``,
    ``loop``, ``logger``, ``timeout_keep_alive[_task]``, and ``send_400_response``,
    ``timeout_keep_alive_handler``, ``_unset_keepalive_if_required``. ``data_received`` is
    replaced, not extended.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = conf.get()
        self.max_head = settings.MAX_HEADER_BYTES
        self.head_timeout = settings.HEADER_TIMEOUT
        self.head_timer: asyncio.TimerHandle | None = None
        self.head_size: int | None = None  # bytes of the head being read; None: none is
        self.refused = False  # a request was refused: nothing more is read

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._stop_head_timer()

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        if not self._responding():
            self._start_head_timer()
        view = memoryview(data)
        while view and not self.refused and not self.transport.is_closing():
            if self.head_size is None:
                size = min(_SLICE, self.max_head)
            else:
                size = self.max_head - self.head_size
                if size <= 0:
                    logger.warning("request head over %d bytes: 431", self.max_head)
                    self._refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
                    return
            piece, view = view[:size], view[size:]
            try:
                self.parser.feed_data(piece)
            except httptools.HttpParserUpgrade:
                # A WebSocket was refused in on_headers_complete; any other upgrade (h2c) is
                # ignored (RFC 9110 7.8): its request is being answered over HTTP/1.1.
                return
            except httptools.HttpParserError:
                if not self.refused:  # else _Refused, raised by on_headers_complete
                    self.logger.warning("Invalid HTTP request received.")
                    self.send_400_response("Invalid HTTP request received.")
                return
            if self.head_size is not None:  # all of it, if the head began inside the piece
                self.head_size += len(piece)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.head_size = 0

    def on_headers_complete(self) -> None:
        self.head_size = None
        self._stop_head_timer()
        if any(k == b"upgrade" and v.strip().lower() == b"websocket" for k, v in self.headers):
            self._refuse(HTTPStatus.BAD_REQUEST, b"WebSocket is not supported: use SSE\n")
            raise _Refused  # stops the parser: nothing more of this connection is read
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self._responding():
            self._start_head_timer()  # the next request's head is due from now

    def _responding(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _start_head_timer(self) -> None:
        if self.head_timer is None:
            self.head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if self.transport.is_closing():
            return
        if self.head_size is None:  # only blank lines, or nothing: close quietly
            self.transport.close()
        else:
            logger.info("request head not received in %ss: 408", self.head_timeout)
            self._refuse(HTTPStatus.REQUEST_TIMEOUT)

    def _refuse(self, status: HTTPStatus, body: bytes | None = None) -> None:
        """Answer ``status`` and close. Behind a response in progress (a pipelined request),
        close after that response instead: the refusal must not land inside it."""
        self.refused = True
        if self._responding():
            self.cycle.keep_alive = False  # uvicorn closes the connection after it
            return
        body = body or f"{status.phrase}\n".encode()
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s"
            % (status.value, status.phrase.encode(), len(body), body)
        )
        self.transport.close()


class _Refused(Exception):
    """Raised in a parser callback to stop parsing a connection that was just refused."""


class _QuietServer(uvicorn.Server):
    """uvicorn, minus its signal handlers (the Process owns SIGTERM/SIGINT), telling the
    process once it listens."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[uvicorn.Server], None]):
        super().__init__(config)
        self.on_started = on_started

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.on_started(self)


def run(options: ServeOptions) -> None:
    """Block running the process until it is told to stop."""
    _use_uvloop()
    asyncio.run(Process(options).run())


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
