"""Housekeeping on the log: deleting old finished tasks with their runs and events."""

from __future__ import annotations

import logging

from streaming.db import Database

logger = logging.getLogger(__name__)


async def delete_finished_before(db: Database, hours: float, dry_run: bool = False) -> int:
    """Delete tasks finished more than ``hours`` ago (row, run, events); how many."""
    rows = await db.fetchall("old_runs", {"hours": hours})
    if dry_run:
        return len(rows)
    for run_id, app_label, model_name, task_id, db_table, pk_column in rows:
        await db.delete_task(run_id, app_label, model_name, task_id, db_table, pk_column)
        logger.info("deleted task %s/%s/%s", app_label, model_name, task_id)
    return len(rows)
