"""Helpers for your own test suites: run a task to its end inside a test, leave nothing open.

A worker claims and runs a task on connections of its own, so a test that runs tasks must
commit the task's row: use ``django.test.TransactionTestCase`` (or pytest-django's
``transactional_db``), never the plain ``TestCase``, whose test runs inside one transaction
that nothing else can see. The helpers check this and fail at once, saying so.

``run_task(task, timeout=30.0)`` (sync) and ``await arun_task(task, timeout=30.0)`` queue
the task, claim and run it in this process, wait until it is completed, failed or
cancelled, close what they opened for it (the runtime they started on the event loop, with
its pool and LISTEN connection; Django connections they opened in asgiref's thread; an
async caller's coordinator sync connection), and return the task refreshed from the
database: assert on ``task.status``, ``task.final_value``, ``task.error`` and
``task.events()``. A task still unfinished after ``timeout`` seconds is cancelled and
``TaskTimeout`` (an ``AssertionError``) says which state it was in.

Django's test runner (``manage.py test``)::

    from django.test import TransactionTestCase
    from streaming.testing import StreamingTestMixin

    from shop.models import Report


    class ReportTests(StreamingTestMixin, TransactionTestCase):
        def test_report(self):
            report = self.run_task(Report.objects.create(title="Q3"))
            self.assertEqual(report.status, "completed")
            self.assertEqual(report.final_value, {"pages": 10})

        async def test_report_async(self):
            report = await self.arun_task(await Report.objects.acreate(title="Q4"))
            self.assertEqual(report.status, "completed")

pytest with pytest-django: enable the plugin in your ``conftest.py`` (there is no entry
point, so nothing changes for projects that do not ask for it)::

    pytest_plugins = ["streaming.testing"]

then use the ``streaming_tasks`` fixture (it brings pytest-django's ``transactional_db``)::

    def test_report(streaming_tasks):
        report = streaming_tasks.run(Report.objects.create(title="Q3"), timeout=10)
        assert report.status == "completed"


    @pytest.mark.asyncio
    async def test_report_async(streaming_tasks):
        report = await streaming_tasks.arun(await Report.objects.acreate(title="Q4"))
        assert [e["type"] for e in await report.aevents()][-1] == "end"

Everything either form opened is closed when it returns, and the mixin and the fixture close
what the test's own calls left (``close_connections()``), so ``manage.py test`` and pytest
can drop the test database at the end. Importing this module needs neither pytest nor
Django's settings.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from asgiref.sync import SyncToAsync, async_to_sync, sync_to_async
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.models import Model

from streaming import registry, runtime
from streaming.coordinator import coordinator
from streaming.events import Status, TaskKey
from streaming.exceptions import StreamingError
from streaming.runs import Run

if TYPE_CHECKING:
    from django.test import TransactionTestCase as _MixinBase
else:
    _MixinBase = object

__all__ = [
    "StreamingTasks",
    "StreamingTestMixin",
    "TaskNotCommitted",
    "TaskTimeout",
    "arun_task",
    "close_connections",
    "run_task",
]

T = TypeVar("T", bound=Model)

DEFAULT_TIMEOUT = 30.0
_CANCEL_WAIT = 5.0  # seconds a timed-out task is given to end once cancelled

NOT_COMMITTED = (
    "{call} was called inside django.test.TestCase's transaction: the task's row is not "
    "committed, so the worker, which runs it on connections of its own, cannot see it, and "
    "the task would stay pending. Use django.test.TransactionTestCase with "
    "streaming.testing.StreamingTestMixin (self.run_task), or with pytest-django "
    "@pytest.mark.django_db(transaction=True) / the transactional_db fixture, or the "
    "streaming_tasks fixture (pytest_plugins = ['streaming.testing'])."
)


class TaskNotCommitted(StreamingError, RuntimeError):
    """A helper was called inside ``TestCase``'s transaction, where no worker sees the task."""


class TaskTimeout(AssertionError):
    """The task did not finish in time (it has been cancelled); the message says its state."""


# -- running a task --------------------------------------------------------------------------


def run_task(task: T, timeout: float = DEFAULT_TIMEOUT) -> T:
    """Run ``task`` to its end in this process (sync); the task, refreshed from the database.

    Raises ``TaskNotCommitted`` inside ``django.test.TestCase`` and ``TaskTimeout`` when the
    task is not finished after ``timeout`` seconds. From async code, ``await arun_task``.
    """
    _refuse_uncommitted(task, "run_task()")
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError("run_task() is sync; on an event loop use: await arun_task(task)")
    # The coroutine runs on a new event loop in a thread of asgiref's, and the ORM calls it
    # makes come back to this thread, onto the test's own connection: none is opened.
    result: T = async_to_sync(_arun)(task, timeout)
    return result


async def arun_task(task: T, timeout: float = DEFAULT_TIMEOUT) -> T:
    """``run_task`` for async tests: runs ``task`` on this event loop; the refreshed task."""
    await sync_to_async(_refuse_uncommitted)(task, "arun_task()")
    try:
        return await _arun(task, timeout)
    finally:
        coordinator.close()  # this thread's sync connection, if the test opened one


