"""Shared fixtures: a clean log per test, runtimes closed in their loop, real servers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import support


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--slow", action="store_true", help="also run the long fault-injection variants"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="long variant: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _close_sync_connection() -> Iterator[None]:
    """After each test, close the library's sync readers and the Django connection of
    asgiref's thread (async calls on a loop without a runtime run their statements there),
    so that no test inherits a connection an earlier one broke (a terminated backend)."""
    yield
    from streaming.testing import close_connections

    close_connections()


@pytest.fixture
async def rt(transactional_db: None) -> AsyncIterator[Any]:
    """This test's runtime (pool, hub, worker), closed before the test's loop ends."""
    from streaming import runtime

    current = await runtime.current()
    try:
        yield current
    finally:
        await runtime.shutdown()
        # The async ORM ran in asgiref's thread: close that thread's Django connection.
        from asgiref.sync import sync_to_async
        from django.db import connections

        await sync_to_async(connections.close_all)()


@pytest.fixture(autouse=True)
def _clean_log(request: pytest.FixtureRequest) -> Iterator[None]:
    """Empty the SQL-managed tables after tests that committed (Django's flush skips them)."""
    yield
    marker = request.node.get_closest_marker("django_db")
    committed = bool(marker and marker.kwargs.get("transaction")) or any(
        name in request.fixturenames for name in ("transactional_db", "live_db", "live_server")
    )
    if not committed:
        return
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute("TRUNCATE streaming_taskevent, streaming_taskrun")


@pytest.fixture
def live_db(transactional_db: None, django_db_blocker: Any) -> str:
    """The test database's URL, with its data committed so other processes see it."""
    return support.database_url_from_settings()


@pytest.fixture
def server_factory(live_db: str, tmp_path: Path) -> Iterator[Callable[..., support.ManagedProcess]]:
    """Start real ``manage.py runserver_stream`` processes on the test database."""
    started: list[support.ManagedProcess] = []

    def start(*extra: str, **env: str) -> support.ManagedProcess:
        mp = support.start_server(support.child_env(live_db, **env), tmp_path, *extra)
        started.append(mp)
        return mp

    yield start
    for mp in started:
        mp.stop()


@pytest.fixture
def manage(live_db: str, tmp_path: Path) -> Callable[..., str]:
    """Run a manage.py command to completion on the test database; its output."""
    import subprocess
    import sys

    def run(*args: str, **env: str) -> str:
        out = subprocess.run(
            [sys.executable, str(support.ROOT / "manage.py"), *args],
            env=support.child_env(live_db, **env),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=support.ROOT,
        )
        if out.returncode != 0:
            raise AssertionError(f"manage.py {' '.join(args)} failed:\n{out.stdout}{out.stderr}")
        return out.stdout

    return run
