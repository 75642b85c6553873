"""Who may do what, against real runserver_stream processes: each ready policy and each action,
tokens, revocation of open streams, Host, CORS, CSRF, /metrics and the per-address quotas.

Signed-in users are Django users of the test database (which the servers share) with a
session made here; tokens are made here too, with the SECRET_KEY the servers are given.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import pytest
from django.conf import settings as django_settings
from django.contrib.auth.models import Permission, User
from django.contrib.sessions.models import Session
from django.test import Client

from streaming import client as stream_client
from streaming import registry, runtime
from streaming.coordinator import coordinator
from tests import support
from tests.faults import wait_until
from tests.models import ExampleTask, ScriptedTask
from tests.support import SSE as Event
from tests.support import ManagedProcess, parse_sse, read_stream, sql

pytestmark = pytest.mark.django_db(transaction=True)

SSE = {"Accept": "text/event-stream"}
TASKS = "/tasks/tests/ScriptedTask"
PUBLIC_KEY = "streaming-example-not-secret"
Serve = Callable[..., ManagedProcess]


# -- fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture
def secret(settings: Any) -> str:
    """A random SECRET_KEY, for this process (tokens, sessions) and the servers ``serve`` starts."""
    key = secrets.token_urlsafe(40)
    settings.SECRET_KEY = key
    return key


@pytest.fixture
def serve(server_factory: Serve, secret: str) -> Serve:
    """``server_factory`` with this test's SECRET_KEY and a short shutdown grace."""

    def start(*args: str, **env: str) -> ManagedProcess:
        return server_factory(
            *args, **{"DJANGO_SECRET_KEY": secret, "STREAMING_SHUTDOWN_GRACE": "0.2", **env}
        )

    return start


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    def signature(self) -> tuple[int, bytes, dict[str, str]]:
        """What two answers must share to be indistinguishable (all but the Date)."""
        return self.status, self.body, {k: v for k, v in self.headers.items() if k != "date"}


_HTTP = httpx.Client(timeout=10)  # one client: making one costs more than a request


def send(
    method: str,
    url: str,
    headers: dict[str, str] | None = None,
    *,
    json_body: Any = None,
    content: bytes | None = None,
) -> Answer:
    """One request; an event stream that opens is closed at once (its body left empty)."""
    with _HTTP.stream(method, url, headers=headers or {}, json=json_body, content=content) as resp:
        sse = resp.headers.get("content-type", "").startswith("text/event-stream")
        body = b"" if sse else resp.read()
        return Answer(resp.status_code, dict(resp.headers), body)


def enqueue(*tasks: Any) -> None:
    """Queue tasks for any worker, as ``coordinator.enqueue`` does in an application."""

    async def go() -> None:
        try:
            for task in tasks:
                await coordinator.enqueue(task)
        finally:
            await runtime.shutdown()

    asyncio.run(go())


def run_row(task: Any) -> tuple[str, Any] | None:
    key = registry.key_of(task)
    rows = sql(
        "SELECT status, cancel_requested_at FROM streaming_taskrun "
        "WHERE app_label = %s AND model_name = %s AND task_id = %s",
        key.app_label,
        key.model_name,
        key.task_id,
    )
    return (rows[0][0], rows[0][1]) if rows else None


def wait_for_status(task: Any, *statuses: str, timeout: float = 20.0) -> str:
    def check() -> str | None:
        row = run_row(task)
        return row[0] if row and row[0] in statuses else None

    return wait_until(check, timeout, f"task {task.pk} to be {statuses}")


def token_of(url: str) -> str:
    """The token of a signed URL (``stream_url(signed=True)``, ``cancel_url()``)."""
    return parse_qs(urlsplit(url).query)["token"][0]


def view_token(task: Any, expires_in: float | None = None) -> str:
    return token_of(task.stream_url(signed=True, expires_in=expires_in))


def cancel_token(task: Any) -> str:
    return token_of(task.cancel_url())


def q(token: str | None) -> str:
    return f"?token={quote(token, safe='')}" if token is not None else ""


def make_user(name: str, *perms: str, superuser: bool = False, **flags: Any) -> User:
    """A user with these permissions on ScriptedTask (``view``, ``add``, ``change``)."""
    if superuser:
        user = User.objects.create_superuser(name, None, None, **flags)
    else:
        user = User.objects.create_user(name, None, None, **flags)
    if perms:
        found = Permission.objects.filter(
            content_type__app_label="tests",
            codename__in=[f"{p}_scriptedtask" for p in perms],
        )
        assert found.count() == len(perms)
        user.user_permissions.set(found)
    return user


def login(user: User) -> dict[str, str]:
    """The Cookie header of a fresh session of ``user`` (as after a login to the site)."""
    client = Client()
    client.force_login(user)
    name = django_settings.SESSION_COOKIE_NAME
    return {"Cookie": f"{name}={client.cookies[name].value}"}


def unknown_404(base: str, headers: dict[str, str] | None = None) -> Answer:
    """The answer to a task id that does not exist."""
    answer = send("GET", f"{base}/stream/tests/ScriptedTask/987654321", headers)
    assert answer.status == 404
    return answer


