"""The STREAMING settings dict: typed defaults, read in this one module."""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class StreamingSettings:
    """Every tunable of the package; override any of them in ``settings.STREAMING``."""

    LEASE_TTL: float = 30.0
    HEARTBEAT_INTERVAL: float = 5.0
    MAX_ATTEMPTS: int = 3
    WORKER_CONCURRENCY: int = 64
    WORKER_POLL_INTERVAL: float = 2.0
    SHUTDOWN_GRACE: float = 10.0
    KEEPALIVE_INTERVAL: float = 15.0
    SSE_RETRY_MS: int = 1000
    POOL_MIN_SIZE: int = 1
    POOL_MAX_SIZE: int = 4
    LISTEN_HEALTH_INTERVAL: float = 2.0
    HUB_POLL_INTERVAL: float = 5.0
    SUBSCRIBER_BUFFER: int = 1024
    GROUP_COMMIT_MAX_BATCH: int = 512
    NOTIFY_DELAY: float = 0.002
    CHANNEL: str = "streaming"
    DEFAULT_TASK_TIMEOUT: float | None = None
    DATABASE_WAIT: float = 5.0

    def __post_init__(self) -> None:
        positive = ("LEASE_TTL", "HEARTBEAT_INTERVAL", "KEEPALIVE_INTERVAL", "WORKER_POLL_INTERVAL")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"STREAMING[{name!r}] must be positive")
        if self.HEARTBEAT_INTERVAL >= self.LEASE_TTL:
            raise ValueError("STREAMING['HEARTBEAT_INTERVAL'] must be shorter than LEASE_TTL")
        if self.MAX_ATTEMPTS < 1 or self.WORKER_CONCURRENCY < 1 or self.POOL_MAX_SIZE < 1:
            raise ValueError("STREAMING counts (MAX_ATTEMPTS, WORKER_CONCURRENCY, …) must be >= 1")


def build(overrides: dict[str, Any]) -> StreamingSettings:
    """Settings from a dict, rejecting unknown keys and casting to each field's type."""
    known = {f.name: f for f in fields(StreamingSettings)}
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ValueError(f"unknown STREAMING settings: {', '.join(unknown)}")
    return StreamingSettings(**overrides)


@functools.cache
def get() -> StreamingSettings:
    """The project's settings (``settings.STREAMING``), read once."""
    from django.conf import settings

    return build(dict(getattr(settings, "STREAMING", {}) or {}))


def from_environ(environ: dict[str, str], prefix: str = "STREAMING_") -> dict[str, Any]:
    """Overrides from environment variables such as ``STREAMING_LEASE_TTL=5``, typed by field."""
    out: dict[str, Any] = {}
    for f in fields(StreamingSettings):
        raw = environ.get(prefix + f.name)
        if raw is None:
            continue
        kind = str(f.type)
        if kind.startswith("int"):
            out[f.name] = int(raw)
        elif kind.startswith("float"):
            out[f.name] = None if raw.lower() == "none" else float(raw)
        else:
            out[f.name] = raw
    return out
