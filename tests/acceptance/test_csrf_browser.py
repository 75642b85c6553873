"""Headless Chromium against a real server: pages of other origins cannot create or cancel
tasks (CSRF), even with the user's session cookie; the same origin and a CORS-allowed one
can; EventSource follows a stream with a token in its query string.

The attacking pages are served by a tiny http.server on other ports (other origins, the same
site: the browser sends the session cookie along). What happened is read in SQL: once
Playwright runs, its event loop in this thread makes the ORM refuse sync calls.
"""

from __future__ import annotations

import asyncio
import html
import json
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.contrib.auth.models import User
from django.test import Client

from streaming import registry, runtime
from streaming.coordinator import coordinator
from tests import support
from tests.acceptance.test_browser import CHROMIUM_ARGS, chromium_path, wait_js
from tests.faults import wait_until
from tests.models import ScriptedTask

pytestmark = pytest.mark.django_db(transaction=True)

TASKS = "/tasks/tests/ScriptedTask"


@pytest.fixture
def secret(settings: Any) -> str:
    key = secrets.token_urlsafe(40)
    settings.SECRET_KEY = key
    return key


@dataclass
class Site:
    """Static pages on 127.0.0.1:port: another origin than the stream server's."""

    port: int
    pages: dict[str, str] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Site:
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                site.requests.append(self.path)
                page = site.pages.get(self.path)
                body = (page or "not found").encode()
                self.send_response(200 if page is not None else 404)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@pytest.fixture
def sites() -> Iterator[Callable[[int], Site]]:
    started: list[Site] = []

    def start(port: int) -> Site:
        site = Site(port).start()
        started.append(site)
        return site

    yield start
    for site in started:
        site.stop()


@pytest.fixture
def browser() -> Iterator[Callable[[], Any]]:
    """A headless Chromium (started on first use; see the module docstring): new contexts."""
    from playwright.sync_api import sync_playwright

    pw: Any = None
    chromium: Any = None

    def new_context() -> Any:
        nonlocal pw, chromium
        if chromium is None:
            pw = sync_playwright().start()
            chromium = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        return chromium.new_context()

    yield new_context
    if chromium is not None:
        chromium.close()
    if pw is not None:
        pw.stop()


def enqueue(*tasks: Any) -> None:
    async def go() -> None:
        try:
            for task in tasks:
                await coordinator.enqueue(task)
        finally:
            await runtime.shutdown()

    asyncio.run(go())


def task_count() -> int:
    return int(support.sql("SELECT count(*) FROM tests_scriptedtask")[0][0])


def run_row(task: Any) -> tuple[str, Any]:
    key = registry.key_of(task)
    rows = support.sql(
        "SELECT status, cancel_requested_at FROM streaming_taskrun "
        "WHERE model_name = %s AND task_id = %s",
        key.model_name,
        key.task_id,
    )
    return rows[0][0], rows[0][1]


def session_cookie(user: User, url: str) -> dict[str, Any]:
    """A Playwright cookie of a fresh session of ``user``, for the host of ``url``."""
    client = Client()
    client.force_login(user)
    name = django_settings.SESSION_COOKIE_NAME
    return {"name": name, "value": client.cookies[name].value, "url": url}


ATTACK = """<!doctype html>
<html><body>
<iframe name="sink"></iframe>
<form id="create-form" method="POST" action="__CREATE__" target="sink">
  <input name="ticks" value="1">
</form>
<form id="create-text" method="POST" enctype="text/plain" action="__CREATE__" target="sink">
  <input name='{"ticks": 1, "x": "' value='"}'>
</form>
<form id="create-multipart" method="POST" enctype="multipart/form-data" action="__CREATE__"
      target="sink"><input name="ticks" value="1"></form>
<form id="cancel-form" method="POST" action="__CANCEL__" target="sink"></form>
<form id="cancel-text" method="POST" enctype="text/plain" action="__CANCEL__" target="sink">
  <input name='{"x": "' value='"}'>
</form>
</body></html>
"""

