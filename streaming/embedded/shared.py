"""The shared server's callers: ensure_shared_server, release_shared_server and ``server.json``.

Each caller holds a shared ``flock`` on ``users.lock`` for as long as it lives. The first one
spawns the detached supervisor (``python -m streaming.embedded supervise``, see ``supervisor``)
under ``start.lock``, and reads the port it reports; later ones find it through ``server.json``,
believed only while ``supervisor.lock`` is held.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streaming.embedded.errors import EmbeddedPostgresError
from streaming.embedded.locks import is_held, lock_file, locked
from streaming.embedded.process import (
    POSTGRES_LOG,
    START_TIMEOUT,
    STOP_TIMEOUT,
    log_tail,
    rotate,
    run_command,
)
from streaming.embedded.wire import HOST, SHARED_DATABASE, SUPERUSER, build_url, probe

log = logging.getLogger(__name__)

USERS_LOCK = "users.lock"
START_LOCK = "start.lock"
SUPERVISOR_LOCK = "supervisor.lock"
STATE_FILE = "server.json"
SUPERVISOR_LOG = "supervisor.log"


@dataclass(frozen=True)
class SharedState:
    """What ``server.json`` records about a running shared server."""

    port: int
    supervisor_pid: int
    postgres_pid: int
    cluster: str
    bindir: str


_users: dict[Path, int] = {}
_users_lock = threading.Lock()


def ensure_shared_server(data_dir: Path) -> str:
    """The URL of the project's shared server in ``data_dir``, started if need be.

    This process counts as one of its users until it exits or calls ``release_shared_server``;
    the server stops a couple of seconds after its last user is gone."""
    data_dir = Path(data_dir).resolve()
    if not data_dir.is_dir():
        data_dir.mkdir(parents=True, exist_ok=True)
        data_dir.chmod(0o755)
    with _users_lock:
        if data_dir not in _users:
            _users[data_dir] = lock_file(
                data_dir / USERS_LOCK, fcntl.LOCK_SH, "the previous server to shut down"
            )
    try:
        port = _running_port(data_dir) or _start_shared(data_dir)
    except BaseException:
        release_shared_server(data_dir)
        raise
    return build_url(port, SHARED_DATABASE)


def release_shared_server(data_dir: Path) -> None:
    """Stop counting this process as a user of the shared server in ``data_dir``."""
    with _users_lock:
        fd = _users.pop(Path(data_dir).resolve(), None)
    if fd is not None:
        os.close(fd)


def read_state(data_dir: Path) -> SharedState | None:
    """What the last supervisor recorded in ``data_dir`` (current only while it runs)."""
    try:
        return SharedState(**json.loads((data_dir / STATE_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _running_port(data_dir: Path) -> int | None:
    if not is_held(data_dir / SUPERVISOR_LOCK):
        return None
    state = read_state(data_dir)
    if state is None:
        return None
    status = probe(state.port, SHARED_DATABASE)
    if status == "no-database":  # dropped by hand since the server started
        create_database(Path(state.bindir), state.port)
        status = "ready"
    return state.port if status == "ready" else None


def _start_shared(data_dir: Path) -> int:
    with locked(data_dir / START_LOCK, fcntl.LOCK_EX, "another process starting the server"):
        deadline = time.monotonic() + STOP_TIMEOUT
        while is_held(data_dir / SUPERVISOR_LOCK):  # a supervisor that restarts or stops postgres
            port = _running_port(data_dir)
            if port is not None:
                return port
            if time.monotonic() > deadline:
                raise EmbeddedPostgresError(
                    f"a supervisor runs in {data_dir} but its server does not answer; see "
                    f"{data_dir / SUPERVISOR_LOG} and {data_dir / POSTGRES_LOG}"
                )
            time.sleep(0.05)
        return _spawn_supervisor(data_dir)


def _spawn_supervisor(data_dir: Path) -> int:
    log_path = data_dir / SUPERVISOR_LOG
    rotate(log_path)
    read_fd, write_fd = os.pipe()
    try:
        argv = [sys.executable, "-m", "streaming.embedded", "supervise", str(data_dir)]
        with open(log_path, "ab") as log_file:
            # Returns at once: the child forks the supervisor off and exits, leaving us no zombie.
            subprocess.run(
                [*argv, "--status-fd", str(write_fd)],
                pass_fds=(write_fd,),
                check=False,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd="/",
                env=_python_env(),
                start_new_session=True,
                timeout=START_TIMEOUT,
            )
        os.close(write_fd)
        write_fd = -1
        status = _read_status(read_fd, log_path)
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
    if "port" not in status:
        reason = status.get("error", "the supervisor exited without starting the server")
        raise EmbeddedPostgresError(f"{reason}\n(the end of {log_path}:)\n{log_tail(log_path)}")
    if not Path(status["cluster"]).is_relative_to(data_dir):
        log.warning(
            "the Postgres data for %s lives in %s; see %s", data_dir, status["cluster"], log_path
        )
    return int(status["port"])


def _read_status(fd: int, log_path: Path) -> dict[str, Any]:
    deadline = time.monotonic() + START_TIMEOUT
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise EmbeddedPostgresError(f"the shared server did not start in time; see {log_path}")
        if select.select([fd], [], [], remaining)[0]:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    try:
        status: dict[str, Any] = json.loads(data.splitlines()[0])
    except (IndexError, ValueError):
        return {}
    return status


def _python_env() -> dict[str, str]:
    # The supervisor must import this package even when it is not installed (a plain checkout):
    # put the directory holding ``streaming`` (streaming/embedded/shared.py -> ../../..) first.
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, path]) if path else root}


def create_database(bindir: Path, port: int) -> None:
    createdb = [str(bindir / "createdb"), "-h", HOST, "-p", str(port), "-U", SUPERUSER]
    run_command([*createdb, SHARED_DATABASE], what=f"createdb {SHARED_DATABASE}")
