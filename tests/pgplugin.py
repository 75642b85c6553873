"""pytest plugin: the test session's Postgres, provided before Django reads its settings.

``DATABASE_URL`` set: that server is used as is. Unset: a throwaway embedded server is started
(or, with ``TEST_PG=docker``, a testcontainers Postgres) and ``DATABASE_URL`` points at it, for
this process and the ``manage.py`` processes the tests start. Loaded with ``-p tests.pgplugin``.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Generator
from typing import Any
from urllib.parse import urlsplit

import pytest

from streaming.embedded import EmbeddedPostgresError, EphemeralServer, start_ephemeral_server

DOCKER_PING_TIMEOUT = 1.5
DOCKER_IMAGE = "postgres:18"
_INFORMATIONAL = {"-h", "--help", "--version", "-V"}

_server_key = pytest.StashKey[EphemeralServer]()
_container_key = pytest.StashKey[Any]()
_owned_env_key = pytest.StashKey[list[str]]()


@pytest.hookimpl(wrapper=True)
def pytest_load_initial_conftests(
    early_config: pytest.Config, parser: pytest.Parser, args: list[str]
) -> Generator[None, None, None]:
    # A wrapper runs before every plain implementation, pytest-django's tryfirst one included,
    # which imports the settings and so reads DATABASE_URL.
    if not os.environ.get("DATABASE_URL") and not _INFORMATIONAL.intersection(args):
        _provide_database(early_config)
    try:
        return (yield)
    except BaseException:
        _release_database(early_config)  # pytest_unconfigure will not run
        raise


def pytest_unconfigure(config: pytest.Config) -> None:
    _release_database(config)


@pytest.fixture(scope="session")
def pg_server(pytestconfig: pytest.Config) -> EphemeralServer:
    """The session's embedded server, for tests that stop or restart Postgres.

    Skips when the database is external (DATABASE_URL or TEST_PG=docker). A test that stops it
    should ``start()`` it again in a ``finally`` (a no-op when it runs)."""
    server = pytestconfig.stash.get(_server_key, None)
    if server is None:
        pytest.skip("needs the embedded server (the database is external)")
    return server


def _provide_database(config: pytest.Config) -> None:
    mode = os.environ.get("TEST_PG", "").strip().lower() or "embedded"
    if mode == "embedded":
        server = _start_embedded()
        config.stash[_server_key] = server
        env = {"DATABASE_URL": server.url, "STREAMING_TEST_PG_PORT": str(server.port)}
    elif mode == "docker":
        container, url = _start_container()
        config.stash[_container_key] = container
        env = {"DATABASE_URL": url}
    else:
        raise pytest.UsageError(f"TEST_PG={mode!r}: expected 'embedded' or 'docker'")
    os.environ.update(env)
    config.stash[_owned_env_key] = list(env)


def _start_embedded() -> EphemeralServer:
    try:
        return start_ephemeral_server()
    except EmbeddedPostgresError as exc:
        raise pytest.UsageError(
            f"could not start the embedded Postgres: {exc}\n"
            "Set DATABASE_URL to an existing server, or TEST_PG=docker."
        ) from exc


def _start_container() -> tuple[Any, str]:
    if not docker_answers():
        raise pytest.UsageError(
            f"TEST_PG=docker, but no Docker daemon answered within {DOCKER_PING_TIMEOUT} s "
            f"at {_docker_host()}; start Docker, or unset TEST_PG to use the embedded Postgres"
        )
    try:
        from testcontainers.postgres import PostgresContainer
    except ImportError as exc:
        raise pytest.UsageError(
            "TEST_PG=docker needs testcontainers: pip install 'testcontainers[postgres]'"
        ) from exc
    image = os.environ.get("TEST_PG_IMAGE", DOCKER_IMAGE)
    container = PostgresContainer(image, driver=None).with_command(
        "postgres -c max_connections=300 -c fsync=off -c full_page_writes=off"
    )
    container.start()
    return container, container.get_connection_url()


def _release_database(config: pytest.Config) -> None:
    """Stop what _provide_database started and undo its environment; safe to call twice."""
    server = config.stash.get(_server_key, None)
    if server is not None:
        server.close()
        del config.stash[_server_key]
    container = config.stash.get(_container_key, None)
    if container is not None:
        container.stop()
        del config.stash[_container_key]
    for name in config.stash.get(_owned_env_key, []):
        os.environ.pop(name, None)
    config.stash[_owned_env_key] = []


def _docker_host() -> str:
    return os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


def docker_answers(host: str | None = None, timeout: float = DOCKER_PING_TIMEOUT) -> bool:
    """Whether a Docker daemon answers ``GET /_ping`` at ``host`` within ``timeout`` seconds."""
    parts = urlsplit(host or _docker_host())
    address: str | tuple[str, int]
    if parts.scheme == "unix":
        family, address = socket.AF_UNIX, parts.path
    elif parts.scheme == "tcp" and parts.hostname:
        family, address = socket.AF_INET, (parts.hostname, parts.port or 2375)
    else:
        return False
    deadline = time.monotonic() + timeout
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(address)
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            status_line = sock.recv(256).split(b"\r\n", 1)[0]
    except OSError:
        return False
    return status_line.startswith(b"HTTP/") and b" 200 " in status_line + b" "
