"""One origin for real: ``tests.asgi:application`` (``streaming.asgi.mount``) under a uvicorn
process, and docs/nginx-one-origin.conf in front of ``runserver_stream`` and Django's own
``runserver``. Django's pages, the stream routes and the session cookie share one port."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.contrib.auth import get_user_model

from tests import faults, support
from tests.faults import wait_until
from tests.models import ExampleTask
from tests.support import ManagedProcess, read_stream

pytestmark = pytest.mark.django_db(transaction=True)
SSE = {"Accept": "text/event-stream"}
NGINX_CONF = support.ROOT / "docs" / "nginx-one-origin.conf"
PASSWORD = "a-long-test-password-1"


def start_uvicorn(env: dict[str, str], log_dir: Path, wait: float = 30.0) -> ManagedProcess:
    """``python -m uvicorn tests.asgi:application --port P``; returns once Django answers."""
    port = support.free_port()
    log_path = log_dir / f"uvicorn-{port}.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "tests.asgi:application", "--port", str(port)],
            cwd=support.ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    mp = ManagedProcess(["uvicorn"], proc, log_path, port)
    wait_until(lambda: _answers(mp, "/admin/login/"), wait, "uvicorn to serve Django", 0.1)
    return mp


def _answers(mp: ManagedProcess, path: str) -> bool:
    if mp.proc.poll() is not None:
        raise RuntimeError(f"{mp.args[0]} exited with {mp.proc.returncode}:\n{mp.log()}")
    try:
        return httpx.get(mp.url + path, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def uvicorn_factory(live_db: str, tmp_path: Path) -> Iterator[Callable[..., ManagedProcess]]:
    """Start uvicorn processes serving the example's mount on the test database."""
    started: list[ManagedProcess] = []

    def start(**env: str) -> ManagedProcess:
        mp = start_uvicorn(support.child_env(live_db, **env), tmp_path)
        started.append(mp)
        return mp

    yield start
    for mp in started:
        mp.stop()


def create(url: str, headers: dict[str, str] | None = None, **fields: Any) -> httpx.Response:
    return httpx.post(url + "/tasks/tests/ExampleTask", json=fields, headers=headers or {})


def created(url: str, **fields: Any) -> dict[str, Any]:
    resp = create(url, **fields)
    assert resp.status_code == 201, resp.text
    body: dict[str, Any] = resp.json()
    return body


def assert_complete(events: list[support.SSE], first: int = 1) -> None:
    """A whole stream from ``first``: contiguous ids, then a completed ``end``."""
    assert [e.id for e in events] == list(range(first, first + len(events)))
    assert events[-1].event == "end" and events[-1].data["status"] == "completed"


# -- the mount ------------------------------------------------------------------------------


def test_django_and_the_stream_routes_share_one_port(
    uvicorn_factory: Callable[..., ManagedProcess],
    worker_factory: Callable[..., ManagedProcess],
) -> None:
    site = uvicorn_factory()
    login = httpx.get(site.url + "/admin/login/")
    assert login.status_code == 200 and "csrfmiddlewaretoken" in login.text
    # /health and /metrics are not under the mounted prefixes: they are the project's.
    for path in ("/health", "/metrics", "/stream", "/streamx/tests/ExampleTask/1"):
        resp = httpx.get(site.url + path)
        assert resp.status_code == 404 and "text/html" in resp.headers["content-type"], path

    task = created(site.url, total_steps=4, step_delay=0.05)
    time.sleep(1.5)  # the default mount runs no worker: the task waits for one
    status = httpx.get(f"{site.url}/tasks/tests/ExampleTask/{task['id']}").json()
    assert status["status"] == "pending" and status["started"]
    worker_factory()
    resp, events = read_stream(site.url + task["stream_url"], SSE)
    assert resp.status_code == 200 and resp.headers["content-type"] == "text/event-stream"
    assert_complete(events)
    assert [e.event for e in events] == ["start"] + ["progress"] * 4 + ["complete", "end"]
    # Resume after event 3 on the same origin, by header and by query.
    _, resumed = read_stream(site.url + task["stream_url"], {**SSE, "Last-Event-ID": "3"})
    assert resumed == events[3:]
    _, resumed = read_stream(site.url + task["stream_url"] + "?last_event_id=5", SSE)
    assert resumed == events[5:]
    summary = httpx.get(site.url + task["stream_url"]).json()
    assert summary["status"] == "completed" and summary["final_value"]["steps"] == 4
    watch = httpx.get(site.url + task["stream_url"].replace("/stream/", "/watch/"))
    assert watch.status_code == 200 and task["stream_url"] in watch.text


