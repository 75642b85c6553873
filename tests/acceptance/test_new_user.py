"""A new user's first hour, as subprocesses: the README's "Use it in your project", steps 1-8.

The wheel is built from the repository and installed, with its dependencies, into a fresh venv
of the newest Python that has the newest Django (3.13 and Django 6.1 here); ``django-admin
startproject`` makes a project, ``startapp`` an app whose model, admin and tests are the
README's own code blocks (the task's sleeps shortened). Then, as the README says: the system
check refuses SQLite, ``makemigrations`` and ``migrate`` on a fresh Postgres database, a sync
view starts tasks under ``runserver`` while ``runserver_stream`` streams them and runs them,
the admin shows them, the README's ``asgi.py`` mounts the streams on the site's origin under
uvicorn, ``manage.py test`` runs the README's test, and both servers stop on SIGTERM.

Nothing here imports the repository into the user's processes: they run in the user's
project directory, with the venv's interpreter and no inherited Django or streaming settings.
``pytest -s`` prints how long each step took.
"""

from __future__ import annotations

import glob
import html
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest
from psycopg import sql as pgsql

from tests import support

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = support.ROOT
README = ROOT / "README.md"
SSE_HEADERS = {"Accept": "text/event-stream"}
CALLS = 200  # view calls in the sessions check
SAMPLE_EVERY = 20
SESSION_SPREAD = 2  # max - min of the sampled session counts
STOP_WITHIN = 15.0  # seconds a server may take to exit on SIGTERM
PAGES = 10  # the README's Report sends this many progress events
SHORT_SLEEP = "0.02"  # seconds per page instead of the README's 1
ADMIN_USER, ADMIN_PASSWORD = "admin", "a-long-new-user-password-1"
# What the environment must not carry into the user's processes (the test process has
# DJANGO_SETTINGS_MODULE=tests.settings and the test database's DATABASE_URL).
SCRUBBED_PREFIXES = ("DJANGO_", "STREAMING_", "PYTHON", "VIRTUAL_ENV", "PYENV_VERSION")
SCRUBBED = {"DATABASE_URL"}
NEWEST_FIRST = ("3.14", "3.13", "3.12")  # the Pythons that Django 6.1 supports


# -- the README's code blocks -------------------------------------------------------------------


def readme_block(after: str, lang: str = "python") -> str:
    """The first ```lang block of the README after the first line containing ``after``."""
    text = README.read_text()
    assert after in text, f"README.md has no {after!r} (the step this test follows)"
    start = text.index(after)
    match = re.search(rf"```{lang}\n(.*?)```", text[start:], re.DOTALL)
    assert match, f"no ```{lang} block after {after!r} in README.md"
    return match.group(1)


def readme_block_starting(first_line: str, lang: str = "python") -> str:
    """The ```lang block of the README whose first line is ``first_line``."""
    for match in re.finditer(rf"```{lang}\n(.*?)```", README.read_text(), re.DOTALL):
        if match.group(1).startswith(first_line + "\n"):
            return match.group(1)
    raise AssertionError(f"README.md has no ```{lang} block starting with {first_line!r}")


def replaced(text: str, old: str, new: str, what: str) -> str:
    """``text`` with ``old`` replaced, asserting the README still has ``old``."""
    assert old in text, f"README's {what} no longer contains {old!r}:\n{text}"
    return text.replace(old, new)


# -- timing and subprocesses --------------------------------------------------------------------


@dataclass
class Clock:
    started: float = field(default_factory=time.monotonic)
    steps: list[tuple[str, float]] = field(default_factory=list)
    _last: float = field(default_factory=time.monotonic)

    def step(self, name: str) -> None:
        now = time.monotonic()
        self.steps.append((name, now - self._last))
        self._last = now
        print(f"[new user] {name}: {self.steps[-1][1]:.1f}s", flush=True)

    def report(self) -> str:
        lines = [f"  {name:<48} {secs:6.1f}s" for name, secs in self.steps]
        lines.append(f"  {'total':<48} {time.monotonic() - self.started:6.1f}s")
        return "\n".join(lines)


def show(cmd: Sequence[object]) -> str:
    return " ".join(str(c) for c in cmd)


