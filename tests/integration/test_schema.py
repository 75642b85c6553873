"""Every DDL file is applied by exactly one migration, and the schema does what it says."""

from __future__ import annotations

import re
from pathlib import Path

import psycopg
import pytest

from streaming import schema
from tests.support import sql

pytestmark = pytest.mark.django_db(transaction=True)
MIGRATIONS = Path(schema.__file__).parent / "migrations"


def test_each_ddl_file_is_wrapped_by_exactly_one_migration() -> None:
    uses: dict[str, int] = {}
    for path in MIGRATIONS.glob("[0-9]*.py"):
        for name in re.findall(r'schema\.read\("([^"]+)"\)', path.read_text()):
            uses[name] = uses.get(name, 0) + 1
    assert uses == {name: 1 for name in schema.files()}


def test_each_ddl_file_was_applied_once() -> None:
    applied = [r[0] for r in sql("SELECT name FROM streaming_schema_file ORDER BY name")]
    assert applied == schema.files()


def test_applying_a_file_twice_fails_instead_of_duplicating() -> None:
    with pytest.raises(psycopg.errors.DuplicateTable):
        sql(schema.read("0001_initial.sql"))
    assert sql("SELECT count(*) FROM streaming_schema_file WHERE name = '0001_initial.sql'") == [
        (1,)
    ]


def test_seq_is_unique_per_task_in_the_database() -> None:
    sql(
        "INSERT INTO streaming_taskevent (app_label, model_name, task_id, seq, attempt, "
        "event_type, data) VALUES ('a', 'M', 1, 1, 1, 'x', '{}')"
    )
    with pytest.raises(psycopg.errors.UniqueViolation):
        sql(
            "INSERT INTO streaming_taskevent (app_label, model_name, task_id, seq, attempt, "
            "event_type, data) VALUES ('a', 'M', 1, 1, 1, 'y', '{}')"
        )
    with pytest.raises(psycopg.errors.CheckViolation):
        sql(
            "INSERT INTO streaming_taskevent (app_label, model_name, task_id, seq, attempt, "
            "event_type, data) VALUES ('a', 'M', 1, 2, 1, 'bad type', '{}')"
        )


def test_the_system_check_refuses_a_database_that_is_not_postgres(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from django.conf import settings
    from django.core import checks as django_checks

    from streaming import checks

    assert checks.postgres_engine() == []
    assert checks.postgres_version(databases=["default"]) == []  # the test server is 14+
    monkeypatch.setitem(settings.DATABASES["default"], "ENGINE", "django.db.backends.sqlite3")
    errors = checks.postgres_engine()
    assert [e.id for e in errors] == ["streaming.E001"] and "PostgreSQL 14" in errors[0].msg
    assert "streaming.E001" in [e.id for e in django_checks.run_checks()]