ALLOWED = {
    "view /stream": 200,
    "view /tasks": 200,
    "view /watch": 200,
    "create": 201,
    "start": 200,
    "cancel": 202,
}
REFUSED = {
    "view /stream": 404,
    "view /tasks": 404,
    "view /watch": 404,
    "create": 403,
    "start": 404,
    "cancel": 404,
}
# May view, nothing else: a refused action of a task one may view is a 403 (server.py).
VIEWER = {**ALLOWED, "create": 403, "start": 403, "cancel": 403}


def try_everything(
    base: str,
    headers: dict[str, str] | None = None,
    token: Callable[[Any, str], str | None] | None = None,
) -> dict[str, int]:
    """Each action once, on tasks made for it (``--no-worker`` servers: nothing runs), as the
    caller of ``headers`` and ``token(task, action)``; the statuses, checked against their
    effects, and every 404 checked to be the unknown task's."""
    headers = headers or {}

    def tok(task: Any, action: str) -> str:
        return q(token(task, action) if token else None)

    started, fresh, victim = (ScriptedTask.objects.create(ticks=1) for _ in range(3))
    enqueue(started, victim)
    before = ScriptedTask.objects.count()
    name = f"/tests/ScriptedTask/{started.pk}"
    answers = {
        "view /stream": send("GET", f"{base}/stream{name}{tok(started, 'view')}", headers | SSE),
        "view /tasks": send("GET", f"{base}/tasks{name}{tok(started, 'view')}", headers),
        "view /watch": send("GET", f"{base}/watch{name}{tok(started, 'view')}", headers),
        "create": send("POST", f"{base}{TASKS}", headers, json_body={"ticks": 1}),
        "start": send(
            "GET", f"{base}/stream/tests/ScriptedTask/{fresh.pk}{tok(fresh, 'view')}", headers | SSE
        ),
        "cancel": send("POST", f"{base}{TASKS}/{victim.pk}/cancel{tok(victim, 'cancel')}", headers),
    }
    statuses = {what: a.status for what, a in answers.items()}
    # The answers and what happened agree.
    assert (ScriptedTask.objects.count() == before + 1) == (statuses["create"] == 201), statuses
    assert (run_row(fresh) is not None) == (statuses["start"] == 200), statuses
    victim_row = run_row(victim)
    assert victim_row is not None
    assert (victim_row[1] is not None) == (statuses["cancel"] == 202), statuses
    if statuses["view /tasks"] == 200:
        assert answers["view /tasks"].json["id"] == started.pk
    if statuses["view /watch"] == 200:
        assert answers["view /watch"].headers["content-type"].startswith("text/html")
    not_found = unknown_404(base, headers).signature()
    for what, answer in answers.items():
        if answer.status == 404:
            assert answer.signature() == not_found, what
        if answer.status == 403:
            assert answer.headers["content-type"] == "application/json", what
    return statuses


def flat(outcomes: dict[str, dict[str, int]]) -> dict[str, int]:
    """``{who: {action: status}}`` as ``{"who: action": status}``: diffs name the cell."""
    return {
        f"{who}: {what}": status for who, row in outcomes.items() for what, status in row.items()
    }


# -- the ready policies, action by action ------------------------------------------------------


def test_allow_all_lets_anyone_do_anything(server_factory: Serve) -> None:
    """The example project's policy, with its public SECRET_KEY: development only."""
    server = server_factory("--no-worker")
    assert try_everything(server.url) == ALLOWED
    assert try_everything(server.url, {"Cookie": "sessionid=junk"}) == ALLOWED


def test_the_default_policy_refuses_anonymous_callers(serve: Serve) -> None:
    server = serve("--no-worker", STREAMING_POLICY="none")
    assert try_everything(server.url) == REFUSED
    assert try_everything(server.url, {"Cookie": "sessionid=junk"}) == REFUSED
    assert try_everything(server.url, {"Authorization": "Bearer junk"}) == REFUSED


def test_the_default_policy_lets_a_token_do_its_action_only(serve: Serve) -> None:
    server = serve("--no-worker", STREAMING_POLICY="none")

    def signed(task: Any, action: str) -> str:
        return cancel_token(task) if action == "cancel" else view_token(task)

    assert try_everything(server.url, token=signed) == {**VIEWER, "cancel": 202}
    # A view token does not cancel (403: its bearer may view the task); no token is the 404.
    victim = ScriptedTask.objects.create(ticks=1)
    enqueue(victim)
    cancel = f"{server.url}{TASKS}/{victim.pk}/cancel"
    assert send("POST", cancel + q(view_token(victim))).status == 403
    assert send("POST", cancel).signature() == unknown_404(server.url).signature()
    bearer = {"Authorization": f"Bearer {view_token(victim)}"}
    assert send("POST", cancel, bearer).status == 403
    assert run_row(victim) == ("pending", None)
    assert send("POST", cancel, {"Authorization": f"Bearer {cancel_token(victim)}"}).status == 202


def test_the_default_policy_lets_users_do_what_their_permissions_allow(serve: Serve) -> None:
    server = serve("--no-worker", STREAMING_POLICY="none")
    users = {
        "superuser": make_user("root", superuser=True),
        "view+add+change": make_user("editor", "view", "add", "change"),
        "view": make_user("viewer", "view"),
        "none": make_user("nobody"),
        "staff, no permission": make_user("staff", is_staff=True),
        "inactive superuser": make_user("gone", superuser=True, is_active=False),
    }
    got = {name: try_everything(server.url, login(user)) for name, user in users.items()}
    assert flat(got) == flat(
        {
            "superuser": ALLOWED,
            "view+add+change": ALLOWED,
            "view": VIEWER,
            "none": REFUSED,
            "staff, no permission": REFUSED,
            "inactive superuser": REFUSED,
        }
    )


