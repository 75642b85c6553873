"""Signed tokens: one task, one action, an expiry; anything else, junk included, is refused."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
from django.core import signing
from hypothesis import given
from hypothesis import strategies as st

from streaming import tokens
from streaming.events import TaskKey

KEY = TaskKey("tests", "ScriptedTask", 7)
NOW = 1_800_000_000.0


class Clock:
    """``time.time`` as the tokens module sees it, set by the test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[Clock]:
    fake = Clock(NOW)
    monkeypatch.setattr(tokens.time, "time", fake)
    yield fake


@pytest.fixture(autouse=True)
def _secret(settings: Any) -> None:
    settings.SECRET_KEY = "unit-test-secret-" + "x" * 40
    settings.SECRET_KEY_FALLBACKS = []


def _payload(token: str) -> dict[str, Any]:
    encoded = token.rsplit(":", 1)[0]
    data: dict[str, Any] = json.loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))
    return data


def _with_payload(token: str, payload: dict[str, Any]) -> str:
    """``token``'s signature on another payload: what a forger without the key can make."""
    raw = json.dumps(payload, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=") + ":" + token.rsplit(":", 1)[1]


# -- round trip -------------------------------------------------------------------------------


@pytest.mark.parametrize("action", ["view", "cancel"])
def test_a_token_checks_for_its_task_and_action(action: str) -> None:
    token = tokens.make(KEY, action)
    assert tokens.check(token, KEY, action)
    assert _payload(token)["t"] == KEY.path and _payload(token)["a"] == action


def test_the_token_names_what_it_allows_in_plain_sight_but_holds_no_secret(settings: Any) -> None:
    token = tokens.make(KEY, "view")
    assert settings.SECRET_KEY not in token
    assert set(_payload(token)) == {"t", "a", "e"}


@pytest.mark.parametrize(
    "other",
    [
        TaskKey("tests", "ScriptedTask", 8),
        TaskKey("tests", "ScriptedTask", 70),
        TaskKey("tests", "ExampleTask", 7),
        TaskKey("other", "ScriptedTask", 7),
    ],
)
def test_a_token_for_another_task_is_refused(other: TaskKey) -> None:
    assert not tokens.check(tokens.make(other, "view"), KEY, "view")
    assert not tokens.check(tokens.make(KEY, "view"), other, "view")


@pytest.mark.parametrize(("made", "used"), [("view", "cancel"), ("cancel", "view"), ("view", "")])
def test_a_token_for_another_action_is_refused(made: str, used: str) -> None:
    assert not tokens.check(tokens.make(KEY, made), KEY, used)


# -- expiry -----------------------------------------------------------------------------------


def test_a_token_expires(clock: Clock) -> None:
    token = tokens.make(KEY, "view", expires_in=60)
    assert tokens.check(token, KEY, "view")
    clock.now = NOW + 59.5
    assert tokens.check(token, KEY, "view")
    clock.now = NOW + 60
    assert not tokens.check(token, KEY, "view")
    clock.now = NOW + 10**6
    assert not tokens.check(token, KEY, "view")


def test_a_tiny_expiry_is_past_at_once(clock: Clock) -> None:
    token = tokens.make(KEY, "view", expires_in=0.001)
    clock.now = NOW + 0.002
    assert not tokens.check(token, KEY, "view")


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.99])
@pytest.mark.parametrize("expires_in", [0.3, 1.5, 30.0])
def test_a_token_is_valid_right_after_it_is_made(
    clock: Clock, fraction: float, expires_in: float
) -> None:
    """Whatever the clock's fraction of a second, a token lives (almost) ``expires_in`` s:
    it is valid when made and until just before ``now + expires_in``."""
    clock.now = NOW + fraction
    token = tokens.make(KEY, "view", expires_in=expires_in)
    assert tokens.check(token, KEY, "view"), f"born expired: expiry {_payload(token)['e']}"
    clock.now = NOW + fraction + expires_in * 0.9
    assert tokens.check(token, KEY, "view")
    clock.now = NOW + fraction + expires_in + 1.0
    assert not tokens.check(token, KEY, "view")


@pytest.mark.parametrize("expires_in", [0, -1, -0.5])
def test_a_token_must_expire_in_the_future(expires_in: float) -> None:
    with pytest.raises(ValueError):
        tokens.make(KEY, "view", expires_in=expires_in)


