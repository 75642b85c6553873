"""The baseline: django-streaming-coordinator 0.2.1 from PyPI, in a virtualenv of its own.

The seed keeps tasks in one process's memory and has no API to create tasks: a client's
``GET /stream/{app}/{model}/{id}`` loads the row (SQLite here, as the seed defaults to) and
runs ``process()``. The small project below (settings and a task model that emits at a given
rate) is generated at run time; it is not seed code. uvloop and httptools are installed next
to it, as they are for us, so both run on the same HTTP stack.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx

from tests import support

PACKAGE = "django-streaming-coordinator==0.2.1"
EXTRAS = ("uvloop", "httptools")
VENV = support.ROOT / ".bench" / "seed-venv"
MARKER = "installed.txt"
# The seed's uvicorn waits for running tasks on SIGTERM; it keeps no state, so do not wait.
SEED_STOP = 2.0

SETTINGS = """\
SECRET_KEY = "seed-benchmark"
DEBUG = False
USE_TZ = True
ALLOWED_HOSTS = ["*"]
INSTALLED_APPS = ["django.contrib.contenttypes", "streaming", "benchapp"]
DATABASES = {{"default": {{"ENGINE": "django.db.backends.sqlite3", "NAME": {db!r}}}}}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
"""

MODELS = '''\
import asyncio
import json
import os
import time

from django.db import models
from streaming.models import StreamTask


class BenchTask(StreamTask):
    """Waits for ``wait_clients`` clients (or ``go_file``), then emits ``events`` ticks."""

    events = models.PositiveIntegerField(default=100)
    rate = models.FloatField(default=0.0)
    payload_size = models.PositiveIntegerField(default=0)
    wait_clients = models.PositiveIntegerField(default=0)
    go_file = models.CharField(max_length=500, blank=True, default="")
    times_file = models.CharField(max_length=500, blank=True, default="")

    async def process(self):
        deadline = time.monotonic() + 300
        while len(self._clients) < self.wait_clients or (
                self.go_file and not os.path.exists(self.go_file)):
            if time.monotonic() > deadline:
                raise TimeoutError("clients did not connect")
            await asyncio.sleep(0.005)
        pad = "x" * self.payload_size
        loop = asyncio.get_running_loop()
        start = loop.time()
        calls, returns = [], []
        for i in range(1, self.events + 1):
            if self.rate:
                delay = start + (i - 1) / self.rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            calls.append(time.time())
            await self.send_event("tick", {"i": i, "pad": pad} if pad else {"i": i})
            returns.append(time.time())
        if self.times_file:
            with open(self.times_file + ".tmp", "w") as out:
                json.dump({"calls": calls, "returns": returns}, out)
            os.replace(self.times_file + ".tmp", self.times_file)
        await self.send_event("complete", {"events": self.events})  # the seed's end of stream
        return {"events": self.events}
'''


def python() -> Path:
    return VENV / "bin" / "python"


def ensure_venv() -> Path:
    """The seed's virtualenv, created and installed on first use (cached under .bench/)."""
    marker = VENV / MARKER
    wanted = " ".join((PACKAGE, *EXTRAS))
    if marker.exists() and marker.read_text().strip() == wanted and python().exists():
        return VENV
    # Away from this project: `python -m` puts the working directory on sys.path, and this
    # project's own `streaming` must not be what the seed's pip or Python sees.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    VENV.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "venv", "--clear", str(VENV)], check=True, cwd=VENV.parent, env=env
    )
    out = subprocess.run(
        [str(python()), "-m", "pip", "install", "--disable-pip-version-check", PACKAGE, *EXTRAS],
        cwd=VENV.parent,
        env=env,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"installing the seed failed:\n{out.stdout}\n{out.stderr}")
    marker.write_text(wanted + "\n")
    return VENV


@dataclass
class SeedProject:
    """A generated Django project running the seed, with its SQLite database."""

    root: Path

    @property
    def db(self) -> Path:
        return self.root / "seed.sqlite3"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PYTHONPATH")}
        env.update(
            DJANGO_SETTINGS_MODULE="benchproj.settings",
            PYTHONPATH=str(self.root),
            PYTHONUNBUFFERED="1",
        )
        return env

    def manage(self, *args: str) -> None:
        subprocess.run(
            [str(python()), "-m", "django", *args],
            cwd=self.root,
            env=self.env(),
            check=True,
            capture_output=True,
        )

    def create_task(self, **fields: object) -> int:
        """Insert a BenchTask row; the seed starts it on the first GET of its stream."""
        now = datetime.now(UTC).isoformat()
        row = {
            "events": 100,
            "rate": 0.0,
            "payload_size": 0,
            "wait_clients": 0,
            "go_file": "",
            "times_file": "",
            **fields,
        }
        cols = ", ".join(["created_at", "updated_at", *row])
        marks = ", ".join("?" * (len(row) + 2))
        with sqlite3.connect(self.db) as conn:
            cur = conn.execute(
                f"INSERT INTO benchapp_benchtask ({cols}) VALUES ({marks})",
                (now, now, *row.values()),
            )
            return int(cur.lastrowid or 0)

    def start_server(self, log_dir: Path) -> support.ManagedProcess:
        port = support.free_port()
        log_path = log_dir / f"seed-{port}-{time.monotonic_ns()}.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                [
                    str(python()),
                    "-m",
                    "django",
                    "runserver_stream",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                ],
                cwd=self.root,
                env=self.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        mp = support.ManagedProcess(["seed"], proc, log_path, port)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"seed server exited:\n{mp.log()}")
            try:
                if httpx.get(mp.url + "/health", timeout=1).text == "OK":
                    return mp
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        mp.stop()
        raise RuntimeError(f"seed server did not answer:\n{mp.log()}")


def make_project(root: Path) -> SeedProject:
    """Write the settings and the task model, then create the SQLite tables."""
    ensure_venv()
    project = SeedProject(root)
    for package, files in {
        "benchproj": {"settings.py": SETTINGS.format(db=str(project.db))},
        "benchapp": {"models.py": MODELS},
        "benchapp/migrations": {},
    }.items():
        pkg = root / package
        pkg.mkdir(parents=True, exist_ok=True)
        (pkg / "__init__.py").write_text("")
        for name, text in files.items():
            (pkg / name).write_text(textwrap.dedent(text))
    project.manage("makemigrations", "benchapp")
    project.manage("migrate")
    return project