FETCHES = """async ([create, cancel]) => {
  const body = JSON.stringify({ticks: 1});
  const attempts = {
    "create no-cors text/plain": [create, {method: "POST", mode: "no-cors", credentials: "include",
      headers: {"Content-Type": "text/plain"}, body}],
    "create no-cors, asks for JSON": [create, {method: "POST", mode: "no-cors",
      credentials: "include", headers: {"Content-Type": "application/json"}, body}],
    "create no-cors Blob": [create, {method: "POST", mode: "no-cors", credentials: "include",
      body: new Blob([body], {type: "application/x-www-form-urlencoded"})}],
    "create cors JSON": [create, {method: "POST", mode: "cors", credentials: "include",
      headers: {"Content-Type": "application/json"}, body}],
    "cancel no-cors, no body": [cancel, {method: "POST", mode: "no-cors",
      credentials: "include"}],
    "cancel no-cors text/plain": [cancel, {method: "POST", mode: "no-cors",
      credentials: "include", headers: {"Content-Type": "text/plain"}, body: "{}"}],
    "cancel cors JSON": [cancel, {method: "POST", mode: "cors", credentials: "include",
      headers: {"Content-Type": "application/json"}, body: "{}"}],
  };
  const out = {};
  for (const [name, [url, init]] of Object.entries(attempts)) {
    try {
      const r = await fetch(url, init);
      out[name] = r.type + " " + r.status;
    } catch (e) {
      out[name] = "refused: " + e.name;
    }
  }
  return out;
}"""

POST_JSON = """async ([url, credentials]) => {
  const r = await fetch(url, {method: "POST", mode: "cors", credentials,
    headers: {"Content-Type": "application/json"}, body: JSON.stringify({ticks: 1})});
  return {status: r.status, body: await r.text()};
}"""


def test_cross_origin_pages_cannot_create_or_cancel_even_with_the_session(
    server_factory: Callable[..., support.ManagedProcess],
    secret: str,
    sites: Callable[[int], Site],
    browser: Callable[[], Any],
) -> None:
    evil_port, app_port = support.free_port(), support.free_port()
    app_origin = f"http://127.0.0.1:{app_port}"
    server = server_factory(
        DJANGO_SECRET_KEY=secret,
        STREAMING_POLICY="none",  # the default: tokens, or users with their permissions
        STREAMING_CORS_ALLOWED_ORIGINS=app_origin,
        STREAMING_CORS_ALLOW_CREDENTIALS="1",
        STREAMING_SHUTDOWN_GRACE="0.2",
    )
    root = User.objects.create_superuser("root", None, None)
    cookie = session_cookie(root, server.url)
    victim = ScriptedTask.objects.create(ticks=5000, delay=0.02)
    enqueue(victim)
    wait_until(lambda: run_row(victim)[0] == "running", 20, "the victim to run")
    before = task_count()

    create, cancel = server.url + TASKS, f"{server.url}{TASKS}/{victim.pk}/cancel"
    evil = sites(evil_port)
    evil.pages["/attack.html"] = ATTACK.replace("__CREATE__", html.escape(create)).replace(
        "__CANCEL__", html.escape(cancel)
    )
    app = sites(app_port)
    app.pages["/app.html"] = "<!doctype html><title>app</title>"

    context = browser()
    context.add_cookies([cookie])
    page = context.new_page()
    posts: list[tuple[str, int]] = []
    page.on(
        "response",
        lambda r: (
            posts.append((r.url, r.status))
            if r.request.method == "POST" and r.url.startswith(server.url)
            else None
        ),
    )
    page.goto(evil.origin + "/attack.html")

    fetched = page.evaluate(FETCHES, [create, cancel])
    assert fetched == {
        "create no-cors text/plain": "opaque 0",  # sent; its answer unreadable
        "create no-cors, asks for JSON": "opaque 0",  # the JSON type is dropped in no-cors
        "create no-cors Blob": "opaque 0",
        "create cors JSON": "refused: TypeError",  # the preflight is refused: never sent
        "cancel no-cors, no body": "opaque 0",
        "cancel no-cors text/plain": "opaque 0",
        "cancel cors JSON": "refused: TypeError",
    }, fetched
    forms = ["create-form", "create-text", "create-multipart", "cancel-form", "cancel-text"]
    for form in forms:
        with page.expect_response(
            lambda r: r.request.method == "POST" and r.url.startswith(server.url)
        ) as answer:
            page.evaluate("(id) => document.getElementById(id).submit()", form)
        assert answer.value.status in (403, 415), (form, answer.value.status)
    wait_until(lambda: len(posts) >= 5 + len(forms), 10, "every attempt to be answered")
    assert sorted({status for _, status in posts}) == [403, 415], posts
    assert all(status == 415 for url, status in posts if url == create), posts

    assert task_count() == before, "a cross-origin page created a task"
    assert run_row(victim) == ("running", None), "a cross-origin page cancelled a task"

    # The allowed origin, with credentials: created, and the answer readable.
    app_page = context.new_page()
    app_page.goto(app.origin + "/app.html")
    allowed = app_page.evaluate(POST_JSON, [create, "include"])
    assert allowed["status"] == 201, allowed
    assert json.loads(allowed["body"])["model"] == "ScriptedTask"
    # The same page without the cookie is anonymous: refused by the policy (readable: CORS).
    anonymous = app_page.evaluate(POST_JSON, [create, "omit"])
    assert anonymous["status"] == 403, anonymous
    # The server's own origin: created, and cancelled.
    own = context.new_page()
    own.goto(server.url + "/health")
    same = own.evaluate(POST_JSON, [create, "same-origin"])
    assert same["status"] == 201, same
    assert task_count() == before + 2
    cancelled = own.evaluate("async (url) => (await fetch(url, {method: 'POST'})).status", cancel)
    assert cancelled == 202
    assert run_row(victim)[1] is not None


