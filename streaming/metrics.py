"""The ``/metrics`` text: Prometheus exposition of the counters each component reports."""

from __future__ import annotations

from collections.abc import Mapping

PREFIX = "streaming_"


def render(*groups: Mapping[str, int]) -> str:
    """One ``streaming_<name> <value>`` line per counter, in the order given."""
    lines = [f"{PREFIX}{name} {value}" for group in groups for name, value in group.items()]
    return "\n".join(lines) + "\n"
