"""The account Postgres runs as when this process is root, and which paths that account can reach.

Postgres refuses to run as root, so as root it runs as ``postgres`` (or a ``streaming-pg`` system
account created on first use); these helpers tell whether that account can enter a directory or
run a binary.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from streaming.embedded.errors import EmbeddedPostgresError

log = logging.getLogger(__name__)

ACCOUNT_NAMES = ("postgres", "streaming-pg")


@dataclass(frozen=True)
class Account:
    """The unprivileged account Postgres runs as when this process is root."""

    name: str
    uid: int
    gid: int


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


def can_run(bindir: Path, account: Account) -> bool:
    try:
        st = (bindir / "postgres").stat()
    except OSError:
        return False
    return blocked_dir(bindir, account) is None and mode_allows(st, account, os.R_OK | os.X_OK)
