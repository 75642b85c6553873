"""Unit tests of tests.tcpproxy against a local echo server (no database).

The echo server answers every byte with itself, so a client speaking the Postgres frontend
protocol through the proxy gets its own messages back. A client that sends a message shaped
like a ReadyForQuery (``Z``) makes the "server" answer one: that ends a lost answer.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from tests.tcpproxy import SSL_REQUEST, FrontendParser, TcpProxy, is_commit

MARKER = "streaming_append_batch"
READY = b"Z" + struct.pack("!i", 5) + b"I"  # ReadyForQuery, idle


class EchoServer:
    """Echoes every connection's bytes back; keeps what each connection received."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port: int = self.sock.getsockname()[1]
        self.received: list[bytearray] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)
            buf = bytearray()
            with self._lock:
                self.received.append(buf)
            threading.Thread(target=self._echo, args=(conn, buf), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket, buf: bytearray) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    buf += data
                    conn.sendall(data)
            except OSError:
                pass

    def got(self, needle: bytes) -> bool:
        with self._lock:
            return any(needle in bytes(b) for b in self.received)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[TcpProxy]:
    with TcpProxy("127.0.0.1", echo.port, ack_timeout=5.0) as p:
        yield p


def startup() -> bytes:
    body = struct.pack("!i", 3 << 16) + b"user\0postgres\0database\0test\0\0"
    return struct.pack("!i", len(body) + 4) + body


def message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def query(sql: str) -> bytes:
    return message(b"Q", sql.encode() + b"\0")


def parse(name: str, sql: str) -> bytes:
    return message(b"P", name.encode() + b"\0" + sql.encode() + b"\0" + struct.pack("!h", 0))


def bind(portal: str, statement: str) -> bytes:
    return message(b"B", portal.encode() + b"\0" + statement.encode() + b"\0" + bytes(6))


def execute(portal: str = "") -> bytes:
    return message(b"E", portal.encode() + b"\0" + struct.pack("!i", 0))


def connect(proxy: TcpProxy) -> socket.socket:
    sock = socket.create_connection((proxy.host, proxy.port), timeout=5)
    return sock


