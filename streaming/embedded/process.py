"""Postgres processes: commands run as the server account, and postmasters tied to their parent.

A postmaster gets a parent-death signal, so it never outlives the thread that started it; its
readiness is read from ``postmaster.pid``, which proves that it, not another process, owns the port.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

from streaming.embedded.accounts import Account
from streaming.embedded.errors import EmbeddedPostgresError, PortTaken

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

T = TypeVar("T")

START_TIMEOUT = 120.0
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
LOG_LIMIT = 10 * 1024 * 1024
POSTGRES_LOG = "postgres.log"

_PR_SET_PDEATHSIG = 1


def _child_env() -> dict[str, str]:
    # PG* variables (PGDATA, PGPORT ...) would override what we pass; C messages are parseable.
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    return {**env, "LC_ALL": "C"}


def _run_as(account: Account | None) -> dict[str, Any]:
    """subprocess arguments that drop to ``account`` (and none of root's groups)."""
    if account is None:
        return {}
    return {"user": account.uid, "group": account.gid, "extra_groups": []}


def run_command(argv: Sequence[str], account: Account | None = None, *, what: str) -> str:
    try:
        result = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            cwd="/",
            env=_child_env(),
            check=False,
            timeout=START_TIMEOUT,
            **_run_as(account),
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise EmbeddedPostgresError(f"{what} failed: {exc}") from exc
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip()
        raise EmbeddedPostgresError(f"{what} failed (exit {result.returncode}): {output}")
    return result.stdout


def _die_with_parent(sig: int) -> Callable[[], None] | None:
    """A preexec hook arranging for the child to get ``sig`` when the thread that forked it dies.

    It runs after subprocess has switched user, which would otherwise clear the setting."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes  # only where needed, to keep the import of this module cheap

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def arrange() -> None:
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the setting took effect
            os._exit(1)

    return arrange


def spawn_postgres(
    bindir: Path,
    cluster: Path,
    port: int,
    settings: Mapping[str, str],
    account: Account | None,
    log_file: IO[bytes],
    die_with: int,
) -> subprocess.Popen[bytes]:
    argv = [str(bindir / "postgres"), "-D", str(cluster), "-p", str(port)]
    for name, value in settings.items():
        argv += ["-c", f"{name}={value}"]
    # A session of its own: a Ctrl-C meant for the caller must not stop the server under it.
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        cwd="/",
        env=_child_env(),
        start_new_session=True,
        preexec_fn=_die_with_parent(die_with),
        **_run_as(account),
    )


def await_ready(proc: subprocess.Popen[bytes], cluster: Path, log_path: Path) -> None:
    """Wait until the postmaster ``proc`` says it accepts connections (in postmaster.pid, which
    proves that this process, not another, owns the port)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while not _postmaster_ready(cluster, proc.pid):
        if proc.poll() is not None:
            tail = log_tail(log_path)
            if "Address already in use" in tail:
                raise PortTaken(tail)
            raise EmbeddedPostgresError(
                f"postgres exited with code {proc.returncode} while starting; "
                f"the end of {log_path}:\n{tail}"
            )
        if time.monotonic() > deadline:
            stop_process(proc, immediate=True)
            raise EmbeddedPostgresError(f"postgres did not start in time; see {log_path}")
        time.sleep(0.01)


def _postmaster_ready(cluster: Path, pid: int) -> bool:
    try:
        lines = (cluster / "postmaster.pid").read_text().splitlines()
    except OSError:
        return False
    return len(lines) >= 8 and lines[0].strip() == str(pid) and lines[7].strip() == "ready"


def stop_process(proc: subprocess.Popen[bytes], *, immediate: bool = False) -> None:
    """Fast shutdown (SIGINT), or immediate (SIGQUIT: like a crash, recovery on next start)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGQUIT if immediate else signal.SIGINT)
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        log.warning(
            "postgres (pid %s) ignored shutdown for %.0f s; killing it", proc.pid, STOP_TIMEOUT
        )
        proc.kill()
        proc.wait()


def log_tail(path: Path, size: int = 3000) -> str:
    try:
        with open(path, "rb") as file:
            file.seek(max(0, file.seek(0, os.SEEK_END) - size))
            return file.read().decode(errors="replace")
    except OSError:
        return ""


def rotate(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.stat().st_size > LOG_LIMIT:
            os.replace(path, path.with_name(path.name + ".1"))


_spawner: ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


def in_lasting_thread(fn: Callable[[], T]) -> T:
    """Call ``fn`` from a thread that lives as long as the process.

    The parent-death signal fires when the *thread* that forked the child exits, so a server
    started from ``asyncio.to_thread`` must not be forked from that short-lived worker."""
    global _spawner
    if threading.current_thread() is threading.main_thread():
        return fn()
    from concurrent.futures import ThreadPoolExecutor

    with _spawner_lock:
        if _spawner is None:
            _spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedded-pg")
    return _spawner.submit(fn).result()
