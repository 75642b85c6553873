"""A user's own test suites pass, and leave the test database droppable.

A tiny project (app ``shop`` with a ``Report`` task, its migration made by ``makemigrations``)
is written to a temporary directory and tested as its users would: ``manage.py test`` with
``TransactionTestCase`` + ``StreamingTestMixin``, and ``python -m pytest`` with pytest-django
and ``pytest_plugins = ["streaming.testing"]``. Both must exit 0, with no "being accessed by
other users" when the test database is dropped. A plain ``TestCase`` must fail, saying why.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

LEFT_OPEN = "being accessed by other users"

SETTINGS = """\
import os

SECRET_KEY = "shop-tests-only"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "streaming",
    "shop",
]
DATABASES = {{
    "default": {{
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ["SHOP_DB_NAME"],
        "USER": {user!r},
        "PASSWORD": {password!r},
        "HOST": {host!r},
        "PORT": {port!r},
    }}
}}
"""

MANAGE = """\
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
"""

MODELS = """\
from django.db import models

from streaming.models import StreamTask


class Report(StreamTask):
    title = models.CharField(max_length=200)
    fail = models.BooleanField(default=False)

    async def process(self):
        await self.send_event("start", {"title": self.title})
        for step in range(1, 4):
            if self.fail and step == 2:
                raise ValueError("no data for page 2")
            await self.send_event("progress", {"step": step, "total": 3})
        return {"pages": 3, "title": self.title}
"""

DJANGO_TESTS = """\
from django.test import TransactionTestCase

from shop.models import Report
from streaming.testing import StreamingTestMixin


class ReportTests(StreamingTestMixin, TransactionTestCase):
    def test_report_completes(self):
        report = self.run_task(Report.objects.create(title="Q3"), timeout=30)
        self.assertEqual(report.status, "completed")
        self.assertEqual(report.final_value, {"pages": 3, "title": "Q3"})
        self.assertEqual(
            [e["type"] for e in report.events()],
            ["start", "progress", "progress", "progress", "end"],
        )

    def test_a_failing_report(self):
        report = self.run_task(Report.objects.create(title="Q2", fail=True))
        self.assertEqual(report.status, "failed")
        self.assertEqual(report.error["message"], "no data for page 2")

    async def test_report_async(self):
        report = await self.arun_task(await Report.objects.acreate(title="Q4"))
        self.assertEqual(report.final_value, {"pages": 3, "title": "Q4"})
"""

PLAIN_TESTCASE = """\
from django.test import TestCase

from shop.models import Report
from streaming.testing import run_task


class PlainReportTests(TestCase):
    def test_report_completes(self):
        report = run_task(Report.objects.create(title="plain"), timeout=30)
        self.assertEqual(report.status, "completed")
"""

PYTEST_INI = """\
[pytest]
DJANGO_SETTINGS_MODULE = proj.settings
testpaths = pytests
python_files = test_*.py
asyncio_default_fixture_loop_scope = function
filterwarnings = error
"""

CONFTEST = 'pytest_plugins = ["streaming.testing"]\n'

PYTEST_TESTS = """\
import pytest

from shop.models import Report


def test_report_completes(streaming_tasks):
    report = streaming_tasks.run(Report.objects.create(title="Q3"), timeout=30)
    assert report.status == "completed"
    assert report.final_value == {"pages": 3, "title": "Q3"}
    assert [e["type"] for e in report.events()][-1] == "end"


def test_a_failing_report(streaming_tasks):
    report = streaming_tasks.run(Report.objects.create(title="Q2", fail=True))
    assert report.status == "failed"
    assert report.error == {"message": "no data for page 2", "error_type": "ValueError"}


@pytest.mark.asyncio
async def test_report_async(streaming_tasks):
    report = await streaming_tasks.arun(await Report.objects.acreate(title="Q4"))
    assert report.final_value == {"pages": 3, "title": "Q4"}
    assert [e["type"] for e in await report.aevents()][0] == "start"