async def _arun(task: T, timeout: float) -> T:
    key = registry.key_of(task)
    opened_before = await sync_to_async(_open_aliases)()
    rt = runtime.existing()
    owned = rt is None  # the runtime is ours to close only if this call started it
    try:
        if rt is None:
            rt = await runtime.current()
        run_id = await coordinator.enqueue(task)
        # False when another worker got it first, or it is finished: it is waited for anyway.
        await rt.worker.claim(run_id)
        run = await _wait_finished(rt, key, timeout)
        if run is None or not run.finished:
            cancelled = await coordinator.cancel_task(key.app_label, key.model_name, key.task_id)
            after = await _wait_finished(rt, key, _CANCEL_WAIT)
            ended = after is not None and after.finished
            if cancelled or not ended:  # else it finished on its own, just at the deadline
                name = type(task).__name__
                raise TaskTimeout(_timeout_message(name, key, run, timeout, ended))
        await task.arefresh_from_db()
        return task
    finally:
        if owned:
            await runtime.shutdown()
        await sync_to_async(_close_opened_since)(opened_before)


async def _wait_finished(rt: runtime.Runtime, key: TaskKey, timeout: float) -> Run | None:
    """The task's run once it is finished, or as it is when ``timeout`` seconds have passed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pause = 0.005
    while True:
        run = await rt.store.get(key)
        left = deadline - loop.time()
        if (run is not None and run.finished) or left <= 0:
            return run
        await asyncio.sleep(min(pause, left))
        pause = min(pause * 2, 0.05)


def _timeout_message(
    name: str, key: TaskKey, run: Run | None, timeout: float, cancelled: bool
) -> str:
    head = f"{name} {key.task_id} ({key.path}) did not finish within {timeout:g}s"
    if run is None:
        return f"{head}: it was never queued"
    state = f"it was still {run.status} (attempt {run.attempt}, {run.last_seq} event(s) logged)"
    if run.status == Status.PENDING:
        state += ", claimed by no worker"
    end = "it has been cancelled" if cancelled else "it was asked to cancel"
    return f"{head}: {state}; {end}"


# -- the TestCase check and cleanup ----------------------------------------------------------


def _refuse_uncommitted(task: Any, call: str = "run_task()") -> None:
    """Raise ``TaskNotCommitted`` when this thread is inside ``TestCase``'s transaction.

    Django's ``TestCase`` (and pytest-django's ``db`` fixture) wrap each test in atomic
    blocks marked ``_from_testcase``; rows written there are invisible to other connections.
    """
    state = getattr(task, "_state", None)
    aliases = {DEFAULT_DB_ALIAS, getattr(state, "db", None) or DEFAULT_DB_ALIAS}
    for alias in sorted(aliases):
        conn = connections[alias]
        if conn.in_atomic_block and any(
            getattr(block, "_from_testcase", False) for block in conn.atomic_blocks
        ):
            raise TaskNotCommitted(NOT_COMMITTED.format(call=call))


def _open_aliases() -> set[str]:
    """The aliases whose Django connection is open in this thread."""
    return {c.alias for c in connections.all(initialized_only=True) if c.connection is not None}


def _close_opened_since(before: set[str]) -> None:
    """Close this thread's Django connections opened since ``before`` was taken."""
    for alias in _open_aliases() - before:
        connections[alias].close()


def close_connections() -> None:
    """Close what the library and the async ORM left open for this test (sync; teardown).

    The coordinator's sync connection, and the Django connections of asgiref's ORM thread
    (where ``sync_to_async`` runs the ORM for async code outside ``async_to_sync``). The
    test's own Django connection is left to the test framework.
    """
    coordinator.close()
    if SyncToAsync.deadlock_context.get(False):
        connections.close_all()  # called through sync_to_async: this is that thread
    else:
        SyncToAsync.single_thread_executor.submit(connections.close_all).result(timeout=30)


# -- Django's test runner --------------------------------------------------------------------


class StreamingTestMixin(_MixinBase):
    """For ``TransactionTestCase`` subclasses: ``self.run_task`` and a cleanup of connections.

    ``class ReportTests(StreamingTestMixin, TransactionTestCase)``. After each test (also
    when ``setUp`` is overridden without ``super()``, once a task was run) the library's
    connections are closed, so the test database can be dropped at the end of the run.
    """

    _streaming_cleanup = False

    def setUp(self) -> None:
        super().setUp()
        self._close_streaming_after_test()

    def run_task(self, task: T, timeout: float = DEFAULT_TIMEOUT) -> T:
        """Run ``task`` to its end; the task refreshed (see ``streaming.testing.run_task``)."""
        self._close_streaming_after_test()
        return run_task(task, timeout)

    async def arun_task(self, task: T, timeout: float = DEFAULT_TIMEOUT) -> T:
        """The async form, for ``async def`` test methods."""
        self._close_streaming_after_test()
        return await arun_task(task, timeout)

    def _close_streaming_after_test(self) -> None:
        if not self._streaming_cleanup:
            self._streaming_cleanup = True
            self.addCleanup(close_connections)


# -- pytest ----------------------------------------------------------------------------------


class StreamingTasks:
    """What the ``streaming_tasks`` fixture gives a test: ``run`` and ``arun`` tasks."""

    def __init__(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.timeout = timeout

    def run(self, task: T, timeout: float | None = None) -> T:
        """``run_task`` with this fixture's default timeout."""
        return run_task(task, self.timeout if timeout is None else timeout)

    async def arun(self, task: T, timeout: float | None = None) -> T:
        """``arun_task`` with this fixture's default timeout."""
        return await arun_task(task, self.timeout if timeout is None else timeout)

    def close(self) -> None:
        close_connections()


try:
    import pytest
except ImportError:  # Django's test runner needs no pytest
    pass
else:

    @pytest.fixture
    def streaming_tasks(transactional_db: None) -> Iterator[StreamingTasks]:
        """Run tasks to their end in a test (committed rows: ``transactional_db``)."""
        tasks = StreamingTasks()
        try:
            yield tasks
        finally:
            tasks.close()
