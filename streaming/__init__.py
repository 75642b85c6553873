"""streaming: long-running Django tasks whose progress streams over SSE, on Postgres."""

from __future__ import annotations

from typing import Any

__version__ = "0.3.0"
__all__ = ["StreamTask", "StreamingClient", "__version__", "get_client"]


def __getattr__(name: str) -> Any:
    # Lazy so that importing the package neither needs Django settings nor imports httpx.
    if name == "StreamTask":
        from streaming.models import StreamTask

        return StreamTask
    if name in ("get_client", "StreamingClient"):
        from streaming import client

        return getattr(client, name)
    raise AttributeError(f"module 'streaming' has no attribute {name!r}")
