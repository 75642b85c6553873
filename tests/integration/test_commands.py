"""The management commands that are not servers: cleanup_old_tasks and create_task."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from streaming.coordinator import coordinator
from tests.models import ExampleTask, ScriptedTask
from tests.support import sql, wait_for_status

pytestmark = pytest.mark.django_db(transaction=True)


async def test_cleanup_old_tasks_deletes_old_finished_tasks_with_their_logs(
    rt: Any,
    manage: Callable[..., str],
) -> None:
    old, recent, running = [await ScriptedTask.objects.acreate(ticks=2) for _ in range(3)]
    running.ticks, running.delay = 1000, 0.05
    await running.asave()
    for t in (old, recent, running):
        await coordinator.start_task(t)
    await wait_for_status(rt, old)
    await wait_for_status(rt, recent)
    sql(
        "UPDATE streaming_taskrun SET finished_at = now() - interval '3 hours' "
        "WHERE model_name = 'ScriptedTask' AND task_id = %s",
        old.pk,
    )

    dry = manage("cleanup_old_tasks", "--hours", "2", "--dry-run")
    assert "Would delete 1 finished task(s)" in dry
    assert sql(
        "SELECT count(*) FROM streaming_taskevent WHERE task_id = %s "
        "AND model_name = 'ScriptedTask'",
        old.pk,
    ) == [(3,)]

    out = manage("cleanup_old_tasks", "--hours", "2")
    assert "Deleted 1 finished task(s)" in out
    assert not await ScriptedTask.objects.filter(pk=old.pk).aexists()
    assert sql(
        "SELECT count(*) FROM streaming_taskevent WHERE task_id = %s "
        "AND model_name = 'ScriptedTask'",
        old.pk,
    ) == [(0,)]
    assert sql(
        "SELECT count(*) FROM streaming_taskrun WHERE task_id = %s AND model_name = 'ScriptedTask'",
        old.pk,
    ) == [(0,)]
    assert await ScriptedTask.objects.filter(pk__in=[recent.pk, running.pk]).acount() == 2
    await running.acancel()


def test_cleanup_rejects_bad_hours(manage: Callable[..., str]) -> None:
    with pytest.raises(AssertionError, match="--hours must be positive"):
        manage("cleanup_old_tasks", "--hours", "0")


def test_create_task_no_start_creates_without_queueing(manage: Callable[..., str]) -> None:
    out = manage("create_task", "--no-start", "--message", "later")
    task_id = int(out.split("Created ExampleTask ")[1].split()[0])
    task = ExampleTask.objects.get(pk=task_id)
    assert task.message == "later" and task.status == "pending"
    assert sql(
        "SELECT count(*) FROM streaming_taskrun WHERE task_id = %s AND model_name = 'ExampleTask'",
        task_id,
    ) == [(0,)]
