"""streaming: long-running Django tasks whose progress streams over SSE, on Postgres."""

from __future__ import annotations

from typing import Any

__all__ = ["StreamTask", "get_client"]


def __getattr__(name: str) -> Any:
    # Lazy so that importing the package neither needs Django settings nor imports httpx.
    if name == "StreamTask":
        from streaming.models import StreamTask

        return StreamTask
    if name == "get_client":
        from streaming.client import get_client

        return get_client
    raise AttributeError(f"module 'streaming' has no attribute {name!r}")
