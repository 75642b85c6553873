"""One server process: uvicorn with our app, the worker, signals and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import uvicorn
from asgiref.sync import sync_to_async

from streaming import runtime
from streaming.orm import discard_broken_django_connections
from streaming.server import StreamServer, build_app

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    host: str | None = None
    port: int | None = None
    socket: str | None = None
    worker: bool = True
    http: bool = True
    grace: float = 10.0
    log_level: str = "info"


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
        logger.info("ready: %s", self._describe())
        await self._stop.wait()
        await self._shutdown(rt, serving)

    def _describe(self) -> str:
        o = self.options
        where = o.socket or f"http://{o.host}:{o.port}" if o.http else "no HTTP"
        return f"{where}, worker {'on' if o.worker else 'off'}, pid {os.getpid()}"

    async def _serve(self) -> None:
        o = self.options
        app = _with_usable_connections(build_app(self.stream_server))
        config = uvicorn.Config(
            app,
            host=o.host or "127.0.0.1",
            port=o.port or 8888,
            uds=o.socket,
            lifespan="off",
            log_level=o.log_level,
            access_log=False,
            timeout_graceful_shutdown=2,
            loop="none",
            http="auto",
        )
        self.uvicorn = _QuietServer(config)
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
        # go to another host instead of opening a stream here that shutdown would cut; then
        # end the open streams, so their clients reconnect elsewhere while tasks wind down.
        self._stop_accepting()
        self.stream_server.close_streams()
        await rt.worker.shutdown(self.options.grace)
        # A request accepted just before we stopped listening may have become a stream
        # since: end it cleanly too, rather than let uvicorn cancel it mid-response.
        self.stream_server.close_streams()
        if self.uvicorn is not None:
            self.uvicorn.should_exit = True
        if serving is not None:
            await serving
        await runtime.shutdown()
        logger.info("stopped")


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


class _QuietServer(uvicorn.Server):
    """uvicorn, minus its signal handlers: the Process owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


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
