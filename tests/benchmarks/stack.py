"""What the scenarios run against: a database, Django set up on it, server processes."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg

from tests import support

SETTINGS = "tests.benchmarks.settings"
BENCH_DB = "streaming_bench"
# Benchmark servers log warnings only: per-task INFO lines are not what is measured.
QUIET = {"STREAMING_LOG_LEVEL": "WARNING"}


@dataclass
class Stack:
    """The benchmark's database and a directory for logs and go/times files."""

    url: str
    workdir: Path
    pg_info: dict[str, str] = field(default_factory=dict)
    servers: list[support.ManagedProcess] = field(default_factory=list)

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url, autocommit=True, **kwargs)

    def sql(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        with self.connect() as conn:
            cur = conn.execute(query.encode(), params)
            return list(cur.fetchall()) if cur.description else []

    def reset(self) -> None:
        """Empty the log, the runs and the benchmark's tasks between scenarios."""
        self.sql("TRUNCATE streaming_taskevent, streaming_taskrun, benchmarks_benchtask")
        self.sql("VACUUM ANALYZE streaming_taskevent, streaming_taskrun, benchmarks_benchtask")

    def path(self, name: str) -> str:
        return str(self.workdir / f"{name}-{time.monotonic_ns()}")

    def start_server(self, *extra: str, **env: str) -> support.ManagedProcess:
        """``manage.py runserver_stream`` on a free TCP port (with its worker unless told)."""
        mp = support.start_server(
            support.child_env(self.url, **{**QUIET, **env}),
            self.workdir,
            "--verbosity",
            "0",
            *extra,
        )
        self.servers.append(mp)
        return mp

    def start_worker(self, **env: str) -> support.ManagedProcess:
        """``manage.py runworker_stream``; returns once it says it is ready."""
        env = {"STREAMING_LOG_LEVEL": "INFO", **env}  # its "ready:" line is an INFO one
        mp = support.start_manage(
            ["runworker_stream"], support.child_env(self.url, **env), self.workdir
        )
        self.servers.append(mp)
        deadline = time.monotonic() + 60
        while "ready:" not in mp.log():
            if mp.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start:\n{mp.log()}")
            time.sleep(0.05)
        return mp

    def stop(self, mp: support.ManagedProcess) -> None:
        mp.stop()
        if mp in self.servers:
            self.servers.remove(mp)

    def stop_all(self) -> None:
        for mp in list(self.servers):
            self.stop(mp)


@contextlib.contextmanager
def provision(fsync: bool, keep: bool = False) -> Iterator[Stack]:
    """A database of the benchmark's own, Django set up on it, migrated.

    Without DATABASE_URL: an embedded throwaway server (durable commits unless ``fsync`` is
    False: the embedded default turns fsync off, which would hide the cost we measure). With
    DATABASE_URL: a ``streaming_bench`` database created next to the one named there, so the
    benchmark never touches your data; that server's settings are left as they are.
    """
    raise_fd_limit()
    workdir = Path(tempfile.mkdtemp(prefix="streaming-bench-"))
    server = None
    given = os.environ.get("DATABASE_URL")
    try:
        if given:
            admin_url = given
        else:
            server = _start_embedded(fsync)
            admin_url = server.url
        url = _fresh_database(admin_url)
        stack = Stack(url, workdir)
        stack.pg_info = _pg_info(url, embedded=server is not None)
        _setup_django(url)
        try:
            yield stack
        finally:
            stack.stop_all()
    finally:
        if server is not None:
            server.close()
        if not keep:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)


def raise_fd_limit() -> int:
    """Allow as many sockets as the hard limit does (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return want


def _start_embedded(fsync: bool) -> Any:
    """A throwaway embedded server; durable (fsync on) unless told otherwise.

    The embedded test server turns fsync off on its command line, where ALTER SYSTEM cannot
    override it, so the benchmark adjusts the settings it is launched with.
    """
    from streaming.embedded import start_ephemeral_server

    try:
        from streaming.embedded import cluster

        settings: dict[str, str] = cluster.EPHEMERAL_SETTINGS
    except (ImportError, AttributeError):
        settings = {}
    saved = dict(settings)
    if fsync and settings:
        settings.update(fsync="on", full_page_writes="on")
    try:
        return start_ephemeral_server()
    finally:
        settings.clear()
        settings.update(saved)


def _fresh_database(admin_url: str) -> str:
    parts = urlsplit(admin_url)
    name = BENCH_DB
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        raise ValueError(name)
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)".encode())
        conn.execute(f"CREATE DATABASE {name}".encode())
    return urlunsplit(parts._replace(path=f"/{name}"))


def _pg_info(url: str, embedded: bool) -> dict[str, str]:
    with psycopg.connect(url, autocommit=True) as conn:
        info = {
            name: str(conn.execute(f"SHOW {name}".encode()).fetchone()[0])  # type: ignore[index]
            for name in (
                "server_version",
                "fsync",
                "synchronous_commit",
                "full_page_writes",
                "wal_sync_method",
                "max_connections",
                "shared_buffers",
            )
        }
    info["postgres"] = "embedded (streaming.embedded)" if embedded else "DATABASE_URL server"
    return info


def _setup_django(url: str) -> None:
    os.environ["DATABASE_URL"] = url
    os.environ["DJANGO_SETTINGS_MODULE"] = SETTINGS
    os.environ.update(QUIET)
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)


def get(url: str, timeout: float = 10.0) -> httpx.Response:
    return httpx.get(url, timeout=timeout)


def metrics(server: support.ManagedProcess) -> dict[str, float]:
    """The server's /metrics as {name: value}."""
    out: dict[str, float] = {}
    for line in get(server.url + "/metrics").text.splitlines():
        name, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[name] = float(value)
    return out


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def db_connections(pid: int, pg_port: int) -> int:
    """TCP connections process ``pid`` holds to the Postgres port (from /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                remote_port = int(cols[2].rsplit(":", 1)[1], 16)
                if remote_port == pg_port and cols[9] in inodes and cols[3] == "01":
                    count += 1
    return count


def terminate(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
