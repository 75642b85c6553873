"""The STREAMING settings dict: typed defaults, read in this one module."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field, fields
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
    # -- who may do what (README, "Security") ------------------------------------------
    POLICY: str | None = None  # dotted path; None: safe default (see streaming.policy)
    POLICY_OPTIONS: dict[str, Any] = field(default_factory=dict)
    POLICY_RECHECK_INTERVAL: float = 30.0
    TOKEN_EXPIRES_IN: float = 3600.0
    ALLOWED_ORIGINS: tuple[str, ...] = ()  # origins whose pages may POST (besides same-origin)
    CORS_ALLOWED_ORIGINS: tuple[str, ...] = ()
    CORS_ALLOW_CREDENTIALS: bool = False
    METRICS_ALLOWED_ADDRESSES: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    METRICS_TOKEN: str | None = None
    PROXY_HEADER: str | None = None  # e.g. "x-forwarded-for", when behind a proxy
    PROXY_TRUSTED: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    # -- limits ------------------------------------------------------------------------
    MAX_STREAMS_PER_CLIENT: int = 64
    CREATES_PER_MINUTE: int = 60
    MAX_ACTIVE_PER_MODEL: int = 1000
    MAX_BODY_BYTES: int = 1 << 20
    SUBSCRIBER_BUFFER_BYTES: int = 1 << 20
    PAGE_BYTES: int = 1 << 18
    SEND_TIMEOUT: float = 30.0
    MAX_HEADER_BYTES: int = 65536  # a request line and headers, at most (431 beyond)
    HEADER_TIMEOUT: float = 10.0  # seconds to receive them (408 beyond)
    IDLE_TIMEOUT: float = 5.0  # seconds a connection may wait for its next request

    def __post_init__(self) -> None:
        positive = ("LEASE_TTL", "HEARTBEAT_INTERVAL", "KEEPALIVE_INTERVAL", "WORKER_POLL_INTERVAL")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"STREAMING[{name!r}] must be positive")
        if self.HEARTBEAT_INTERVAL >= self.LEASE_TTL:
            raise ValueError("STREAMING['HEARTBEAT_INTERVAL'] must be shorter than LEASE_TTL")
        if self.MAX_ATTEMPTS < 1 or self.WORKER_CONCURRENCY < 1 or self.POOL_MAX_SIZE < 1:
            raise ValueError("STREAMING counts (MAX_ATTEMPTS, WORKER_CONCURRENCY, …) must be >= 1")
        if self.MAX_HEADER_BYTES < 1 or self.HEADER_TIMEOUT <= 0 or self.IDLE_TIMEOUT <= 0:
            raise ValueError("STREAMING HTTP limits (MAX_HEADER_BYTES, …_TIMEOUT) must be positive")


def build(overrides: dict[str, Any]) -> StreamingSettings:
    """Settings from a dict, rejecting unknown keys and casting to each field's type."""
    known = {f.name: f for f in fields(StreamingSettings)}
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ValueError(f"unknown STREAMING settings: {', '.join(unknown)}")
    typed: dict[str, Any] = {
        name: tuple(value)
        if str(known[name].type).startswith("tuple") and isinstance(value, list)
        else value
        for name, value in overrides.items()
    }
    return StreamingSettings(**typed)


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
        elif kind.startswith("bool"):
            out[f.name] = raw.lower() in ("1", "true", "yes", "on")
        elif kind.startswith("tuple"):
            out[f.name] = tuple(part.strip() for part in raw.split(",") if part.strip())
        elif kind.startswith("dict"):
            out[f.name] = json.loads(raw)
        elif kind.startswith("str |") and raw.lower() == "none":
            out[f.name] = None
        else:
            out[f.name] = raw
    return out
