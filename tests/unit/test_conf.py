"""The STREAMING settings: typed defaults, validation, environment overrides."""

from __future__ import annotations

import pytest

from streaming import conf


def test_defaults() -> None:
    s = conf.build({})
    assert s.LEASE_TTL == 30.0 and s.HEARTBEAT_INTERVAL == 5.0 and s.MAX_ATTEMPTS == 3
    assert s.KEEPALIVE_INTERVAL == 15.0


def test_unknown_keys_are_rejected_by_name() -> None:
    with pytest.raises(ValueError, match="LEASE_TLL"):
        conf.build({"LEASE_TLL": 3})


@pytest.mark.parametrize(
    "bad", [{"LEASE_TTL": 0}, {"HEARTBEAT_INTERVAL": 40}, {"MAX_ATTEMPTS": 0}, {"POOL_MAX_SIZE": 0}]
)
def test_invalid_values_are_rejected(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        conf.build(bad)


def test_environment_overrides_are_typed() -> None:
    env = {
        "STREAMING_LEASE_TTL": "12.5",
        "STREAMING_MAX_ATTEMPTS": "5",
        "STREAMING_DEFAULT_TASK_TIMEOUT": "none",
        "STREAMING_CHANNEL": "chan",
        "OTHER": "1",
    }
    over = conf.from_environ(env)
    assert over == {
        "LEASE_TTL": 12.5,
        "MAX_ATTEMPTS": 5,
        "DEFAULT_TASK_TIMEOUT": None,
        "CHANNEL": "chan",
    }
    assert conf.build(over).LEASE_TTL == 12.5
