"""Named SQL statements, loaded once from the ``.sql`` files beside this package."""

from __future__ import annotations

import functools
import re
from importlib import resources

_BLOCK = re.compile(r"^-- (\w+) --$", re.MULTILINE)


def parse(text: str) -> dict[str, str]:
    """Split a file of ``-- name --`` blocks into {name: statement}."""
    parts = _BLOCK.split(text)
    out: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = [ln for ln in body.strip().splitlines() if not ln.lstrip().startswith("--")]
        statement = "\n".join(lines).strip().rstrip(";")
        if name in out:
            raise ValueError(f"query {name!r} defined twice")
        out[name] = statement
    return out


@functools.cache
def all_queries() -> dict[str, str]:
    text = resources.files("streaming").joinpath("sql/queries.sql").read_text()
    return parse(text)


def get(name: str) -> str:
    """The statement called ``name``; KeyError names it when it does not exist."""
    try:
        return all_queries()[name]
    except KeyError:
        raise KeyError(f"no SQL query named {name!r}") from None
