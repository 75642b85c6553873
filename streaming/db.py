"""Postgres access: the only module that touches psycopg (pool, listener, sync reads)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import psycopg.sql
from psycopg.conninfo import make_conninfo
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from streaming import queries
from streaming.exceptions import DatabaseError, DatabaseUnavailable, DataRefused

logger = logging.getLogger(__name__)

Params = Mapping[str, Any]
LISTENER_APP_NAME = "streaming-listener"  # + ":<pid>" in pg_stat_activity.application_name
Row = tuple[Any, ...]


def conninfo_from_django(alias: str = "default") -> str:
    """A libpq connection string for one of Django's DATABASES entries."""
    from django.conf import settings

    cfg: dict[str, Any] = settings.DATABASES[alias]
    parts = {
        "dbname": cfg.get("NAME") or "postgres",
        "user": cfg.get("USER") or None,
        "password": cfg.get("PASSWORD") or None,
        "host": cfg.get("HOST") or None,
        "port": str(cfg["PORT"]) if cfg.get("PORT") else None,
    }
    options = {k: v for k, v in (cfg.get("OPTIONS") or {}).items() if isinstance(v, str | int)}
    return make_conninfo("", **{k: v for k, v in parts.items() if v is not None}, **options)


@asynccontextmanager
async def translated_errors() -> AsyncIterator[None]:
    """psycopg's errors as the package's: DatabaseUnavailable, DataRefused, DatabaseError."""
    try:
        yield
    except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
        raise DatabaseUnavailable(str(exc)) from exc
    except PoolTimeout as exc:
        raise DatabaseUnavailable("no database connection available") from exc
    except psycopg.DataError as exc:
        raise DataRefused(_first_line(exc)) from exc
    except psycopg.Error as exc:
        raise DatabaseError(_first_line(exc)) from exc


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


async def retrying(op: Callable[[], Awaitable[Any]], deadline: float) -> Any:
    """Run ``op()`` again while the database is unavailable, for up to ``deadline`` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    delay = 0.1
    while True:
        try:
            return await op()
        except DatabaseUnavailable:
            if loop.time() + delay > end:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


class Database:
    """A small async pool bound to one event loop; every statement is named."""

    def __init__(
        self, conninfo: str, min_size: int = 1, max_size: int = 4, wait: float = 10.0
    ) -> None:
        """``wait``: seconds a statement waits for a pooled connection before failing with
        DatabaseUnavailable (callers that must wait longer retry)."""
        self.conninfo = conninfo
        self.queries_run = 0
        self._pool = AsyncConnectionPool(
            conninfo,
            min_size=min_size,
            max_size=max_size,
            open=False,
            kwargs={"autocommit": True},
            check=AsyncConnectionPool.check_connection,
            reconnect_timeout=0,
            timeout=wait,
            name="streaming",
        )

    async def open(self) -> None:
        await self._pool.open(wait=False)

    async def close(self) -> None:
        await self._pool.close(timeout=2)

    async def fetchall(self, name: str, params: Params | None = None) -> list[Row]:
        async with translated_errors(), self._pool.connection() as conn:
            cur = await conn.execute(queries.get(name), params)
            self.queries_run += 1
            return await cur.fetchall()

    async def fetchone(self, name: str, params: Params | None = None) -> Row | None:
        rows = await self.fetchall(name, params)
        return rows[0] if rows else None

    async def execute(self, name: str, params: Params | None = None) -> None:
        async with translated_errors(), self._pool.connection() as conn:
            await conn.execute(queries.get(name), params)
            self.queries_run += 1

    async def delete_task(self, run_id: int, ident: Params, db_table: str, pk_column: str) -> None:
        """Delete a task's events, run and own row in one transaction."""
        row_delete = psycopg.sql.SQL("DELETE FROM {} WHERE {} = %(task_id)s").format(
            psycopg.sql.Identifier(db_table), psycopg.sql.Identifier(pk_column)
        )
        async with translated_errors(), self._pool.connection() as conn, conn.transaction():
            await conn.execute(queries.get("delete_events"), ident)
            await conn.execute(queries.get("delete_run"), {"run_id": run_id})
            await conn.execute(row_delete, ident)


class Listener:
    """One dedicated LISTEN connection; yields notification payloads."""

    def __init__(self, conninfo: str, channel: str) -> None:
        self.conninfo = conninfo
        self.channel = channel
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def connect(self, timeout: float = 5.0) -> None:
        async with translated_errors():
            # application_name lets operators (and the fault tests) find this process's
            # LISTEN connection in pg_stat_activity, e.g. to pg_terminate_backend it.
            connecting = asyncio.ensure_future(
                psycopg.AsyncConnection.connect(
                    self.conninfo,
                    autocommit=True,
                    connect_timeout=max(1, int(timeout)),
                    application_name=f"{LISTENER_APP_NAME}:{os.getpid()}",
                )
            )
            try:
                self._conn = conn = await asyncio.shield(connecting)
            except asyncio.CancelledError:
                # Closed while connecting (a short-lived loop): finish the connect and close
                # it, or the server keeps the session until this object is collected.
                await _close_when_connected(connecting)
                raise
            listen = psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(self.channel))
            await conn.execute(listen)

    async def payloads(self, timeout: float) -> AsyncIterator[str]:
        """Notifications until ``timeout`` seconds pass; raises DatabaseUnavailable on loss."""
        assert self._conn is not None
        async with translated_errors():
            async for note in self._conn.notifies(timeout=timeout):
                yield note.payload

    async def ping(self, timeout: float) -> None:
        """Round-trip on the LISTEN connection; raises DatabaseUnavailable when it is gone."""
        assert self._conn is not None
        try:
            async with translated_errors():
                await asyncio.wait_for(self._conn.execute(b"SELECT 1"), timeout)
        except TimeoutError as exc:
            raise DatabaseUnavailable("LISTEN connection did not answer") from exc

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), 2)
            except (TimeoutError, psycopg.Error):
                logger.debug("closing a broken LISTEN connection failed", exc_info=True)


async def _close_when_connected(connecting: asyncio.Future[psycopg.AsyncConnection[Any]]) -> None:
    try:
        conn = await asyncio.wait_for(connecting, 5)
    except BaseException:  # it failed, or took too long: nothing of ours is left open
        return
    with contextlib.suppress(psycopg.Error):
        await conn.close()


class SyncReader:
    """A per-thread sync connection for the sync API called on an event loop's thread
    (``is_task_running``), where Django's own connection may not be used."""

    def __init__(self, conninfo: str) -> None:
        self.conninfo = conninfo
        self._local = threading.local()
        self._lock = threading.Lock()
        self._opened: list[psycopg.Connection[Any]] = []  # every thread's, for close()

    def fetchone(self, name: str, params: Params | None = None) -> Row | None:
        for attempt in (1, 2):
            conn = self._connection()
            try:
                return conn.execute(queries.get(name), params).fetchone()
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                self._local.conn = None
                if attempt == 2:
                    raise DatabaseUnavailable(str(exc)) from exc
        return None

    def _connection(self) -> psycopg.Connection[Any]:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            try:
                conn = psycopg.connect(self.conninfo, autocommit=True)
            except psycopg.OperationalError as exc:
                raise DatabaseUnavailable(str(exc)) from exc
            self._local.conn = conn
            with self._lock:
                self._opened = [c for c in self._opened if not c.closed]
                self._opened.append(conn)
        return conn

    def close(self) -> None:
        """Close the connections of every thread (each thread opens another when it next
        reads)."""
        with self._lock:
            opened, self._opened = self._opened, []
        for conn in opened:
            conn.close()
