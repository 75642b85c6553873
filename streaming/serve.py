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

from streaming import runtime
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
        if self.options.worker:
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
        config = uvicorn.Config(
            build_app(self.stream_server), host=o.host or "127.0.0.1", port=o.port or 8888,
            uds=o.socket, lifespan="off", log_level=o.log_level, access_log=False,
            timeout_graceful_shutdown=2, loop="none", http="auto",
        )
        self.uvicorn = _QuietServer(config)
        await self.uvicorn.serve()

    def _on_signal(self, sig: int) -> None:
        self._signals += 1
        if self._signals > 1:
            logger.warning("second signal: exiting now")
            os._exit(1)
        logger.info("signal %s: shutting down (grace %ss)", sig, self.options.grace)
        self._stop.set()

    async def _shutdown(self, rt: runtime.Runtime, serving: asyncio.Task[Any] | None) -> None:
        # Streams first, so clients reconnect to another host while tasks wind down.
        self.stream_server.close_streams()
        await rt.worker.shutdown(self.options.grace)
        if self.uvicorn is not None:
            self.uvicorn.should_exit = True
        if serving is not None:
            await serving
        await runtime.shutdown()
        logger.info("stopped")


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
