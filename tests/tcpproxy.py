"""A small threaded TCP proxy for tests, with network faults aimed at the Postgres protocol.

``TcpProxy(host, port)`` listens on 127.0.0.1 (a free port) and forwards every connection to
``host:port``, one thread per direction. Its controls:

- ``cut_all()``: drop every proxied connection now (both sides see the connection end);
- ``pause()`` / ``resume()``: stop forwarding bytes (they wait in the proxy) and refuse new
  connections (accepted and closed at once) until ``resume()``;
- ``lose_next_ack(marker=None)``: the next statement that is a COMMIT (or, with ``marker``,
  whose SQL text contains ``marker``, as an autocommit statement's name does) reaches the
  server, which runs it and answers; the answer is thrown away and the connection dropped
  once the server said ReadyForQuery, so the client never learns that its statement (and
  commit) went through.

The client→server stream is parsed as the Postgres frontend protocol: a startup phase of
untyped messages (int32 length including itself, int32 code: SSLRequest, GSSENCRequest,
CancelRequest or a protocol 3.x StartupMessage), then typed messages (one type byte, int32
length including itself, body). An SSLRequest is forwarded like any message; the server's
one-byte answer comes back unparsed (the embedded test Postgres answers ``N``). A stream the
parser cannot follow (TLS after an ``S`` answer, garbage) is forwarded untouched and never
triggers anything.

What counts as running a statement:

- ``Q`` (simple query, body = SQL NUL): the statement runs and, outside a transaction block,
  commits when the server answers ReadyForQuery;
- ``P`` (Parse: statement name NUL, SQL NUL, ...) only records each statement name's SQL;
  ``B`` (Bind: portal NUL, statement name NUL, ...) binds a portal to a statement's SQL;
  ``E`` (Execute: portal NUL, ...) triggers when its portal's SQL matches. Prepared
  statements that psycopg reuses by name (no SQL text sent any more) are recognised too.

After the triggering message, the client's bytes go on being forwarded (an extended-protocol
Sync follows the Execute: without it an autocommit statement would not commit), and the
server's bytes are parsed as backend messages and dropped until a ReadyForQuery (``Z``); then
the connection is cut. This assumes the client does not pipeline several round trips on the
connection (psycopg and libpq outside pipeline mode do not). If no ReadyForQuery comes within
``ack_timeout`` seconds, the connection is cut anyway.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
_MAX_STARTUP = 10_000  # bytes: a longer "startup packet" is not one (TLS, garbage)
_MAX_MESSAGE = 1 << 30  # Postgres refuses messages of 1 GiB and more
_COMMIT_WORDS = frozenset({"COMMIT", "END"})


def is_commit(sql: str) -> bool:
    """Whether one of the statements of ``sql`` ends a transaction by committing it.

    ``COMMIT``, ``END``, with ``WORK``/``TRANSACTION``/``AND [NO] CHAIN`` or ``PREPARED``
    after them; ``ROLLBACK`` and everything else are not commits."""
    for statement in sql.split(";"):
        words = statement.split(None, 1)
        if words and words[0].upper() in _COMMIT_WORDS:
            return True
    return False


def _cstring(body: bytes, start: int = 0) -> tuple[str, int]:
    """The NUL-terminated string at ``start`` (decoded leniently) and the offset after it."""
    end = body.find(b"\0", start)
    if end < 0:
        end = len(body)
    return body[start:end].decode("utf-8", "replace"), end + 1


@dataclass
class FrontendParser:
    """Follows the client→server half of one connection, message by message.

    ``feed(data)`` returns True when ``data`` completes a message that runs a statement
    matching ``matches`` (see the module docstring for what "runs" means).
    """

    startup: bool = True  # still in the untyped startup phase
    opaque: bool = False  # lost track (TLS, garbage): forward without looking
    messages: int = 0  # complete messages seen (startup ones included)
    _buf: bytearray = field(default_factory=bytearray)
    _statements: dict[str, str] = field(default_factory=dict)  # statement name -> SQL
    _portals: dict[str, str] = field(default_factory=dict)  # portal -> its statement's SQL

    def feed(self, data: bytes, matches: Callable[[str], bool]) -> bool:
        if self.opaque:
            return False
        self._buf += data
        hit = False
        for kind, body in self._messages():
            self.messages += 1
            hit = self._runs_match(kind, body, matches) or hit
        return hit

    def _messages(self) -> Iterator[tuple[str, bytes]]:
        buf = self._buf
        while not self.opaque:
            if self.startup:
                if len(buf) < 8:
                    return
                (length,) = struct.unpack_from("!i", buf, 0)
                if not 8 <= length <= _MAX_STARTUP:
                    self._lose_track()
                    return
                if len(buf) < length:
                    return
                (code,) = struct.unpack_from("!i", buf, 4)
                del buf[:length]
                if code >> 16 == 3:  # StartupMessage, protocol 3.x: typed messages follow
                    self.startup = False
                elif code not in (SSL_REQUEST, GSSENC_REQUEST, CANCEL_REQUEST):
                    self._lose_track()
                    return
                yield "", b""
            else:
                if len(buf) < 5:
                    return
                (length,) = struct.unpack_from("!i", buf, 1)
                if not 4 <= length < _MAX_MESSAGE:
                    self._lose_track()
                    return
                if len(buf) < 1 + length:
                    return
                kind = chr(buf[0])
                body = bytes(buf[5 : 1 + length])
                del buf[: 1 + length]
                yield kind, body

    def _lose_track(self) -> None:
        self.opaque = True
        self._buf.clear()

    def _runs_match(self, kind: str, body: bytes, matches: Callable[[str], bool]) -> bool:
        if kind == "Q":
            return matches(_cstring(body)[0])
        if kind == "P":
            name, pos = _cstring(body)
            self._statements[name] = _cstring(body, pos)[0]
        elif kind == "B":
            portal, pos = _cstring(body)
            statement, _ = _cstring(body, pos)
            self._portals[portal] = self._statements.get(statement, "")
        elif kind == "E":
            # Matched now, not at Parse: a statement prepared before lose_next_ack() counts.
            sql = self._portals.get(_cstring(body)[0])
            return sql is not None and matches(sql)
        elif kind == "C" and body[:1] in (b"S", b"P"):  # Close statement / portal
            table = self._statements if body[:1] == b"S" else self._portals
            table.pop(_cstring(body, 1)[0], None)
        return False


class _Matcher:
    """What the armed ``lose_next_ack`` looks for: a COMMIT, or SQL containing a marker."""

    def __init__(self, marker: str | None) -> None:
        self.marker = marker

    def __call__(self, sql: str) -> bool:
        return is_commit(sql) or (self.marker is not None and self.marker in sql)


@dataclass
class BackendScanner:
    """Finds the end of the server's answer (a ReadyForQuery) in the bytes after a trigger."""

    _buf: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes) -> bool:
        """True once a ReadyForQuery message, or bytes that cannot be messages, went by."""
        buf = self._buf
        buf += data
        while len(buf) >= 5:
            (length,) = struct.unpack_from("!i", buf, 1)
            if not 4 <= length < _MAX_MESSAGE:
                return True
            if len(buf) < 1 + length:
                return False
            kind = buf[0]
            del buf[: 1 + length]
            if kind == ord("Z"):
                return True
        return False