EVENTSOURCE = """<!doctype html>
<script>
window.__got = {ids: [], errors: 0, done: false};
function follow(url) {
  const source = new EventSource(url);
  const got = {ids: [], errors: 0, done: false};
  for (const type of ["tick", "end"]) {
    source.addEventListener(type, (e) => {
      got.ids.push(Number(e.lastEventId));
      if (type === "end") { got.done = true; source.close(); }
    });
  }
  source.onerror = () => { got.errors += 1; if (got.errors > 2) { source.close(); } };
  return got;
}
</script>
"""


def test_eventsource_follows_a_stream_with_a_token_in_its_query(
    server_factory: Callable[..., support.ManagedProcess],
    secret: str,
    sites: Callable[[int], Site],
    browser: Callable[[], Any],
) -> None:
    app_port = support.free_port()
    server = server_factory(
        DJANGO_SECRET_KEY=secret,
        STREAMING_POLICY="none",
        STREAMING_CORS_ALLOWED_ORIGINS=f"http://127.0.0.1:{app_port}",
        STREAMING_SHUTDOWN_GRACE="0.2",
    )
    task = ScriptedTask.objects.create(ticks=8, delay=0.05)
    enqueue(task)
    signed = task.stream_url(signed=True)
    token = signed.split("?token=", 1)[1]
    app = sites(app_port)
    app.pages["/app.html"] = EVENTSOURCE

    context = browser()
    # The watch page: its EventSource gets the page's token.
    page = context.new_page()
    watch = f"{server.url}/watch/tests/ScriptedTask/{task.pk}"
    assert page.goto(watch).status == 404
    assert page.goto(f"{watch}?types=tick&token={token}").status == 200
    wait_js(page, "window.__streaming.done")
    state = page.evaluate("window.__streaming")
    assert state["ids"] == list(range(1, 10)) and state["status"] == "completed"

    # An application page of another (CORS-allowed) origin, with EventSource directly.
    app_page = context.new_page()
    app_page.goto(app.origin + "/app.html")
    app_page.evaluate(
        "([a, b]) => { window.__signed = follow(a); window.__plain = follow(b); }",
        [server.url + signed, f"{server.url}/stream/tests/ScriptedTask/{task.pk}"],
    )
    wait_js(app_page, "window.__signed.done")
    assert app_page.evaluate("window.__signed.ids") == list(range(1, 10))
    wait_js(app_page, "window.__plain.errors > 0")
    assert app_page.evaluate("window.__plain.ids") == []
    # fetch reads the status with the token (CORS lets the page read it), not without.
    status = f"{server.url}/tasks/tests/ScriptedTask/{task.pk}"
    read = "async (u) => { const r = await fetch(u); return [r.status, await r.text()]; }"
    code, body = app_page.evaluate(read, f"{status}?token={token}")
    assert code == 200 and json.loads(body)["status"] == "completed"
    assert app_page.evaluate(read, status)[0] == 404