@pytest.mark.parametrize("expiry", ["9999999999", None, [1], True, {"e": 1}])
def test_a_signed_payload_whose_expiry_is_not_a_number_is_refused(expiry: Any) -> None:
    # Signed with the project's key (so the signature is good): only the shape is wrong.
    token = signing.Signer(salt=tokens.SALT).sign_object({"t": KEY.path, "a": "view", "e": expiry})
    assert not tokens.check(token, KEY, "view")


# -- tampering and foreign signatures -----------------------------------------------------------


def test_a_payload_changed_under_its_signature_is_refused() -> None:
    token = tokens.make(KEY, "view")
    payload = _payload(token)
    for change in (
        {"t": "tests/ScriptedTask/8"},
        {"a": "cancel"},
        {"e": payload["e"] + 10**6},
    ):
        forged = _with_payload(token, {**payload, **change})
        assert not tokens.check(forged, KEY, "view")
        assert not tokens.check(forged, KEY, "cancel")
    # The same payload re-encoded (no change) keeps its signature valid: the test is sound.
    assert tokens.check(_with_payload(token, payload), KEY, "view")


def test_a_flipped_character_anywhere_is_refused() -> None:
    token = tokens.make(KEY, "view")
    for i in range(len(token)):
        flipped = token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1 :]
        assert not tokens.check(flipped, KEY, "view"), i


@pytest.mark.parametrize("cut", [1, 5, 30])
def test_truncated_or_extended_tokens_are_refused(cut: int) -> None:
    token = tokens.make(KEY, "view")
    assert not tokens.check(token[:-cut], KEY, "view")
    assert not tokens.check(token[cut:], KEY, "view")
    assert not tokens.check(token + "x" * cut, KEY, "view")
    assert not tokens.check(token + ":" + token, KEY, "view")


def test_a_token_signed_with_another_key_is_refused(settings: Any) -> None:
    token = tokens.make(KEY, "view")
    settings.SECRET_KEY = "another-secret-" + "y" * 40
    assert not tokens.check(token, KEY, "view")
    # Nor one forged with the example project's public key.
    settings.SECRET_KEY = "streaming-example-not-secret"
    forged = tokens.make(KEY, "view")
    settings.SECRET_KEY = "unit-test-secret-" + "x" * 40
    assert not tokens.check(forged, KEY, "view")


def test_other_signed_values_of_the_project_are_not_tokens() -> None:
    """Values the project signs for other purposes (another salt, no salt, signing.dumps)
    cannot be replayed as tokens, even with the payload of one."""
    payload = {"t": KEY.path, "a": "view", "e": int(NOW) + 10**9}
    for other in (
        signing.Signer().sign_object(payload),
        signing.Signer(salt="django.contrib.sessions").sign_object(payload),
        signing.dumps(payload),
        signing.dumps(payload, salt=tokens.SALT),  # a TimestampSigner: not the same format
    ):
        assert not tokens.check(other, KEY, "view"), other


# -- junk -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "junk",
    [
        None,
        "",
        ":",
        "::",
        "a:b",
        "a:b:c",
        ".:x",
        "." + "A" * 50 + ":x",
        "x" * 1001,
        tokens.make(KEY, "view") + "x" * 1001,
        "\x00",
        "\ud800",
        "é:ü",
        "eyJ0IjoxfQ:AAAA",
    ],
)
def test_junk_is_refused_without_raising(junk: str | None) -> None:
    assert tokens.check(junk, KEY, "view") is False


@given(st.text(max_size=300))
def test_arbitrary_text_never_raises(junk: str) -> None:
    assert tokens.check(junk, KEY, "view") is False


@given(
    st.text(
        alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_:.=", max_size=200
    )
)
def test_token_shaped_text_never_raises(junk: str) -> None:
    assert tokens.check(junk, KEY, "view") is False


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3),
        max_leaves=8,
    )
)
def test_any_validly_signed_json_that_is_not_a_token_payload_is_refused(value: Any) -> None:
    token = signing.Signer(salt=tokens.SALT).sign_object(value)
    assert tokens.check(token, KEY, "view") is False


# -- public secret keys -------------------------------------------------------------------------


def test_public_secret_keys_are_known() -> None:
    assert tokens.secret_is_public("streaming-example-not-secret")
    assert tokens.secret_is_public("")
    assert not tokens.secret_is_public("a-real-secret-" + "z" * 40)
