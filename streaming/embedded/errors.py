"""Errors of the embedded Postgres: the one callers catch, and a port clash retried inside."""

from __future__ import annotations

from streaming.exceptions import StreamingError


class EmbeddedPostgresError(StreamingError):
    """The embedded Postgres could not be found, started or reached."""


class PortTaken(EmbeddedPostgresError):
    """Postgres could not bind its port: another process has it."""
