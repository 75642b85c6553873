"""docker/nginx.conf for real, in front of local servers: clients resume through the proxy.

Runs the repository's nginx config (upstream addresses and listen line swapped for local
ones) when an ``nginx`` binary is installed; skipped otherwise.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests import faults, support
from tests.faults import FAST_LEASES, Follower, wait_until
from tests.models import ScriptedTask

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(shutil.which("nginx") is None, reason="needs nginx"),
]
NGINX_CONF = support.ROOT / "docker" / "nginx.conf"


def render(ports: list[int | None], listen: int, tmp: Path) -> str:
    """docker/nginx.conf for local upstreams on ``ports``, listening on 127.0.0.1:``listen``."""
    text = NGINX_CONF.read_text()
    upstreams = "\n".join(
        f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=5s;" for p in ports
    )
    text, n = re.subn(
        r"(?m)^\s*server stream\d:8000 [^\n]*\n(?:\s*server stream[^\n]*\n)*",
        upstreams + "\n",
        text,
    )
    assert n == 1, "docker/nginx.conf: the upstream block moved"
    text, n = re.subn(r"listen 80;", f"listen 127.0.0.1:{listen};", text)
    assert n == 1, "docker/nginx.conf: the listen line moved"
    temp = "".join(
        f"    {kind}_temp_path {tmp}/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return text.replace("http {\n", "http {\n" + temp, 1)


@pytest.fixture
def proxy_for(tmp_path: Path) -> Iterator[Callable[[list[support.ManagedProcess]], str]]:
    """Start nginx with the repository's config in front of ``servers``; its URL."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(servers: list[support.ManagedProcess]) -> str:
        port = support.free_port()
        conf = tmp_path / "nginx.conf"
        conf.write_text(render([s.port for s in servers], port, tmp_path))
        base = [
            "nginx",
            "-p",
            str(tmp_path),
            "-c",
            str(conf),
            "-g",
            f"pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log; daemon off;",
        ]
        check = subprocess.run([*base, "-t"], capture_output=True, text=True, check=False)
        assert check.returncode == 0, check.stderr
        procs.append(subprocess.Popen(base))
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _answers(url), 10, "nginx to answer")
        return url

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGQUIT)  # graceful stop
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).text == "OK"
    except httpx.HTTPError:
        return False


def serving(servers: list[support.ManagedProcess], clients: int) -> list[support.ManagedProcess]:
    """The servers that hold at least one open stream, once ``clients`` streams are open."""

    def check() -> list[support.ManagedProcess] | None:
        counts = [faults.metrics(s.url)["streaming_connected_clients"] for s in servers]
        return (
            [s for s, n in zip(servers, counts, strict=True) if n]
            if sum(counts) == clients
            else None
        )

    return wait_until(check, 10, f"{clients} open streams")


def test_clients_behind_nginx_resume_when_their_server_is_killed(
    server_factory: Callable[..., support.ManagedProcess],
    proxy_for: Callable[[list[support.ManagedProcess]], str],
) -> None:
    servers = [server_factory(**FAST_LEASES) for _ in range(3)]
    proxy = proxy_for(servers)
    task = ScriptedTask.objects.create(ticks=60, delay=0.05)
    clients = [Follower(proxy, task, name=f"c{i}") for i in range(3)]
    for c in clients:
        c.start()
    wait_until(lambda: all(len(c.events) >= 5 for c in clients), 20, "five events each")
    victim = serving(servers, len(clients))[0]
    victim.kill()
    rows: list[faults.Row] = []
    for c in clients:
        c.finish()
        rows = rows or faults.log_of(task)
        faults.same_as_log(c.events, rows)
    faults.assert_gap_free(task)
    assert faults.run_of(task).status == "completed"
    assert faults.tick_numbers(rows, faults.run_of(task).attempt) == list(range(1, 61))


def test_a_server_stopped_behind_nginx_hands_its_clients_over(
    server_factory: Callable[..., support.ManagedProcess],
    proxy_for: Callable[[list[support.ManagedProcess]], str],
) -> None:
    servers = [server_factory("--grace", "0.5") for _ in range(3)]
    proxy = proxy_for(servers)
    task = ScriptedTask.objects.create(ticks=60, delay=0.05)
    clients = [Follower(proxy, task, name=f"c{i}") for i in range(3)]
    for c in clients:
        c.start()
    wait_until(lambda: all(len(c.events) >= 5 for c in clients), 20, "five events each")
    stopping = serving(servers, len(clients))[0]
    stopping.signal(signal.SIGTERM)
    assert stopping.proc.wait(10) == 0
    rows: list[faults.Row] = []
    for c in clients:
        c.finish()
        rows = rows or faults.log_of(task)
        faults.same_as_log(c.events, rows)
    assert faults.run_of(task).status == "completed"
    others = [s for s in servers if s is not stopping]
    assert sum(faults.metrics(s.url)["streaming_http_requests_total"] for s in others) > 0
