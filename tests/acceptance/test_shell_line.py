"""The README's shell lines, run as a user runs them: ``manage.py shell``, 50 times in a row.

Each run must exit within a few seconds and leave no session behind in pg_stat_activity
(an ``asyncio.run(coordinator.start_task(...))`` once built a pool and a LISTEN connection
for its loop and could hang in the loop's teardown).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from typing import Any

import pytest

from tests import support

RUNS = 50

pytestmark = pytest.mark.django_db(transaction=True)


def readme_block(after: str) -> str:
    """The first ```python block of the README after the line containing ``after``."""
    text = (support.ROOT / "README.md").read_text()
    start = text.index(after)
    match = re.search(r"```python\n(.*?)```", text[start:], re.DOTALL)
    assert match, f"no python block after {after!r} in README.md"
    return match.group(1)


def sessions(database_url: str) -> list[tuple[Any, ...]]:
    return support.sql(
        "SELECT pid, application_name, state, left(query, 60) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )


@pytest.mark.timeout(600)
def test_the_readme_shell_line_exits_at_once_and_leaves_no_session(live_db: str) -> None:
    code = readme_block("From `manage.py shell`")
    assert "asyncio.run(coordinator.start_task(" in code  # the line this test is about
    before = sessions(live_db)
    env = support.child_env(live_db)
    durations = []
    for i in range(RUNS):
        started = time.monotonic()
        out = subprocess.run(
            [sys.executable, str(support.ROOT / "manage.py"), "shell", "-c", code],
            env=env,
            cwd=support.ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
        durations.append(time.monotonic() - started)
        assert out.returncode == 0, f"run {i}: {out.stdout}{out.stderr}"
        assert "Traceback" not in out.stderr, out.stderr
        assert "error connecting" not in out.stderr, out.stderr
    assert max(durations) < 15, durations
    assert sessions(live_db) == before
    rows = support.sql("SELECT status, count(*) FROM streaming_taskrun GROUP BY status")
    assert rows == [("pending", RUNS)]  # each queued durably, for a worker to run
