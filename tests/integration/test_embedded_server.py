"""Real embedded servers: throwaway ones restarted in place, and the shared one's lifetime across
real processes (reuse, stop after the last user, SIGKILLed users and supervisors)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from streaming import embedded
from streaming.embedded import EphemeralServer, locks, start_ephemeral_server

ROOT = Path(__file__).resolve().parents[2]

# A user of the shared server: prints its URL and the time ensure_shared_server took, then lives
# until its stdin closes.
HOLDER = """
import sys, time
from pathlib import Path
from streaming.embedded import ensure_shared_server
started = time.perf_counter()
url = ensure_shared_server(Path(sys.argv[1]))
print(url, time.perf_counter() - started, flush=True)
sys.stdin.read()
"""

# Starts a throwaway server, prints its port and directory, then lives until killed.
EPHEMERAL_OWNER = """
import sys, time
from streaming.embedded import start_ephemeral_server
server = start_ephemeral_server()
print(server.port, server.root, flush=True)
time.sleep(60)
"""


def eventually(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"


def scalar(url: str, sql: str) -> object:
    """The first value ``sql`` returns, if it returns rows."""
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        cur = conn.execute(sql)
        row = cur.fetchone() if cur.description else None
    return row[0] if row else None


# --- throwaway servers --------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[EphemeralServer]:
    with start_ephemeral_server() as server:
        yield server


def test_ephemeral_server_restarts_on_the_same_port_with_its_data(server: EphemeralServer) -> None:
    port, url = server.port, server.url
    scalar(url, "CREATE TABLE kept AS SELECT 42 AS answer")
    assert scalar(url, "SHOW max_connections") == "300"
    assert scalar(url, "SHOW fsync") == "off"

    server.stop()
    assert not server.running
    assert embedded.probe(port, "postgres") == "down"
    server.start()
    assert (server.port, server.url) == (port, url)
    assert scalar(url, "SELECT answer FROM kept") == 42


def test_ephemeral_server_survives_an_immediate_stop(server: EphemeralServer) -> None:
    scalar(server.url, "CREATE TABLE committed AS SELECT 7 AS n")
    server.restart(immediate=True)  # like a crash: the next start runs recovery
    assert scalar(server.url, "SELECT n FROM committed") == 7
    assert "database system was interrupted" in server.log_path.read_text()


def test_ephemeral_server_started_from_a_short_lived_thread_outlives_it(
    server: EphemeralServer,
) -> None:
    server.stop()
    worker = threading.Thread(target=server.start)
    worker.start()
    worker.join(30)
    time.sleep(0.3)  # the parent-death signal, if tied to that thread, would have fired by now
    assert server.running
    assert embedded.probe(server.port, "postgres") == "ready"


def test_ephemeral_server_close_removes_everything() -> None:
    server = start_ephemeral_server()
    server.close()
    server.close()  # idempotent
    assert not server.root.exists()
    assert embedded.probe(server.port, "postgres") == "down"


def test_ephemeral_server_dies_with_the_process_that_started_it() -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", EPHEMERAL_OWNER], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    with owner:
        assert owner.stdout is not None
        port_text, root = owner.stdout.readline().split()
        assert embedded.probe(int(port_text), "postgres") == "ready"
        owner.kill()
        owner.wait()
    try:
        assert eventually(lambda: embedded.probe(int(port_text), "postgres") == "down", 5)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --- the shared server --------------------------------------------------------------------------


class Holder:
    """A process using the shared server until closed or killed."""

    def __init__(self, data_dir: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(data_dir)], cwd=ROOT, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        if not line:
            self.close()
            pytest.fail(f"the holder failed: {self.proc.stderr and self.proc.stderr.read()}")
        self.url, self.seconds = line[0], float(line[1])
        self.port = int(self.url.rsplit(":", 1)[1].split("/")[0])

    def kill(self) -> None:
        self.proc.kill()
        self.close()

    def close(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        self.proc.wait(10)


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not tmp_path: as root, Postgres runs as another account, which cannot enter pytest's dirs.
    parent = Path(tempfile.mkdtemp(prefix="embedded-shared-", dir="/tmp"))
    parent.chmod(0o755)
    yield parent / ".pgdata"
    eventually(lambda: not supervisor_running(parent / ".pgdata"), 15)
    shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture
def holders(data_dir: Path) -> Iterator[Callable[[], Holder]]:
    started: list[Holder] = []

    def start() -> Holder:
        started.append(Holder(data_dir))
        return started[-1]

    yield start
    for holder in started:
        holder.kill()


def supervisor_running(data_dir: Path) -> bool:
    return locks.is_held(data_dir / embedded.SUPERVISOR_LOCK)


def test_shared_server_is_reused_and_stops_after_its_last_user_is_killed(
    data_dir: Path, holders: Callable[[], Holder]
) -> None:
    first = holders()
    second = holders()
    assert second.url == first.url
    assert second.seconds < 0.2, "reusing a running server must be quick"
    assert scalar(first.url, "SELECT current_database()") == "streaming"
    assert scalar(first.url, "SHOW listen_addresses") == "127.0.0.1"
    state = embedded.read_state(data_dir)
    assert state is not None and state.port == first.port

    first.kill()
    time.sleep(embedded.IDLE_GRACE + 2 * embedded.POLL_INTERVAL)
    assert embedded.probe(first.port, "streaming") == "ready", "a user is still there"

    second.kill()
    assert eventually(lambda: not supervisor_running(data_dir), 3 * embedded.IDLE_GRACE)
    assert not pid_alive(state.postgres_pid)
    assert embedded.probe(first.port, "streaming") == "down"


def test_shared_server_comes_back_on_the_same_port_with_its_data(
    data_dir: Path, holders: Callable[[], Holder]
) -> None:
    first = holders()
    scalar(first.url, "CREATE TABLE kept AS SELECT 1 AS n")
    first.close()  # a clean exit this time
    assert eventually(lambda: not supervisor_running(data_dir), 3 * embedded.IDLE_GRACE)

    again = holders()
    assert again.url == first.url
    assert scalar(again.url, "SELECT n FROM kept") == 1


def test_killing_the_supervisor_takes_postgres_down_and_the_next_user_restarts_it(
    data_dir: Path, holders: Callable[[], Holder]
) -> None:
    first = holders()
    state = embedded.read_state(data_dir)
    assert state is not None
    os.kill(state.supervisor_pid, signal.SIGKILL)
    assert eventually(lambda: not pid_alive(state.postgres_pid), 5)

    second = holders()
    assert scalar(second.url, "SELECT 1") == 1
    new_state = embedded.read_state(data_dir)
    assert new_state is not None and new_state.supervisor_pid != state.supervisor_pid
    first.kill()
