"""Hypothesis fuzzing of the HTTP API of a real ``runserver_stream``, over raw TCP sockets.

Raw sockets, not an HTTP client, so that a request can carry anything a client could send:
invalid UTF-8 and NUL in headers, very long values, bare-LF line endings, junk methods,
bodies that are not what their headers say. What must hold for every request:

* no status >= 500, and no traceback (or ERROR line) in the server's log;
* no 4xx body that shows internals (SQL, module paths, a traceback);
* afterwards the server still streams a new task exactly.

Settings (environment variables): ``STREAMING_FUZZ_REQUESTS`` distinct requests (default
10,000); an example draws ``STREAMING_FUZZ_SIDE`` request lines and as many header+body
payloads and sends every pairing (5 x 5), over ``STREAMING_FUZZ_CONNECTIONS`` keep-alive
connections (4); ``STREAMING_FUZZ_SHRINK=0`` reports failures unshrunk (faster);
``STREAMING_FUZZ_TRACE=file`` writes every request and answer there. Generation is
derandomized (``derandomize=True``, no example database): every run sends the same requests.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes

import httpx
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from tests.models import ExampleTask, ScriptedTask
from tests.support import ROOT, ManagedProcess, read_stream

pytestmark = pytest.mark.django_db(transaction=True)

REQUESTS = int(os.environ.get("STREAMING_FUZZ_REQUESTS", "10000"))
SIDE = max(1, int(os.environ.get("STREAMING_FUZZ_SIDE", "5")))  # SIDE**2 requests an example
DISTINCT = 0.65  # the share of those not sent before (a margin: about 0.75 are new)
CONNECTIONS = max(1, int(os.environ.get("STREAMING_FUZZ_CONNECTIONS", "4")))
TRACE = os.environ.get("STREAMING_FUZZ_TRACE", "")  # a file: every request and answer
SHRINK = os.environ.get("STREAMING_FUZZ_SHRINK", "1") != "0"
READ_TIMEOUT = 10.0  # seconds for any one recv; a whole response gets RESPONSE_DEADLINE
RESPONSE_DEADLINE = 20.0
SSE = {"Accept": "text/event-stream"}
CRLF = b"\r\n"

# What a 4xx body must never show (unless the request itself sent it, to be echoed back).
LEAKS = ("SELECT", "psycopg", "Traceback", "django.", "streaming.")
# What the server's log must never show.
LOG_ALARMS = ("Traceback", "Exception in ASGI application", "ERROR")


# -- requests and responses ------------------------------------------------------------------


def _repeats(data: bytes, i: int, width: int) -> int:
    """How many times ``data[i : i + width]`` repeats from ``i`` (slice compares, in C)."""
    unit = data[i : i + width]
    most = (len(data) - i) // width
    if len(unit) < width:
        return 1
    low = 1
    while low * 2 <= most and data[i : i + low * 2 * width] == unit * (low * 2):
        low *= 2
    high = min(most, low * 2 - 1)
    while low < high:
        mid = (low + high + 1) // 2
        if data[i : i + mid * width] == unit * mid:
            low = mid
        else:
            high = mid - 1
    return low


def _compact(data: bytes) -> str:
    """A Python expression for ``data``, repeats of a short unit written as ``b"ab" * n``."""
    parts: list[str] = []
    literal = bytearray()
    i = 0
    while i < len(data):
        width, count = 1, 1
        for w in range(1, 9):
            if data[i : i + w] == data[i + w : i + 2 * w]:  # cheap: most bytes repeat nothing
                n = _repeats(data, i, w)
                if w * n > width * count:
                    width, count = w, n
                if w == 1 and n >= 32:
                    break  # a run of one byte: nothing says it better
        if width * count >= 32 and count > 1:
            if literal:
                parts.append(repr(bytes(literal)))
                literal.clear()
            parts.append(f"{data[i : i + width]!r} * {count}")
            i += width * count
        else:
            literal.append(data[i])
            i += 1
    if literal or not parts:
        parts.append(repr(bytes(literal)))
    return " + ".join(parts)


def _printf_arg(data: bytes) -> str:
    """``data`` as a single-quoted printf format that writes exactly those bytes."""
    out = []
    for b in data:
        c = chr(b)
        if c == "%":
            out.append("%%")
        elif c == "\\":
            out.append("\\\\")
        elif c == "'":
            out.append("\\047")
        elif 32 <= b < 127:
            out.append(c)
        else:
            out.append(f"\\{b:03o}")
    return "'" + "".join(out) + "'"


@dataclass(frozen=True)
class Req:
    """One HTTP/1.x request, written byte for byte as generated."""

    method: bytes
    target: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes = b""
    chunked: bool = False
    eol: bytes = b"\r\n"
    version: bytes = b"HTTP/1.1"

    def raw(self) -> bytes:
        head = [self.method + b" " + self.target + b" " + self.version]
        head += [name + b": " + value for name, value in self.headers]
        if self.chunked:
            head.append(b"Transfer-Encoding: chunked")
        elif self.body or self.method in (b"POST", b"PUT", b"PATCH"):
            head.append(b"Content-Length: " + str(len(self.body)).encode())
        out = self.eol.join(head) + self.eol + self.eol
        if not self.chunked:
            return out + self.body
        step = max(1, len(self.body) // 3 or 1)
        for i in range(0, len(self.body), step):
            chunk = self.body[i : i + step]
            out += f"{len(chunk):x}".encode() + b"\r\n" + chunk + b"\r\n"
        return out + b"0\r\n\r\n"

    @property
    def closes(self) -> bool:
        """Whether the connection cannot carry another request after this one."""
        names = {n.lower() for n, _ in self.headers}
        return b"upgrade" in names or self.method == b"CONNECT" or self.version != b"HTTP/1.1"

    def reproducer(self, port: int | str = "$PORT") -> str:
        raw = self.raw()
        if len(raw) <= 2048:
            return f"printf {_printf_arg(raw)} | nc -q 5 127.0.0.1 {port}"
        expr = _compact(raw).replace("'", "'\"'\"'")
        return (
            f"python3 -c 'import sys; sys.stdout.buffer.write({expr})' | nc -q 5 127.0.0.1 {port}"
        )

    def __repr__(self) -> str:  # what Hypothesis prints for a falsifying example
        return f"Req({_compact(self.raw())})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # Hypothesis's pretty-printer
        printer.text(repr(self))


@dataclass
class Outcome:
    status: int  # 0: no response (the reason is in ``error``)
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    error: str = ""
    raw_head: bytes = b""

    def header(self, name: str) -> str:
        return next((v for k, v in self.headers if k == name), "")


class Connection:
    """A keep-alive TCP connection that sends requests one after another."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None
        self.used = False

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=READ_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.used = sock, False
        return sock

    def send(self, req: Req) -> Outcome:
        reused = self.sock is not None and self.used
        out = self._send_once(req)
        if out.status == 0 and reused and out.error.startswith("eof before"):
            out = self._send_once(req)  # the server had closed the idle connection
        if out.status == 0 or req.closes or out.header("connection").lower() == "close":
            self.close()
        return out

    def _send_once(self, req: Req) -> Outcome:
        sock = self.sock or self._connect()
        self.used = True
        raw = req.raw()
        sent_error = ""
        try:
            sock.sendall(raw)
        except OSError as exc:  # the server answered early and closed: read that answer
            sent_error = f"send: {exc!r}; "
        try:
            return self._read(sock, req)
        except TimeoutError:
            self.close()
            return Outcome(0, error=sent_error + "timeout")
        except OSError as exc:
            self.close()
            return Outcome(0, error=sent_error + f"eof before a response ({exc!r})")

    def _read(self, sock: socket.socket, req: Req) -> Outcome:
        deadline = time.monotonic() + RESPONSE_DEADLINE
        buf = b""

        def more() -> bytes:
            if time.monotonic() > deadline:
                raise TimeoutError
            data = sock.recv(65536)
            if not data:
                raise ConnectionAbortedError("eof")
            return data

        while True:
            while b"\r\n\r\n" not in buf:
                try:
                    buf += more()
                except ConnectionAbortedError:
                    if buf:
                        return Outcome(0, error=f"eof in the head: {buf[:200]!r}")
                    raise ConnectionAbortedError("eof before a response") from None
            head, _, buf = buf.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            status_line = lines[0].decode("latin-1")
            match = re.match(r"HTTP/1\.[01] (\d{3})", status_line)
            if not match:
                return Outcome(0, error=f"bad status line {status_line!r}")
            status = int(match.group(1))
            headers = []
            for line in lines[1:]:
                name, _, value = line.decode("latin-1").partition(":")
                headers.append((name.strip().lower(), value.strip()))
            out = Outcome(status, headers, raw_head=head)
            if 100 <= status < 200 and status != 101:
                continue  # 100 Continue: the real answer follows
            break
        if status == 101 or out.header("content-type").startswith("text/event-stream"):
            self.close()  # a stream (or a protocol switch): the head is all we read
            return out
        if req.method == b"HEAD" or status in (204, 304):
            return out
        if out.header("transfer-encoding").lower() == "chunked":
            body = b""
            while True:
                while b"\r\n" not in buf:
                    buf += more()
                size_line, _, buf = buf.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                while len(buf) < size + 2:
                    buf += more()
                body, buf = body + buf[:size], buf[size + 2 :]
                if size == 0:
                    break
            out.body = body
            return out
        length = out.header("content-length")
        if length:
            while len(buf) < int(length):
                buf += more()
            out.body = buf[: int(length)]
            return out
        try:  # no length: the body runs to the end of the connection
            while True:
                buf += more()
        except ConnectionAbortedError:
            pass
        self.close()
        out.body = buf
        return out


