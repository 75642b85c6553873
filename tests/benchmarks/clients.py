"""Parent side of the client processes: start them, wait until connected, merge results."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tests.benchmarks import harness
from tests.benchmarks.sseclient import RESOLUTION


@dataclass
class ClientGroup:
    """Client processes following one stream; ``count`` connections spread over them."""

    procs: list[asyncio.subprocess.Process] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    @classmethod
    async def start(
        cls, cfg: dict[str, Any], count: int, per_process: int = 500, timeout: float = 180.0
    ) -> ClientGroup:
        """Start the processes and return once each has every connection open."""
        group = cls()
        sizes = [per_process] * (count // per_process)
        if count % per_process:
            sizes.append(count % per_process)
        for size in sizes:
            fd, result_file = tempfile.mkstemp(prefix="sseclient-", suffix=".json")
            os.close(fd)
            group.files.append(result_file)
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.benchmarks.sseclient",
                json.dumps({**cfg, "count": size, "result_file": result_file}),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            group.procs.append(proc)
        await asyncio.wait_for(
            asyncio.gather(*(group._expect(p, "connected") for p in group.procs)), timeout
        )
        return group

    async def _expect(self, proc: asyncio.subprocess.Process, prefix: str) -> str:
        assert proc.stdout is not None
        while True:
            line = (await proc.stdout.readline()).decode()
            if not line:
                raise RuntimeError(f"client process {proc.pid} exited before {prefix!r}")
            if line.startswith(prefix):
                return line[len(prefix) :].strip()

    async def results(self, timeout: float = 300.0) -> Stats:
        """Wait for every process's result and merge them."""
        paths = await asyncio.wait_for(
            asyncio.gather(*(self._expect(p, "result ") for p in self.procs)), timeout
        )
        stats = Stats.merge([_load_json(path) for path in paths])
        await self.close()
        return stats

    async def close(self) -> None:
        for proc in self.procs:
            if proc.stdin is not None and not proc.stdin.is_closing():
                proc.stdin.close()
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        for path in self.files:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self.files = []


def _load_json(path: str) -> dict[str, Any]:
    with open(path) as f:
        data: dict[str, Any] = json.load(f)
    return data


@dataclass
class Stats:
    """What every client of a run saw, merged."""

    streams: int
    complete: int
    received: int
    duplicates: int
    bad: int
    first_receipt: float
    last_receipt: float
    histogram: Counter[int]
    histogram_call: Counter[int]

    @classmethod
    def merge(cls, parts: list[dict[str, Any]]) -> Stats:
        hist: Counter[int] = Counter()
        hist_call: Counter[int] = Counter()
        for p in parts:
            hist.update({int(k): v for k, v in p["histogram"].items()})
            hist_call.update({int(k): v for k, v in p["histogram_call"].items()})
        firsts = [p["first_receipt"] for p in parts if p["first_receipt"]]
        return cls(
            streams=sum(p["streams"] for p in parts),
            complete=sum(p["complete"] for p in parts),
            received=sum(p["received"] for p in parts),
            duplicates=sum(p["duplicates"] + p["out_of_range"] for p in parts),
            bad=sum(p["bad_status"] + p["timed_out"] for p in parts),
            first_receipt=min(firsts, default=0.0),
            last_receipt=max((p["last_receipt"] for p in parts), default=0.0),
            histogram=hist,
            histogram_call=hist_call,
        )

    def latency(self, q: float, since: str = "return") -> float:
        """The q-quantile of the latency to receipt from send_event's return (or call), ms."""
        hist = self.histogram if since == "return" else self.histogram_call
        return harness.histogram_percentile(hist, q, RESOLUTION) * 1000

    def delivery(self, expect: int) -> float:
        """Fraction of (client, event) pairs delivered exactly once."""
        if not self.streams:
            return 0.0
        return (self.received - self.duplicates) / (self.streams * expect)
