"""The HTTP guards (client address, Host, Origin, CORS, /metrics, quotas) and the ready
policies, as plain functions and objects: no server, no database."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from streaming import conf, guard, policy, tokens
from streaming.events import TaskKey
from streaming.policy import Action, AllowAll, AnyOf, DjangoUsers, Request, SignedTokens

XFF = "x-forwarded-for"


def settings(**overrides: Any) -> conf.StreamingSettings:
    return conf.build(overrides)


BEHIND_PROXY = settings(PROXY_HEADER="X-Forwarded-For", PROXY_TRUSTED=("10.0.0.0/8", "::1/128"))


# -- client_address ----------------------------------------------------------------------------


def test_without_a_proxy_header_setting_the_peer_is_the_client() -> None:
    plain = settings()
    assert guard.client_address("203.0.113.7", {XFF: "198.51.100.1"}, plain) == "203.0.113.7"
    assert guard.client_address("127.0.0.1", {XFF: "198.51.100.1"}, plain) == "127.0.0.1"


@pytest.mark.parametrize(
    ("peer", "header", "client"),
    [
        # A trusted proxy in front: its header names the client.
        ("10.0.0.2", "198.51.100.1", "198.51.100.1"),
        ("10.0.0.2", " 198.51.100.1 ", "198.51.100.1"),
        # The client forged hops of its own before the proxy appended the real one.
        ("10.0.0.2", "6.6.6.6, 198.51.100.1", "198.51.100.1"),
        ("10.0.0.2", "127.0.0.1, 198.51.100.1", "198.51.100.1"),
        ("10.0.0.2", "10.0.0.9, 198.51.100.1", "198.51.100.1"),
        # Trusted proxies hop by hop: the last untrusted hop is the client.
        ("10.0.0.2", "198.51.100.1, 10.0.0.5, 10.0.0.6", "198.51.100.1"),
        ("10.0.0.2", "6.6.6.6, 198.51.100.1, 10.0.0.5", "198.51.100.1"),
        ("::1", "2001:db8::1", "2001:db8::1"),
        # Nothing usable in the header: the peer.
        ("10.0.0.2", "", "10.0.0.2"),
        ("10.0.0.2", ",,, ,", "10.0.0.2"),
        ("10.0.0.2", "10.0.0.5, 10.0.0.6", "10.0.0.2"),
        ("10.0.0.2", "not-an-address", "10.0.0.2"),
        ("10.0.0.2", "198.51.100.1:4711", "10.0.0.2"),
        ("10.0.0.2", "198.51.100.1, unknown", "10.0.0.2"),
        ("10.0.0.2", "198.51.100.1, 10.0.0.5, <script>", "10.0.0.2"),
        ("10.0.0.2", "\x00", "10.0.0.2"),
    ],
)
def test_a_trusted_proxy_names_the_client(peer: str, header: str, client: str) -> None:
    assert guard.client_address(peer, {XFF: header}, BEHIND_PROXY) == client


@pytest.mark.parametrize("header", ["198.51.100.1", "127.0.0.1", "10.0.0.5", "6.6.6.6, 10.0.0.5"])
def test_an_untrusted_peer_cannot_name_another_client(header: str) -> None:
    assert guard.client_address("203.0.113.7", {XFF: header}, BEHIND_PROXY) == "203.0.113.7"


def test_a_missing_header_or_a_junk_peer_falls_back_to_the_peer() -> None:
    assert guard.client_address("10.0.0.2", {}, BEHIND_PROXY) == "10.0.0.2"
    assert guard.client_address("", {XFF: "198.51.100.1"}, BEHIND_PROXY) == ""
    assert guard.client_address("junk", {XFF: "198.51.100.1"}, BEHIND_PROXY) == "junk"


def test_the_default_trusted_proxies_are_loopback_only() -> None:
    s = settings(PROXY_HEADER="x-real-ip")
    assert guard.client_address("127.0.0.1", {"x-real-ip": "198.51.100.1"}, s) == "198.51.100.1"
    assert guard.client_address("::1", {"x-real-ip": "198.51.100.1"}, s) == "198.51.100.1"
    assert guard.client_address("10.0.0.2", {"x-real-ip": "198.51.100.1"}, s) == "10.0.0.2"
    # The header is the one named, not any forwarding header.
    assert guard.client_address("127.0.0.1", {XFF: "198.51.100.1"}, s) == "127.0.0.1"


def test_networks_name_a_bad_spec() -> None:
    assert guard.networks(["10.0.0.0/8", " ::1 ", "192.0.2.1"])[2].num_addresses == 1
    with pytest.raises(ValueError, match=r"'10\.0\.0\.300'"):
        guard.networks(["10.0.0.300"])
    assert not guard.in_networks("junk", guard.networks(["0.0.0.0/0"]))


# -- host_allowed ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "allowed", "ok"),
    [
        ("example.com", ["example.com"], True),
        ("example.com:8000", ["example.com"], True),
        ("EXAMPLE.com", ["example.com"], True),
        ("www.example.com", ["example.com"], False),
        ("www.example.com", [".example.com"], True),
        ("example.com", [".example.com"], True),
        ("evil-example.com", [".example.com"], False),
        ("example.com.evil.org", ["example.com"], False),
        ("evil.org", ["example.com"], False),
        ("anything.org", ["*"], True),
        ("[::1]:8000", ["[::1]"], True),
        ("127.0.0.1:8000", ["127.0.0.1"], True),
        # Malformed hosts are refused even by "*".
        ("ex@mple.com", ["*"], False),
        ("bad_host", ["*"], False),
        ("example.com:port", ["*"], False),
        ("example.com/path", ["*"], False),
        ("", ["*"], False),
        (None, ["*"], False),
    ],
)
def test_host_allowed_as_django_checks_it(host: str | None, allowed: list[str], ok: bool) -> None:
    assert guard.host_allowed(host, allowed, debug=False) is ok


def test_an_empty_allowed_hosts_allows_only_localhost_in_debug() -> None:
    for host in ("localhost", "localhost:8000", "app.localhost", "127.0.0.1:8888", "[::1]"):
        assert guard.host_allowed(host, [], debug=True), host
        assert not guard.host_allowed(host, [], debug=False), host
    assert not guard.host_allowed("example.com", [], debug=True)


# -- same_origin and origin_may_post -----------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "host", "same"),
    [
        ("http://127.0.0.1:8000", "127.0.0.1:8000", True),
        ("https://example.com", "example.com", True),
        ("https://Example.COM", "example.com", True),
        ("http://example.com/", "example.com", True),
        ("http://127.0.0.1:8001", "127.0.0.1:8000", False),
        ("http://example.com:80", "example.com", False),
        ("http://evil.com", "example.com", False),
        ("http://example.com.evil.com", "example.com", False),
        ("http://evil.com#example.com", "example.com", False),
        ("null", "example.com", False),
        ("example.com", "example.com", False),
        ("", "example.com", False),
        ("http://example.com", None, False),
        ("http://example.com", "", False),
    ],
)
def test_same_origin(origin: str, host: str | None, same: bool) -> None:
    assert guard.same_origin(origin, host) is same


POSTING = settings(
    ALLOWED_ORIGINS=("https://poster.example",), CORS_ALLOWED_ORIGINS=("https://app.example",)
)


@pytest.mark.parametrize(
    ("origin", "ok"),
    [
        (None, True),  # not a page: curl, a server
        ("https://poster.example", True),
        ("https://app.example", True),
        ("http://stream.example:8000", True),  # same origin
        ("https://evil.example", False),
        ("https://poster.example.evil.example", False),
        ("https://poster.example:444", False),
        ("http://poster.example", False),
        ("null", False),  # sandboxed frames, data: URLs, some redirects
        ("", False),
        ("*", False),
    ],
)
def test_origin_may_post(origin: str | None, ok: bool) -> None:
    assert guard.origin_may_post(origin, "stream.example:8000", POSTING) is ok


# -- cors_headers ------------------------------------------------------------------------------


def test_cors_echoes_an_allowed_origin_exactly_with_vary() -> None:
    s = settings(CORS_ALLOWED_ORIGINS=("https://app.example", "http://localhost:3000"))
    assert guard.cors_headers("https://app.example", s) == {
        "access-control-allow-origin": "https://app.example",
        "vary": "Origin",
    }
    assert guard.cors_headers("http://localhost:3000", s)["access-control-allow-origin"] == (
        "http://localhost:3000"
    )


@pytest.mark.parametrize(
    "origin",
    [None, "", "null", "https://evil.example", "https://app.example.evil", "HTTPS://APP.EXAMPLE"],
)
def test_cors_says_nothing_to_another_origin(origin: str | None) -> None:
    s = settings(CORS_ALLOWED_ORIGINS=("https://app.example",), CORS_ALLOW_CREDENTIALS=True)
    # Nothing but Vary (so that shared caches keep the origins' answers apart).
    assert guard.cors_headers(origin, s) == {"vary": "Origin"}


def test_credentials_are_allowed_only_when_configured() -> None:
    with_credentials = settings(
        CORS_ALLOWED_ORIGINS=("https://app.example",), CORS_ALLOW_CREDENTIALS=True
    )
    assert guard.cors_headers("https://app.example", with_credentials) == {
        "access-control-allow-origin": "https://app.example",
        "vary": "Origin",
        "access-control-allow-credentials": "true",
    }
    without = settings(CORS_ALLOWED_ORIGINS=("https://app.example",))
    assert "access-control-allow-credentials" not in guard.cors_headers(
        "https://app.example", without
    )


def test_a_star_in_the_settings_is_no_wildcard() -> None:
    s = settings(CORS_ALLOWED_ORIGINS=("*",), CORS_ALLOW_CREDENTIALS=True)
    assert guard.cors_headers("https://evil.example", s) == {"vary": "Origin"}
    assert guard.cors_headers("http://localhost", s) == {"vary": "Origin"}


def test_no_cors_by_default() -> None:
    assert guard.cors_headers("https://app.example", settings()) == {}


def test_the_preflight_allows_the_methods_and_headers_the_api_uses() -> None:
    assert set(guard.PREFLIGHT["access-control-allow-methods"].replace(" ", "").split(",")) == {
        "GET",
        "POST",
    }
    allowed = {h.strip() for h in guard.PREFLIGHT["access-control-allow-headers"].split(",")}
    assert {"content-type", "last-event-id", "authorization"} <= allowed
    assert "*" not in guard.PREFLIGHT.values()


# -- metrics_allowed ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "ok"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("10.0.0.1", False),
        ("203.0.113.7", False),
        ("::ffff:127.0.0.1", False),
        ("", False),
        ("junk", False),
    ],
)
def test_metrics_are_for_loopback_by_default(address: str, ok: bool) -> None:
    assert guard.metrics_allowed(address, None, settings()) is ok


def test_a_metrics_token_opens_metrics_from_anywhere() -> None:
    s = settings(METRICS_ALLOWED_ADDRESSES=(), METRICS_TOKEN="s3cret-token")
    assert not guard.metrics_allowed("127.0.0.1", None, s)
    assert guard.metrics_allowed("203.0.113.7", "Bearer s3cret-token", s)
    assert guard.metrics_allowed("203.0.113.7", "bearer  s3cret-token ", s)
    for wrong in (
        "Bearer s3cret-toke",
        "Bearer s3cret-token-and-more",
        "Bearer ",
        "Bearer",
        "Basic s3cret-token",
        "s3cret-token",
        "Bearer S3CRET-TOKEN",
        "Bearer s3cret-tokén",
        "Bearer \x00",
        "",
    ):
        assert not guard.metrics_allowed("203.0.113.7", wrong, s), wrong


def test_without_a_metrics_token_no_authorization_opens_metrics() -> None:
    for unset in (None, ""):
        s = settings(METRICS_ALLOWED_ADDRESSES=("10.0.0.0/8",), METRICS_TOKEN=unset)
        assert not guard.metrics_allowed("203.0.113.7", "Bearer ", s)
        assert not guard.metrics_allowed("203.0.113.7", "Bearer None", s)
        assert guard.metrics_allowed("10.1.2.3", None, s)


# -- Quotas ------------------------------------------------------------------------------------


def test_stream_quota_per_address() -> None:
    q = guard.Quotas(max_streams=2, creates_per_minute=10)
    assert q.open_stream("a") and q.open_stream("a")
    assert not q.open_stream("a")
    assert q.streams == {"a": 2}  # a refusal counts nothing
    assert q.open_stream("b")  # another address has its own quota
    q.close_stream("a")
    assert q.open_stream("a")
    assert not q.open_stream("a")
    for _ in range(5):
        q.close_stream("a")  # more closes than opens never go negative
    assert "a" not in q.streams
    assert q.open_stream("a") and q.open_stream("a") and not q.open_stream("a")
    q.close_stream("never-seen")
    assert "never-seen" not in q.streams


def test_create_quota_is_a_sliding_minute() -> None:
    q = guard.Quotas(max_streams=1, creates_per_minute=3)
    assert all(q.create("a", now=100.0 + i) for i in range(3))
    assert not q.create("a", now=103.0)
    assert not q.create("a", now=159.9)
    assert q.create("b", now=103.0)  # per address
    assert q.create("a", now=160.0)  # the first one is a minute old
    assert not q.create("a", now=160.5)
    assert q.create("a", now=161.0) and q.create("a", now=162.0)
    assert not q.create("a", now=162.5)


def test_refused_creations_do_not_extend_the_wait() -> None:
    q = guard.Quotas(max_streams=1, creates_per_minute=1)
    assert q.create("a", now=0.0)
    for t in range(1, 60):
        assert not q.create("a", now=float(t))
    assert q.create("a", now=60.0)


def test_the_creation_counters_forget_idle_addresses() -> None:
    q = guard.Quotas(max_streams=1, creates_per_minute=1)
    for i in range(10_001):
        assert q.create(f"10.0.{i // 256}.{i % 256}", now=0.0)
    assert q.create("fresh", now=100.0)  # past 10,000 addresses: the idle ones are dropped
    assert len(q._creations) < 100
    assert not q.create("fresh", now=101.0)


# -- policies ----------------------------------------------------------------------------------

KEY = TaskKey("tests", "OwnedTask", 1)


def request(
    query: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    user: Any = None,
) -> Request:
    r = Request("GET", "/", dict(headers or {}), dict(query or {}), {}, "127.0.0.1")
    if user is not None:
        r._user, r._user_loaded = user, True
    return r


@dataclass
class FakeUser:
    """What DjangoUsers reads of a user: flags and ``ahas_perm``."""

    name: str
    perms: set[str] = field(default_factory=set)
    is_authenticated: bool = True
    is_active: bool = True
    is_staff: bool = False
    asked: list[str] = field(default_factory=list)

    async def ahas_perm(self, perm: str) -> bool:
        self.asked.append(perm)
        return perm in self.perms


ANONYMOUS = FakeUser("anonymous", is_authenticated=False)


@dataclass
class FakeQuery:
    rows: list[dict[str, Any]]
    lookups: dict[str, Any]

    async def aexists(self) -> bool:
        return any(all(row.get(k) == v for k, v in self.lookups.items()) for row in self.rows)


@dataclass
class FakeManager:
    rows: list[dict[str, Any]]
    calls: list[dict[str, Any]] = field(default_factory=list)

    def filter(self, **lookups: Any) -> FakeQuery:
        self.calls.append(lookups)
        return FakeQuery(self.rows, lookups)


@dataclass
class FakeMeta:
    app_label: str = "tests"
    model_name: str = "ownedtask"


class FakeModel:
    """A task model with an owner field: the example app has none (see the report)."""

    _meta = FakeMeta()
    _default_manager: FakeManager


def owned_model(owner_of_1: FakeUser) -> type[FakeModel]:
    """Task 1 is ``owner_of_1``'s, task 2 another user's."""

    class Owned(FakeModel):
        pass

    rows = [{"pk": 1, "owner": owner_of_1}, {"pk": 2, "owner": FakeUser("bob")}]
    Owned._default_manager = FakeManager(rows)
    return Owned


ALL_PERMS = {f"tests.{p}_ownedtask" for p in ("view", "add", "change")}


def test_request_token_from_the_query_or_a_bearer_header() -> None:
    assert request({"token": "q"}).token == "q"
    assert request({"token": "q"}, {"authorization": "Bearer h"}).token == "q"
    assert request(headers={"authorization": "Bearer h"}).token == "h"
    assert request(headers={"authorization": "bearer  h "}).token == "h"
    assert request(headers={"authorization": "BEARER h"}).token == "h"
    assert request(headers={"authorization": "Bearer "}).token is None
    assert request(headers={"authorization": "Basic h"}).token is None
    assert request(headers={"authorization": "Bearerh"}).token is None
    assert request().token is None


async def test_a_request_without_a_session_is_anonymous() -> None:
    user = await request().auser()
    assert not user.is_authenticated


async def test_allow_all_allows_everything() -> None:
    for action in Action:
        key = None if action == Action.CREATE else KEY
        assert await AllowAll()(request(), action, FakeModel, key)


async def test_signed_tokens_allow_the_action_of_the_token_only(settings: Any) -> None:
    settings.SECRET_KEY = "unit-test-secret-" + "x" * 40
    p = SignedTokens()
    view, cancel = tokens.make(KEY, "view"), tokens.make(KEY, "cancel")
    assert await p(request({"token": view}), Action.VIEW, FakeModel, KEY)
    assert not await p(request({"token": view}), Action.CANCEL, FakeModel, KEY)
    assert await p(request({"token": cancel}), Action.CANCEL, FakeModel, KEY)
    assert not await p(request({"token": cancel}), Action.VIEW, FakeModel, KEY)
    bearer = request(headers={"authorization": f"Bearer {view}"})
    assert await p(bearer, Action.VIEW, FakeModel, KEY)
    other = TaskKey("tests", "OwnedTask", 2)
    assert not await p(request({"token": view}), Action.VIEW, FakeModel, other)
    assert not await p(request(), Action.VIEW, FakeModel, KEY)
    # Creating and starting are refused, whatever token comes along.
    for action in ("create", "start"):
        token = tokens.make(KEY, action)
        assert not await p(request({"token": token}), Action(action), FakeModel, KEY)
        assert not await p(request({"token": token}), Action(action), FakeModel, None)


@pytest.mark.parametrize(
    ("action", "perm"),
    [("view", "view"), ("create", "add"), ("start", "add"), ("cancel", "change")],
)
async def test_django_users_need_the_model_permission_of_the_action(action: str, perm: str) -> None:
    p = DjangoUsers()
    key = None if action == "create" else KEY
    user = FakeUser("u", perms={f"tests.{perm}_ownedtask"})
    assert await p(request(user=user), Action(action), FakeModel, key)
    assert user.asked == [f"tests.{perm}_ownedtask"]
    others = FakeUser("v", perms=ALL_PERMS - {f"tests.{perm}_ownedtask"})
    assert not await p(request(user=others), Action(action), FakeModel, key)


async def test_django_users_refuse_anonymous_and_inactive_users() -> None:
    p = DjangoUsers()
    inactive = FakeUser("gone", perms=ALL_PERMS, is_active=False)
    anonymous = FakeUser("anon", perms=ALL_PERMS, is_authenticated=False)
    for action in Action:
        assert not await p(request(user=inactive), action, FakeModel, KEY)
        assert not await p(request(user=anonymous), action, FakeModel, KEY)
    assert not await p(request(), Action.VIEW, FakeModel, KEY)  # no session: AnonymousUser


async def test_without_auth_installed_django_users_refuse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(policy, "_auth_installed", lambda: False)
    assert await request().auser() is None
    assert not await DjangoUsers()(request(), Action.VIEW, FakeModel, KEY)


async def test_owner_field_limits_users_to_their_own_tasks() -> None:
    alice = FakeUser("alice", perms=ALL_PERMS)
    model = owned_model(alice)
    p = DjangoUsers(owner_field="owner")
    mine, bobs = TaskKey("tests", "OwnedTask", 1), TaskKey("tests", "OwnedTask", 2)
    for action in (Action.VIEW, Action.START, Action.CANCEL):
        assert await p(request(user=alice), action, model, mine)
        assert not await p(request(user=alice), action, model, bobs)
        assert not await p(request(user=alice), action, model, TaskKey("tests", "OwnedTask", 3))
    assert model._default_manager.calls[0] == {"pk": 1, "owner": alice}
    # Creating has no task yet: the permission is enough.
    assert await p(request(user=alice), Action.CREATE, model, None)


async def test_owner_field_still_needs_the_permission() -> None:
    owner = FakeUser("owner", perms={"tests.view_ownedtask"})
    model = owned_model(owner)
    p = DjangoUsers(owner_field="owner")
    assert await p(request(user=owner), Action.VIEW, model, KEY)
    assert not await p(request(user=owner), Action.CANCEL, model, KEY)
    assert not await p(request(user=owner), Action.START, model, KEY)


async def test_owner_field_lets_staff_with_the_permission_see_all() -> None:
    model = owned_model(FakeUser("alice", perms=ALL_PERMS))
    p = DjangoUsers(owner_field="owner")
    staff = FakeUser("staff", perms={"tests.view_ownedtask"}, is_staff=True)
    assert await p(request(user=staff), Action.VIEW, model, TaskKey("tests", "OwnedTask", 2))
    assert not await p(request(user=staff), Action.CANCEL, model, TaskKey("tests", "OwnedTask", 2))
    staff_without = FakeUser("staff2", is_staff=True)
    assert not await p(request(user=staff_without), Action.VIEW, model, KEY)


@dataclass
class Recorder:
    answer: bool
    calls: list[str] = field(default_factory=list)

    async def __call__(self, r: Request, action: Action, model: Any, key: TaskKey | None) -> bool:
        self.calls.append(str(action))
        return self.answer


async def test_any_of_the_first_yes_wins() -> None:
    no, yes, never = Recorder(False), Recorder(True), Recorder(True)
    assert await AnyOf(no, yes, never)(request(), Action.VIEW, FakeModel, KEY)
    assert no.calls == ["view"] and yes.calls == ["view"] and never.calls == []
    assert not await AnyOf(Recorder(False), Recorder(False))(
        request(), Action.CANCEL, FakeModel, KEY
    )
    assert not await AnyOf()(request(), Action.VIEW, FakeModel, KEY)


def test_the_default_policy_is_tokens_or_users() -> None:
    p = policy.default()
    assert isinstance(p, AnyOf)
    assert [type(x) for x in p.policies] == [SignedTokens, DjangoUsers]
    assert p.policies[1].owner_field is None  # type: ignore[attr-defined]
    assert policy.uses_tokens(p)


def test_without_auth_the_default_is_tokens_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(policy, "_auth_installed", lambda: False)
    assert isinstance(policy.default(), SignedTokens)


async def test_the_default_policy_for_anonymous_callers(settings: Any) -> None:
    settings.SECRET_KEY = "unit-test-secret-" + "x" * 40
    p = policy.default()
    anon = FakeUser("anon", is_authenticated=False)
    for action in Action:
        key = None if action == Action.CREATE else KEY
        assert not await p(request(user=anon), action, FakeModel, key), action
    view = tokens.make(KEY, "view")
    assert await p(request({"token": view}, user=anon), Action.VIEW, FakeModel, KEY)
    assert not await p(request({"token": view}, user=anon), Action.START, FakeModel, KEY)
    assert not await p(request({"token": view}, user=anon), Action.CANCEL, FakeModel, KEY)


def test_load_names_the_policy() -> None:
    assert isinstance(policy.load(settings()), AnyOf)
    assert isinstance(policy.load(settings(POLICY="streaming.policy.AllowAll")), AllowAll)
    loaded = policy.load(
        settings(POLICY="streaming.policy.DjangoUsers", POLICY_OPTIONS={"owner_field": "owner"})
    )
    assert isinstance(loaded, DjangoUsers) and loaded.owner_field == "owner"
    # A function (or an instance) is the policy itself; options need a class.
    assert policy.load(settings(POLICY="streaming.policy.default")) is policy.default
    with pytest.raises(ValueError, match="POLICY_OPTIONS"):
        policy.load(settings(POLICY="streaming.policy.default", POLICY_OPTIONS={"x": 1}))
    with pytest.raises(ImportError):
        policy.load(settings(POLICY="streaming.policy.NoSuchPolicy"))


def test_uses_tokens() -> None:
    assert policy.uses_tokens(SignedTokens())
    assert policy.uses_tokens(AnyOf(DjangoUsers(), SignedTokens()))
    assert policy.uses_tokens(AnyOf(DjangoUsers(), AnyOf(AllowAll(), SignedTokens())))
    assert not policy.uses_tokens(AllowAll())
    assert not policy.uses_tokens(DjangoUsers())
    assert not policy.uses_tokens(AnyOf(AllowAll(), DjangoUsers()))