def test_django_users_needs_a_session_and_ignores_tokens(serve: Serve) -> None:
    server = serve("--no-worker", STREAMING_POLICY="streaming.policy.DjangoUsers")
    creator = make_user("creator", "add")
    clerk = make_user("clerk", "view", "change")
    got = {
        "anonymous": try_everything(server.url),
        "tokens": try_everything(server.url, token=lambda t, a: view_token(t)),
        "add": try_everything(server.url, login(creator)),
        "view+change": try_everything(server.url, login(clerk)),
        "superuser": try_everything(server.url, login(make_user("root", superuser=True))),
    }
    assert flat(got) == flat(
        {
            "anonymous": REFUSED,
            "tokens": REFUSED,
            # Starting needs seeing the task first: a creator who may not view gets the 404.
            "add": {**REFUSED, "create": 201},
            "view+change": {**VIEWER, "cancel": 202},
            "superuser": ALLOWED,
        }
    )


def test_a_session_is_refused_once_it_is_gone_or_its_password_changed(serve: Serve) -> None:
    server = serve("--no-worker", STREAMING_POLICY="streaming.policy.DjangoUsers")
    root = make_user("root", superuser=True)
    task = ScriptedTask.objects.create()
    enqueue(task)
    url = f"{server.url}/tasks/tests/ScriptedTask/{task.pk}"
    cookie = login(root)
    assert send("GET", url, cookie).status == 200
    root.set_password("changed")
    root.save()
    assert send("GET", url, cookie).signature() == unknown_404(server.url, cookie).signature()
    cookie = login(root)
    assert send("GET", url, cookie).status == 200
    Session.objects.all().delete()
    assert send("GET", url, cookie).status == 404


def test_signed_tokens_ignore_users(serve: Serve) -> None:
    server = serve("--no-worker", STREAMING_POLICY="streaming.policy.SignedTokens")
    root = login(make_user("root", superuser=True))

    def signed(task: Any, action: str) -> str:
        return cancel_token(task) if action == "cancel" else view_token(task)

    got = {
        "anonymous": try_everything(server.url),
        "superuser": try_everything(server.url, root),
        "tokens": try_everything(server.url, token=signed),
    }
    expected = {"anonymous": REFUSED, "superuser": REFUSED, "tokens": {**VIEWER, "cancel": 202}}
    assert flat(got) == flat(expected)


@pytest.mark.parametrize("policy", ["none", "streaming.policy.SignedTokens"])
@pytest.mark.parametrize("key", [PUBLIC_KEY, ""])
def test_a_public_secret_key_is_fatal_when_tokens_are_honoured(
    live_db: str, tmp_path: Path, policy: str, key: str
) -> None:
    env = support.child_env(live_db, STREAMING_POLICY=policy, DJANGO_SECRET_KEY=key)
    port = support.free_port()
    mp = support.start_manage(
        ["runserver_stream", "--host", "127.0.0.1", "--port", str(port)], env, tmp_path, port
    )
    try:
        code = mp.proc.wait(60)
    finally:
        mp.stop()
    assert code != 0
    log = mp.log()
    assert "SECRET_KEY" in log, log
    if key:
        assert "public" in log and "STREAMING['POLICY']" in log, log
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)


@pytest.mark.parametrize("policy", ["streaming.policy.AllowAll", "streaming.policy.DjangoUsers"])
def test_a_public_secret_key_is_accepted_by_policies_without_tokens(
    server_factory: Serve, policy: str
) -> None:
    server = server_factory("--no-worker", STREAMING_POLICY=policy, DJANGO_SECRET_KEY=PUBLIC_KEY)
    assert httpx.get(server.url + "/health").text == "OK"


# -- tokens ------------------------------------------------------------------------------------


def _flip_last(token: str) -> str:
    return token[:-1] + ("A" if token[-1] != "A" else "B")


def _swap_payload(token: str, onto: str) -> str:
    """``token``'s payload under ``onto``'s signature: a forged token."""
    return token.rsplit(":", 1)[0] + ":" + onto.rsplit(":", 1)[1]


def _forged_with_public_key(task: Any, settings: Any) -> str:
    real = settings.SECRET_KEY
    settings.SECRET_KEY = PUBLIC_KEY
    try:
        return view_token(task)
    finally:
        settings.SECRET_KEY = real


