"""One origin: the stream routes mounted in front of a project's own ASGI application.

In the project's ``asgi.py``::

    from django.core.asgi import get_asgi_application

    import streaming.asgi

    application = streaming.asgi.mount(get_asgi_application())

and serve it with any ASGI server (``uvicorn myproject.asgi:application``). HTTP requests
under ``/stream/``, ``/tasks/`` and ``/watch/`` go to the stream server (the app that
``runserver_stream`` serves: the same routes, policy, Host, Origin and CORS checks, quotas);
everything else, ``/health`` and ``/metrics`` and WebSockets included, goes to Django. The
browser sends the site's session cookie with its stream requests, so a policy such as
``streaming.policy.DjangoUsers`` sees the signed-in user.

**Workers.** By default the mount runs no tasks: run ``manage.py runworker_stream`` beside
it (as many as you like), so that web processes only serve and a deploy of the site never
cuts a running task short. ``mount(app, worker=True)`` runs a worker in each server process
instead (one process to deploy; its tasks get ``SHUTDOWN_GRACE`` seconds on shutdown, then
are released to other workers). It needs a server that sends ASGI lifespan events (uvicorn,
hypercorn, granian do); without them it starts at the first request, and its runs are
reclaimed only when their lease expires.

**Lifespan.** The mount answers the ``lifespan`` scope itself (Django's handler refuses it)
and does not pass it on. Startup opens this event loop's runtime and waits for its LISTEN
connection; shutdown follows ``serve.wind_down``, the order ``runserver_stream`` uses. A
server sends shutdown only once its open responses have ended, and SSE streams do not end
by themselves: so the mount also ends its streams when the server's SIGTERM/SIGINT handler
runs (it chains in front of it), and their clients reconnect, to another process if need
be. Without lifespan events the runtime starts on first use, and is never closed.

What the mount does not bring: ``runserver_stream``'s HTTP guards below the ASGI app (the
limits on a request head's size and time, WebSocket refusal). Those are the server's job
here, and the access log too: uvicorn's includes the query string, where a signed URL's
token is (``--no-access-log``, or a log filter).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from types import FrameType
from typing import Any

from streaming import runtime
from streaming.serve import stream_app, wind_down
from streaming.server import StreamServer

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
# Loose on purpose: servers and frameworks type scope and messages each their own way.
ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]

PREFIXES = ("/stream/", "/tasks/", "/watch/")
_EXIT_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def mount(django_app: ASGIApp, *, worker: bool = False) -> ASGIApp:
    """``django_app`` with the stream routes in front of it, on the same origin.

    Call it after Django is set up (``get_asgi_application()`` does that). ``worker``: run
    queued tasks in this process too (default: no, run ``manage.py runworker_stream``).
    """
    return Mount(django_app, worker=worker)


def is_stream_route(path: str) -> bool:
    """Whether a request path is the stream server's (else it is the project's)."""
    return path.startswith(PREFIXES)


class Mount:
    """The ASGI app ``mount`` returns: routes by path, owns the lifespan."""

    def __init__(self, django_app: ASGIApp, *, worker: bool = False) -> None:
        self.django_app = django_app
        self.worker = worker
        # Built now, so that a misconfiguration (a policy that cannot load, tokens with a
        # public SECRET_KEY) stops the server at import, as it stops runserver_stream.
        self.stream_server = StreamServer()
        self.stream_app = stream_app(self.stream_server)
        self._runtime: runtime.Runtime | None = None  # the runtime startup opened
        self._lifespan = False  # the server sent lifespan events
        self._lazy_worker: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan_loop(receive, send)
            return
        if self.worker and not self._lifespan and self._lazy_worker is None:
            self._lazy_worker = asyncio.get_running_loop().create_task(self._start_lazily())
        if kind == "http" and is_stream_route(scope["path"]):
            await self.stream_app(scope, receive, send)
        else:
            await self.django_app(scope, receive, send)

    # -- lifespan -------------------------------------------------------------------------

    async def _lifespan_loop(self, receive: Receive, send: Send) -> None:
        self._lifespan = True
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:  # the server reports it and exits
                    logger.exception("startup failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    await self.shutdown()
                except Exception as exc:
                    logger.exception("shutdown failed")
                    await send({"type": "lifespan.shutdown.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self) -> None:
        """Open this loop's runtime, wait for its LISTEN; start the worker if asked to."""
        rt = await runtime.current()
        await rt.hub.wait_listening()
        self._runtime = rt
        _before_exit_signals(asyncio.get_running_loop(), self.stream_server.close_streams)
        if self.worker:
            rt.worker.start()
        logger.info("mounted %s, worker %s", ", ".join(PREFIXES), "on" if self.worker else "off")

    async def shutdown(self) -> None:
        """End the streams, let running tasks finish (``SHUTDOWN_GRACE``), close the runtime."""
        rt, self._runtime = self._runtime, None
        if rt is not None:
            await wind_down(rt, self.stream_server, self.stream_server.settings.SHUTDOWN_GRACE)
            logger.info("stopped")

    async def _start_lazily(self) -> None:
        """``worker=True`` under a server that sends no lifespan: start at the first request."""
        logger.warning(
            "no ASGI lifespan events: the worker starts now and its tasks are not released "
            "on shutdown (they are reclaimed when their lease expires)"
        )
        rt = await runtime.current()
        await rt.hub.wait_listening()
        rt.worker.start()


def _before_exit_signals(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    """Run ``callback`` on ``loop`` when SIGTERM or SIGINT arrive, before the handler the
    server installed (which is then called as before).

    A server begins its graceful shutdown in that handler, then waits for open responses
    before it sends lifespan shutdown: ending the streams here lets it get there. Signals
    the server does not handle (the default action) are left alone, and so is everything
    outside the main thread, where Python cannot set handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in _EXIT_SIGNALS:
        previous = signal.getsignal(sig)
        if not callable(previous):  # SIG_DFL, SIG_IGN or None: the server handles none
            continue

        def handler(
            signum: int, frame: FrameType | None, previous: Callable[..., Any] = previous
        ) -> None:
            loop.call_soon_threadsafe(callback)
            previous(signum, frame)

        signal.signal(sig, handler)