# -- what to send ----------------------------------------------------------------------------
#
# Every strategy is built once (module level, or once per run in ``request_strategy``): one
# made inside a draw is validated again on each draw, which made generation ten times slower.


@functools.cache
def _upto(n: int) -> st.SearchStrategy[int]:
    return st.integers(0, n)


def _encode_segment(text: str, mode: int) -> bytes:
    """A path segment or query part: escaped minimally, fully, or raw (non-ASCII kept)."""
    data = text.encode("utf-8", "surrogatepass")
    if mode == 0:
        return quote_from_bytes(data, safe=b"!$&'()*+,;=:@-._~%").encode()
    if mode == 1:
        return "".join(f"%{b:02X}" for b in data).encode()
    return bytes(b for b in data if b not in b" \r\n#?/")


_any_char = st.characters(exclude_categories=())  # lone surrogates included
_text = st.text(_any_char, max_size=12)


def _pick(
    options: Sequence[str], otherwise: st.SearchStrategy[str] = _text
) -> st.SearchStrategy[str]:
    """Mostly one of ``options``, sometimes ``otherwise`` (one draw, not one_of's two)."""
    choices = st.sampled_from([*options, *options, None])

    @st.composite
    def pick(draw: st.DrawFn) -> str:
        value = draw(choices)
        return draw(otherwise) if value is None else value

    return pick()


APPS = _pick(
    ["tests", "streaming", "auth", "contenttypes", "sessions", "admin", "messages", "TESTS",
     "Tests", "", ".", "..", "tests ", "tests\x00", "test", "tests.models", "tests/"]
)  # fmt: skip
MODELS = _pick(
    ["ScriptedTask", "scriptedtask", "SCRIPTEDTASK", "ExampleTask", "exampletask",
     "TimeoutTask", "ContinueTask", "AsyncGeneratorTask", "SyncGeneratorTask",
     "HttpxFetchTask", "StreamTask", "User", "Group", "Permission", "ContentType", "Session",
     "LogEntry", "TaskRun", "TaskEvent", "NoSuch", "", ".", "..", "ScriptedTask\x00",
     "ScriptedTas\u212a", "scriptedtask ", "Scripted%54ask", "tests.ScriptedTask"]
)  # fmt: skip
PREFIXES = _pick(
    ["stream", "stream", "tasks", "tasks", "watch", "health", "metrics", "Stream", "STREAM",
     "streams", "task", "", ".", "..", "static", "admin", "%73tream", "stream\x00",
     "\u0455tream"]
)  # fmt: skip
REAL_PREFIXES = st.sampled_from(["stream", "stream", "tasks", "watch"])
REAL_MODELS = st.sampled_from(["ScriptedTask", "ScriptedTask", "ExampleTask", "scriptedtask"])
SUFFIXES = _pick(["cancel", "cancel", "Cancel", "cancel/", "", "..", "status", "x"])
JUNK_IDS = (
    ["0", "1", "2", "-1", "-0", "999999999", "9" * 18, "9" * 19, "9" * 40,
     "9223372036854775807", "9223372036854775808", "00000000000000000001", "\u0661",
     "\u0661\u0662\u0663", "\uff11", "\u07c0", "\u0e51" * 18, "\U0001d7d9", "1.5", "1e3",
     "0x1f", "+1", " 1", "1 ", "\t1", "1\x00", "", ".", "..", "%31", "1;x", "NaN",
     "Infinity", "\u00b2", "\u2460"]
)  # fmt: skip
TYPES = (
    ["tick", "end", "tick,end", "a,b,c", ",,,", "<script>alert(1)</script>", "a" * 65,
     "a" * 64, "tick,\x00", "ti ck", ",".join(["t"] * 500), "progress,error,cancelled"]
)  # fmt: skip
QUERY_KEYS = _pick(
    ["last_event_id", "last_event_id", "token", "types", "types", "Last-Event-ID",
     "last_event_id[]", "", "%00", "LAST_EVENT_ID"]
)  # fmt: skip
TOKENS = (
    ["", "x", "abc:def", "\x00", "\u00e9", "\ud800", "a" * 5000, "=" * 20, "%%%",
     "eyJ0YXNrIjoxfQ:1tXyZ:abc", "<script>alert(1)</script>"]
)  # fmt: skip
_digits = st.text(st.characters(categories=["Nd"]), min_size=1, max_size=19)
_other_ids = st.one_of(st.integers(-(10**20), 10**20).map(str), _digits, _text)
NO_VALUE = "\x00(a query key with no =)\x00"
QUERY_STYLES = st.sampled_from(  # how the pairs are escaped, and joined
    [(0, b"&")] * 6 + [(1, b"&"), (2, b"&"), (0, b";"), (1, b";"), (0, b"&&")]
)
TARGET_FORMS = st.sampled_from(["plain"] * 12 + ["/", "//", "/./", "absolute", "odd"])


# JSON as text, not values: NaN, Infinity, lone surrogates and duplicate keys cannot be dumped.
def _jstr(text: str) -> str:
    return json.dumps(text)


def _object(pairs: list[tuple[str, str]]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in pairs) + "}"


