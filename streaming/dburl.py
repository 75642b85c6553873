"""A Django ``DATABASES`` entry from a ``postgres://`` URL, for a project's settings.py.

::

    from streaming.dburl import database

    DATABASES = {"default": database()}  # from $DATABASE_URL

The only module that imports ``dj_database_url``: it parses the URL (percent-decoding, query
parameters as ``OPTIONS``, e.g. ``?sslmode=require``). Errors never show the URL itself, which
may carry a password.
"""

from __future__ import annotations

import os
from typing import Any

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

SCHEMES = ("postgres", "postgresql")


def database(
    url: str | None = None,
    *,
    env: str = "DATABASE_URL",
    conn_max_age: int = 0,
    **extra: Any,
) -> dict[str, Any]:
    """The ``DATABASES`` entry for ``url`` (default: the ``env`` environment variable).

    ``url`` is ``postgres://user:password@host:port/dbname`` or ``postgresql://…``; without a
    database name, ``postgres``. ``extra`` keys (``TEST``, ``OPTIONS``, ``ATOMIC_REQUESTS``…)
    are added to the entry, replacing what the URL gave. Raises ``ImproperlyConfigured`` when
    no URL is given and the variable is unset or empty, or when the URL is not a Postgres one.
    """
    source = "the database URL" if url is not None else f"the {env} environment variable"
    if url is None:
        url = os.environ.get(env, "")
        if not url:
            raise ImproperlyConfigured(
                f"{env} is not set: set it to postgres://user:password@host:port/dbname"
            )
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in SCHEMES:
        # Only a scheme that is followed by :// is shown: "user:password@host" has none.
        shown = f"{scheme}://" if scheme.isalnum() else "no scheme"
        raise ImproperlyConfigured(
            f"{source} must start with postgres:// or postgresql:// (it has {shown})"
        )
    try:
        entry: dict[str, Any] = dict(dj_database_url.parse(url, conn_max_age=conn_max_age))
    except ValueError:  # dj_database_url.ParseError, whose message holds no part of the URL
        raise ImproperlyConfigured(
            f"{source} is not a valid URL (are its user name and password percent-encoded?)"
        ) from None
    entry["NAME"] = entry.get("NAME") or "postgres"
    entry.update(extra)
    return entry
