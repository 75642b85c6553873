#!/usr/bin/env python
"""Django's command-line utility, with an embedded Postgres when DATABASE_URL is unset."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    if not os.environ.get("DATABASE_URL") and _needs_database(sys.argv[1:2]):
        from streaming.embedded import EmbeddedPostgresError, ensure_shared_server

        try:  # this process is a user of the shared server until it exits
            os.environ["DATABASE_URL"] = ensure_shared_server(ROOT / ".pgdata")
        except EmbeddedPostgresError as exc:  # no binaries, say: the message says what to do
            sys.exit(f"manage.py: could not start the embedded Postgres: {exc}")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


def _needs_database(command: list[str]) -> bool:
    return bool(command) and command[0] not in (
        "help",
        "--help",
        "-h",
        "version",
        "--version",
        "check",
        "startapp",
        "startproject",
    )


if __name__ == "__main__":
    main()