"""


def write_project(root: Path) -> None:
    """The user's project: settings, manage.py, the shop app and both kinds of tests."""
    from django.conf import settings

    db = settings.DATABASES["default"]
    files = {
        "manage.py": MANAGE,
        "proj/__init__.py": "",
        "proj/settings.py": SETTINGS.format(
            user=str(db["USER"]),
            password=str(db.get("PASSWORD") or ""),
            host=str(db["HOST"]),
            port=str(db["PORT"]),
        ),
        "shop/__init__.py": "",
        "shop/models.py": MODELS,
        "shop/tests.py": DJANGO_TESTS,
        "shop/plain_cases.py": PLAIN_TESTCASE,
        "pytest.ini": PYTEST_INI,
        "conftest.py": CONFTEST,
        "pytests/test_reports.py": PYTEST_TESTS,
    }
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def maintenance_connection() -> psycopg.Connection[tuple[object, ...]]:
    """A connection to the test server's ``postgres`` database (autocommit)."""
    from django.conf import settings

    db = settings.DATABASES["default"]
    return psycopg.connect(
        dbname="postgres",
        user=str(db["USER"]) or None,
        password=str(db.get("PASSWORD") or "") or None,
        host=str(db["HOST"]) or None,
        port=str(db["PORT"]) or None,
        autocommit=True,
    )


class UserProject:
    """The user's project in a directory; each command runs on a database name of its own."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.names: list[str] = []
        write_project(root)

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``python *args`` in the project, as its user would run it."""
        name = f"shop_{uuid.uuid4().hex[:10]}"
        self.names.append(name)
        # The user's environment, not this suite's: no pytest, Django or streaming settings.
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("PYTEST", "DJANGO", "STREAMING", "DATABASE_URL"))
        }
        env.update(DJANGO_SETTINGS_MODULE="proj.settings", SHOP_DB_NAME=name)
        env["PYTHONUNBUFFERED"] = "1"
        return subprocess.run(
            [sys.executable, *args],
            cwd=self.root,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )

    def drop_databases(self) -> None:
        """What a failed run may have left: its database and Django's test database."""
        with maintenance_connection() as conn:
            for name in self.names:
                for db in (name, f"test_{name}"):
                    query = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                    conn.execute(query.format(sql.Identifier(db)))


@pytest.fixture
def project(tmp_path: Path) -> Iterator[UserProject]:
    user_project = UserProject(tmp_path / "userproject")
    try:
        yield user_project
    finally:
        user_project.drop_databases()


def output(done: subprocess.CompletedProcess[str]) -> str:
    return f"exit {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"


def test_a_users_django_and_pytest_suites_pass_and_leave_nothing_open(
    project: UserProject,
) -> None:
    made = project.run("manage.py", "makemigrations", "shop", "--noinput")
    assert made.returncode == 0, output(made)
    assert (project.root / "shop/migrations/0001_initial.py").is_file(), output(made)

    django = project.run("manage.py", "test", "shop", "--noinput", "-v", "2")
    assert django.returncode == 0, output(django)
    assert "Ran 3 tests" in django.stderr and "OK" in django.stderr, output(django)
    assert "Destroying test database" in django.stderr, output(django)
    assert LEFT_OPEN not in django.stdout + django.stderr, output(django)

    pytest_run = project.run("-m", "pytest", "-p", "no:cacheprovider", "-q")
    assert pytest_run.returncode == 0, output(pytest_run)
    assert "3 passed" in pytest_run.stdout, output(pytest_run)
    assert LEFT_OPEN not in pytest_run.stdout + pytest_run.stderr, output(pytest_run)


def test_a_plain_testcase_fails_at_once_saying_what_to_use(
    project: UserProject,
) -> None:
    made = project.run("manage.py", "makemigrations", "shop", "--noinput")
    assert made.returncode == 0, output(made)

    plain = project.run("manage.py", "test", "shop.plain_cases", "--noinput")
    assert plain.returncode == 1, output(plain)
    text = plain.stdout + plain.stderr
    assert "TaskNotCommitted" in text, output(plain)
    assert "the task's row is not committed" in text, output(plain)
    assert "TransactionTestCase" in text and "StreamingTestMixin" in text, output(plain)
    assert "FAILED (errors=1)" in text, output(plain)
    assert LEFT_OPEN not in text, output(plain)