def roundtrip(sock: socket.socket, data: bytes) -> bytes:
    """Send ``data``; read until as many bytes came back (the echo)."""
    sock.sendall(data)
    got = bytearray()
    while len(got) < len(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return bytes(got)


def ended(sock: socket.socket, timeout: float = 5.0) -> bytes | None:
    """The bytes that arrived before the connection ended; None if it is still open."""
    sock.settimeout(timeout)
    got = bytearray()
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return bytes(got)


def opened(proxy: TcpProxy) -> socket.socket:
    """A connection through the proxy past its startup packet."""
    sock = connect(proxy)
    assert roundtrip(sock, startup()) == startup()
    return sock


def test_bytes_go_both_ways_unchanged(proxy: TcpProxy, echo: EchoServer) -> None:
    with opened(proxy) as sock:
        big = query("SELECT '" + "x" * 300_000 + "'")
        assert roundtrip(sock, query("SELECT 1")) == query("SELECT 1")
        assert roundtrip(sock, big) == big
    # Not Postgres at all: forwarded untouched too.
    with connect(proxy) as raw:
        assert roundtrip(raw, b"GET / HTTP/1.0\r\n\r\n") == b"GET / HTTP/1.0\r\n\r\n"
    assert proxy.accepted == 2
    assert echo.got(big)


def test_an_ssl_request_is_forwarded_and_the_startup_after_it_parsed() -> None:
    parser = FrontendParser()
    ssl_request = struct.pack("!ii", 8, SSL_REQUEST)
    assert not parser.feed(ssl_request + startup(), lambda sql: True)
    assert not parser.startup and not parser.opaque and parser.messages == 2
    assert parser.feed(query("COMMIT")[:3], lambda sql: True) is False  # incomplete
    assert parser.feed(query("COMMIT")[3:], lambda sql: True) is True


def test_cut_all_drops_every_connection_and_new_ones_still_work(proxy: TcpProxy) -> None:
    socks = [opened(proxy), opened(proxy)]
    assert proxy.connections == 2
    assert proxy.cut_all() == 2
    for sock in socks:
        assert ended(sock) == b""
        sock.close()
    deadline = time.monotonic() + 5
    while proxy.connections and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proxy.connections == 0
    with opened(proxy) as sock:
        assert roundtrip(sock, query("SELECT 2")) == query("SELECT 2")


def test_pause_holds_bytes_and_refuses_connections_until_resume(proxy: TcpProxy) -> None:
    with opened(proxy) as sock:
        proxy.pause()
        sock.sendall(query("SELECT 3"))
        assert ended(sock, timeout=0.3) is None  # nothing came back, still open
        with connect(proxy) as refused:
            assert ended(refused) == b""
        assert proxy.refused == 1
        proxy.resume()
        sock.settimeout(5)
        assert sock.recv(65536) == query("SELECT 3")


def test_the_answer_to_a_marked_statement_is_lost_and_the_connection_cut(
    proxy: TcpProxy, echo: EchoServer
) -> None:
    victim, bystander = opened(proxy), opened(proxy)
    with victim, bystander:
        proxy.lose_next_ack(marker=MARKER)
        assert roundtrip(bystander, query("SELECT 4")) == query("SELECT 4")
        assert roundtrip(victim, query("BEGIN")) == query("BEGIN")
        marked = query(f"SELECT * FROM {MARKER}(1)")
        victim.sendall(marked + READY)  # the echo server answers with a ReadyForQuery
        assert ended(victim) == b"", "an answer to the marked statement got through"
        assert echo.got(marked), "the marked statement never reached the server"
        assert proxy.wait_ack_lost(1, timeout=5)
        assert proxy.armed == 0
        # Only the next one: the bystander and later statements are untouched.
        assert roundtrip(bystander, query(f"SELECT {MARKER}")) == query(f"SELECT {MARKER}")
    assert proxy.acks_lost == 1


def test_a_commit_is_recognised_without_a_marker(proxy: TcpProxy, echo: EchoServer) -> None:
    with opened(proxy) as sock:
        proxy.lose_next_ack()
        assert roundtrip(sock, query(f"SELECT {MARKER}")) == query(f"SELECT {MARKER}")
        assert roundtrip(sock, query("ROLLBACK")) == query("ROLLBACK")
        sock.sendall(query("commit") + READY)
        assert ended(sock) == b""
    assert proxy.wait_ack_lost(1, timeout=5)
    assert echo.got(query("commit"))


def test_a_statement_prepared_before_arming_triggers_when_executed(
    proxy: TcpProxy, echo: EchoServer
) -> None:
    """psycopg prepares a statement once, then sends only Bind/Execute with its name."""
    sql = f"SELECT * FROM {MARKER}($1)"
    sync = message(b"S", b"")
    with opened(proxy) as sock:
        prepare = parse("_pg3_0", sql) + sync
        assert roundtrip(sock, prepare) == prepare  # Parse alone does not trigger
        proxy.lose_next_ack(marker=MARKER)
        other = parse("", "SELECT 5") + bind("", "") + execute() + sync
        assert roundtrip(sock, other) == other
        run = bind("", "_pg3_0") + execute() + sync
        sock.sendall(run + READY)
        assert ended(sock) == b""
    assert proxy.wait_ack_lost(1, timeout=5)
    assert echo.got(run)


def test_without_a_ready_for_query_the_connection_is_cut_after_ack_timeout(
    echo: EchoServer,
) -> None:
    with TcpProxy("127.0.0.1", echo.port, ack_timeout=0.3) as proxy, opened(proxy) as sock:
        proxy.lose_next_ack(marker=MARKER)
        sock.sendall(query(f"SELECT {MARKER}()"))
        assert ended(sock) == b""
        assert proxy.acks_lost == 0  # cut by the timer, not by a ReadyForQuery


def test_a_target_that_is_down_gets_its_clients_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once s is closed
    with TcpProxy("127.0.0.1", port) as proxy, connect(proxy) as sock:
        assert ended(sock) == b""
        assert proxy.refused == 1


def test_url_for_points_a_database_url_at_the_proxy(proxy: TcpProxy) -> None:
    url = proxy.url_for("postgresql://postgres:pw@127.0.0.1:5432/test_db?sslmode=disable")
    assert url == f"postgresql://postgres:pw@127.0.0.1:{proxy.port}/test_db?sslmode=disable"
    assert proxy.url_for("postgresql://h:1/db") == f"postgresql://127.0.0.1:{proxy.port}/db"


@pytest.mark.parametrize(
    ("sql", "commit"),
    [
        ("COMMIT", True),
        ("commit;", True),
        ("  END TRANSACTION", True),
        ("COMMIT AND CHAIN", True),
        ("INSERT INTO t VALUES (1); COMMIT", True),
        ("ROLLBACK", False),
        ("SELECT 'commit'", False),
        ("BEGIN", False),
        ("", False),
    ],
)
def test_is_commit(sql: str, commit: bool) -> None:
    assert is_commit(sql) is commit
