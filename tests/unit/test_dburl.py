"""Unit tests of streaming.dburl: DATABASES entries from postgres:// URLs, no database."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured

from streaming.dburl import database

SECRET = "s3cr%2Ft"  # "s3cr/t", percent-encoded


def test_a_url_gives_a_postgresql_entry() -> None:
    entry = database(f"postgres://alice:{SECRET}@db.example:6543/shop")
    assert entry["ENGINE"] == "django.db.backends.postgresql"
    assert (entry["NAME"], entry["USER"], entry["PASSWORD"]) == ("shop", "alice", "s3cr/t")
    assert (entry["HOST"], entry["PORT"]) == ("db.example", 6543)
    assert entry["CONN_MAX_AGE"] == 0


def test_the_postgresql_scheme_and_no_port_or_database_name() -> None:
    entry = database("postgresql://bob@localhost")
    assert entry["ENGINE"] == "django.db.backends.postgresql"
    assert (entry["HOST"], entry["PORT"], entry["NAME"]) == ("localhost", "", "postgres")
    assert entry["PASSWORD"] == ""


def test_query_parameters_become_options() -> None:
    entry = database("postgres://u@h/d?sslmode=require&connect_timeout=5")
    assert entry["OPTIONS"] == {"sslmode": "require", "connect_timeout": 5}


def test_conn_max_age_and_extra_keys_are_added() -> None:
    entry = database(
        "postgres://u@h/d?sslmode=require",
        conn_max_age=60,
        TEST={"NAME": "test_d"},
        OPTIONS={"application_name": "app"},
    )
    assert entry["CONN_MAX_AGE"] == 60
    assert entry["TEST"] == {"NAME": "test_d"}
    assert entry["OPTIONS"] == {"application_name": "app"}  # extra replaces what the URL gave


def test_the_default_is_the_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgres://u@envhost/envdb")
    assert database()["HOST"] == "envhost"
    monkeypatch.setenv("OTHER_DB", "postgresql://u@otherhost/otherdb")
    assert database(env="OTHER_DB")["NAME"] == "otherdb"


@pytest.mark.parametrize("value", [None, ""])
def test_an_unset_variable_is_named(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("MY_DATABASE_URL", raising=False)
    else:
        monkeypatch.setenv("MY_DATABASE_URL", value)
    with pytest.raises(ImproperlyConfigured, match="MY_DATABASE_URL is not set"):
        database(env="MY_DATABASE_URL")


def test_a_given_url_wins_over_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert database("postgres://u@given/d")["HOST"] == "given"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"mysql://alice:{SECRET}@h/d", "mysql://"),
        (f"alice:{SECRET}@h/d", "no scheme"),
        (f"alice:{SECRET}@h/x://y", "no scheme"),
        ("", "no scheme"),
    ],
)
def test_a_non_postgres_url_is_refused_without_showing_it(url: str, shown: str) -> None:
    with pytest.raises(ImproperlyConfigured) as info:
        database(url)
    message = str(info.value)
    assert "postgres://" in message
    assert shown in message
    assert SECRET not in message and "s3cr" not in message and "alice" not in message


def test_a_non_postgres_variable_is_named_without_its_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"sqlite://alice:{SECRET}@h/d")
    with pytest.raises(ImproperlyConfigured, match="DATABASE_URL") as info:
        database()
    assert "s3cr" not in str(info.value)


def test_a_malformed_url_is_refused_without_showing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgres://alice:s3cr3t@h:notaport/d")
    with pytest.raises(ImproperlyConfigured, match="DATABASE_URL") as info:
        database()
    assert "s3cr3t" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_the_example_settings_use_it() -> None:
    from django.conf import settings

    entry = settings.DATABASES["default"]
    assert entry["ENGINE"] == "django.db.backends.postgresql"
    assert "TEST" in entry and "NAME" in entry["TEST"]
