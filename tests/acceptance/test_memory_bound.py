"""Memory per client is bounded: clients that never read cost a bounded amount, given back."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests import faults
from tests.faults import wait_until
from tests.models import ScriptedTask
from tests.support import ManagedProcess

pytestmark = pytest.mark.django_db(transaction=True)

CLIENTS = 50
EVENTS = 1000
PAYLOAD = 5000  # bytes per event: a 5 MB log


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_clients_that_never_read_cost_bounded_memory_given_back(
    server_factory: Callable[..., ManagedProcess],
) -> None:
    server = server_factory()
    resp = httpx.post(
        server.url + "/tasks/tests/ScriptedTask", json={"ticks": EVENTS, "payload_size": PAYLOAD}
    )
    assert resp.status_code == 201, resp.text
    task = ScriptedTask.objects.get(pk=resp.json()["id"])
    wait_until(lambda: faults.run_of(task).status == "completed", 60, "the task to finish")
    pid = server.proc.pid
    path = f"/stream/tests/ScriptedTask/{task.pk}"
    warm = faults.RawStream(server.url, path)  # one full replay first: the caches are warm
    assert len(warm.read_all()) == EVENTS + 1
    before = rss_mb(pid)
    held, after = _round(server, path, pid)
    held2, after2 = _round(server, path, pid)  # a second crowd: nothing was kept of the first
    print(
        f"\nRSS: {before:.0f} MB before, {held:.0f} MB with {CLIENTS} clients that never read "
        f"a {EVENTS * PAYLOAD / 1e6:.0f} MB log ({(held - before) / CLIENTS * 1024:.0f} KB "
        f"each), {after:.0f} MB after they left; a second crowd: {held2:.0f} MB, then "
        f"{after2:.0f} MB"
    )
    # Without bounds each held a page of 1,000 events (5 MB) twice: ~500 MB for 50 clients.
    # Bounded: a 256 KiB page, its joined write and uvicorn's write buffer, ~0.6 MB each.
    assert held - before < 80, (before, held)
    assert after - before < 30, (before, after)
    # A second crowd needs no more than the first did: nothing of the first was kept.
    assert held2 < held + 15 and after2 < held + 10, (held, after, held2, after2)


def _round(server: ManagedProcess, path: str, pid: int) -> tuple[float, float]:
    """CLIENTS clients that never read, then gone: the RSS with them and after them."""
    stuck = [faults.RawStream(server.url, path, rcvbuf=4096) for _ in range(CLIENTS)]
    try:
        wait_until(
            lambda: faults.metrics(server.url)["streaming_connected_clients"] == CLIENTS,
            20,
            "every client connected",
        )
        time.sleep(3)  # each has filled what the server will hold for it
        held = rss_mb(pid)
    finally:
        for client in stuck:
            client.close()
    wait_until(
        lambda: faults.metrics(server.url)["streaming_connected_clients"] == 0, 20, "all gone"
    )
    time.sleep(1)
    return held, rss_mb(pid)
