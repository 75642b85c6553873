"""NOTIFY traffic: the payload format, and a sender that coalesces after commit."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from streaming.db import Database
from streaming.exceptions import DatabaseUnavailable

logger = logging.getLogger(__name__)

# Payloads stay far below Postgres's 8000-byte limit; ids only, never event data.
MAX_PAYLOAD = 7000


@dataclass
class Message:
    """One parsed notification: new events (run id -> last seq), queued runs, cancels.

    ``origin`` names the sender (one per event loop's runtime), so that a process can skip
    the echo of its own commits, which it has announced to itself already.
    """

    events: dict[int, int] = field(default_factory=dict)
    queued: list[int] = field(default_factory=list)
    cancels: list[int] = field(default_factory=list)
    origin: str = ""


def encode(
    events: dict[int, int], queued: list[int], cancels: list[int], origin: str = ""
) -> list[str]:
    """Payloads like ``e/ORIGIN 12=7,13=9``, ``q 12,14``, ``c 12``, under MAX_PAYLOAD bytes."""
    out: list[str] = []
    tag = f"/{origin}" if origin else ""
    for prefix, items in (
        ("e", [f"{run}={seq}" for run, seq in events.items()]),
        ("q", [str(run) for run in queued]),
        ("c", [str(run) for run in cancels]),
    ):
        chunk: list[str] = []
        size = 0
        for item in items:
            if chunk and size + len(item) + 1 > MAX_PAYLOAD:
                out.append(f"{prefix}{tag} {','.join(chunk)}")
                chunk, size = [], 0
            chunk.append(item)
            size += len(item) + 1
        if chunk:
            out.append(f"{prefix}{tag} {','.join(chunk)}")
    return out


def decode(payload: str) -> Message:
    """Parse one payload; anything malformed is ignored (listeners re-read the log anyway)."""
    head, _, body = payload.partition(" ")
    kind, _, origin = head.partition("/")
    msg = Message(origin=origin)
    try:
        if kind == "e":
            for item in body.split(","):
                run, _, seq = item.partition("=")
                msg.events[int(run)] = max(int(seq), msg.events.get(int(run), 0))
        elif kind == "q":
            msg.queued = [int(x) for x in body.split(",") if x]
        elif kind == "c":
            msg.cancels = [int(x) for x in body.split(",") if x]
    except ValueError:
        logger.warning("ignoring malformed notification %r", payload[:100])
        return Message()
    return msg


class Notifier:
    """Sends NOTIFYs after commit, coalesced per process every few milliseconds.

    A NOTIFY inside the write transaction takes an instance-wide lock through the
    commit's WAL flush; sending it afterwards keeps that lock off the write path. A
    notification lost to a crash in between costs latency only: listeners poll the log.
    """

    def __init__(self, db: Database, channel: str, delay: float, origin: str = "") -> None:
        self.db = db
        self.channel = channel
        self.origin = origin
        self.delay = delay
        self.sent = 0
        self._events: dict[int, int] = {}
        self._queued: list[int] = []
        self._cancels: list[int] = []
        self._task: asyncio.Task[None] | None = None

    def events_committed(self, run_id: int, seq: int) -> None:
        if seq > self._events.get(run_id, 0):
            self._events[run_id] = seq
        self._schedule()

    def queued(self, run_id: int) -> None:
        self._queued.append(run_id)
        self._schedule()

    def cancel(self, run_id: int) -> None:
        self._cancels.append(run_id)
        self._schedule()

    def counters(self) -> dict[str, int]:
        return {"notifications_sent_total": self.sent}

    async def flush(self) -> None:
        """Send whatever is pending now."""
        events, queued, cancels = self._events, self._queued, self._cancels
        self._events, self._queued, self._cancels = {}, [], []
        for payload in encode(events, queued, cancels, self.origin):
            try:
                await self.db.execute("notify", {"channel": self.channel, "payload": payload})
                self.sent += 1
            except DatabaseUnavailable:
                logger.warning("NOTIFY failed; listeners will find the rows by polling")

    def _schedule(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while self._events or self._queued or self._cancels:
            await asyncio.sleep(self.delay)
            await self.flush()

    async def aclose(self) -> None:
        if self._task is not None and not self._task.done():
            await self._task
        await self.flush()