def test_every_bad_token_gets_the_404_of_an_unknown_task(serve: Serve, settings: Any) -> None:
    server = serve(STREAMING_POLICY="none")
    task, other = ScriptedTask.objects.create(ticks=3), ScriptedTask.objects.create(ticks=1)
    enqueue(task, other)
    wait_for_status(task, "completed")
    expired = view_token(task, expires_in=0.001)
    time.sleep(0.01)
    bad: dict[str, str | None] = {
        "missing": None,
        "empty": "",
        "junk": "junk",
        "flipped signature": _flip_last(view_token(task)),
        "payload of another task": _swap_payload(view_token(other), view_token(task)),
        "expired": expired,
        "for another task": view_token(other),
        "for another action": cancel_token(task),
        "forged with the public key": _forged_with_public_key(task, settings),
        "huge": "x" * 4000,
    }
    path = f"/tests/ScriptedTask/{task.pk}"
    reconnects: dict[str, dict[str, str]] = {
        "first connect": {},
        "first connect, SSE": SSE,
        "reconnect": {"Last-Event-ID": "1"} | SSE,
        "reconnect at the end": {"Last-Event-ID": "4"},
    }
    checked = 0
    for label, token in bad.items():
        for when, headers in reconnects.items():
            baseline = unknown_404(server.url, headers).signature()
            urls = [
                f"{server.url}/stream{path}{q(token)}",
                f"{server.url}/stream{path}{q(token) or '?'}&last_event_id=1",
                f"{server.url}/tasks{path}{q(token)}",
                f"{server.url}/watch{path}{q(token)}",
            ]
            for url in urls:
                assert send("GET", url, headers).signature() == baseline, (label, when, url)
                checked += 1
            if token:
                as_bearer = headers | {"Authorization": f"Bearer {token}"}
                got = send("GET", f"{server.url}/stream{path}", as_bearer).signature()
                assert got == baseline, (label, when, "bearer")
    assert checked == len(bad) * len(reconnects) * 4

    # The valid token, on first connect and on reconnect, in the query or as a bearer.
    good = view_token(task)
    for auth_query, auth_headers in ((q(good), {}), ("", {"Authorization": f"Bearer {good}"})):
        url = f"{server.url}/stream{path}{auth_query}"
        _, events = read_stream(url, auth_headers | SSE, timeout=20)
        assert [e.id for e in events] == [1, 2, 3, 4] and events[-1].event == "end"
        _, events = read_stream(url, auth_headers | {"Last-Event-ID": "1"}, timeout=20)
        assert [e.id for e in events] == [2, 3, 4]
        assert send("GET", url, auth_headers | {"Last-Event-ID": "4"}).status == 204
        summary = send("GET", url, auth_headers)
        assert summary.status == 200 and summary.json["status"] == "completed"
        status = send("GET", f"{server.url}/tasks{path}{auth_query}", auth_headers)
        assert status.status == 200 and status.json["last_seq"] == 4
    watch = send("GET", f"{server.url}/watch{path}{q(good)}")
    assert watch.status == 200
    assert f"/stream{path}?token={quote(good, safe='')}".encode() in watch.body
    assert watch.headers["referrer-policy"] == "no-referrer"  # the token stays on this page


def test_the_python_client_follows_a_stream_with_a_token(serve: Serve) -> None:
    server = serve(STREAMING_POLICY="none")
    task = ScriptedTask.objects.create(ticks=5, delay=0.01)
    enqueue(task)
    token = view_token(task)
    expired = view_token(task, expires_in=0.001)
    time.sleep(0.01)
    client = stream_client.StreamingClient(server.url)
    bearer = stream_client.StreamingClient(server.url, headers={"Authorization": f"Bearer {token}"})
    try:
        events = list(client.stream("tests", "ScriptedTask", task.pk, token=token))
        assert [e.id for e in events] == [1, 2, 3, 4, 5, 6] and events[-1].event == "end"
        tail = list(client.stream("tests", "ScriptedTask", task.pk, last_event_id=3, token=token))
        assert [e.id for e in tail] == [4, 5, 6]
        assert [e.id for e in bearer.stream("tests", "ScriptedTask", task.pk)] == [1, 2, 3, 4, 5, 6]
        status = bearer.get_task_status_sync("tests", "ScriptedTask", task.pk)
        assert status["status"] == "completed"
        for refused in (None, expired, "junk", cancel_token(task)):
            with pytest.raises(stream_client.TaskNotFound):
                list(client.stream("tests", "ScriptedTask", task.pk, token=refused))
        with pytest.raises(stream_client.TaskNotFound):
            client.get_task_status_sync("tests", "ScriptedTask", task.pk)

        async def follow() -> list[int]:
            try:
                events = client.astream("tests", "ScriptedTask", task.pk, 4, token)
                return [event.id async for event in events]  # through the end event
            finally:
                await client.aclose()  # its async client belongs to this loop

        assert asyncio.run(follow()) == [5, 6]
    finally:
        client.close()
        bearer.close()


# -- revocation of open streams ----------------------------------------------------------------


@dataclass
class Reader:
    """Follows one stream in a thread: what it got, and when the server ended it."""

    url: str
    headers: dict[str, str]
    status: int | None = None
    events: list[Event] = field(default_factory=list)
    opened_at: float | None = None
    ended_at: float | None = None
    error: BaseException | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Reader:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        wait_until(lambda: self.events or self.ended_at, 15, "the stream to open")
        assert self.status == 200, self.status
        return self

    def _run(self) -> None:
        timeout = httpx.Timeout(10, read=30)
        try:
            with (
                httpx.Client(timeout=timeout) as client,
                client.stream("GET", self.url, headers=self.headers) as resp,
            ):
                self.status = resp.status_code
                self.opened_at = time.monotonic()
                buf = ""
                for chunk in resp.iter_text():
                    buf += chunk
                    end = buf.rfind("\n\n")
                    self.events = parse_sse(buf[: end + 2]) if end >= 0 else []
                    if self._stop.is_set():
                        return
        except BaseException as exc:
            self.error = exc
        finally:
            if not self._stop.is_set():
                self.ended_at = time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)


@pytest.fixture
def readers() -> Iterator[list[Reader]]:
    started: list[Reader] = []
    yield started
    for reader in started:
        reader.stop()