json_scalars = st.one_of(
    st.sampled_from(
        ["NaN", "-NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1E400", "-0", "0.0",
         "1e-400", '"\\ud800"', '"\\udc00\\ud800"', '"\\u0000"', '"a\\u0000b"',
         '"\\ud83d\\ude00"', '"\\uffff"', "9" * 5000, "true", "false", "null", "[]", "{}",
         '""', '"\\/"', '"\\x41"']
    ),
    st.integers().map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.text(_any_char, max_size=20).map(_jstr),
)  # fmt: skip
_json_keys = json_scalars.map(lambda s: s if s.startswith('"') else _jstr(s))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]"),
        st.lists(st.tuples(_json_keys, inner), max_size=4).map(_object),
    ),
    max_leaves=6,
)

# Values for the integer fields: invalid ones, or valid and small. A valid huge count
# (ticks=2**31-1, payload_size=10**9) is a task that runs for hours, not an HTTP bug.
BAD_NUMBERS = st.sampled_from(
    ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1E400", "1.5", "-0.0", '"3"',
     '"abc"', '"\\u0000"', '"\\ud800"', '"\\u0661"', '" 2 "', '"1e3"', '"' + "9" * 30 + '"',
     "null", "true", "false", "[]", "{}", "[1]", '{"a": 1}', "1" + "0" * 400,
     "-1" + "0" * 400, "9" * 5000, '""', "2147483648", "-2147483649", "9223372036854775808",
     "-1"]
)  # fmt: skip
counts = st.one_of(
    st.integers(0, 5).map(str),
    BAD_NUMBERS,
    st.integers(max_value=-1).map(str),
    st.integers(min_value=2**31).map(str),
)
# Delays: never a long positive one (Infinity: a task that sleeps forever).
delays = st.one_of(
    st.sampled_from(
        ["0", "0.001", "0.0", "-1", "-Infinity", "-1e999", "NaN", "1e-300", '"0.001"',
         '"abc"', "null", "[]", "{}", '"\\u0000"', "1" + "0" * 400, "-1" + "0" * 400, '"NaN"',
         "false"]
    ),
    st.floats(-1e6, 0.005).map(repr),
)  # fmt: skip
messages = st.one_of(
    st.text(_any_char, max_size=300).map(_jstr),
    st.sampled_from(['"\\u0000"', '"\\ud800"', '"' + "x" * 256 + '"', "null", "1", "[]"]),
)
FIELD_VALUES: dict[str, st.SearchStrategy[str]] = {
    "ticks": counts,
    "payload_size": st.one_of(st.integers(0, 64).map(str), BAD_NUMBERS),
    "fail_at": st.one_of(counts, st.integers().map(str)),
    "delay": delays,
    "result": json_values,
    "message": messages,
    "total_steps": counts,
    "step_delay": delays,
}
OTHER_KEYS = _pick(
    ["id", "pk", "created_at", "updated_at", "completed_at", "final_value", "status",
     "attempt", "started_at", "error", "nope", "", "\x00", "__proto__", "ticks ", "TICKS",
     "\ud800", "ticks\x00", "_state", "save", "objects"]
)  # fmt: skip
field_pairs = st.one_of(
    *[st.tuples(st.just(_jstr(name)), values) for name, values in FIELD_VALUES.items()],
    st.tuples(OTHER_KEYS.map(_jstr), json_values),
)
# Bodies a client that means well would send: valid values (a task that runs), at most one
# field off; half the task bodies are those, so that creation gets past validation.
GOOD_VALUES: dict[str, st.SearchStrategy[str]] = {
    "ticks": st.integers(0, 5).map(str),
    "payload_size": st.integers(0, 64).map(str),
    "fail_at": st.one_of(
        st.none().map(lambda _: "null"), st.integers(-(2**31), 2**31 - 1).map(str)
    ),
    "delay": st.floats(0, 0.005).map(repr),
    "result": json_values,
    "message": st.text(max_size=255).map(_jstr),
    "total_steps": st.integers(0, 5).map(str),
    "step_delay": st.floats(0, 0.005).map(repr),
}
good_pairs = st.one_of(
    *[st.tuples(st.just(_jstr(name)), values) for name, values in GOOD_VALUES.items()]
)
task_bodies = st.one_of(
    st.lists(field_pairs, max_size=5).map(_object),
    st.tuples(
        st.lists(good_pairs, max_size=4, unique_by=lambda kv: kv[0]),
        st.lists(field_pairs, max_size=1),
    ).map(lambda parts: _object(parts[0] + parts[1])),
)

MiB = 1 << 20
ODD_BODIES = st.sampled_from(
    [b"\xef\xbb\xbf{}", "{}".encode("utf-16"), b'{"ticks": "\xff"}', b"{\x00}",
     b'{"ticks": 1}\x00', b"{", b"}", b"[1]", b"null", b'"str"', b"NaN",
     b'{"ticks": 1}{"ticks": 2}', b'{"ticks": 1, }', b"\x00" * 10, b"\xff\xfe",
     b"{'ticks': 1}", b'{"ticks": 1} ', b" " * 1000, b"\r\n", b'{"ticks": 1, "ticks": 2}']
)  # fmt: skip
HUGE_BODIES = st.sampled_from(
    [
        b"[" * 200_000 + b"]" * 200_000,
        b'{"result": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
        b'{"result": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_000 + b"}",
        b'{"result": ' + b"[" * 2_000 + b"]" * 2_000 + b"}",
        b'{"ticks": 1, "result": "' + b"x" * (MiB + 10) + b'"}',
        b'{"ticks": 1, "result": "' + b"x" * (MiB - 40) + b'"}',  # just under the limit
        b" " * (MiB + 1),
        b"x" * (3 * MiB),
    ]
)
_binary_bodies = st.binary(max_size=300)


@st.composite
def _bodies(draw: st.DrawFn) -> bytes:
    kind = draw(_upto(39))
    if kind == 0:
        return b""
    if kind < 26:
        return draw(task_bodies).encode("utf-8", "surrogatepass")
    if kind < 30:
        return draw(json_values).encode("utf-8", "surrogatepass")
    if kind < 34:
        return draw(ODD_BODIES)
    if kind < 37:
        return draw(_binary_bodies)
    return draw(HUGE_BODIES)


bodies = _bodies()

HEADER_JUNK_VALUES = st.sampled_from(
    [b"", b"\x00", b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\x7f", b"\t", b"a\x00b",
     "\u00e9".encode(), "\u00e9".encode("latin-1"), b" x ", b"text/event-stream\x00",
     b"\x80" * 10, b"\x1b[31m", b"%00", b"=?utf-8?b?w6k=?="]
)  # fmt: skip
_ascii_values = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)
_utf8_values = st.text(max_size=20)
_bytes_values = st.binary(max_size=60)
_long_values = st.sampled_from([1000, 8000, 70_000])


@st.composite
def _header_values(draw: st.DrawFn) -> bytes:
    kind = draw(_upto(19))
    if kind < 10:
        return draw(_ascii_values).encode()
    if kind < 13:
        return draw(HEADER_JUNK_VALUES)
    if kind < 17:
        return draw(_utf8_values).encode()  # not ASCII: RFC 9110 calls it obs-text
    if kind < 19:  # control characters: the parser refuses most
        return draw(_bytes_values).replace(b"\r", b"").replace(b"\n", b"")
    return b"v" * draw(_long_values)


