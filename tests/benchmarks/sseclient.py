"""A process of many SSE clients over raw sockets: ``python -m tests.benchmarks.sseclient CFG``.

CFG is JSON: host, port, path, count (connections), end (the event type that ends a stream),
expect (events per stream), times_file (send times written by the task), timeout, hold (stay
connected until stdin closes, for the memory scenario). The process prints ``connected N`` once
every connection has its response headers, then ``result PATH`` once it has written to
``result_file`` (or ``result {json}`` without one) what it saw: per-stream counts,
gaps, and histograms of latencies: receipt time minus the time ``send_event`` returned, and
minus the time it was called.
Receipt times are taken when bytes arrive, before any parsing.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from collections import Counter
from typing import Any

INDEX = re.compile(rb'data: \{"i": ?(\d+)')
RESOLUTION = 1e-5  # latency histogram buckets: 10 microseconds


class Stream(asyncio.Protocol):
    """One HTTP/1.1 GET of an SSE stream: event indices and their receipt times.

    The body is scanned as it arrives, chunked transfer coding and all: a chunk holds whole
    writes, and an SSE frame never contains a raw blank line inside, so scanning up to the last
    ``\\n\\n`` finds whole frames (the chunk size lines in between match nothing). This keeps
    the clients' CPU, on a machine they share with the server, as low as it can be.
    """

    def __init__(
        self,
        request: bytes,
        end_marker: bytes,
        expect: int,
        connected: asyncio.Future[None] | None,
        finished: asyncio.Future[None],
    ) -> None:
        self.request = request
        self.end_marker = end_marker
        self.times = [0.0] * (expect + 1)
        self.count = 0
        self.duplicates = 0
        self.out_of_range = 0
        self.status = 0
        self.connected = connected
        self.finished = finished
        self.transport: Any = None
        self._head = b""
        self.tail = b""
        self._headers_done = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport  # uvloop's transports are not asyncio.Transport instances
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.time()
        if not self._headers_done:
            data = self._parse_headers(data)
            if not data:
                return
        buf = self.tail + data if self.tail else data
        end = buf.rfind(b"\n\n")
        if end < 0:
            self.tail = buf
            return
        block, self.tail = buf[: end + 2], buf[end + 2 :]
        found = INDEX.findall(block)
        if found:
            times = self.times
            size = len(times)
            for raw in found:
                i = int(raw)
                if i >= size:
                    self.out_of_range += 1
                elif times[i]:
                    self.duplicates += 1
                else:
                    times[i] = now
                    self.count += 1
        if self.end_marker in block:
            self._finish()

    def _parse_headers(self, data: bytes) -> bytes:
        """Consume the response head; what follows it (the start of the body), if any."""
        head = self._head + data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            self._head = head
            return b""
        self._head = b""
        self.status = int(head.split(b" ", 2)[1])
        self._headers_done = True
        if self.connected is not None and not self.connected.done():
            self.connected.set_result(None)
        if self.status != 200:
            self._finish()
        return head[end + 4 :]

    def _finish(self) -> None:
        if not self.finished.done():
            self.finished.set_result(None)
        if self.connected is not None and not self.connected.done():
            self.connected.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish()


async def open_streams(cfg: dict[str, Any]) -> list[Stream]:
    loop = asyncio.get_running_loop()
    headers = "".join(f"{k}: {v}\r\n" for k, v in cfg.get("headers", {}).items())
    request = (
        f"GET {cfg['path']} HTTP/1.1\r\nHost: {cfg['host']}\r\n"
        f"Accept: text/event-stream\r\n{headers}\r\n"
    ).encode()
    end_marker = f"event: {cfg['end']}\n".encode()
    streams: list[Stream] = []
    wait_headers = cfg.get("wait_headers", True)
    sem = asyncio.Semaphore(64)

    async def one() -> None:
        connected = loop.create_future() if wait_headers else None
        stream = Stream(request, end_marker, cfg["expect"], connected, loop.create_future())
        async with sem:
            await loop.create_connection(lambda: stream, cfg["host"], cfg["port"])
        streams.append(stream)

    await asyncio.gather(*(one() for _ in range(cfg["count"])))
    if wait_headers:
        # Every stream was given a ``connected`` future (wait_headers): none of them is None.
        await asyncio.wait_for(
            asyncio.gather(
                *(
                    s.connected
                    for s in streams  # type: ignore[arg-type]
                )
            ),
            cfg.get("timeout", 120),
        )
    return streams


async def wait_for_file(path: str, timeout: float) -> dict[str, list[float]]:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(os.path.exists, path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        await asyncio.sleep(0.02)
    return await asyncio.to_thread(_load, path)


def _load(path: str) -> dict[str, list[float]]:
    with open(path) as f:
        return dict(json.load(f))


async def main(cfg: dict[str, Any]) -> dict[str, Any]:
    streams = await open_streams(cfg)
    print(f"connected {len(streams)}", flush=True)
    if cfg.get("hold"):
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        for s in streams:
            if s.transport is not None:
                s.transport.close()
        return {"streams": len(streams)}
    done, _ = await asyncio.wait([s.finished for s in streams], timeout=cfg.get("timeout", 120))
    # The task writes its send times after its last send_event, which may return late.
    sends = await wait_for_file(cfg["times_file"], 300) if cfg.get("times_file") else {}
    return summarise(streams, sends, cfg["expect"], timed_out=len(streams) - len(done))


def summarise(
    streams: list[Stream], sends: dict[str, list[float]], expect: int, timed_out: int
) -> dict[str, Any]:
    first = min((t for s in streams for t in s.times[1:] if t), default=0.0)
    last = max((t for s in streams for t in s.times[1:] if t), default=0.0)
    return {
        "streams": len(streams),
        "complete": sum(1 for s in streams if s.count == expect),
        "received": sum(s.count for s in streams),
        "duplicates": sum(s.duplicates for s in streams),
        "out_of_range": sum(s.out_of_range for s in streams),
        "bad_status": sum(1 for s in streams if s.status != 200),
        "timed_out": timed_out,
        "first_receipt": first,
        "last_receipt": last,
        "histogram": _latencies(streams, sends.get("returns", [])),
        "histogram_call": _latencies(streams, sends.get("calls", [])),
    }


def _latencies(streams: list[Stream], sent: list[float]) -> dict[int, int]:
    """Receipt time minus ``sent[i]``, bucketed by RESOLUTION, over every stream and event."""
    hist: Counter[int] = Counter()
    for s in streams:
        for i, t in enumerate(s.times[1 : len(sent) + 1], start=1):
            if t:
                hist[int((t - sent[i - 1]) // RESOLUTION)] += 1
    return dict(hist)


def run() -> None:
    cfg = json.loads(sys.argv[1])
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    result = asyncio.run(main(cfg))
    # Histograms of a lagging run run to hundreds of KB: a file, not a line on a pipe.
    path = cfg.get("result_file")
    if path:
        with open(path, "w") as out:
            json.dump(result, out)
        print(f"result {path}", flush=True)
    else:
        print("result " + json.dumps(result), flush=True)


if __name__ == "__main__":
    run()