def test_a_mount_with_a_worker_runs_tasks_in_the_server_process(
    uvicorn_factory: Callable[..., ManagedProcess],
) -> None:
    site = uvicorn_factory(EXAMPLE_MOUNT_WORKER="1")
    task = created(site.url, total_steps=3, step_delay=0.05)
    _, events = read_stream(site.url + task["stream_url"], SSE)
    assert_complete(events)
    assert f"claimed task tests/ExampleTask/{task['id']} " in site.log()  # by this process


def _superuser() -> None:
    get_user_model().objects.create_superuser("admin", "admin@example.com", PASSWORD)


def login(url: str) -> str:
    """Sign in through Django's admin login form (with its CSRF token); the session id."""
    with httpx.Client(base_url=url) as browser:
        form = browser.get("/admin/login/?next=/admin/")
        match = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text)
        assert match, form.text
        done = browser.post(
            "/admin/login/?next=/admin/",
            data={
                "username": "admin",
                "password": PASSWORD,
                "csrfmiddlewaretoken": match.group(1),
                "next": "/admin/",
            },
        )
        assert done.status_code == 302 and done.headers["location"] == "/admin/", done.text
        session = browser.cookies.get("sessionid")
        assert session
        return session


@pytest.fixture
def strict_hosts(tmp_path: Path) -> dict[str, str]:
    """The environment of a project whose ALLOWED_HOSTS names 127.0.0.1 only."""
    (tmp_path / "strict_settings.py").write_text(
        'from tests.settings import *  # noqa: F403\n\nALLOWED_HOSTS = ["127.0.0.1"]\n'
    )
    return {"PYTHONPATH": str(tmp_path), "DJANGO_SETTINGS_MODULE": "strict_settings"}


def test_a_django_login_on_the_same_origin_reaches_the_policy(
    uvicorn_factory: Callable[..., ManagedProcess], strict_hosts: dict[str, str]
) -> None:
    _superuser()
    site = uvicorn_factory(
        STREAMING_POLICY="streaming.policy.DjangoUsers", EXAMPLE_MOUNT_WORKER="1", **strict_hosts
    )
    task = ExampleTask.objects.create(total_steps=2, step_delay=0.05)
    stream = f"{site.url}/stream/tests/ExampleTask/{task.pk}"
    anonymous = httpx.get(stream, headers=SSE)
    assert (anonymous.status_code, anonymous.text) == (404, '{"error": "not found"}')
    assert create(site.url).status_code == 403
    forged = httpx.get(stream, headers={**SSE, "cookie": "sessionid=" + "x" * 32})
    assert forged.status_code == 404

    session = {"cookie": f"sessionid={login(site.url)}"}
    resp, events = read_stream(stream, {**SSE, **session})  # never started: the GET starts it
    assert resp.status_code == 200
    assert_complete(events)
    # A page of the same origin may POST; another origin may not, even with the cookie.
    same = {**session, "origin": site.url}
    assert create(site.url, same, total_steps=1).status_code == 201
    other = {**session, "origin": "http://evil.example"}
    assert create(site.url, other, total_steps=1).status_code == 403
    # A Host outside ALLOWED_HOSTS: refused by the stream routes as by Django.
    evil = {"host": "evil.example"}
    assert httpx.get(stream, headers={**session, **evil}).status_code == 400
    assert httpx.get(site.url + "/admin/login/", headers=evil).status_code == 400


