"""Who may do what: the authorization policy and the ready ones.

A policy is an async callable ``policy(request, action, model, key) -> bool``. ``action`` is
``view`` (a stream, the status, the watch page), ``create`` (``POST /tasks/…``; ``key`` is
None), ``start`` (a GET that would queue a never-started task) or ``cancel``. ``request`` is a
``Request``: headers, cookies, query, the client's address, and ``await request.auser()``,
the Django user of the session cookie when ``django.contrib.auth`` and sessions are
installed. ``STREAMING["POLICY"]`` names it by dotted path (a class is instantiated with
``STREAMING["POLICY_OPTIONS"]``).
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings as django_settings
from django.utils.module_loading import import_string

from streaming import conf, tokens
from streaming.events import TaskKey

logger = logging.getLogger(__name__)


class Action(enum.StrEnum):
    VIEW = "view"
    CREATE = "create"
    START = "start"
    CANCEL = "cancel"


@dataclass
class Request:
    """What a policy sees of an HTTP request."""

    method: str
    path: str
    headers: Mapping[str, str]  # lower-case names
    query: Mapping[str, str]
    cookies: Mapping[str, str]
    client: str  # the client's address (from the proxy header when the peer is trusted)
    _user: Any = field(default=None, repr=False)
    _user_loaded: bool = field(default=False, repr=False)

    @property
    def token(self) -> str | None:
        """The signed token of the request: ``?token=``, or ``Authorization: Bearer …``."""
        if "token" in self.query:
            return self.query["token"]
        auth = self.headers.get("authorization", "")
        return auth[7:].strip() or None if auth[:7].lower() == "bearer " else None

    async def auser(self) -> Any:
        """The Django user of the session (AnonymousUser without one); None without auth."""
        if not self._user_loaded:
            self._user = await _session_user(self.cookies)
            self._user_loaded = True
        return self._user


Policy = Callable[[Request, Action, Any, TaskKey | None], Awaitable[bool]]


class AllowAll:
    """Everyone may do everything: for development only (the example project uses it)."""

    async def __call__(
        self, request: Request, action: Action, model: Any, key: TaskKey | None
    ) -> bool:
        return True


class SignedTokens:
    """A valid, unexpired token for this task and this action (``task.stream_url(signed=True)``
    for ``view``, ``task.cancel_url()`` for ``cancel``). Creating and starting need none of
    them: they are refused."""

    async def __call__(
        self, request: Request, action: Action, model: Any, key: TaskKey | None
    ) -> bool:
        if key is None or action in (Action.CREATE, Action.START):
            return False
        return tokens.check(request.token, key, str(action))


class DjangoUsers:
    """Authenticated users with the model's permissions: ``view`` for view, ``add`` for create
    and start, ``change`` for cancel. With ``owner_field`` (e.g. ``"owner"``), a user sees and
    cancels only the tasks whose field is them (staff with the permission see all)."""

    PERMISSIONS = {
        Action.VIEW: "view",
        Action.CREATE: "add",
        Action.START: "add",
        Action.CANCEL: "change",
    }

    def __init__(self, owner_field: str | None = None) -> None:
        self.owner_field = owner_field

    async def __call__(
        self, request: Request, action: Action, model: Any, key: TaskKey | None
    ) -> bool:
        user = await request.auser()
        if user is None or not user.is_authenticated or not user.is_active:
            return False
        meta = model._meta
        perm = f"{meta.app_label}.{self.PERMISSIONS[action]}_{meta.model_name}"
        if not await user.ahas_perm(perm):
            return False
        if self.owner_field is None or key is None or user.is_staff:
            return True
        return bool(
            await model._default_manager.filter(
                pk=key.task_id, **{self.owner_field: user}
            ).aexists()
        )


class AnyOf:
    """Allowed when any of the policies allows it (in order; the first yes wins)."""

    def __init__(self, *policies: Policy) -> None:
        self.policies = policies

    async def __call__(
        self, request: Request, action: Action, model: Any, key: TaskKey | None
    ) -> bool:
        for policy in self.policies:
            if await policy(request, action, model, key):
                return True
        return False


def default() -> Policy:
    """What a project that names no policy gets: safe as shipped.

    Anonymous requests may view a task only with a valid token, and may not create, start or
    cancel; signed-in users may do what their model permissions allow (``DjangoUsers``).
    """
    if _auth_installed():
        return AnyOf(SignedTokens(), DjangoUsers())
    return SignedTokens()


def load(settings: conf.StreamingSettings) -> Policy:
    """The policy that ``settings.POLICY`` names, or the default."""
    if settings.POLICY is None:
        return default()
    target = import_string(settings.POLICY)
    if isinstance(target, type):
        instance: Policy = target(**settings.POLICY_OPTIONS)
        return instance
    if settings.POLICY_OPTIONS:
        raise ValueError("STREAMING['POLICY_OPTIONS'] needs a class as STREAMING['POLICY']")
    return target


def uses_tokens(policy: Policy) -> bool:
    """Whether a policy honours signed tokens (then a public SECRET_KEY is fatal)."""
    if isinstance(policy, SignedTokens):
        return True
    return isinstance(policy, AnyOf) and any(uses_tokens(p) for p in policy.policies)


_SESSION_KEY = re.compile(r"[a-z0-9]{8,64}")


def _auth_installed() -> bool:
    apps = django_settings.INSTALLED_APPS
    return "django.contrib.auth" in apps and "django.contrib.sessions" in apps


async def _session_user(cookies: Mapping[str, str]) -> Any:
    if not _auth_installed():
        return None
    from django.contrib.auth import aget_user
    from django.contrib.auth.models import AnonymousUser
    from django.contrib.sessions.backends.base import SessionBase
    from django.utils.module_loading import import_string as load_class

    session_key = cookies.get(django_settings.SESSION_COOKIE_NAME)
    # Django's session keys are lower-case letters and digits: anything else (a NUL, a
    # megabyte) names no session, and must not reach the session store's query.
    if not session_key or not _SESSION_KEY.fullmatch(session_key):
        return AnonymousUser()
    store: type[SessionBase] = load_class(f"{django_settings.SESSION_ENGINE}.SessionStore")
    # aget_user reads only request.session: a stand-in, not a whole HttpRequest.
    return await aget_user(_SessionRequest(store(session_key)))  # type: ignore[arg-type]


@dataclass
class _SessionRequest:
    """The part of an HttpRequest that ``django.contrib.auth.aget_user`` reads."""

    session: Any
