"""The ``flock`` helpers the shared server's lifetime is built on: wait for a lock, test one."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from streaming.embedded.errors import EmbeddedPostgresError
from streaming.embedded.process import START_TIMEOUT


def open_lock(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)


def lock_file(path: Path, operation: int, waiting_for: str) -> int:
    """An fd of ``path`` holding ``operation`` (LOCK_SH/LOCK_EX), waiting up to START_TIMEOUT."""
    fd = open_lock(path)
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while not try_flock(fd, operation):
            if time.monotonic() > deadline:
                raise EmbeddedPostgresError(f"timed out waiting for {waiting_for} ({path})")
            time.sleep(0.02)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def locked(path: Path, operation: int, waiting_for: str) -> Iterator[None]:
    fd = lock_file(path, operation, waiting_for)
    try:
        yield
    finally:
        os.close(fd)


def try_flock(fd: int, operation: int) -> bool:
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def is_held(path: Path) -> bool:
    """Whether some process holds an exclusive lock on ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        return not try_flock(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)