def run(
    cmd: Sequence[object],
    *,
    env: dict[str, str],
    cwd: Path,
    timeout: float = 120,
    expect: int | None = 0,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` to completion; with ``expect``, assert its exit code (output in the message)."""
    try:
        out = subprocess.run(
            [str(c) for c in cmd],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"`{show(cmd)}` (in {cwd}) did not finish in {timeout}s:\n"
            f"{_text(exc.stdout)}{_text(exc.stderr)}"
        ) from None
    if expect is not None:
        assert out.returncode == expect, (
            f"`{show(cmd)}` (in {cwd}) exited with {out.returncode}, expected {expect}:\n"
            f"--- stdout\n{out.stdout}\n--- stderr\n{out.stderr}"
        )
    return out


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")


@dataclass
class Server:
    """A long-running child process, its output in a file."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, path: str, ok: Callable[[httpx.Response], bool], wait: float) -> None:
        deadline = time.monotonic() + wait
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.proc.returncode} before it answered "
                    f"{path}:\n{self.log()}"
                )
            try:
                resp = httpx.get(self.url + path, timeout=2)
                if ok(resp):
                    return
                last = f"{resp.status_code} {resp.text[:300]}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.1)
        raise AssertionError(
            f"{self.name} did not answer {path} in {wait}s (last: {last}):\n{self.log()}"
        )

    def terminate(self, within: float = STOP_WITHIN) -> tuple[int | None, float]:
        """SIGTERM; (exit code or None if still running after ``within`` s, seconds taken)."""
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(within)
        except subprocess.TimeoutExpired:
            return None, time.monotonic() - started
        return self.proc.returncode, time.monotonic() - started

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def start_server(
    name: str, cmd: Sequence[object], *, env: dict[str, str], cwd: Path, port: int
) -> Server:
    log_path = cwd.parent / f"{name}-{port}.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [str(c) for c in cmd], env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT
        )
    return Server(name, proc, log_path, port)


# -- the interpreter, the venv ------------------------------------------------------------------


def python_version(python: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run(
            [python, "-c", "import sys; print(*sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    major, minor = out.stdout.split()
    return int(major), int(minor)


def pyenv_root() -> Path:
    if os.environ.get("PYENV_ROOT"):
        return Path(os.environ["PYENV_ROOT"])
    try:
        out = subprocess.run(
            ["pyenv", "root"], capture_output=True, text=True, timeout=30, check=True
        )
        return Path(out.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return Path.home() / ".pyenv"


def ci_python(minor: str) -> str | None:
    """``.ci/python X.Y``: the CI's way of finding a working interpreter (its path), if any."""
    script = ROOT / ".ci" / "python"
    if not (script.is_file() and os.access(script, os.X_OK)):
        return None
    try:
        out = subprocess.run(
            [str(script), minor], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    path = out.stdout.strip()
    return path if out.returncode == 0 and path else None


def newest_python() -> tuple[str, tuple[int, int], list[str]]:
    """The interpreter for the user's venv and the Django requirement to install with it.

    The newest Python 3.12+ that is found (by ``.ci/python X.Y`` when the repository has it,
    else in pyenv's versions or on PATH) with Django 6.1, the newest; without one, this
    interpreter and the newest Django it supports (no pin).
    """
    for minor in NEWEST_FIRST:
        candidates = [ci_python(minor)]
        candidates += sorted(
            glob.glob(str(pyenv_root() / "versions" / f"{minor}.*/bin/python{minor}")),
            reverse=True,
        )
        candidates.append(shutil.which(f"python{minor}"))
        for candidate in candidates:
            if candidate and python_version(candidate) == tuple(map(int, minor.split("."))):
                major, low = map(int, minor.split("."))
                return candidate, (major, low), ["django>=6.1,<6.2"]
    here = sys.version_info[:2]
    print(
        f"[new user] NO Python 3.12+ found: falling back to {sys.executable} "
        f"({here[0]}.{here[1]}) with the newest Django it supports",
        flush=True,
    )
    return sys.executable, (here[0], here[1]), []


def user_env(venv: Path, **extra: str) -> dict[str, str]:
    """The environment of a user's shell with the venv activated: nothing of this test's."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(SCRUBBED_PREFIXES) and k not in SCRUBBED
    }
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def copy_source(dest: Path) -> Path:
    """The repository's tree without venvs, caches, builds and egg-info (which would leak in)."""

    def ignore(directory: str, names: list[str]) -> set[str]:
        skipped = {n for n in names if n == "__pycache__"}
        if Path(directory) == ROOT:
            skipped |= {n for n in names if n.startswith(".") or n in ("build", "dist")}
            skipped |= {n for n in names if n.endswith(".egg-info")}
        return skipped

    shutil.copytree(ROOT, dest, symlinks=True, ignore=ignore)
    return dest


# What the venv's interpreter reports about its site-packages (importlib.metadata only).
INSPECT_SITE = r"""
import importlib.metadata as md, json, os, re, sysconfig

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

site = sysconfig.get_paths()["purelib"]
dists = {}
for dist in md.distributions():
    tops = sorted({f.parts[0] for f in (dist.files or []) if f.parts and f.parts[0] != ".."})
    requires = []
    for req in dist.requires or []:
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
        if m:
            requires.append(norm(m.group(1)))
    dists[norm(dist.metadata["Name"])] = {
        "version": dist.version, "top": tops, "requires": requires,
        "has_record": dist.read_text("RECORD") is not None,
    }
print(json.dumps({"site": site, "entries": sorted(os.listdir(site)), "dists": dists}))
"""


def check_site_packages(python: Path, env: dict[str, str], cwd: Path) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(run([python, "-c", INSPECT_SITE], env=env, cwd=cwd).stdout)
    dists: dict[str, dict[str, Any]] = info["dists"]
    ours = dists.get("django-streaming-tasks")
    assert ours, f"django-streaming-tasks is not installed in the venv: {sorted(dists)}"
    assert ours["has_record"], "django-streaming-tasks has no RECORD"
    modules = [t for t in ours["top"] if not t.endswith(".dist-info")]
    assert modules == ["streaming"], (
        f"django-streaming-tasks installs the top-level names {modules}, expected only "
        f"['streaming'] (RECORD's top-level entries: {ours['top']})"
    )
    for stray in ("tests", "benchmarks", "docker", "docs", "migrations_sql", "manage.py"):
        assert stray not in info["entries"], f"site-packages holds {stray!r}: {info['entries']}"
    # Every entry of site-packages is claimed by an installed distribution's RECORD...
    claimed = {top for d in dists.values() for top in d["top"]}
    unclaimed = sorted(set(info["entries"]) - claimed - {"__pycache__"})
    assert unclaimed == [], (
        f"site-packages entries that no installed distribution's RECORD declares: {unclaimed}"
    )
    # ... and every distribution is ours, one of our declared dependencies (followed down,
    # extras included), or the venv's own pip.
    wanted = {"django-streaming-tasks", "django"}
    todo = list(wanted)
    while todo:
        for req in dists.get(todo.pop(), {}).get("requires", []):
            if req not in wanted:
                wanted.add(req)
                todo.append(req)
    extra = sorted(set(dists) - wanted - {"pip", "setuptools", "wheel"})
    assert extra == [], f"distributions installed that nothing declared: {extra}"
    return info


# -- the user's project -------------------------------------------------------------------------


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{path.name} as generated has no {old!r}:\n{text}"
    path.write_text(text.replace(old, new, 1))


def add_apps(settings: Path) -> None:
    text = settings.read_text()
    match = re.search(r"INSTALLED_APPS = \[\n(.*?)\n\]", text, re.DOTALL)
    assert match, f"no INSTALLED_APPS list in the generated settings.py:\n{text}"
    body = match.group(1).rstrip().rstrip(",")
    settings.write_text(
        text[: match.start(1)] + body + ',\n    "streaming",\n    "reports",' + text[match.end(1) :]
    )


def use_database_url(settings: Path) -> None:
    """The README's step 2, the DATABASE_URL form, in place of the generated SQLite entry."""
    text = settings.read_text()
    match = re.search(r"^DATABASES = \{\n.*?^\}\n", text, re.DOTALL | re.MULTILINE)
    assert match, f"no DATABASES block in the generated settings.py:\n{text}"
    step2 = readme_block("**2. Settings.**")
    assert "import streaming.dburl\n" in step2, step2
    assert 'DATABASES = {"default": streaming.dburl.database()}' in step2, step2
    # The block as written, but for its INSTALLED_APPS line (done on the generated list).
    new = "".join(line for line in step2.splitlines(True) if "INSTALLED_APPS" not in line)
    settings.write_text(text[: match.start()] + new + text[match.end() :])


VIEWS = """\
from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from .models import Report


@csrf_exempt
@require_POST
def start(request):
    report = Report.objects.create(title=request.POST.get("title", "Q3"))
    report.start()
    return JsonResponse({"id": report.pk, "stream": report.stream_url(signed=True)})
"""

URLS = """\
from django.contrib import admin
from django.urls import path

from reports import views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("start/", views.start, name="start"),
    path("reports/new/", views.new_report, name="new_report"),  # the README's step 5
    path("reports/<int:pk>/", views.report, name="report"),
]
"""


def write_app(project: Path, stream_port: int) -> None:
    """The README's model (step 3), views (5), template (6), admin (7) and test (8); start/."""
    model = replaced(
        readme_block("**3. A task model**"),
        "await asyncio.sleep(1)",
        f"await asyncio.sleep({SHORT_SLEEP})",
        "step 3 (the model)",
    )
    (project / "reports" / "models.py").write_text(model)
    admin_code = replaced(
        readme_block("**7. The admin**"),
        'stream_base_url = "http://127.0.0.1:8888"',
        f'stream_base_url = "http://127.0.0.1:{stream_port}"',
        "step 7 (the admin)",
    )
    (project / "reports" / "admin.py").write_text(admin_code)
    tests = readme_block("**8. Test it.**")
    assert "Report.objects.create" in tests and "from .models import Report" in tests, tests
    (project / "reports" / "tests.py").write_text(tests)
    # Step 5's views beside the start/ view, and step 6's template where it says.
    step5 = replaced(
        readme_block("**5. Start a task from a view**"),
        'STREAMS = "http://127.0.0.1:8888"',
        f'STREAMS = "http://127.0.0.1:{stream_port}"',
        "step 5 (the views)",
    )
    (project / "reports" / "views.py").write_text(f"{VIEWS}\n\n{step5}")
    assert "`reports/templates/report.html`" in README.read_text()
    templates = project / "reports" / "templates"
    templates.mkdir()
    (templates / "report.html").write_text(readme_block("**6. Show its progress**", "html"))
    (project / "mysite" / "urls.py").write_text(URLS)


def write_asgi(project: Path) -> None:
    """The README's ``myproject/asgi.py`` (step 4), for this project's name."""
    code = readme_block_starting("# myproject/asgi.py")
    code = replaced(code, '"myproject.settings"', '"mysite.settings"', "step 4 (asgi.py)")
    (project / "mysite" / "asgi.py").write_text(code)


# -- Postgres -----------------------------------------------------------------------------------


def with_dbname(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


def sessions(admin_url: str, dbname: str) -> list[tuple[Any, ...]]:
    """The sessions on ``dbname`` (read from a connection to another database)."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid, application_name, state, backend_type, left(query, 80)"
            " FROM pg_stat_activity WHERE datname = %s ORDER BY pid",
            (dbname,),
        ).fetchall()
    return list(rows)


def on_db(url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(query.encode(), params or None)
        return list(cur.fetchall()) if cur.description else []


def drop_database(admin_url: str, dbname: str) -> str | None:
    """DROP it (WITH (FORCE) when sessions remain); what was left, if it needed FORCE."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        try:
            conn.execute(pgsql.SQL("DROP DATABASE IF EXISTS {}").format(pgsql.Identifier(dbname)))
            return None
        except psycopg.errors.ObjectInUse as exc:
            left = f"{exc}; sessions: {sessions(admin_url, dbname)}"
            conn.execute(
                pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    pgsql.Identifier(dbname)
                )
            )
            return left


@pytest.fixture
def new_database(live_db: str) -> Iterator[tuple[str, str]]:
    """A fresh database on the test's Postgres: (its name, its URL); dropped at the end."""
    name = f"newuser_{secrets.token_hex(4)}"
    with psycopg.connect(live_db, autocommit=True) as conn:
        conn.execute(pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(name)))
    try:
        yield name, with_dbname(live_db, name)
    finally:
        for leftover in (name, f"test_{name}"):  # manage.py test's, if it left it
            forced = drop_database(live_db, leftover)
            if forced:
                print(f"[new user] DROP DATABASE {leftover} needed FORCE: {forced}", flush=True)


# -- SSE ----------------------------------------------------------------------------------------


def stream_to_end(url: str, timeout: float = 30.0) -> tuple[httpx.Response, list[support.SSE], str]:
    """GET an SSE stream and read it until its ``end`` event: (response, events, raw text)."""
    buf = ""
    deadline = time.monotonic() + timeout
    with (
        httpx.Client(timeout=timeout) as client,
        client.stream("GET", url, headers=SSE_HEADERS) as resp,
    ):
        if not resp.headers.get("content-type", "").startswith("text/event-stream"):
            resp.read()
            return resp, [], resp.text
        for chunk in resp.iter_text():
            buf += chunk
            events = support.parse_sse(buf[: buf.rfind("\n\n") + 2] if "\n\n" in buf else "")
            if any(e.event == "end" for e in events) or time.monotonic() > deadline:
                break
    complete = buf[: buf.rfind("\n\n") + 2] if "\n\n" in buf else ""
    return resp, support.parse_sse(complete), buf


def check_report_stream(url: str, where: str) -> list[support.SSE]:
    resp, events, raw = stream_to_end(url)
    assert resp.status_code == 200, f"{where}: GET {url} -> {resp.status_code}: {raw[:2000]}"
    types = [e.event for e in events]
    assert types and types[-1] == "end", f"{where}: the stream has no end event:\n{raw[:4000]}"
    progress = [e for e in events if e.event == "progress"]
    assert [e.id for e in progress] == list(range(1, PAGES + 1)), (
        f"{where}: progress ids {[e.id for e in progress]}, expected 1..{PAGES}:\n{raw[:4000]}"
    )
    assert [(e.data["page"], e.data["of"]) for e in progress] == [
        (page, PAGES) for page in range(1, PAGES + 1)
    ], f"{where}: progress data out of order:\n{raw[:4000]}"
    assert types == ["progress"] * PAGES + ["end"], f"{where}: events {types}"
    end = events[-1]
    assert end.id == PAGES + 1, f"{where}: end has id {end.id}, expected {PAGES + 1}"
    assert end.data.get("status") == "completed", f"{where}: end event {end.data}"
    assert end.data.get("final_value") == {"pages": PAGES}, f"{where}: end event {end.data}"
    return events


# -- the admin ----------------------------------------------------------------------------------


def admin_login(client: httpx.Client, base: str) -> None:
    page = client.get(base + "/admin/login/")
    assert page.status_code == 200, f"GET /admin/login/ -> {page.status_code}: {page.text[:2000]}"
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
    assert token, f"no CSRF token on /admin/login/:\n{page.text[:3000]}"
    resp = client.post(
        base + "/admin/login/?next=/admin/",
        data={
            "csrfmiddlewaretoken": token.group(1),
            "username": ADMIN_USER,
            "password": ADMIN_PASSWORD,
            "next": "/admin/",
        },
        headers={"Referer": base + "/admin/login/"},
    )
    assert resp.status_code == 302 and resp.headers.get("location") == "/admin/", (
        f"login POST -> {resp.status_code} {resp.headers.get('location')}: {resp.text[:3000]}"
    )
    assert "sessionid" in client.cookies, f"no session cookie after login: {client.cookies}"


def admin_page(client: httpx.Client, base: str, path: str) -> str:
    resp = client.get(base + path)
    assert resp.status_code == 200, f"GET {path} -> {resp.status_code}:\n{resp.text[:3000]}"
    assert "/admin/login/" not in str(resp.url), f"GET {path} sent back to the login page"
    return resp.text


# -- the test -----------------------------------------------------------------------------------


@pytest.mark.timeout(900)
def test_a_new_user_follows_the_readme(
    tmp_path: Path, live_db: str, new_database: tuple[str, str]
) -> None:
    clock = Clock()
    dbname, db_url = new_database
    servers: list[Server] = []
    try:
        _follow_the_readme(tmp_path, live_db, dbname, db_url, servers, clock)
    finally:
        for server in servers:
            server.kill()
        print("[new user] timings:\n" + clock.report(), flush=True)


def _follow_the_readme(
    tmp: Path, live_db: str, dbname: str, db_url: str, servers: list[Server], clock: Clock
) -> None:
    # 1. Build the wheel, install it with [embedded] and the newest Django in a fresh venv.
    source = copy_source(tmp / "source")
    dist = tmp / "dist"
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", dist, source],
        env=dict(os.environ), cwd=tmp, timeout=300,
    )  # fmt: skip
    wheels = sorted(dist.glob("django_streaming_tasks-*.whl"))
    assert len(wheels) == 1, f"expected one django_streaming_tasks wheel in {dist}: {wheels}"
    wheel = wheels[0]
    clock.step("build the wheel")

    python, version, django_pin = newest_python()
    print(f"[new user] venv Python: {python} ({version[0]}.{version[1]})", flush=True)
    venv = tmp / "venv"
    run([python, "-m", "venv", venv], env=user_env(venv), cwd=tmp, timeout=120)
    vpy = venv / "bin" / "python"
    env = user_env(venv)
    run(
        [vpy, "-m", "pip", "install", "-q", f"{wheel}[embedded]", *django_pin],
        env=env, cwd=tmp, timeout=300,
    )  # fmt: skip
    django_version = run(
        [vpy, "-c", "import django; print(django.get_version())"], env=env, cwd=tmp
    ).stdout.strip()
    print(f"[new user] Django {django_version} on Python {version[0]}.{version[1]}", flush=True)
    if django_pin:
        assert django_version.startswith("6.1"), f"Django {django_version} installed, not 6.1"
    clock.step(f"venv (Python {version[0]}.{version[1]}, Django {django_version}) and install")

    # 2. site-packages holds streaming and the declared dependencies, nothing else.
    check_site_packages(vpy, env, tmp)
    probe = run([vpy, "-c", "import tests"], env=env, cwd=tmp, expect=None)
    assert probe.returncode != 0, "`import tests` works in the user's venv: a stray package"
    clock.step("site-packages")

    # 3. startproject, startapp, the README's model; SQLite is refused, Postgres migrates.
    run([venv / "bin" / "django-admin", "startproject", "mysite"], env=env, cwd=tmp)
    project = tmp / "mysite"
    manage = [vpy, "manage.py"]
    run([*manage, "startapp", "reports"], env=env, cwd=project)
    stream_port, site_port, asgi_port = support.free_port(), support.free_port(), 0
    while asgi_port in (0, stream_port, site_port):
        asgi_port = support.free_port()
    write_app(project, stream_port)
    settings = project / "mysite" / "settings.py"
    add_apps(settings)

    check = run([*manage, "check"], env=env, cwd=project, expect=None)
    output = check.stdout + check.stderr
    assert check.returncode != 0, f"`manage.py check` on SQLite passed:\n{output}"
    assert "streaming.E001" in output and "PostgreSQL" in output, (
        f"`manage.py check` on SQLite failed without streaming.E001 / PostgreSQL:\n{output}"
    )

    use_database_url(settings)
    env = user_env(venv, DATABASE_URL=db_url)
    run([*manage, "check"], env=env, cwd=project)
    made = run([*manage, "makemigrations", "reports"], env=env, cwd=project)
    assert (project / "reports" / "migrations" / "0001_initial.py").exists(), made.stdout
    run([*manage, "migrate"], env=env, cwd=project, timeout=180)
    tables = {
        row[0]
        for row in on_db(db_url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    }
    for table in ("reports_report", "streaming_taskrun", "streaming_taskevent"):
        assert table in tables, f"after migrate, no {table} in {sorted(tables)}"
    clock.step("startproject, check, makemigrations, migrate")

    # 4. runserver and runserver_stream; 200 calls of the view; the sessions stay flat.
    site = start_server(
        "runserver",
        [*manage, "runserver", "--noreload", f"127.0.0.1:{site_port}"],
        env=env, cwd=project, port=site_port,
    )  # fmt: skip
    servers.append(site)
    streams = start_server(
        "runserver_stream",
        [*manage, "runserver_stream", "--host", "127.0.0.1", "--port", str(stream_port)],
        env=env, cwd=project, port=stream_port,
    )  # fmt: skip
    servers.append(streams)
    site.wait_ready("/admin/login/", lambda r: r.status_code == 200, 60)
    streams.wait_ready("/health", lambda r: r.text == "OK", 60)
    assert f"127.0.0.1:{stream_port}" in streams.log(), (
        f"runserver_stream does not log where it listens:\n{streams.log()}"
    )
    clock.step("servers up")

    samples: list[tuple[int, list[tuple[Any, ...]]]] = [(0, sessions(live_db, dbname))]
    ids: list[int] = []
    with httpx.Client(base_url=site.url, timeout=30) as client:
        for call in range(1, CALLS + 1):
            resp = client.post("/start/", data={"title": f"report {call}"})
            assert resp.status_code == 200, (
                f"call {call}: POST /start/ -> {resp.status_code}:\n{resp.text[:3000]}\n"
                f"--- runserver:\n{site.log()[-5000:]}"
            )
            ids.append(resp.json()["id"])
            if call % SAMPLE_EVERY == 0:
                samples.append((call, sessions(live_db, dbname)))
    counts = [(call, len(rows)) for call, rows in samples]
    later = [n for _, n in counts[1:]]
    detail = "\n".join(f"after {call} calls: {rows}" for call, rows in samples)
    assert max(later) - min(later) <= SESSION_SPREAD, (
        f"sessions on {dbname} grew with the calls (after N calls: count): {counts}\n{detail}"
    )
    assert len(set(ids)) == CALLS, f"the view returned {len(set(ids))} distinct ids"
    print(f"[new user] sessions on {dbname} (after N calls: count): {counts}", flush=True)

    deadline = time.monotonic() + 60
    statuses: list[tuple[Any, ...]] = []
    while time.monotonic() < deadline:
        statuses = on_db(
            db_url,
            "SELECT status, count(*) FROM streaming_taskrun WHERE model_name = 'Report'"
            " GROUP BY status ORDER BY status",
        )
        if statuses == [("completed", CALLS)]:
            break
        time.sleep(0.2)
    assert statuses == [("completed", CALLS)], (
        f"the {CALLS} tasks did not all complete in 60 s: {statuses}\n"
        f"--- runserver_stream:\n{streams.log()[-5000:]}"
    )
    clock.step(f"{CALLS} view calls, all tasks completed")

    # 5. One task streamed to its end, from the stream server (the view's signed URL).
    with httpx.Client(base_url=site.url, timeout=30) as client:
        started = client.post("/start/", data={"title": "streamed"}).json()
    streamed_id = started["id"]
    assert started["stream"].startswith(f"/stream/reports/Report/{streamed_id}"), started
    check_report_stream(streams.url + started["stream"], "runserver_stream")
    clock.step("one task streamed to end")

    # 6. A superuser; the admin's pages.
    run(
        [*manage, "createsuperuser", "--noinput"],
        env={**env, "DJANGO_SUPERUSER_USERNAME": ADMIN_USER,
             "DJANGO_SUPERUSER_PASSWORD": ADMIN_PASSWORD,
             "DJANGO_SUPERUSER_EMAIL": "admin@example.com"},
        cwd=project,
    )  # fmt: skip
    with httpx.Client(timeout=30) as client:
        admin_login(client, site.url)
        changelist = admin_page(client, site.url, "/admin/reports/report/")
        assert "streamed" in changelist and "completed" in changelist.lower(), (
            f"the Report changelist shows neither the title nor the status:\n{changelist[:5000]}"
        )
        change = admin_page(client, site.url, f"/admin/reports/report/{streamed_id}/change/")
        watch = f"http://127.0.0.1:{stream_port}/watch/reports/Report/{streamed_id}"
        assert watch in change, f"the change page has no watch link {watch}:\n{change[:8000]}"
        assert re.search(r">\s*[Cc]ompleted\s*<", change), (
            f"the change page does not show the status completed:\n{change[:8000]}"
        )
        assert '"pages": 10' in html.unescape(change), (
            f"the change page does not show the result {{'pages': 10}}:\n{change[:8000]}"
        )
        # The README's step 5 and 6: the form's POST, the redirect, the page, its stream.
        csrf = client.cookies.get("csrftoken")
        assert csrf, f"no csrftoken cookie after the admin login: {client.cookies}"
        created = client.post(
            site.url + "/reports/new/",
            data={"title": "from the page", "csrfmiddlewaretoken": csrf},
            headers={"Referer": site.url + "/"},
        )
        location = created.headers.get("location", "")
        assert created.status_code == 302 and re.fullmatch(r"/reports/\d+/", location), (
            f"POST /reports/new/ -> {created.status_code} {location!r}:\n{created.text[:3000]}"
        )
        page = client.get(site.url + location)
        assert page.status_code == 200, f"GET {location} -> {page.status_code}:\n{page.text}"
        assert '<progress id="bar" max="10" value="0">' in page.text, page.text
        script = re.search(
            r'<script id="stream-url" type="application/json">(.*?)</script>', page.text
        )
        assert script, f"no stream-url json_script on {location}:\n{page.text}"
        page_stream = json.loads(script.group(1))
        page_id = int(location.strip("/").rsplit("/", 1)[1])
        assert page_stream.startswith(
            f"http://127.0.0.1:{stream_port}/stream/reports/Report/{page_id}?token="
        ), page_stream
        check_report_stream(page_stream, f"the README's report page {location}")
        runs = admin_page(client, site.url, "/admin/streaming/taskrun/")
        assert "reports.Report #" in runs, f"the run changelist lists no Report:\n{runs[:5000]}"
        events = admin_page(client, site.url, "/admin/streaming/taskevent/")
        assert "progress" in events, f"the event changelist shows no progress:\n{events[:5000]}"
    clock.step("superuser and admin pages")

    # 4b. The README's asgi.py under uvicorn: Django and the streams on one origin.
    write_asgi(project)
    uvicorn = start_server(
        "uvicorn",
        [vpy, "-m", "uvicorn", "mysite.asgi:application", "--host", "127.0.0.1",
         "--port", str(asgi_port)],
        env=env, cwd=project, port=asgi_port,
    )  # fmt: skip
    servers.append(uvicorn)
    uvicorn.wait_ready("/admin/login/", lambda r: r.status_code == 200, 60)
    with httpx.Client(base_url=uvicorn.url, timeout=30) as client:
        mounted = client.post("/start/", data={"title": "mounted"})
        assert mounted.status_code == 200, (
            f"POST /start/ through the mount -> {mounted.status_code}:\n{mounted.text[:3000]}\n"
            f"--- uvicorn:\n{uvicorn.log()}"
        )
    check_report_stream(uvicorn.url + mounted.json()["stream"], "the ASGI mount (uvicorn)")
    clock.step("asgi.py mount under uvicorn")

    # 7. The README's test, with manage.py test.
    tested = run([*manage, "test", "reports"], env=env, cwd=project, timeout=180, expect=None)
    output = tested.stdout + tested.stderr
    assert tested.returncode == 0, f"`manage.py test reports` exited {tested.returncode}:\n{output}"
    assert "being accessed by other users" not in output, (
        f"`manage.py test reports` could not drop its test database:\n{output}"
    )
    assert re.search(r"Ran 1 test", output) and "OK" in output, output
    clock.step("manage.py test reports")

    # 8. SIGTERM: each server exits within STOP_WITHIN seconds, leaving no session behind.
    stopped = {s.name: s.terminate() for s in servers}
    slow = {name: secs for name, (code, secs) in stopped.items() if code is None}
    logs = "\n".join(f"--- {s.name}:\n{s.log()[-5000:]}" for s in servers if s.name in slow)
    assert not slow, f"still running {STOP_WITHIN:g}s after SIGTERM: {sorted(slow)}\n{logs}"
    print(f"[new user] SIGTERM: {stopped}", flush=True)
    by_name = {s.name: s for s in servers}
    assert stopped["runserver_stream"][0] == 0, (
        f"runserver_stream exited with {stopped['runserver_stream'][0]} on SIGTERM:\n"
        + by_name["runserver_stream"].log()[-5000:]
    )
    # uvicorn re-raises the signal once it has shut down cleanly: -SIGTERM is its clean exit.
    uvicorn_log = by_name["uvicorn"].log()
    assert stopped["uvicorn"][0] in (0, -signal.SIGTERM), (
        f"uvicorn exited with {stopped['uvicorn'][0]} on SIGTERM:\n{uvicorn_log[-5000:]}"
    )
    assert "Application shutdown complete" in uvicorn_log, (
        f"the mount's lifespan shutdown did not complete:\n{uvicorn_log[-5000:]}"
    )
    deadline = time.monotonic() + 5
    while sessions(live_db, dbname) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = sessions(live_db, dbname)
    assert left == [], f"sessions left on {dbname} once every server exited: {left}"
    clock.step("SIGTERM")
