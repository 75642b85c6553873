"""A real headless Chromium follows a task on the watch page and resumes across a restart."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import support
from tests.models import ScriptedTask

pytestmark = pytest.mark.django_db(transaction=True)

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    path = (
        os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    )
    if not path:
        pytest.fail("the browser tests need Chromium: apt-get install chromium (see README)")
    return path


@pytest.fixture
def open_page() -> Iterator[Callable[[str], Any]]:
    """Open a URL in headless Chromium (started on first use: Playwright runs an event loop
    in this thread, after which Django's ORM refuses sync calls here)."""
    from playwright.sync_api import sync_playwright

    pw = browser = None

    def open_url(url: str) -> Any:
        nonlocal pw, browser
        pw = sync_playwright().start()
        browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(url)
        return page

    yield open_url
    if browser is not None:
        browser.close()
    if pw is not None:
        pw.stop()


def wait_js(page: Any, expression: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = page.evaluate(expression)
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(
        f"{expression} still false after {timeout}s: "
        f"{page.evaluate('JSON.stringify(window.__streaming)')}"
    )


def test_the_watch_page_resumes_after_its_server_is_killed(
    live_db: str, tmp_path: Path, open_page: Callable[[str], Any]
) -> None:
    env = support.child_env(live_db)
    worker = support.start_manage(["runworker_stream"], env, tmp_path)
    port = support.free_port()
    args = ("--no-worker",)
    first = _server_on(port, env, tmp_path, args)
    second = None
    try:
        task = ScriptedTask.objects.create(ticks=40, delay=0.1)
        browser_page = open_page(f"{first.url}/watch/tests/ScriptedTask/{task.pk}?types=tick")
        wait_js(browser_page, "window.__streaming.ids.length >= 8")
        first.kill()  # mid-stream: EventSource reconnects after retry: with Last-Event-ID
        second = _server_on(port, env, tmp_path, args)
        wait_js(browser_page, "window.__streaming.done")
        state = browser_page.evaluate("window.__streaming")
        assert state["ids"] == list(range(1, 42))
        assert state["reconnects"] >= 1 and state["status"] == "completed"
        assert browser_page.inner_text("#status") == "completed"
        assert browser_page.locator("#events li").count() == 41
        browser_page.screenshot(path=str(tmp_path / "watch.png"))
        assert (tmp_path / "watch.png").stat().st_size > 1000
    finally:
        for mp in (first, second, worker):
            if mp is not None:
                mp.stop()


def test_the_watch_page_404s_like_the_stream(live_db: str, tmp_path: Path) -> None:
    import httpx

    server = support.start_server(support.child_env(live_db), tmp_path, "--no-worker")
    try:
        assert httpx.get(f"{server.url}/watch/auth/User/1").status_code == 404
        task = ScriptedTask.objects.create(ticks=1)
        page = httpx.get(f"{server.url}/watch/tests/ScriptedTask/{task.pk}?types=<x>,tick")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert f"/stream/tests/ScriptedTask/{task.pk}" in page.text
        assert '"tick"' in page.text and "<x>" not in page.text
    finally:
        server.stop()


def _server_on(
    port: int, env: dict[str, str], tmp_path: Path, args: tuple[str, ...]
) -> support.ManagedProcess:
    mp = support.start_manage(
        ["runserver_stream", "--host", "127.0.0.1", "--port", str(port), *args], env, tmp_path, port
    )
    import httpx

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(mp.url + "/health", timeout=1).text == "OK":
                return mp
        except httpx.HTTPError:
            time.sleep(0.1)
    mp.stop()
    raise AssertionError(f"server on {port} did not start:\n{mp.log()}")