LONG = {"ticks": 5000, "delay": 0.02}  # 100 s of ticks: never over during a test
RECHECK = "0.2"


def test_an_expiring_token_ends_its_open_stream(serve: Serve, readers: list[Reader]) -> None:
    server = serve(STREAMING_POLICY="none", STREAMING_POLICY_RECHECK_INTERVAL=RECHECK)
    task = ScriptedTask.objects.create(**LONG)
    enqueue(task)
    made = time.monotonic()
    token = view_token(task, expires_in=2)  # expires within 1-2 s (a whole-second expiry)
    path = f"/stream/tests/ScriptedTask/{task.pk}"
    reader = Reader(f"{server.url}{path}{q(token)}", SSE).start()
    readers.append(reader)
    wait_until(lambda: reader.ended_at, 6, "the stream to end once its token expired")
    assert reader.ended_at is not None and reader.ended_at - made < 2 + 1.5
    assert reader.error is None
    assert reader.events and reader.events[-1].event == "tick"  # cut: the task goes on
    last = reader.events[-1].id
    assert last is not None
    again = send("GET", f"{server.url}{path}{q(token)}", {"Last-Event-ID": str(last)})
    assert again.signature() == unknown_404(server.url, {"Last-Event-ID": str(last)}).signature()
    # A new token resumes exactly where the cut stream stopped.
    fresh = Reader(f"{server.url}{path}{q(view_token(task))}", {"Last-Event-ID": str(last)})
    readers.append(fresh.start())
    wait_until(lambda: fresh.events, 10, "events after the resume")
    assert fresh.events[0].id == last + 1
    assert run_row(task) == ("running", None)


def _remove_permission(user: User) -> None:
    user.user_permissions.clear()


def _deactivate(user: User) -> None:
    user.is_active = False
    user.save()


def _log_out(user: User) -> None:
    Session.objects.all().delete()


def _change_password(user: User) -> None:
    user.set_password("a new one")
    user.save()


@pytest.mark.parametrize(
    "revoke",
    [_remove_permission, _deactivate, _log_out, _change_password],
    ids=lambda f: f.__name__,
)
def test_revoking_a_user_ends_their_open_stream(
    serve: Serve, readers: list[Reader], revoke: Callable[[User], None]
) -> None:
    server = serve(
        STREAMING_POLICY="streaming.policy.DjangoUsers",
        STREAMING_POLICY_RECHECK_INTERVAL=RECHECK,
    )
    viewer = make_user("viewer", "view")
    task = ScriptedTask.objects.create(**LONG)
    enqueue(task)
    url = f"{server.url}/stream/tests/ScriptedTask/{task.pk}"
    reader = Reader(url, login(viewer) | SSE).start()
    readers.append(reader)
    wait_until(lambda: len(reader.events) >= 3, 10, "a few events")
    revoked = time.monotonic()
    revoke(viewer)
    ended = wait_until(lambda: reader.ended_at, 5, f"the stream to end after {revoke.__name__}")
    assert ended - revoked < 0.2 + 2.0
    assert reader.events[-1].event == "tick"


def test_the_recheck_keeps_streams_that_are_still_allowed(
    serve: Serve, readers: list[Reader]
) -> None:
    server = serve(
        STREAMING_POLICY="none", STREAMING_POLICY_RECHECK_INTERVAL=RECHECK
    )  # tokens and users
    viewer = make_user("viewer", "view")
    task = ScriptedTask.objects.create(**LONG)
    enqueue(task)
    url = f"{server.url}/stream/tests/ScriptedTask/{task.pk}"
    by_user = Reader(url, login(viewer) | SSE).start()
    by_token = Reader(url + q(view_token(task, expires_in=600)), SSE).start()
    readers.extend([by_user, by_token])
    time.sleep(2.0)  # ten rechecks
    for reader in (by_user, by_token):
        assert reader.ended_at is None and reader.error is None
        _wait_for_more(reader)


def _wait_for_more(reader: Reader) -> None:
    count = len(reader.events)
    wait_until(lambda: len(reader.events) > count, 5, "more events")


# -- Host --------------------------------------------------------------------------------------


def test_a_malformed_host_header_is_400(server_factory: Serve) -> None:
    """tests/settings.py sets ALLOWED_HOSTS = ["*"] (no environment override): only malformed
    or missing Host headers can be refused here; guard.host_allowed has unit tests."""
    server = server_factory("--no-worker")
    task = ScriptedTask.objects.create()
    before = ScriptedTask.objects.count()
    for host in ("bad_host", "ex@mple.com", "example.com:port"):
        for method, path, body in (
            ("GET", "/health", None),
            ("GET", f"/stream/tests/ScriptedTask/{task.pk}", None),
            ("GET", "/metrics", None),
            ("POST", TASKS, {"ticks": 1}),
            ("OPTIONS", TASKS, None),
        ):
            answer = send(method, server.url + path, {"Host": host}, json_body=body)
            assert answer.status == 400, (host, path)
            assert answer.json == {"error": "invalid Host header"}
    assert ScriptedTask.objects.count() == before
    assert run_row(task) is None
    assert send("GET", server.url + "/health", {"Host": "any.example:8000"}).status == 200
    # HTTP/1.0 without any Host header.
    with socket.create_connection(("127.0.0.1", server.port or 0), timeout=5) as sock:
        sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 400"), reply[:100]


# -- CORS --------------------------------------------------------------------------------------

