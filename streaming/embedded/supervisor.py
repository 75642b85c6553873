"""The shared server's supervisor: runs postgres as its child until its users are gone.

It holds ``supervisor.lock`` while it lives and polls for an exclusive lock on ``users.lock``; once
that has been free for ``IDLE_GRACE`` seconds it keeps it, stops postgres and exits, so the server
never outlives its users, even when they are killed with SIGKILL.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from streaming.embedded.accounts import Account, server_account
from streaming.embedded.binaries import find_bindir, reachable_bindir
from streaming.embedded.cluster import SHARED_SETTINGS, check_major, cluster_dir, init_cluster
from streaming.embedded.errors import EmbeddedPostgresError, PortTaken
from streaming.embedded.locks import open_lock, try_flock
from streaming.embedded.process import (
    POSTGRES_LOG,
    STOP_TIMEOUT,
    await_ready,
    rotate,
    spawn_postgres,
    stop_process,
)
from streaming.embedded.shared import (
    STATE_FILE,
    SUPERVISOR_LOCK,
    USERS_LOCK,
    SharedState,
    create_database,
    read_state,
)
from streaming.embedded.wire import HOST, SHARED_DATABASE, free_port, probe

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.5
IDLE_GRACE = 2.0
MAX_RESTARTS = 3


class _Supervisor:
    """Runs the shared postgres as its child until no user is left."""

    def __init__(self, data_dir: Path, bindir: Path, cluster: Path, account: Account | None):
        self.data_dir = data_dir
        self.bindir = bindir
        self.cluster = cluster
        self.account = account
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.stop_requested = False

    @classmethod
    def boot(cls, data_dir: Path) -> _Supervisor:
        account = server_account()
        bindir = reachable_bindir(find_bindir(), account)
        cluster = cluster_dir(data_dir, account)
        if not (cluster / "PG_VERSION").is_file():
            log.info("creating the cluster in %s", cluster)
            init_cluster(cluster, bindir, account, durable=True)
        check_major(cluster, bindir)
        supervisor = cls(data_dir, bindir, cluster, account)
        previous = read_state(data_dir)
        supervisor.start([previous.port] if previous else [])
        return supervisor

    def start(self, ports: list[int]) -> None:
        _await_exit(self.cluster)
        rotate(self.data_dir / POSTGRES_LOG)
        for port in [*ports, *(free_port() for _ in range(5))]:
            with contextlib.suppress(PortTaken):
                self._launch(port)
                break
        else:
            raise EmbeddedPostgresError("could not find a free port for postgres")
        if probe(self.port, SHARED_DATABASE) == "no-database":
            create_database(self.bindir, self.port)
        assert self.proc is not None
        state = SharedState(
            self.port, os.getpid(), self.proc.pid, str(self.cluster), str(self.bindir)
        )
        _write_state(self.data_dir, state)
        log.info("postgres (pid %s) listens on %s:%s", self.proc.pid, HOST, self.port)

    def _launch(self, port: int) -> None:
        log_path = self.data_dir / POSTGRES_LOG
        with open(log_path, "ab") as log_file:
            # SIGINT is a clean fast shutdown, should this supervisor be killed.
            proc = spawn_postgres(
                self.bindir,
                self.cluster,
                port,
                SHARED_SETTINGS,
                self.account,
                log_file,
                signal.SIGINT,
            )
        await_ready(proc, self.cluster, log_path)
        self.proc, self.port = proc, port

    def serve(self) -> None:
        """Watch postgres and the users until the last user has been gone for IDLE_GRACE."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._request_stop)
        users_fd = open_lock(self.data_dir / USERS_LOCK)
        restarts = 0
        idle_since: float | None = None
        # Keeps users_fd (and its lock) open until exit: callers arriving now wait for us to finish.
        while not self.stop_requested:
            if self.proc is not None and self.proc.poll() is not None:
                restarts += 1
                self._recover(restarts)
            if try_flock(users_fd, fcntl.LOCK_EX):
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since >= IDLE_GRACE:
                    log.info("no users left; stopping")
                    return
                fcntl.flock(users_fd, fcntl.LOCK_UN)
            else:
                idle_since = None
            time.sleep(POLL_INTERVAL)
        log.info("asked to stop")

    def _request_stop(self, signum: int, frame: object) -> None:
        self.stop_requested = True

    def _recover(self, restarts: int) -> None:
        assert self.proc is not None
        log.error("postgres exited unexpectedly with code %s", self.proc.returncode)
        if restarts > MAX_RESTARTS:
            raise EmbeddedPostgresError(f"postgres died {restarts} times; giving up")
        self.start([self.port])

    def shutdown(self) -> None:
        # server.json stays: it is only believed while supervisor.lock is held, and the next
        # supervisor tries its port first, so that the URL stays the same across restarts.
        if self.proc is not None:
            stop_process(self.proc)
            log.info("postgres stopped (exit code %s)", self.proc.returncode)


def _write_state(data_dir: Path, state: SharedState) -> None:
    staging = data_dir / f"{STATE_FILE}.tmp"
    staging.write_text(json.dumps(asdict(state)))
    os.replace(staging, data_dir / STATE_FILE)


def _await_exit(cluster: Path) -> None:
    """Wait for a postmaster left from an earlier supervisor (killed, say) to finish exiting."""
    try:
        pid = int((cluster / "postmaster.pid").read_text().split()[0])
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError, IndexError):
        return
    deadline = time.monotonic() + STOP_TIMEOUT
    while comm == "postgres" and Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def supervise(data_dir: Path, status_fd: int | None) -> int:
    """Run the shared server for ``data_dir`` until its users are gone (``supervise`` command)."""
    data_dir = data_dir.resolve()
    lock_fd = open_lock(data_dir / SUPERVISOR_LOCK)
    if not try_flock(lock_fd, fcntl.LOCK_EX):
        _report(status_fd, {"error": f"another supervisor already runs in {data_dir}"})
        return 1
    try:
        supervisor = _Supervisor.boot(data_dir)
    except Exception as exc:  # reported to the starting process, which raises it
        log.exception("could not start the shared server")
        _report(status_fd, {"error": str(exc)})
        return 1
    _report(status_fd, {"port": supervisor.port, "cluster": str(supervisor.cluster)})
    try:
        supervisor.serve()
    except Exception:
        log.exception("the supervisor failed")
        return 1
    finally:
        supervisor.shutdown()
    return 0


def _report(fd: int | None, status: Mapping[str, Any]) -> None:
    if fd is None:
        return
    with contextlib.suppress(OSError):  # the starter may be gone
        os.write(fd, (json.dumps(status) + "\n").encode())
    with contextlib.suppress(OSError):
        os.close(fd)
