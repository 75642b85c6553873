"""Signed tokens: one task, one action, an expiry, signed with the project's SECRET_KEY."""

from __future__ import annotations

import math
import time

from django.core import signing

from streaming.events import TaskKey

SALT = "streaming.token"
#: Secret keys that are public (examples, templates): tokens signed with them can be forged.
PUBLIC_SECRET_KEYS = frozenset({"streaming-example-not-secret", ""})


def make(key: TaskKey, action: str, expires_in: float = 3600.0) -> str:
    """A token that lets its bearer do ``action`` on the task ``key`` for ``expires_in`` s."""
    if expires_in <= 0:
        raise ValueError("expires_in must be positive")
    # To the millisecond, rounded up: a token lives as long as asked, 0.3 s included.
    payload = {"t": key.path, "a": action, "e": math.ceil((time.time() + expires_in) * 1000) / 1000}
    return signing.Signer(salt=SALT).sign_object(payload, compress=False)


def check(token: str | None, key: TaskKey, action: str) -> bool:
    """Whether ``token`` is a valid, unexpired token for ``action`` on exactly ``key``."""
    if not token or len(token) > 1000:
        return False
    try:
        payload = signing.Signer(salt=SALT).unsign_object(token)
    except (signing.BadSignature, ValueError, TypeError, UnicodeError):
        return False
    if not isinstance(payload, dict):
        return False
    expiry = payload.get("e")
    return (
        payload.get("t") == key.path
        and payload.get("a") == action
        and isinstance(expiry, int | float)
        and not isinstance(expiry, bool)
        and time.time() < expiry
    )


def secret_is_public(secret_key: str) -> bool:
    """Whether a SECRET_KEY is one known to be public (the example project's, an empty one),
    so that anyone could forge tokens with it."""
    return secret_key in PUBLIC_SECRET_KEYS
