"""The cache directory: entries (cluster templates, binaries) built once and renamed into place."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT_CACHE = Path("/var/cache/streaming-pg")


def cache_dir() -> Path:
    """Where cluster templates (and, as root, copied binaries) are kept."""
    if os.geteuid() == 0:
        return ROOT_CACHE
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "streaming-pg"


def publish(target: Path, build: Callable[[Path], None], *, public: bool) -> None:
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


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprint(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}-{st.st_mtime_ns}"
