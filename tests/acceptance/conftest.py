"""Fixtures of the acceptance tests: worker-only processes next to server_factory's servers."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import faults, support


@pytest.fixture
def worker_factory(live_db: str, tmp_path: Path) -> Iterator[Callable[..., support.ManagedProcess]]:
    """Start real ``manage.py runworker_stream`` processes on the test database."""
    started: list[support.ManagedProcess] = []

    def start(*extra: str, wait: float = 30.0, **env: str) -> support.ManagedProcess:
        mp = faults.start_worker(live_db, tmp_path, *extra, wait=wait, **env)
        started.append(mp)
        return mp

    yield start
    for mp in started:
        mp.signal(signal.SIGCONT)  # a test may have left one stopped
        mp.stop()
