"""Reaching a local trust-auth server: its URL, a free port, and a wire-protocol readiness probe."""

from __future__ import annotations

import socket
import struct
from typing import Literal

Probe = Literal["ready", "starting", "no-database", "down"]

SUPERUSER = "postgres"
SHARED_DATABASE = "streaming"
HOST = "127.0.0.1"

_PROTOCOL_3_0 = 196608
_TERMINATE = b"X\0\0\0\x04"
_ERROR_PROBES: dict[str, Probe] = {"57P03": "starting", "3D000": "no-database", "53300": "ready"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def build_url(port: int, database: str = SHARED_DATABASE, *, host: str = HOST) -> str:
    """The ``postgresql://`` URL of a trust-auth server (no password)."""
    return f"postgresql://{SUPERUSER}@{host}:{port}/{database}"


def probe(port: int, database: str, *, host: str = HOST, timeout: float = 1.0) -> Probe:
    """Whether a trust-auth Postgres on ``port`` lets the superuser into ``database``, in one
    round trip of the wire protocol (no driver, no subprocess)."""
    params = f"user\0{SUPERUSER}\0database\0{database}\0\0".encode()
    startup = struct.pack("!ii", 8 + len(params), _PROTOCOL_3_0) + params
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(startup)
            kind, body = _read_until_settled(sock)
            if kind == b"Z":
                sock.sendall(_TERMINATE)
    except OSError:
        return "down"
    if kind == b"Z":
        return "ready"
    return _ERROR_PROBES.get(_sqlstate(body), "down") if kind == b"E" else "down"


def _read_until_settled(sock: socket.socket) -> tuple[bytes, bytes]:
    """Read the replies to a startup message up to ReadyForQuery, an error or a password request
    (trust auth says AuthenticationOk *before* it checks that the database exists)."""
    for _ in range(100):
        kind, body = _read_message(sock)
        if kind in (b"Z", b"E") or (kind == b"R" and body[:4] != bytes(4)):
            return kind, body
    raise ConnectionError("no ReadyForQuery from the server")


def _read_message(sock: socket.socket) -> tuple[bytes, bytes]:
    header = _recv_exactly(sock, 5)
    (length,) = struct.unpack("!i", header[1:])
    if not 4 <= length <= 65536:
        raise ConnectionError(f"not a Postgres reply (length {length})")
    return header[:1], _recv_exactly(sock, length - 4)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return data


def _sqlstate(error_body: bytes) -> str:
    fields = error_body.split(b"\0")
    return next((f[1:].decode() for f in fields if f.startswith(b"C")), "")
