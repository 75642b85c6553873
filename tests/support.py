"""Test helpers: real manage.py processes, free ports, SSE parsing over real HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def database_url_from_settings() -> str:
    """The URL of the database Django is using now (the test database during tests)."""
    from django.conf import settings

    cfg = settings.DATABASES["default"]
    auth = str(cfg["USER"]) + (f":{cfg['PASSWORD']}" if cfg.get("PASSWORD") else "")
    return f"postgresql://{auth}@{cfg['HOST']}:{cfg['PORT']}/{cfg['NAME']}"


def child_env(database_url: str, **overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env["DATABASE_URL"] = database_url
    env.setdefault("STREAMING_LOG_LEVEL", "INFO")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides)
    return env


@dataclass
class ManagedProcess:
    """A manage.py child process; stopped (and reaped) by ``stop``."""

    args: list[str]
    proc: subprocess.Popen[bytes]
    log_path: Path
    port: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def start_manage(
    args: list[str], env: dict[str, str], log_dir: Path, port: int | None = None
) -> ManagedProcess:
    log_path = log_dir / f"{args[0]}-{port or 'x'}-{time.monotonic_ns()}.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "manage.py"), *args],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return ManagedProcess(args, proc, log_path, port)


def start_server(
    env: dict[str, str], log_dir: Path, *extra: str, wait: float = 30.0
) -> ManagedProcess:
    """``manage.py runserver_stream --port P``; returns once /health answers."""
    port = free_port()
    mp = start_manage(
        ["runserver_stream", "--host", "127.0.0.1", "--port", str(port), *extra], env, log_dir, port
    )
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if mp.proc.poll() is not None:
            raise RuntimeError(f"server exited with {mp.proc.returncode}:\n{mp.log()}")
        try:
            if httpx.get(mp.url + "/health", timeout=1).text == "OK":
                return mp
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    mp.stop()
    raise RuntimeError(f"server did not answer /health in {wait}s:\n{mp.log()}")


@dataclass(frozen=True)
class SSE:
    id: int | None
    event: str
    data: dict[str, Any]


def parse_sse(text: str) -> list[SSE]:
    """Events of an SSE body (comments and retry lines skipped)."""
    out: list[SSE] = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value
        if "data" in fields:
            out.append(
                SSE(
                    int(fields["id"]) if "id" in fields else None,
                    fields.get("event", "message"),
                    json.loads(fields["data"]),
                )
            )
    return out


def _complete(buf: str) -> str:
    end = buf.rfind("\n\n")
    return buf[: end + 2] if end >= 0 else ""


def read_stream(
    url: str,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
    max_events: int | None = None,
) -> tuple[httpx.Response, list[SSE]]:
    """GET an SSE stream until the server ends it (or ``max_events`` arrive)."""
    with (
        httpx.Client(timeout=timeout) as client,
        client.stream("GET", url, headers=headers or {}) as resp,
    ):
        if not resp.headers.get("content-type", "").startswith("text/event-stream"):
            resp.read()
            return resp, []
        buf = ""
        for chunk in resp.iter_text():
            buf += chunk
            if max_events is not None and len(parse_sse(_complete(buf))) >= max_events:
                break
        return resp, parse_sse(_complete(buf))


async def wait_for_status(
    rt: Any,
    task: Any,
    statuses: tuple[str, ...] = ("completed", "failed", "cancelled"),
    timeout: float = 20.0,
) -> str:
    """Poll the run table until the task reaches one of ``statuses``; the status."""
    import asyncio

    from streaming import registry

    key = registry.key_of(task)
    params = {"app_label": key.app_label, "model_name": key.model_name, "task_id": key.task_id}
    deadline = asyncio.get_running_loop().time() + timeout
    status = None
    while asyncio.get_running_loop().time() < deadline:
        row = await rt.db.fetchone("run_status", params)
        status = row[0] if row else None
        if status in statuses:
            return status
        await asyncio.sleep(0.02)
    raise AssertionError(f"task {key.path} still {status!r} after {timeout}s")


def sql(query: str, *params: Any) -> list[tuple[Any, ...]]:
    """Rows of a query on the test database, on a connection of its own (autocommit)."""
    import psycopg

    with psycopg.connect(database_url_from_settings(), autocommit=True) as conn:
        cur = conn.execute(query.encode(), params or None)
        return list(cur.fetchall()) if cur.description else []


@contextlib.contextmanager
def django_wsgi_server() -> Iterator[str]:
    """This project's Django over HTTP on a free port: a thread per request, in this process.

    Not pytest-django's ``live_server``: with no STATIC_URL in tests/settings.py its static
    files handler fails every request."""
    import threading
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from django.core.handlers.wsgi import WSGIHandler

    class Threaded(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = make_server("127.0.0.1", 0, WSGIHandler(), server_class=Threaded, handler_class=Quiet)
    thread = threading.Thread(target=server.serve_forever, name="django-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