header_values = _header_values()
# Names this fuzzer sets itself (framing); every other name is fair game.
_RESERVED_HEADERS = {b"content-length", b"transfer-encoding", b"expect", b"upgrade", b"host"}
COMMON_HEADERS = st.sampled_from(
    [b"X-Fuzz", b"Cookie", b"Authorization", b"X-Forwarded-For", b"Referer", b"User-Agent",
     b"Accept-Encoding", b"If-None-Match", b"Range", b"Connection", b"Keep-Alive",
     b"Cache-Control", b"X-Requested-With", b"Forwarded", b"Sec-Fetch-Mode",
     b"Accept-Language", b"TE", b"Trailer", b"Via", b"Last-Event-Id ", b"Last_Event_ID",
     b"Accept "]
)  # fmt: skip
_token_names = st.text(
    "abcdefghijklmnopqrstuvwxyzABCXYZ0123456789-_!#$%&'*+.^`|~", min_size=1, max_size=20
)
_binary_names = st.binary(min_size=1, max_size=20)
_long_names = st.sampled_from([1000, 9000])


@st.composite
def _header_names(draw: st.DrawFn) -> bytes:
    kind = draw(_upto(9))
    if kind < 6:
        name = draw(COMMON_HEADERS)
    elif kind < 8:
        name = draw(_token_names).encode()
    elif kind == 8:
        name = draw(_binary_names)
        name = name.replace(b":", b"").replace(b"\r", b"").replace(b"\n", b"") or b"X"
    else:
        name = b"X" * draw(_long_names)
    return b"X-Fuzz" if name.strip().lower() in _RESERVED_HEADERS else name


