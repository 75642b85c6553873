"""Clusters: created from a cached initdb template, placed where the server account can reach them,
and the settings servers run them with (127.0.0.1 only, trust auth, no Unix socket)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

from streaming.embedded.accounts import Account, blocked_dir
from streaming.embedded.binaries import server_version
from streaming.embedded.cache import cache_dir, digest, fingerprint, publish
from streaming.embedded.errors import EmbeddedPostgresError
from streaming.embedded.process import run_command
from streaming.embedded.wire import HOST, SUPERUSER

log = logging.getLogger(__name__)

INITDB_ARGS = ("-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync")
RELOCATED_CLUSTERS = Path("/var/lib/streaming-pg")
CLUSTER = "cluster"
_COMMON = {"listen_addresses": HOST, "unix_socket_directories": ""}
SHARED_SETTINGS = {**_COMMON, "max_connections": "200"}
EPHEMERAL_SETTINGS = {
    **_COMMON,
    "max_connections": "300",
    "fsync": "off",
    "full_page_writes": "off",
}


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
            run_command(
                [str(bindir / "initdb"), "-D", str(cluster), *INITDB_ARGS], account, what="initdb"
            )
        if durable:
            run_command(
                [str(bindir / "initdb"), "--sync-only", "-D", str(cluster)], account, what="sync"
            )
    except BaseException:
        shutil.rmtree(cluster, ignore_errors=True)
        raise


def _template(bindir: Path, account: Account | None) -> Path | None:
    owner = account.uid if account else os.geteuid()
    key = digest(f"{bindir}|{fingerprint(bindir / 'postgres')}|{owner}|{INITDB_ARGS}")
    try:
        target = cache_dir() / f"template-{key}"
        if not _is_private(target, owner):
            target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            if account is not None and blocked_dir(target.parent, account) is not None:
                return None
            publish(target, lambda staging: _initdb_into(staging, bindir, account), public=False)
    except (OSError, RuntimeError, EmbeddedPostgresError) as exc:
        log.debug("no cluster template: %s", exc)
        return None
    return target if _is_private(target, owner) else None


def _initdb_into(staging: Path, bindir: Path, account: Account | None) -> None:
    _own(staging, account)
    run_command([str(bindir / "initdb"), "-D", str(staging), *INITDB_ARGS], account, what="initdb")


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
    target = relocated / digest(str(data_dir.resolve()))
    log.warning(
        "%s cannot enter %s, so the Postgres data for %s lives in %s (to keep it in the "
        "project instead, run `chmod o+x %s`; the data kept so far then stays behind)",
        *(account.name, blocked, data_dir, target, blocked),
    )
    relocated.mkdir(mode=0o755, parents=True, exist_ok=True)
    return target


def check_major(cluster: Path, bindir: Path) -> None:
    old = (cluster / "PG_VERSION").read_text().strip()
    new = server_version(bindir).split(".")[0]
    if old != new:
        raise EmbeddedPostgresError(
            f"{cluster} holds a Postgres {old} cluster but {bindir} has Postgres {new}: remove "
            f"{cluster} (its data is lost), or set DATABASE_URL to a Postgres {old} server"
        )


def _is_private(path: Path, uid: int) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    return st.st_uid == uid and not st.st_mode & 0o077 and (path / "PG_VERSION").is_file()