GOOD = "http://good.example"
CORS_ENV = {
    "STREAMING_CORS_ALLOWED_ORIGINS": f"{GOOD}, http://also.example",
    "STREAMING_ALLOWED_ORIGINS": "http://poster.example",
}


def _cors(answer: Answer) -> dict[str, str]:
    return {k: v for k, v in answer.headers.items() if k.startswith("access-control-")}


def _every_answer(base: str, origin: str | None) -> dict[str, Answer]:
    task = ScriptedTask.objects.create()
    victim = ScriptedTask.objects.create()
    enqueue(task, victim)
    headers = {"Origin": origin} if origin else {}
    return {
        "status": send("GET", f"{base}/tasks/tests/ScriptedTask/{task.pk}", headers),
        "unknown": send("GET", f"{base}/tasks/tests/ScriptedTask/987654321", headers),
        "stream": send("GET", f"{base}/stream/tests/ScriptedTask/{task.pk}", headers | SSE),
        "create": send("POST", base + TASKS, headers, json_body={"ticks": 1}),
        "cancel": send("POST", f"{base}{TASKS}/{victim.pk}/cancel", headers),
        "bad request": send("GET", f"{base}/stream/tests/ScriptedTask/x", headers),
        "preflight": send(
            "OPTIONS",
            base + TASKS,
            headers
            | {
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        ),
    }


def test_cors_echoes_allowed_origins_only(server_factory: Serve) -> None:
    server = server_factory("--no-worker", **CORS_ENV)
    allowed = _every_answer(server.url, GOOD)
    assert {k: a.status for k, a in allowed.items()} == {
        "status": 200,
        "unknown": 404,
        "stream": 200,
        "create": 201,
        "cancel": 202,
        "bad request": 400,
        "preflight": 204,
    }
    for what, answer in allowed.items():
        assert answer.headers["access-control-allow-origin"] == GOOD, what
        assert "Origin" in answer.headers["vary"], what
        assert "access-control-allow-credentials" not in answer.headers, what
        assert "*" not in answer.headers.values(), what
    preflight = allowed["preflight"]
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "content-type" in preflight.headers["access-control-allow-headers"]
    assert preflight.body == b""

    also = send("OPTIONS", server.url + TASKS, {"Origin": "http://also.example"})
    assert also.status == 204
    assert also.headers["access-control-allow-origin"] == "http://also.example"

    for origin in ("http://evil.example", "null", f"{GOOD}.evil.example", "http://poster.example"):
        refused = _every_answer(server.url, origin)
        for what, answer in refused.items():
            assert _cors(answer) == {}, (origin, what)
        assert refused["preflight"].status == 403, origin
        may_post = origin == "http://poster.example"  # ALLOWED_ORIGINS: may post, no CORS
        assert refused["create"].status == (201 if may_post else 403), origin
        assert refused["cancel"].status == (202 if may_post else 403), origin
    no_origin = _every_answer(server.url, None)
    assert all(_cors(a) == {} for a in no_origin.values())
    assert no_origin["preflight"].status == 403


def test_cors_credentials_only_when_allowed(server_factory: Serve) -> None:
    server = server_factory(
        "--no-worker", STREAMING_CORS_ALLOW_CREDENTIALS="1", STREAMING_CORS_ALLOWED_ORIGINS=GOOD
    )
    for what, answer in _every_answer(server.url, GOOD).items():
        assert answer.headers["access-control-allow-credentials"] == "true", what
        assert answer.headers["access-control-allow-origin"] == GOOD, what
    for what, answer in _every_answer(server.url, "http://evil.example").items():
        assert _cors(answer) == {}, what


# -- CSRF without a browser: what a cross-site page can send -----------------------------------


def test_posts_are_json_from_no_page_the_same_origin_or_an_allowed_one(
    server_factory: Serve,
) -> None:
    server = server_factory("--no-worker", STREAMING_ALLOWED_ORIGINS="http://poster.example")
    victim = ScriptedTask.objects.create()
    enqueue(victim)
    before = ScriptedTask.objects.count()
    body = b'{"ticks": 1}'
    cancel = f"{server.url}{TASKS}/{victim.pk}/cancel"
    evil = {"Origin": "http://evil.example"}
    refusals = {
        "text/plain": ("POST", server.url + TASKS, {"Content-Type": "text/plain"}, 415),
        "form": (
            "POST",
            server.url + TASKS,
            {"Content-Type": "application/x-www-form-urlencoded"},
            415,
        ),
        "multipart": ("POST", server.url + TASKS, {"Content-Type": "multipart/form-data"}, 415),
        "no content type": ("POST", server.url + TASKS, {}, 415),
        "json lookalike": ("POST", server.url + TASKS, {"Content-Type": "application/jsonx"}, 415),
        "json from evil": (
            "POST",
            server.url + TASKS,
            evil | {"Content-Type": "application/json"},
            403,
        ),
        "json from null": (
            "POST",
            server.url + TASKS,
            {"Origin": "null", "Content-Type": "application/json"},
            403,
        ),
        "cancel as text/plain": ("POST", cancel, {"Content-Type": "text/plain"}, 415),
        "cancel as a form": (
            "POST",
            cancel,
            {"Content-Type": "application/x-www-form-urlencoded"},
            415,
        ),
        "cancel from evil": ("POST", cancel, evil, 403),
        "cancel json from evil": ("POST", cancel, evil | {"Content-Type": "application/json"}, 403),
    }
    for what, (method, url, headers, status) in refusals.items():
        answer = send(method, url, headers, content=body if url.endswith(TASKS) else b"")
        assert answer.status == status, (what, answer.status, answer.body)
    assert ScriptedTask.objects.count() == before
    assert run_row(victim) == ("pending", None)
    # Allowed: no Origin (curl), the same origin, an allowed origin; JSON with a charset.
    same = {"Origin": server.url}
    for headers in (
        {},
        same,
        {"Origin": "http://poster.example"},
        {"Content-Type": "application/json; charset=utf-8"},
    ):
        answer = send(
            "POST", server.url + TASKS, {"Content-Type": "application/json"} | headers, content=body
        )
        assert answer.status == 201, (headers, answer.body)
    assert ScriptedTask.objects.count() == before + 4
    assert send("POST", cancel, same).status == 202


def test_an_oversized_body_is_413(server_factory: Serve) -> None:
    server = server_factory("--no-worker", STREAMING_MAX_BODY_BYTES="200")
    before = ScriptedTask.objects.count()
    big = json.dumps({"ticks": 1, "result": "x" * 500}).encode()
    as_json = {"Content-Type": "application/json"}
    assert send("POST", server.url + TASKS, as_json, content=big).status == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: a chunked body
        yield big[:100]
        yield big[100:]

    with httpx.Client(timeout=10) as client:
        chunked = client.post(server.url + TASKS, headers=as_json, content=chunks())
    assert chunked.status_code == 413
    assert ScriptedTask.objects.count() == before
    small = json.dumps({"ticks": 1, "result": "x" * 50}).encode()
    assert send("POST", server.url + TASKS, as_json, content=small).status == 201


def test_a_body_nested_too_deeply_is_400(server_factory: Serve) -> None:
    server = server_factory("--no-worker")
    as_json = {"Content-Type": "application/json"}
    for levels in (65, 5000):  # 5000: past the recursion limit, which json.loads ignores
        body = ('{"ticks": 1, "result": ' + "[" * levels + "]" * levels + "}").encode()
        answer = send("POST", server.url + TASKS, as_json, content=body)
        assert answer.status == 400, (levels, answer.body)
        assert b"nests deeper" in answer.body
    body = ('{"ticks": 1, "result": ' + "[" * 60 + "]" * 60 + "}").encode()
    assert send("POST", server.url + TASKS, as_json, content=body).status == 201


# -- /metrics ----------------------------------------------------------------------------------


def test_metrics_are_served_to_loopback_by_default(server_factory: Serve) -> None:
    server = server_factory("--no-worker")
    answer = send("GET", server.url + "/metrics")
    assert answer.status == 200 and b"http_requests_total" in answer.body


def test_metrics_elsewhere_need_the_token(server_factory: Serve) -> None:
    server = server_factory(
        "--no-worker",
        STREAMING_METRICS_ALLOWED_ADDRESSES="10.0.0.0/8",
        STREAMING_METRICS_TOKEN="metrics-s3cret",
    )
    not_found = unknown_404(server.url).signature()
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic metrics-s3cret"},
        {"Authorization": "Bearer metrics-s3cre"},
        {"Authorization": "metrics-s3cret"},
    ):
        assert send("GET", server.url + "/metrics", headers).signature() == not_found, headers
    for auth in ("Bearer metrics-s3cret", "bearer metrics-s3cret"):
        answer = send("GET", server.url + "/metrics", {"Authorization": auth})
        assert answer.status == 200 and b"http_refused_total" in answer.body