class _Reader(threading.Thread):
    """One SSE GET in a thread, counting events as they come, until the server ends it."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.text = ""
        self.ended = threading.Event()

    def run(self) -> None:
        try:
            with httpx.stream("GET", self.url, headers=SSE, timeout=60) as resp:
                for chunk in resp.iter_text():
                    self.text += chunk
        except httpx.HTTPError:
            pass
        finally:
            self.ended.set()

    def count(self) -> int:
        return self.text.count("\nevent: ")


@pytest.mark.parametrize("in_process", [False, True], ids=["beside-a-worker", "worker-mounted"])
def test_sigterm_ends_the_open_streams_and_the_server_exits_promptly(
    uvicorn_factory: Callable[..., ManagedProcess],
    worker_factory: Callable[..., ManagedProcess],
    in_process: bool,
) -> None:
    env = {"EXAMPLE_MOUNT_WORKER": "1", "STREAMING_SHUTDOWN_GRACE": "0.5"} if in_process else {}
    site = uvicorn_factory(**env)
    if not in_process:
        worker_factory()
    task = created(site.url, total_steps=200, step_delay=0.1)
    reader = _Reader(site.url + task["stream_url"])
    reader.start()
    wait_until(lambda: reader.count() >= 3, 20, "three events")
    began = time.monotonic()
    site.signal(signal.SIGTERM)
    code = site.proc.wait(10)
    took = time.monotonic() - began
    assert reader.ended.wait(5)
    log = site.log()
    assert took < 5, log
    # uvicorn re-raises the signal it handled once it is done: a clean end is that, or 0.
    assert code in (0, -signal.SIGTERM), log
    assert "Traceback" not in log and "streaming.asgi stopped" in log, log
    assert '"end"' not in reader.text  # cut short: the task goes on
    run = faults.run_of(ExampleTask.objects.get(pk=task["id"]))
    # Mounted, the task was handed back at shutdown (pending again, for any worker).
    assert run.status == ("pending" if in_process else "running"), run


# -- nginx ----------------------------------------------------------------------------------


def render_nginx(site: int, stream: int, listen: int, tmp: Path) -> str:
    """docs/nginx-one-origin.conf with its three addresses replaced, temp paths in ``tmp``."""
    text = NGINX_CONF.read_text()
    for old, new in (
        ("server 127.0.0.1:8000;", f"server 127.0.0.1:{site};"),
        ("server 127.0.0.1:8888 ", f"server 127.0.0.1:{stream} "),
        ("listen 80;", f"listen 127.0.0.1:{listen};"),
    ):
        assert text.count(old) == 1, f"{NGINX_CONF.name}: {old!r} moved"
        text = text.replace(old, new)
    temp = "".join(
        f"    {kind}_temp_path {tmp}/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return text.replace("http {\n", "http {\n" + temp, 1)


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Callable[[int, int], str]]:
    """nginx with the recipe in front of a site port and a stream server port; its URL."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(site: int, stream: int) -> str:
        port = support.free_port()
        conf = tmp_path / "nginx.conf"
        conf.write_text(render_nginx(site, stream, port, tmp_path))
        base = ["nginx", "-p", str(tmp_path), "-c", str(conf), "-g"]
        base.append(f"pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log; daemon off;")
        check = subprocess.run([*base, "-t"], capture_output=True, text=True, check=False)
        assert check.returncode == 0, check.stderr
        procs.append(subprocess.Popen(base))
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _proxies(url), 10, "nginx to answer", 0.1)
        return url

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _proxies(url: str) -> bool:
    try:
        return httpx.get(url + "/admin/login/", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.skipif(shutil.which("nginx") is None, reason="needs nginx")
def test_the_nginx_recipe_puts_the_site_and_the_streams_on_one_origin(
    server_factory: Callable[..., ManagedProcess],
    live_db: str,
    tmp_path: Path,
    nginx: Callable[[int, int], str],
) -> None:
    streams = server_factory("--access-log", STREAMING_PROXY_HEADER="x-forwarded-for")
    port = support.free_port()
    args = ["runserver", "--noreload", f"127.0.0.1:{port}"]
    site = support.start_manage(args, support.child_env(live_db), tmp_path, port)
    try:
        wait_until(lambda: _answers(site, "/admin/login/"), 30, "Django's runserver", 0.1)
        proxy = nginx(port, streams.port or 0)
        login = httpx.get(proxy + "/admin/login/")
        assert login.status_code == 200 and "csrfmiddlewaretoken" in login.text
        assert "GET /admin/login/" in site.log()  # served by the site, not the stream server
        # A page of this origin POSTs (Host passes through, port included, for the Origin check).
        resp = create(proxy, {"origin": proxy}, total_steps=10, step_delay=0.2)
        assert resp.status_code == 201, resp.text
        task = resp.json()
        url = proxy + task["stream_url"]
        began = time.monotonic()
        text, first_at = "", None
        with httpx.stream("GET", url, headers={**SSE, "x-forwarded-for": "203.0.113.7"}) as sse:
            for chunk in sse.iter_text():
                text += chunk
                if first_at is None and "event: start" in text:
                    first_at = time.monotonic() - began
        events = support.parse_sse(text)
        assert_complete(events)
        # No buffering: the first event came at once, the end some 2 s (10 steps) later.
        assert first_at is not None and first_at < 1.0 < time.monotonic() - began
        _, resumed = read_stream(url, {**SSE, "Last-Event-ID": "4"})
        assert resumed == events[4:]
        # The stream server saw the client's address through X-Forwarded-For (PROXY_HEADER).
        wait_until(lambda: "203.0.113.7" in streams.log(), 5, "the access line")
        line = next(x for x in streams.log().splitlines() if "203.0.113.7" in x)
        assert f"GET {task['stream_url']} 200 203.0.113.7" in line
    finally:
        site.stop()
