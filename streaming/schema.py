"""The DDL files in migrations_sql/: where they are and what each contains."""

from __future__ import annotations

import re
from pathlib import Path

# streaming/ddl is a symlink to the repository's migrations_sql/, so that the DDL files
# ship inside the package (wheels, non-editable installs) and are found from either.
SQL_DIR = Path(__file__).parent / "ddl"
_NAME = re.compile(r"\d{4}_[a-z0-9_]+\.sql")


def files() -> list[str]:
    """The DDL file names in order (``NNNN_name.sql``)."""
    return sorted(p.name for p in SQL_DIR.iterdir() if _NAME.fullmatch(p.name))


def read(name: str) -> str:
    """The text of one DDL file; FileNotFoundError names the directory searched."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"not a DDL file name: {name!r}")
    path = SQL_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"{name} not found in {SQL_DIR}")
    return path.read_text()


def function(name: str, function: str) -> str:
    """The ``CREATE FUNCTION`` statement of ``function`` in the DDL file ``name``, as written.

    Migrations that replace a function use it to put the earlier version back on reverse.
    """
    text = read(name)
    match = re.search(
        rf"^CREATE FUNCTION {re.escape(function)}\(.*?^END \$\$;$", text, re.MULTILINE | re.DOTALL
    )
    if match is None:
        raise LookupError(f"{name} defines no function {function}")
    return match.group(0)