def test_without_a_proxy_header_forwarded_addresses_are_ignored(server_factory: Serve) -> None:
    """No PROXY_HEADER: the peer is the client, whatever X-Forwarded-For says (for /metrics and
    the quotas alike), even from a loopback peer."""
    server = server_factory("--no-worker", STREAMING_CREATES_PER_MINUTE="1")
    forged = send("GET", server.url + "/metrics", {"X-Forwarded-For": "203.0.113.5"})
    assert forged.status == 200
    first = send("POST", server.url + TASKS, {"X-Forwarded-For": "198.51.100.1"}, json_body={})
    second = send("POST", server.url + TASKS, {"X-Forwarded-For": "198.51.100.2"}, json_body={})
    assert (first.status, second.status) == (201, 429)


def test_metrics_see_the_forwarded_client_behind_a_trusted_proxy(server_factory: Serve) -> None:
    server = server_factory("--no-worker", STREAMING_PROXY_HEADER="X-Forwarded-For")
    for forwarded, status in (
        ("203.0.113.5", 404),
        ("127.0.0.1, 203.0.113.5", 404),  # a forged loopback hop before the real client
        ("127.0.0.1", 200),
        ("", 200),
    ):
        answer = send("GET", server.url + "/metrics", {"X-Forwarded-For": forwarded})
        assert answer.status == status, forwarded


# -- quotas ------------------------------------------------------------------------------------


def _open(client: httpx.Client, url: str, headers: dict[str, str] | None = None) -> httpx.Response:
    """A stream opened and left unread (the caller closes it)."""
    return client.send(client.build_request("GET", url, headers=(headers or {}) | SSE), stream=True)


