"""System checks: streaming needs PostgreSQL 14 or newer (``manage.py check``, ``migrate``…)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.core.checks import Error, Tags, register
from django.db import connections

MIN_VERSION = 140000  # server_version_num


@register()
def postgres_engine(app_configs: Any = None, **kwargs: Any) -> list[Error]:
    """The default database must be PostgreSQL: the log and run tables are plpgsql and jsonb."""
    engine = str(settings.DATABASES.get("default", {}).get("ENGINE", ""))
    if engine.startswith("django.db.backends.postgresql"):
        return []
    return [
        Error(
            "streaming requires PostgreSQL 14 or newer as the default database.",
            hint=f"DATABASES['default']['ENGINE'] is {engine!r}. Use your Postgres: "
            '{"default": streaming.dburl.database()} with DATABASE_URL=postgres://..., or in '
            'development {"default": streaming.embedded.database(BASE_DIR / ".pgdata")} '
            "(pip install 'django-streaming-tasks[embedded]').",
            id="streaming.E001",
        )
    ]


@register(Tags.database)
def postgres_version(databases: Iterable[str] | None = None, **kwargs: Any) -> list[Error]:
    """With database checks (``migrate``, ``check --database default``): the server's version."""
    if not databases or "default" not in databases or postgres_engine():
        return []
    version = connections["default"].pg_version  # type: ignore[attr-defined]
    if version >= MIN_VERSION:
        return []
    return [
        Error(
            f"streaming requires PostgreSQL 14 or newer; the server is {version // 10000}.",
            id="streaming.E002",
        )
    ]
