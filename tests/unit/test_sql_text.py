"""The SQL files: named queries load, DDL files are well-formed and numbered."""

from __future__ import annotations

import re

import pytest

from streaming import queries, schema


def test_parse_splits_named_blocks_and_drops_comments() -> None:
    parsed = queries.parse("-- one --\n-- a comment\nSELECT 1;\n\n-- two --\nSELECT 2\n")
    assert parsed == {"one": "SELECT 1", "two": "SELECT 2"}


def test_duplicate_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="twice"):
        queries.parse("-- a --\nSELECT 1\n-- a --\nSELECT 2\n")


def test_every_named_query_uses_placeholders_only() -> None:
    for name, text in queries.all_queries().items():
        assert text, name
        assert "{" not in text and "%s" not in text.replace("%(", ""), name


def test_unknown_query_names_raise_a_clear_key_error() -> None:
    with pytest.raises(KeyError, match="no SQL query named 'nope'"):
        queries.get("nope")


def test_ddl_files_are_numbered_without_gaps_and_record_themselves() -> None:
    names = schema.files()
    assert names and names[0] == "0001_initial.sql"
    numbers = [int(n[:4]) for n in names]
    assert numbers == list(range(1, len(names) + 1))
    for name in names:
        text = schema.read(name)
        assert re.search(rf"INSERT INTO streaming_schema_file \(name\) VALUES \('{name}'\)", text)


def test_schema_read_rejects_other_names() -> None:
    with pytest.raises(ValueError):
        schema.read("../etc/passwd")
