"""Throwaway servers: a fresh cluster in a temp dir, run as a child of this process.

A parent-death signal stops the server if this process dies; ``stop()``/``start()`` keep its port.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path

from streaming.embedded.accounts import Account, blocked_dir, server_account
from streaming.embedded.binaries import find_bindir, reachable_bindir
from streaming.embedded.cluster import EPHEMERAL_SETTINGS, init_cluster
from streaming.embedded.errors import EmbeddedPostgresError, PortTaken
from streaming.embedded.process import (
    POSTGRES_LOG,
    await_ready,
    in_lasting_thread,
    spawn_postgres,
    stop_process,
)
from streaming.embedded.wire import build_url, free_port


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
                except PortTaken:
                    raise EmbeddedPostgresError(f"port {self._port} was taken meanwhile") from None
                return
            for _attempt in range(5):
                with contextlib.suppress(PortTaken):
                    self._launch(free_port())
                    return
            raise EmbeddedPostgresError("could not find a free port for postgres")

    def _launch(self, port: int) -> None:
        with open(self.log_path, "ab") as log_file:
            proc = in_lasting_thread(
                lambda: spawn_postgres(
                    self.bindir,
                    self.data_dir,
                    port,
                    EPHEMERAL_SETTINGS,
                    self._account,
                    log_file,
                    signal.SIGQUIT,
                )
            )
        await_ready(proc, self.data_dir, self.log_path)
        self._proc, self._port = proc, port

    def stop(self, *, immediate: bool = False) -> None:
        """Stop the server and wait; ``immediate`` is crash-like (recovery on the next start)."""
        with self._lock:
            if self._proc is not None:
                stop_process(self._proc, immediate=immediate)
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