class _Link:
    """One proxied connection: a client socket, a server socket, two pump threads."""

    def __init__(self, proxy: TcpProxy, client: socket.socket, server: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.server = server
        self.closed = threading.Event()
        self.doomed = threading.Event()  # an answer to lose is on its way: deliver nothing
        self.frontend = FrontendParser()
        self.backend = BackendScanner()
        self._exited = 0
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def start(self) -> None:
        for target, name in ((self._up, "c2s"), (self._down, "s2c")):
            threading.Thread(target=target, daemon=True, name=f"tcpproxy-{name}").start()

    def close(self) -> None:
        """Shut both sockets down (the pumps wake, exit, and the last one closes them)."""
        self.closed.set()
        for sock in (self.client, self.server):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _wait_flowing(self) -> bool:
        """Block while the proxy is paused; False when the link closed meanwhile."""
        while not self.proxy._flowing.wait(0.05):
            if self.closed.is_set():
                return False
        return not self.closed.is_set()

    def _up(self) -> None:
        try:
            while data := self.client.recv(65536):
                if self.frontend.feed(data, self.proxy._matcher) and self.proxy._take_trigger():
                    # Before the bytes go: whatever the server sends from now on is dropped.
                    self.doomed.set()
                    self._timer = threading.Timer(self.proxy.ack_timeout, self.close)
                    self._timer.daemon = True
                    self._timer.start()
                if not self._wait_flowing():
                    break
                self.server.sendall(data)
        except OSError:
            pass
        finally:
            self._exit()

    def _down(self) -> None:
        try:
            while data := self.server.recv(65536):
                if self.doomed.is_set():
                    if self.backend.feed(data):
                        self.proxy._lost_ack()
                        break
                    continue
                if not self._wait_flowing():
                    break
                self.client.sendall(data)
        except OSError:
            pass
        finally:
            self._exit()

    def _exit(self) -> None:
        self.close()
        with self._lock:
            self._exited += 1
            last = self._exited == 2
        if last:
            if self._timer is not None:
                self._timer.cancel()
            self.client.close()
            self.server.close()
            self.proxy._forget(self)


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``target_host:target_port``; see the module docstring.

    Use it as a context manager, or ``start()`` then ``close()``.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        ack_timeout: float = 5.0,
    ) -> None:
        self.target = (target_host, target_port)
        self.ack_timeout = ack_timeout
        self.accepted = 0  # connections forwarded, in all
        self.refused = 0  # connections refused while paused or with the target down
        self.acks_lost = 0  # answers dropped by lose_next_ack
        self._listener = socket.create_server((listen_host, listen_port))
        self._listener.settimeout(0.1)
        self.host, self.port = self._listener.getsockname()[:2]
        self._links: set[_Link] = set()
        self._lock = threading.Lock()
        self._flowing = threading.Event()
        self._flowing.set()
        self._stopping = threading.Event()
        self._armed = 0
        self._matcher = _Matcher(None)
        self._ack_lost = threading.Condition(self._lock)
        self._thread = threading.Thread(
            target=self._accept_loop, daemon=True, name=f"tcpproxy-{self.port}"
        )

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> TcpProxy:
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop listening and drop every connection."""
        self._stopping.set()
        self._flowing.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self._listener.close()
        self.cut_all()

    def url_for(self, database_url: str) -> str:
        """``database_url`` with its host and port replaced by the proxy's."""
        parts = urlsplit(database_url)
        auth = parts.netloc.rpartition("@")[0]
        netloc = f"{auth}@{self.host}:{self.port}" if auth else f"{self.host}:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    @property
    def connections(self) -> int:
        """Connections open through the proxy now."""
        with self._lock:
            return len(self._links)

    def cut_all(self) -> int:
        """Drop every open connection now; how many there were."""
        with self._lock:
            links = list(self._links)
        for link in links:
            link.close()
        return len(links)

    def pause(self) -> None:
        """Hold every byte in both directions, and refuse new connections, until resume()."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def lose_next_ack(self, marker: str | None = None, count: int = 1) -> None:
        """Arm: the next ``count`` matching statements run, but their answers are lost.

        Matching: a COMMIT, or (with ``marker``) SQL text that contains ``marker``."""
        with self._lock:
            self._matcher = _Matcher(marker)
            self._armed = count

    def disarm(self) -> None:
        with self._lock:
            self._armed = 0

    @property
    def armed(self) -> int:
        """Triggers still to go."""
        with self._lock:
            return self._armed

    def wait_ack_lost(self, count: int = 1, timeout: float = 10.0) -> bool:
        """Wait until ``count`` answers in all were dropped; whether they were in time."""
        with self._ack_lost:
            return self._ack_lost.wait_for(lambda: self.acks_lost >= count, timeout)

    # -- internals -----------------------------------------------------------------------

    def _take_trigger(self) -> bool:
        with self._lock:
            if self._armed <= 0:
                return False
            self._armed -= 1
            return True

    def _lost_ack(self) -> None:
        with self._ack_lost:
            self.acks_lost += 1
            self._ack_lost.notify_all()

    def _forget(self, link: _Link) -> None:
        with self._lock:
            self._links.discard(link)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            if not self._flowing.is_set():
                self._refuse(client)
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                self._refuse(client)
                continue
            server.settimeout(None)
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(self, client, server)
            with self._lock:
                self._links.add(link)
                self.accepted += 1
            link.start()

    def _refuse(self, client: socket.socket) -> None:
        with self._lock:
            self.refused += 1
        try:
            client.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        client.close()