header_names = _header_names()
ACCEPTS = st.sampled_from(
    [b"text/event-stream", b"*/*", b"application/json", b"text/html", b"text/event-stream;q=0",
     b"TEXT/EVENT-STREAM", b"text/*", b"application/json, text/event-stream"]
)  # fmt: skip
CONTENT_TYPES = st.sampled_from(
    [b"application/json", b"application/json", b"application/json; charset=utf-8",
     b"APPLICATION/JSON", b"application/json; charset=utf-16", b"text/plain",
     b"multipart/form-data", b"application/x-www-form-urlencoded",
     b"application/json; charset=latin-1", b"application/xml", b"application/json\x00",
     b" application/json ;", b"application/jsonx"]
)  # fmt: skip
# What the policies and guards read: a session cookie (a NUL, octal escapes, too long, not
# one), a bearer token (``Request.token``), the proxy's client address; and Expect.
CREDENTIALS = st.sampled_from(
    [(b"Cookie", b"sessionid=abcdefghijklmnop"), (b"Cookie", b'sessionid="\\000aaaaaaaaaa"'),
     (b"Cookie", b'sessionid="\\377\\376aaaaaaaa"'), (b"Cookie", b"sessionid=" + b"a" * 300),
     (b"Cookie", b"sessionid=%00aaaaaaaaaa"), (b"Cookie", b"sessionid=;sessionid=x"),
     (b"Cookie", b'a=b; sessionid="\\"\\\\"'), (b"Cookie", b"sessionid=\x01aaaaaaaaaa"),
     (b"Cookie", b"=; ;;=x"), (b"Cookie", b"$Version=1; sessionid=aaaaaaaaaaaa; $Path=/"),
     (b"Authorization", b"Bearer "), (b"Authorization", b"Bearer x.y.z"),
     (b"Authorization", b"bearer eyJ0IjoxfQ:1tXyZ:abc"), (b"Authorization", b"Basic Og=="),
     (b"Authorization", b"Bearer " + b"a" * 2000), (b"Authorization", b"Bearer .eJwLy:x:y"),
     (b"Authorization", b"Bearer \\u0000"), (b"Authorization", b"Bearer fuzz-metrics-token"),
     (b"X-Forwarded-For", b"1.2.3.4"), (b"X-Forwarded-For", b"::1, 10.0.0.1"),
     (b"X-Forwarded-For", b"not-an-address"), (b"X-Forwarded-For", b"1.2.3.4, 127.0.0.1"),
     (b"X-Forwarded-For", b"[::1]:80, , ,"), (b"X-Forwarded-For", b"999.1.1.1"),
     (b"X-Forwarded-For", b"fe80::1%eth0"), (b"X-Forwarded-For", b"1.2.3.4, " * 500),
     (b"Expect", b"100-continue"), (b"Expect", b"x")]
)  # fmt: skip
JSON_TYPES = st.sampled_from([b"application/json", b"application/json; charset=utf-8"])
ORIGINS = st.sampled_from(
    [b"null", b"http://evil.example", b"https://127.0.0.1", b"file://", b"http://127.0.0.1"]
)
LAST_EVENT_ID_NAMES = st.sampled_from([b"Last-Event-ID", b"last-event-id"])
UPGRADES = st.sampled_from([b"websocket", b"WebSocket", b"h2c", b"x", b"websocket, h2c"])
METHODS = st.sampled_from(
    [b"GET"] * 8 + [b"POST"] * 6 + [b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"*"]
)
JUNK_METHODS = st.one_of(
    st.sampled_from(
        [b"get", b"FOO", b"G3T", b"PROPFIND", b"TRACE", b"CONNECT", b"M-SEARCH", b"PURGE",
         b"BREW", b"X" * 50, b"GET\x00", b"POST /x", b"\xffGET", b"PRI", b"QUERY"]
    ),
    st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ-_!", min_size=1, max_size=12).map(str.encode),
)  # fmt: skip
CREATE_APPS = st.sampled_from(["tests", "tests", "tests", "Tests", "auth", ""])
CREATE_MODELS = st.sampled_from(
    ["ScriptedTask", "ScriptedTask", "scriptedtask", "ExampleTask", "TimeoutTask", "User"]
)
VERSIONS = st.sampled_from(  # with the line ending
    [(b"HTTP/1.1", b"\r\n")] * 120
    + [(b"HTTP/1.1", b"\n")] * 2
    + [(v, b"\r\n") for v in (b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.2", b"HTTP/9.9", b"HTTX/1.1")]
    + [(b"http/1.1", b"\r\n"), (b"HTTP/1.0", b"\n")]
)
ODD_TARGETS = st.sampled_from([b"*", b"http://127.0.0.1/health", b"//stream", b"/%", b"/?"])
ENCODINGS = st.sampled_from([0] * 12 + [1] * 3 + [2])  # 2: raw, the parser refuses most
_junk_queries = st.binary(max_size=40)
_random_segments = st.lists(_text, max_size=6)
_suffix_lists = st.lists(SUFFIXES, min_size=1, max_size=3)


@dataclass(frozen=True)
class Line:
    """A request line: method, target, version (and the line ending of the whole head)."""

    method: bytes
    target: bytes
    version: bytes
    eol: bytes


@dataclass(frozen=True)
class Payload:
    """Headers and a body: sent only with a POST, PUT or PATCH, unless ``always``."""

    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    chunked: bool
    always: bool


@dataclass(frozen=True)
class Batch:
    """What one example sends: every line with every payload (a generated request costs
    Hypothesis milliseconds; this way each line or payload drawn makes ``SIDE`` of them)."""

    lines: list[Line]
    payloads: list[Payload]

    def requests(self) -> list[Req]:
        return [
            Req(
                line.method,
                line.target,
                load.headers,
                load.body if load.always or line.method in (b"POST", b"PUT", b"PATCH") else b"",
                load.chunked,
                line.eol,
                line.version,
            )
            for line in self.lines
            for load in self.payloads
        ]

    def __repr__(self) -> str:
        return "Batch(\n" + "".join(f"  {r!r},\n" for r in self.requests()) + ")"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


def request_strategy(real: Sequence[int], port: int, side: int = SIDE) -> st.SearchStrategy[Batch]:
    """Batches of requests: the real route shapes, mutated (``real``: ids of real tasks)."""
    real_ids = [str(i) for i in real] * 4
    real_id = st.sampled_from([str(i) for i in real])
    ids = _pick([*real_ids, *JUNK_IDS], _other_ids)
    id_bytes = ids.map(lambda s: s.encode("utf-8", "surrogatepass"))
    query_values = _pick([*real_ids, *JUNK_IDS, *TYPES, *TOKENS, NO_VALUE], _other_ids)
    query_pairs = st.lists(st.tuples(QUERY_KEYS, query_values), min_size=1, max_size=4)
    host = f"127.0.0.1:{port}".encode()

    @st.composite
    def paths(draw: st.DrawFn) -> list[str]:
        shape = draw(_upto(9))
        if shape >= 7:  # a real route to a real task, as is or with one part mutated
            path = [draw(REAL_PREFIXES), "tests", draw(REAL_MODELS), draw(real_id)]
            if path[0] == "tasks" and draw(_upto(2)) == 0:
                path.append("cancel")
            part = draw(_upto(7))
            if part < 4:
                path[part] = draw((PREFIXES, APPS, MODELS, ids)[part])
            return path
        if shape == 0:
            return [draw(PREFIXES), draw(APPS), draw(MODELS), draw(ids)]
        if shape == 1:
            return [draw(PREFIXES), draw(MODELS), draw(ids)]
        if shape == 2:
            return ["tasks", draw(APPS), draw(MODELS)]
        if shape == 3:
            return ["tasks", draw(APPS), draw(MODELS), draw(ids), draw(SUFFIXES)]
        if shape == 4:
            return [draw(PREFIXES)]
        if shape == 5:
            return draw(_random_segments)
        return [draw(PREFIXES), draw(APPS), draw(MODELS), draw(ids), *draw(_suffix_lists)]

    @st.composite
    def queries(draw: st.DrawFn) -> bytes:
        kind = draw(_upto(19))
        if kind < 6:
            return b""
        if kind == 19:  # raw junk, possibly not even ASCII (the parser refuses most)
            return b"?" + bytes(b for b in draw(_junk_queries) if b not in b" \r\n#")
        mode, separator = draw(QUERY_STYLES)
        parts = []
        for key, value in draw(query_pairs):
            if value == NO_VALUE:
                parts.append(_encode_segment(key, mode))
            else:
                parts.append(_encode_segment(key, mode) + b"=" + _encode_segment(value, mode))
        return b"?" + separator.join(parts)

    path_s, query_s = paths(), queries()

    @st.composite
    def targets(draw: st.DrawFn) -> bytes:
        form = draw(TARGET_FORMS)
        if form == "odd":
            return draw(ODD_TARGETS)
        mode = draw(ENCODINGS)
        path = b"/" + b"/".join(_encode_segment(s, mode) for s in draw(path_s))
        if form == "/":
            path += b"/"
        elif form == "//":
            path = b"/" + path
        elif form == "/./":
            path = path.replace(b"/", b"/./", 1)
        elif form == "absolute":
            path = b"http://127.0.0.1" + path
        return path + draw(query_s)

    @st.composite
    def headers(draw: st.DrawFn, creating: bool) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        kind = draw(_upto(19))
        if kind < 17:
            out.append((b"Host", host))
        elif kind == 17:
            out.append((b"Host", draw(header_values)))
        elif kind == 18:
            out += [(b"Host", b"a.example"), (b"Host", host)]
        # 19: no Host header at all
        if creating and draw(_upto(9)) < 8:
            out.append((b"Content-Type", draw(JSON_TYPES if draw(_upto(5)) else CONTENT_TYPES)))

        def known_or_junk(known: st.SearchStrategy[bytes]) -> bytes:
            return draw(known) if draw(_upto(2)) else draw(header_values)

        for _ in range(draw(_upto(3))):
            kind = draw(_upto(9))
            if kind < 2:
                value = draw(id_bytes) if draw(_upto(2)) else draw(header_values)
                out.append((draw(LAST_EVENT_ID_NAMES), value))
            elif kind < 4:
                out.append((b"Accept", known_or_junk(ACCEPTS)))
            elif kind == 4:
                out.append((b"Content-Type", known_or_junk(CONTENT_TYPES)))
            elif kind == 5:
                out.append((b"Origin", known_or_junk(ORIGINS)))
            elif kind == 6:
                out.append(draw(CREDENTIALS))
            else:
                out.append((draw(header_names), draw(header_values)))
        # Not 1 or 2: Hypothesis draws small integers (and constants of the code) far more
        # often than their share.
        websocket = draw(_upto(59))
        if websocket == 31:  # a full handshake
            out += [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"),
                    (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
                    (b"Sec-WebSocket-Version", b"13")]  # fmt: skip
        elif websocket == 32:  # a half-hearted one, or another protocol
            out += [(b"Upgrade", draw(UPGRADES)), (b"Connection", b"Upgrade")]
        return out

    target_s, plain_headers, create_headers = targets(), headers(False), headers(True)

    @st.composite
    def lines(draw: st.DrawFn) -> Line:
        method = draw(METHODS)
        if method == b"*":
            method = draw(JUNK_METHODS)
        if method == b"POST" and draw(_upto(2)):  # creation, mostly of models that allow it
            app, model = draw(CREATE_APPS), draw(CREATE_MODELS)
            target = f"/tasks/{app}/{model}".encode() + draw(query_s)
        else:
            target = draw(target_s)
        version, eol = draw(VERSIONS)
        return Line(method, target, version, eol)

    @st.composite
    def payloads(draw: st.DrawFn) -> Payload:
        json_body = draw(_upto(3)) > 0  # what a POST /tasks/... would send, more or less
        head = draw(create_headers if json_body else plain_headers)
        body = draw(bodies)
        chunked = bool(body) and draw(_upto(9)) == 0
        return Payload(tuple(head), body, chunked, draw(_upto(9)) == 0)

    return st.builds(
        Batch,
        # unique: Hypothesis never "mutates" one element of a unique list into a copy of
        # another (after each example it tries five such mutants, mostly requests sent
        # already: with them, a third of the requests drawn were new).
        st.lists(lines(), min_size=side, max_size=side, unique=True),
        st.lists(payloads(), min_size=side, max_size=side, unique=True),
    )


# -- the run ---------------------------------------------------------------------------------


class LogTail:
    """The server's log, read on from where the last read stopped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def skip(self) -> None:
        self.offset = self.path.stat().st_size

    def read(self) -> str:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        return data.decode("utf-8", "replace")


def alarms(log: str) -> list[str]:
    return [line for line in log.splitlines() if any(a in line for a in LOG_ALARMS)]


_CHAINED = ("During handling of the above exception", "The above exception was the direct")


def exception_lines(log: str) -> list[str]:
    """The exception (its last line) of each traceback in ``log``; of a chain, the last."""
    out: list[str] = []
    lines = log.splitlines()
    chained = False
    for i, line in enumerate(lines):
        if line.startswith(_CHAINED):
            chained = True
        elif line.startswith("Traceback"):
            j = i + 1
            while j < len(lines) and (lines[j].startswith(" ") or not lines[j].strip()):
                j += 1
            if chained and out:
                out.pop()
            chained = False
            if j < len(lines):
                out.append(lines[j][:300])
    return out


def unexplained(log: str, outcomes: Sequence[Outcome]) -> list[str]:
    """Alarm lines of ``log`` that no 5xx answer accounts for: each 5xx explains one ERROR
    line (the one that shows its body, else any) and one traceback."""
    left = [line for line in alarms(log) if not line.startswith("Traceback")]
    errors = [o for o in outcomes if o.status >= 500]
    for out in errors:
        text = out.body[:100].decode("utf-8", "replace")
        shown = [line for line in left if text and text in line]
        if shown or left:
            left.remove((shown or left)[0])
    extra = len(exception_lines(log)) - len(errors)
    if extra > 0 and not left:
        left = exception_lines(log)[-extra:]
    return left


_FAILURE_TYPES: dict[str, type[AssertionError]] = {}


def failure_type(signature: str) -> type[AssertionError]:
    """One exception class per kind of failure, so that Hypothesis shrinks each on its own."""
    if signature not in _FAILURE_TYPES:
        name = "Fuzz_" + re.sub(r"\W+", "_", signature)[:80]
        _FAILURE_TYPES[signature] = type(name, (AssertionError,), {})
    return _FAILURE_TYPES[signature]


_FRAME = re.compile(r'  File "(?P<path>[^"]+)", line \d+, in (?P<func>\S+)')


def _site(log: str) -> str:
    """Where the last traceback of ``log`` (of a chain: the last exception) was raised: the
    innermost frame of the package (or of tests), then the innermost frame of all (with no
    line numbers: others edit the package)."""
    lines = log.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback")]
    start = starts[-1] if starts else None
    if start is None:
        return ""
    frames = []
    for line in lines[start + 1 :]:
        match = _FRAME.match(line)
        if match:
            path = match["path"]
            frames.append((path, f"{Path(path).name}:{match['func']}"))
        elif line and not line.startswith(" "):
            break
    frames = [f for f in frames if f[1].split(":")[1] != "<genexpr>"] or frames
    ours = [name for path, name in frames if path.startswith(str(ROOT)) and "/.venv/" not in path]
    where = [ours[-1]] if ours else []
    if frames and frames[-1][1] not in where:
        where.append(frames[-1][1])
    return " > ".join(where)


def _signature(out: Outcome, log: str) -> str:
    """A 5xx answer's kind: the exception (from the log, else the body) and its site."""
    traces = exception_lines(log)
    if traces:
        what = re.sub(r":.*", "", traces[-1]).strip()
    else:
        text = out.body[:200].decode("utf-8", "replace")
        what = text.split(":")[0].strip() if " in " in text.split(":")[0] else text[:60]
    site = _site(log)
    return f"{what} at {site}" if site else what


def _signature_of_log(lines: Sequence[str]) -> str:
    """The exception named by log lines: an asgineer ERROR line or a traceback's last line."""
    for pattern in (r".*\] (\w+ in [\w ]+?):", r"([\w.]+(Error|Exception|Warning))\b"):
        for line in lines:
            match = re.match(pattern, line)
            if match:
                return match.group(1)
    return lines[0][:60] if lines else "?"


def _simpler(req: Req) -> Iterator[Req]:
    """Requests one step simpler than ``req``."""
    for i, (name, _) in enumerate(req.headers):
        if name.lower() != b"host":
            yield replace(req, headers=req.headers[:i] + req.headers[i + 1 :])
    if req.body:
        yield replace(req, body=b"", chunked=False)
    if req.chunked:
        yield replace(req, chunked=False)
    if b"?" in req.target:
        yield replace(req, target=req.target.split(b"?")[0])
    if req.target.startswith(b"http://"):
        yield replace(req, target=b"/" + req.target.split(b"/", 3)[-1])
    if (req.version, req.eol) != (b"HTTP/1.1", CRLF):
        yield replace(req, version=b"HTTP/1.1", eol=CRLF)
    yield replace(req, method=b"GET")
    for target in (b"/health", b"/"):
        yield replace(req, target=target)
    for i, (name, value) in enumerate(req.headers):
        if len(value) > 1:  # the value halved
            shorter = (name, value[: len(value) // 2])
            yield replace(req, headers=(*req.headers[:i], shorter, *req.headers[i + 1 :]))


@dataclass
class Failure:
    signature: str
    request: Req
    outcome: Outcome
    log: list[str]
    count: int = 1
    minimal: Req | None = None


@dataclass
class Fuzzer:
    port: int
    log: LogTail
    pool: ThreadPoolExecutor
    connections: list[Connection]
    sent: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    failures: dict[str, Failure] = field(default_factory=dict)
    slowest: float = 0.0
    generated: int = 0  # distinct requests the survey sent
    digests: set[int] = field(default_factory=set)
    dispatcher: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1))
    pending: tuple[Sequence[Req], Future[list[Outcome]]] | None = None
    silent: list[tuple[Req, Outcome]] = field(default_factory=list)  # answers never came

    def run_batch(self, batch: Sequence[Req]) -> list[Outcome]:
        lanes = [batch[i :: len(self.connections)] for i in range(len(self.connections))]

        def lane(conn: Connection, reqs: Sequence[Req]) -> list[Outcome]:
            return [self._send(conn, r) for r in reqs]

        futures = [
            self.pool.submit(lane, c, reqs) for c, reqs in zip(self.connections, lanes, strict=True)
        ]
        per_lane = [f.result() for f in futures]
        outcomes: list[Outcome] = [Outcome(0)] * len(batch)
        for i, results in enumerate(per_lane):
            for j, out in enumerate(results):
                outcomes[i + j * len(self.connections)] = out
        self.sent += len(batch)
        for out in outcomes:
            self.statuses[str(out.status) if out.status else "no response"] += 1
        return outcomes

    def _send(self, conn: Connection, req: Req) -> Outcome:
        began = time.monotonic()
        out = conn.send(req)
        took = time.monotonic() - began
        self.slowest = max(self.slowest, took)
        if out.status == 0 and len(self.silent) < 3:
            self.silent.append((req, out))
        if TRACE:
            with open(TRACE, "a") as f:
                f.write(f"{took:.3f} {out.status} {out.body[:150]!r} {out.error} | {req!r:.600}\n")
        return out

    def failures_of(self, batch: Sequence[Req]) -> list[Failure]:
        """Send ``batch``; what went wrong, each failure with the request that caused it."""
        return self.judge(batch, self.run_batch(batch))

    def survey(self, batch: Sequence[Req]) -> None:
        """Send what ``batch`` has not sent before (up to REQUESTS in all), in the background
        while Hypothesis draws the next one; judge the previous one (sent alone, so the log
        is its own)."""
        novel: list[Req] = []
        for req in batch:
            digest = hash(req.raw())
            if digest not in self.digests and self.generated + len(novel) < REQUESTS:
                self.digests.add(digest)
                novel.append(req)
        if not novel:
            return
        self.generated += len(novel)
        self.drain()
        self.pending = (novel, self.dispatcher.submit(self.run_batch, novel))

    def drain(self) -> None:
        if self.pending is not None:
            batch, future = self.pending
            self.pending = None
            self.record(self.judge(batch, future.result()))

    def judge(self, batch: Sequence[Req], outcomes: Sequence[Outcome]) -> list[Failure]:
        log = self.log.read()
        found: list[Failure] = []
        traces = exception_lines(log)
        for req, out in zip(batch, outcomes, strict=True):
            if out.status >= 500:
                # Sent again alone, so that its traceback is the one read: the signature
                # names the exception and where it was raised (the package's frame).
                own = log if len(batch) == 1 else self._alone(req)
                found.append(Failure(f"{out.status} {_signature(out, own)}", req, out, []))
            elif out.status == 0 and "timeout" in out.error:
                found.append(Failure("no response: timeout", req, out, []))
            elif 400 <= out.status < 500:
                raw = req.raw()
                leaked = [s for s in LEAKS if s.encode() in out.body and s.encode() not in raw]
                if leaked:
                    found.append(Failure(f"{out.status} body shows {leaked[0]}", req, out, []))
            elif out.status == 200 and b"<script>alert(1)</script>" in out.body:
                found.append(Failure("200 page echoes a <script>", req, out, []))
        for failure in found:
            failure.log = [line for line in alarms(log) if "ERROR" in line][:1] + traces[:1]
        extra = unexplained(log, outcomes)
        if extra:
            found += self._attribute(batch, outcomes, extra)
        return found

    def _alone(self, req: Req) -> str:
        """The log of ``req`` sent again, alone."""
        self.run_batch([req])
        return self.log.read()

    def _attribute(
        self, batch: Sequence[Req], outcomes: Sequence[Outcome], lines: list[str]
    ) -> list[Failure]:
        """Log alarms no answer explains: resend the requests one by one to find the culprit."""
        signature = f"log: {_signature_of_log(lines)}"
        if len(batch) > 1:
            for req in batch:
                again = self.run_batch([req])[0]
                log = self.log.read()
                if unexplained(log, [again]):
                    return [Failure(signature, req, again, unexplained(log, [again])[:6])]
        return [Failure(signature, batch[0], outcomes[0], lines[:6])]

    def minimize(self, failure: Failure) -> Req:
        """A smaller request that fails the same way, by greedy steps (headers dropped one by
        one, the body, the query; the plainest method, version, framing): for the failures
        the Hypothesis run below may not meet again, which are the rare ones."""
        req = failure.request
        for _ in range(30):  # rounds: each keeps the first step that still fails
            for step in _simpler(req):
                if len(step.raw()) >= len(req.raw()):
                    continue  # smaller only: no going back and forth
                if any(f.signature == failure.signature for f in self.failures_of([step])):
                    req = step
                    break
            else:
                return req
        return req

    def record(self, found: Sequence[Failure]) -> None:
        for failure in found:
            if failure.signature in self.failures:
                self.failures[failure.signature].count += 1
            else:
                self.failures[failure.signature] = failure

    def raise_first(self, found: Sequence[Failure], batch: Sequence[Req]) -> None:
        if not found:
            return
        first = found[0]
        detail = [
            f"{first.signature} ({len(found)} failing request(s) in a batch of {len(batch)})",
            f"request: {first.request.reproducer(self.port)}",
            f"answer: {first.outcome.raw_head[:300]!r} {first.outcome.body[:300]!r}",
            *(f"log: {line}" for line in first.log),
        ]
        raise failure_type(first.signature)("\n".join(detail))

    def report(self, seconds: float) -> str:
        hist = ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items()))
        lines = [
            f"fuzz: {self.generated} distinct requests generated, {self.sent} sent (with the"
            f" replays that pin failures down) in {seconds:.1f}s; slowest answer"
            f" {self.slowest:.2f}s",
            f"statuses: {{{hist}}}",
        ]
        for req, out in self.silent:
            lines.append(f"  no answer ({out.error[:100]}): {req.reproducer(self.port)[:300]}")
        if self.failures:
            lines.append(f"{len(self.failures)} distinct failures (first request of each):")
        for f in self.failures.values():
            lines += [
                f"  FAILURE {f.signature}  (x{f.count})",
                f"    {f.request.reproducer(self.port)[:1500]}",
                *([f"    minimal: {f.minimal.reproducer(self.port)[:1500]}"] if f.minimal else []),
                f"    -> {f.outcome.raw_head.partition(CRLF)[0]!r} {f.outcome.body[:200]!r}"
                f" {f.outcome.error}",
                *(f"    log: {line[:300]}" for line in f.log[:4]),
            ]
        return "\n".join(lines)


@pytest.fixture
def server(server_factory: Callable[..., ManagedProcess]) -> ManagedProcess:
    # Creation quota raised: the fuzz creates more than 60 tasks a minute, and must still
    # create one at the end. The stream quota stays: a stream that leaked would show as 429s.
    return server_factory(
        "--grace",
        "1",
        STREAMING_CREATES_PER_MINUTE="1000000",
        STREAMING_POLICY=f"{__name__}.ShippedPoliciesThenAllow",
        # Guards that are off by default, on: CORS, the proxy's client address, the metrics
        # token (each then reads headers the fuzz sends).
        STREAMING_CORS_ALLOWED_ORIGINS="http://127.0.0.1,null",
        STREAMING_PROXY_HEADER="x-forwarded-for",
        STREAMING_METRICS_TOKEN="fuzz-metrics-token",
    )


class ShippedPoliciesThenAllow:
    """The server's policy here: the default one's code (signed tokens, then the session's
    Django user) runs on every request, with whatever cookie and token it carries; then
    everything is allowed anyway, so that every route is reached too."""

    def __init__(self) -> None:
        from streaming import policy

        self.shipped = policy.AnyOf(policy.SignedTokens(), policy.DjangoUsers())

    async def __call__(self, request: Any, action: Any, model: Any, key: Any) -> bool:
        await self.shipped(request, action, model, key)
        return True


@pytest.fixture
def connections(server: ManagedProcess) -> Iterator[list[Connection]]:
    assert server.port is not None
    conns = [Connection(server.port) for _ in range(CONNECTIONS)]
    yield conns
    for c in conns:
        c.close()


def _real_tasks(server: ManagedProcess) -> list[int]:
    """A few tasks to aim at: finished ones, a running one, a never-started one."""
    ids = []
    for _ in range(3):
        task = ScriptedTask.objects.create(ticks=2, result={"n": 1})
        read_stream(f"{server.url}/stream/tests/ScriptedTask/{task.pk}", headers=SSE)
        ids.append(task.pk)
    ids.append(ScriptedTask.objects.create(ticks=2000, delay=0.05).pk)  # runs during the fuzz
    ids.append(ScriptedTask.objects.create(ticks=1, fail_at=1).pk)
    ids.append(ExampleTask.objects.create(step_delay=0.0).pk)
    return ids


def _assert_streams_a_new_task(server: ManagedProcess, ticks: int = 7) -> None:
    resp = httpx.post(f"{server.url}/tasks/tests/ScriptedTask", json={"ticks": ticks}, timeout=10)
    assert resp.status_code == 201, resp.text
    _, events = read_stream(server.url + resp.json()["stream_url"], headers=SSE, timeout=30)
    assert [e.id for e in events] == list(range(1, ticks + 2))
    assert [e.event for e in events] == ["tick"] * ticks + ["end"]
    assert [e.data["i"] for e in events[:-1]] == list(range(1, ticks + 1))
    assert events[-1].data["status"] == "completed"


def canonical_batch(real: Sequence[int], port: int) -> Batch:
    """The inputs the fuzz must not leave to chance, each sent to creation as a client that
    means well would (JSON content type, no Origin), and to the other routes: Hypothesis's
    explicit example, sent first."""
    task = real[0]
    lines = [
        Line(b"POST", b"/tasks/tests/ScriptedTask", b"HTTP/1.1", CRLF),
        Line(b"POST", b"/tasks/tests/ExampleTask", b"HTTP/1.1", CRLF),
        Line(b"POST", f"/tasks/tests/ScriptedTask/{real[3]}/cancel".encode(), b"HTTP/1.1", CRLF),
        Line(b"GET", f"/stream/tests/ScriptedTask/{task}".encode(), b"HTTP/1.1", CRLF),
        Line(b"GET", f"/watch/tests/ScriptedTask/{task}?types=a,b".encode(), b"HTTP/1.1", CRLF),
    ]
    bodies = [
        b"",
        b"[" * 200_000 + b"]" * 200_000,
        b'{"result": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
        b'{"ticks": 1, "result": "' + b"x" * (MiB + 10) + b'"}',
        b'{"ticks": 1, "result": "\\u0000"}',
        b'{"ticks": 1, "result": "\\ud800"}',
        b'{"message": "\\ud800", "total_steps": 1}',
        b'{"ticks": 1, "\\u0000": 1}',
        b'{"ticks": NaN}',
        b'{"ticks": Infinity}',
        b'{"ticks": 1e999}',
        b'{"delay": 1' + b"0" * 400 + b"}",
        b'{"ticks": 1, "ticks": 2}',
        b'{"ticks": "\\u0661"}',
        b'{"result": ' + b"9" * 5000 + b"}",
        b"not json",
        b'{"ticks": "\xff"}',
    ]
    host = ((b"Host", f"127.0.0.1:{port}".encode()),)
    json_type = ((b"Content-Type", b"application/json"),)
    payloads = [Payload(host + json_type, body, False, True) for body in bodies]
    payloads.append(Payload(host + json_type, b'{"ticks": 2}', True, True))  # chunked
    return Batch(lines, payloads)


def _run(
    test: Callable[[list[Req]], None],
    batches: st.SearchStrategy[Batch],
    examples: int,
    shrink: bool,
    first: Batch | None = None,
) -> None:
    phases = [Phase.generate, Phase.shrink] if shrink else [Phase.generate]
    if first is not None:
        phases.insert(0, Phase.explicit)

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,  # the same requests on every run: failures reproduce in CI
        database=None,
        phases=phases,
        print_blob=False,
        report_multiple_bugs=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(batch=batches)
    def fuzz(batch: Batch) -> None:
        test(batch.requests())

    if first is not None:
        fuzz = example(batch=first)(fuzz)
    fuzz()


def test_fuzz_the_http_api(server: ManagedProcess, connections: list[Connection]) -> None:
    """Every answer below 500, no traceback logged, no internals shown; then still streaming.

    First a survey: REQUESTS distinct requests, each failure recorded with the request that
    caused it. Then, if anything failed, Hypothesis runs again on small batches, to shrink
    each kind of failure to a minimal request (its "Falsifying example"), and the test fails
    with those; the survey's report is printed above them.
    """
    assert server.port is not None
    real = _real_tasks(server)
    log = LogTail(server.log_path)
    log.skip()
    started = time.monotonic()
    shrunk: BaseException | None = None
    with ThreadPoolExecutor(len(connections)) as pool:
        fuzzer = Fuzzer(server.port, log, pool, connections)
        try:
            examples = math.ceil(REQUESTS / (SIDE * SIDE * DISTINCT))
            strategy, first = (
                request_strategy(real, server.port),
                canonical_batch(real, server.port),
            )
            _run(fuzzer.survey, strategy, examples, shrink=False, first=first)
            fuzzer.drain()
            for failure in fuzzer.failures.values():
                failure.minimal = fuzzer.minimize(failure)
        finally:
            fuzzer.dispatcher.shutdown()
            print("\n" + fuzzer.report(time.monotonic() - started))
        if fuzzer.failures and SHRINK:
            shrinker = Fuzzer(server.port, log, pool, connections)
            shrinker.dispatcher.shutdown()  # unused: each batch is judged as it is sent

            def shrinking(batch: list[Req]) -> None:
                shrinker.raise_first(shrinker.failures_of(batch), batch)

            try:
                _run(shrinking, request_strategy(real, server.port, side=2), 500, shrink=True)
            except BaseException as exc:  # the minimal examples: raised below
                shrunk = exc
            took = time.monotonic() - started
            print(f"shrinking: {shrinker.sent} more requests; {took:.1f}s in all")
    assert server.proc.poll() is None, "the server died:\n" + server.log()[-5000:]
    _assert_streams_a_new_task(server)
    if shrunk is not None:
        raise shrunk
    assert not fuzzer.failures, fuzzer.report(time.monotonic() - started)
    assert fuzzer.generated >= REQUESTS, f"only {fuzzer.generated} distinct requests"
    assert not alarms(server.log()), "\n".join(alarms(server.log())[:20])


# -- not a task: the same 404 as an unknown task ---------------------------------------------


def _comparable(out: Outcome) -> tuple[int, list[tuple[str, str]], bytes]:
    return out.status, [(k, v) for k, v in out.headers if k != "date"], out.body


def test_every_model_that_is_not_a_task_is_the_same_404_as_an_unknown_id(
    server: ManagedProcess, connections: list[Connection]
) -> None:
    from django.apps import apps

    from streaming.models import StreamTask

    conn = connections[0]
    host = ((b"Host", f"127.0.0.1:{server.port}".encode()),)

    def get(path: str, method: bytes = b"GET") -> Outcome:
        target = quote_from_bytes(path.encode(), safe="/").encode()
        if method == b"POST":  # a well-formed one, past the guards that need no model
            json = ((b"Content-Type", b"application/json"),)
            return conn.send(Req(method, target, host + json, b"{}"))
        return conn.send(Req(method, target, host))

    unknown = {
        "stream": get("/stream/tests/ScriptedTask/999999999"),
        "tasks": get("/tasks/tests/ScriptedTask/999999999"),
        "watch": get("/watch/tests/ScriptedTask/999999999"),
        "cancel": get("/tasks/tests/ScriptedTask/999999999/cancel", b"POST"),
        "create, no such model": get("/tasks/tests/NoSuchTask", b"POST"),
        "create, not allowed": get("/tasks/tests/TimeoutTask", b"POST"),
    }
    reference = _comparable(unknown["stream"])
    assert reference[0] == 404, unknown["stream"]
    for route, out in unknown.items():
        assert _comparable(out) == reference, route

    def is_task(model: type) -> bool:
        meta = model._meta  # type: ignore[attr-defined]
        # Proxies of task models are tasks too (they run their own process()).
        return issubclass(model, StreamTask) and not meta.abstract and not meta.swapped

    checked = []
    for model in apps.get_models(include_auto_created=True):
        if is_task(model):
            continue
        app, name = model._meta.app_label, model.__name__
        paths = [
            (f"/stream/{app}/{name}/1", b"GET"),
            (f"/stream/{app}/{name.lower()}/1", b"GET"),
            (f"/stream/{name}/1", b"GET"),
            (f"/tasks/{app}/{name}/1", b"GET"),
            (f"/watch/{app}/{name}/1", b"GET"),
            (f"/watch/{name}/1", b"GET"),
            (f"/tasks/{app}/{name}/1/cancel", b"POST"),
            (f"/tasks/{app}/{name}", b"POST"),
        ]
        for path, method in paths:
            got = _comparable(get(path, method))
            assert got == reference, f"{method.decode()} {path}: {got} != {reference}"
            checked.append(path)
    assert len(checked) >= 8 * 10, checked  # auth, contenttypes, sessions, admin, streaming...
    print(f"\n{len(checked)} non-task model URLs: all the unknown-id 404, byte for byte")
