"""The commands' own logging for real: ``runserver_stream`` and ``runworker_stream`` in a
project that configures no logging (as ``django-admin startproject`` makes one) and in one
that does (the example project), each line on stderr exactly once, and the access log."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests import support
from tests.faults import wait_until

pytestmark = pytest.mark.django_db(transaction=True)
SSE = {"Accept": "text/event-stream"}
# streaming.logs's format, and the example project's (tests/settings.py: milliseconds too).
OURS = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
PROJECTS = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"


@dataclass
class Command:
    """A manage.py child with stdout and stderr kept apart."""

    proc: subprocess.Popen[bytes]
    out: Path
    err: Path
    port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(20)


@pytest.fixture
def project(tmp_path: Path) -> Callable[[bool], dict[str, str]]:
    """The environment of a project: ``configured`` (the example's LOGGING) or not."""
    (tmp_path / "unlogged_settings.py").write_text(
        "# The example project, minus LOGGING: Django's default logging config applies, as\n"
        "# in a project made by `django-admin startproject` (which has no LOGGING either).\n"
        "from tests.settings import *  # noqa: F403\n\n"
        "del LOGGING  # noqa: F821\n"
    )

    def env(configured: bool) -> dict[str, str]:
        if configured:
            return {"DJANGO_SETTINGS_MODULE": "tests.settings"}
        return {"DJANGO_SETTINGS_MODULE": "unlogged_settings", "PYTHONPATH": str(tmp_path)}

    return env


@pytest.fixture
def command(live_db: str, tmp_path: Path) -> Iterator[Callable[..., Command]]:
    """Start ``manage.py`` commands on the test database; stopped at the end."""
    started: list[Command] = []

    def start(args: list[str], env: dict[str, str], port: int | None = None) -> Command:
        name = f"{args[0]}-{len(started)}"
        out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            proc = subprocess.Popen(
                [sys.executable, str(support.ROOT / "manage.py"), *args],
                cwd=support.ROOT,
                env=support.child_env(live_db, **env),
                stdout=stdout,
                stderr=stderr,
            )
        cmd = Command(proc, out, err, port)
        started.append(cmd)
        return cmd

    yield start
    for cmd in started:
        cmd.stop()


def serve(start: Callable[..., Command], env: dict[str, str], *extra: str) -> Command:
    port = support.free_port()
    args = ["runserver_stream", "--host", "127.0.0.1", "--port", str(port), *extra]
    server = start(args, env, port)
    wait_until(lambda: _healthy(server), 30, "the server's /health", 0.1)
    return server


def _healthy(cmd: Command) -> bool:
    if cmd.proc.poll() is not None:
        raise RuntimeError(f"exited with {cmd.proc.returncode}:\n{cmd.stderr()}")
    try:
        return httpx.get(cmd.url + "/health", timeout=1).text == "OK"
    except httpx.HTTPError:
        return False


def stream_a_task(server: Command) -> int:
    """Create a task through ``server`` and follow it to its end; its id."""
    resp = httpx.post(server.url + "/tasks/tests/ExampleTask", json={"total_steps": 2})
    assert resp.status_code == 201, resp.text
    task = resp.json()
    _, events = support.read_stream(server.url + task["stream_url"], SSE)
    assert events and events[-1].event == "end", events
    return int(task["id"])


def lines(text: str, pattern: str) -> list[str]:
    return [line for line in text.splitlines() if re.fullmatch(pattern, line)]


@pytest.mark.parametrize("configured", [False, True], ids=["startproject", "with-LOGGING"])
def test_the_commands_log_where_they_listen_and_each_task_once(
    command: Callable[..., Command], project: Callable[[bool], dict[str, str]], configured: bool
) -> None:
    env = project(configured)
    stamp = PROJECTS if configured else OURS
    if not configured:  # the premise: nothing would show an INFO line of the package
        names = "('', 'streaming')"
        probe = f"import logging; print([bool(logging.getLogger(n).handlers) for n in {names}])"
        shell = command(["shell", "--no-imports", "-c", probe], env)
        assert shell.proc.wait(60) == 0, shell.stderr()
        assert shell.stdout().strip() == "[False, False]", shell.stdout()
    server = serve(command, env, "--no-worker")
    worker = command(["runworker_stream"], env)
    wait_until(lambda: "ready:" in worker.stderr(), 30, "the worker to be ready", 0.1)
    task_id = stream_a_task(server)
    path = f"tests/ExampleTask/{task_id}"
    assert server.stop() == 0 and worker.stop() == 0
    served, worked = server.stderr(), worker.stderr()

    listen = rf"{stamp} INFO streaming\.serve ready: listening on {server.url}, worker off, pid \d+"
    assert len(lines(served, listen)) == 1, served
    assert len(lines(worked, rf"{stamp} INFO streaming\.serve ready: no HTTP, worker on, .*")) == 1
    claim = rf"{stamp} INFO streaming\.worker claimed task {path} \(run \d+, attempt 1\)"
    assert len(lines(worked, claim)) == 1, worked
    finish = rf"{stamp} INFO streaming\.worker task {path} completed \(run \d+, attempt 1\)"
    assert len(lines(worked, finish)) == 1, worked
    # Each line once in all: no handler of ours beside the project's, nothing on stdout.
    assert worked.count(f"task {path} ") == 2 and served.count(f"task {path} ") == 1
    assert len(lines(served, rf"{stamp} INFO streaming\.coordinator queued task {path} .*")) == 1
    assert served.count("listening on") == 1
    assert "streaming.access" not in served  # off by default
    assert server.stdout() == worker.stdout() == ""


def test_the_access_log_has_one_line_per_request_and_no_query_string(
    command: Callable[..., Command], project: Callable[[bool], dict[str, str]]
) -> None:
    server = serve(command, project(False), "--access-log")
    task_id = stream_a_task(server)  # claimed and run by the server's own worker
    secret = "?token=not-for-logs-42&last_event_id=1"
    resp, events = support.read_stream(
        f"{server.url}/stream/tests/ExampleTask/{task_id}{secret}", SSE
    )
    assert resp.status_code == 200 and events[0].id == 2
    assert httpx.get(server.url + "/stream/tests/ExampleTask/x%0a").status_code == 400
    assert server.stop() == 0
    log = server.stderr() + server.stdout()
    access = lines(log, rf"{OURS} INFO streaming\.access .*")
    stream = f"/stream/tests/ExampleTask/{task_id}"
    assert len(lines(log, rf"{OURS} INFO streaming\.access POST /tasks/tests/ExampleTask .*")) == 1
    pattern = rf"{OURS} INFO streaming\.access GET {stream} 200 127\.0\.0\.1 \d+\.\d{{3}}s"
    assert len(lines(log, pattern)) == 2, log  # the whole stream, and the resumed one
    assert "not-for-logs" not in log and not any("?" in line for line in access), log
    # A newline sent percent-encoded is logged as it came: it cannot forge a line.
    assert len(lines(log, r".* GET /stream/tests/ExampleTask/x%0a 400 .*")) == 1, log
    claims = lines(
        log, rf"{OURS} INFO streaming\.worker claimed task tests/ExampleTask/{task_id} .*"
    )
    assert len(claims) == 1, log


def test_verbosity_zero_keeps_warnings_but_an_asked_for_access_log(
    command: Callable[..., Command], project: Callable[[bool], dict[str, str]]
) -> None:
    server = serve(command, project(False), "-v", "0", "--access-log")
    assert server.stop() == 0
    log = server.stderr()
    assert "ready:" not in log and "signal" not in log, log
    assert len(lines(log, rf"{OURS} INFO streaming\.access GET /health 200 .*")) >= 1, log