def test_open_streams_are_capped_per_client(server_factory: Serve) -> None:
    server = server_factory("--no-worker", STREAMING_MAX_STREAMS_PER_CLIENT="2")
    first, second = ScriptedTask.objects.create(), ScriptedTask.objects.create()
    enqueue(first, second)
    url = f"{server.url}/stream/tests/ScriptedTask/"
    with httpx.Client(timeout=10) as client:
        a = _open(client, url + str(first.pk))
        b = _open(client, url + str(second.pk))
        assert (a.status_code, b.status_code) == (200, 200)
        for pk in (first.pk, second.pk):
            over = _open(client, url + str(pk))
            over.read()
            assert over.status_code == 429 and over.headers["retry-after"]
        # Status and creation are not streams: still served.
        assert client.get(f"{server.url}/tasks/tests/ScriptedTask/{first.pk}").status_code == 200
        a.close()

        def reopened() -> httpx.Response | None:
            c = _open(client, url + str(first.pk))
            if c.status_code == 200:
                return c
            c.read()
            c.close()
            return None

        c = wait_until(reopened, 5, "the closed stream's slot to be free")
        over = _open(client, url + str(first.pk))
        over.read()
        assert over.status_code == 429
        b.close()
        c.close()


def test_creations_are_capped_per_client_and_minute(server_factory: Serve) -> None:
    server = server_factory("--no-worker", STREAMING_CREATES_PER_MINUTE="3")
    before = ScriptedTask.objects.count()
    got = [send("POST", server.url + TASKS, json_body={"ticks": 1}).status for _ in range(5)]
    assert got == [201, 201, 201, 429, 429]
    over = send("POST", server.url + TASKS, json_body={"ticks": 1})
    assert over.headers["retry-after"] == "60"
    assert ScriptedTask.objects.count() == before + 3
    # Another model: the same address, the same quota.
    assert send("POST", server.url + "/tasks/tests/ExampleTask", json_body={}).status == 429


def test_active_tasks_are_capped_per_model(server_factory: Serve) -> None:
    server = server_factory("--no-worker", STREAMING_MAX_ACTIVE_PER_MODEL="2")
    got = [send("POST", server.url + TASKS, json_body={"ticks": 1}) for _ in range(3)]
    assert [a.status for a in got] == [201, 201, 429]
    assert got[2].headers["retry-after"] == "10"
    assert ScriptedTask.objects.count() == 2
    # Another model has its own cap.
    assert send("POST", server.url + "/tasks/tests/ExampleTask", json_body={}).status == 201
    assert ExampleTask.objects.count() == 1
    # A finished (cancelled) task frees its place.
    first = got[0].json["id"]
    assert send("POST", f"{server.url}{TASKS}/{first}/cancel").status == 202
    assert send("POST", server.url + TASKS, json_body={"ticks": 1}).status == 201


def test_quotas_count_the_forwarded_client_of_a_trusted_proxy(server_factory: Serve) -> None:
    server = server_factory(
        "--no-worker",
        STREAMING_PROXY_HEADER="x-forwarded-for",
        STREAMING_CREATES_PER_MINUTE="1",
        STREAMING_MAX_STREAMS_PER_CLIENT="1",
    )

    def create(forwarded: str | None) -> int:
        headers = {"X-Forwarded-For": forwarded} if forwarded is not None else {}
        return send("POST", server.url + TASKS, headers, json_body={"ticks": 1}).status

    assert create("198.51.100.1") == 201
    assert create("198.51.100.2") == 201
    assert create("198.51.100.1") == 429
    assert create("198.51.100.9, 198.51.100.1") == 429  # a forged first hop changes nothing
    assert create("198.51.100.1, 198.51.100.3") == 201  # the proxy's hop is the client
    assert create(None) == 201  # the proxy itself (the peer)
    assert create("127.0.0.1") == 429  # the header says: the proxy's own address

    task = ScriptedTask.objects.create()
    enqueue(task)
    url = f"{server.url}/stream/tests/ScriptedTask/{task.pk}"
    with httpx.Client(timeout=10) as client:
        a = _open(client, url, {"X-Forwarded-For": "198.51.100.1"})
        b = _open(client, url, {"X-Forwarded-For": "198.51.100.2"})
        c = _open(client, url, {"X-Forwarded-For": "198.51.100.1"})
        c.read()
        assert (a.status_code, b.status_code, c.status_code) == (200, 200, 429)
        a.close()
        b.close()


def test_quotas_ignore_the_header_of_an_untrusted_peer(server_factory: Serve) -> None:
    server = server_factory(
        "--no-worker",
        STREAMING_PROXY_HEADER="x-forwarded-for",
        STREAMING_PROXY_TRUSTED="192.0.2.1/32",
        STREAMING_CREATES_PER_MINUTE="1",
        STREAMING_MAX_STREAMS_PER_CLIENT="1",
    )
    first = send("POST", server.url + TASKS, {"X-Forwarded-For": "198.51.100.1"}, json_body={})
    second = send("POST", server.url + TASKS, {"X-Forwarded-For": "198.51.100.2"}, json_body={})
    assert (first.status, second.status) == (201, 429)
    task = ScriptedTask.objects.create()
    enqueue(task)
    url = f"{server.url}/stream/tests/ScriptedTask/{task.pk}"
    with httpx.Client(timeout=10) as client:
        a = _open(client, url, {"X-Forwarded-For": "198.51.100.1"})
        b = _open(client, url, {"X-Forwarded-For": "198.51.100.2"})
        b.read()
        assert (a.status_code, b.status_code) == (200, 429)
        a.close()
