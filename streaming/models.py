"""StreamTask, the abstract model users subclass, and read-only models of the log tables."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Generator
from typing import Any, ClassVar

from django.db import models

from streaming import registry
from streaming.coordinator import coordinator
from streaming.events import Status

STATUS_CHOICES = [(s.value, s.value) for s in Status]


class StreamTask(models.Model):
    """A long-running task: subclass it, add fields, implement ``async process()``."""

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    final_value = models.JSONField(null=True, blank=True)
    # Run state, mirrored from streaming_taskrun by a trigger in the same transaction.
    status = models.CharField(
        max_length=16, choices=STATUS_CHOICES, default="pending", editable=False
    )
    attempt = models.PositiveIntegerField(default=0, editable=False)
    started_at = models.DateTimeField(null=True, blank=True, editable=False)
    error = models.JSONField(null=True, blank=True, editable=False)

    #: Attempts before a task whose worker keeps dying is failed (None: the setting).
    max_attempts: ClassVar[int | None] = None
    #: Seconds ``process()`` may run before it is stopped with a TimeoutError.
    timeout: ClassVar[float | None] = None
    #: Whether ``POST /tasks/{app}/{model}`` may create tasks of this model.
    allow_http_create: ClassVar[bool] = False

    class Meta:
        abstract = True

    async def process(self) -> Any:
        """Your task's work. Its return value becomes ``final_value``."""
        raise NotImplementedError(f"{type(self).__name__} must implement async process()")

    async def send_event(self, event_type: str, data: dict[str, Any]) -> int:
        """Append an event to this task's log; durable when it returns. Returns its seq."""
        return await coordinator.append_event(self, event_type, data)

    async def mark_completed(self, final_value: Any = None) -> None:
        """Finish the task now as completed with ``final_value`` (the coordinator calls it)."""
        await coordinator.complete(self, final_value)

    async def process_generator(self, generator: AsyncGenerator[dict[str, Any], None]) -> Any:
        """Send each dict the async generator yields as a ``progress`` event; the last one."""
        last = None
        async for item in generator:
            await self.send_event("progress", item)
            last = item
        return last

    async def process_sync_generator(self, generator: Generator[dict[str, Any], None, None]) -> Any:
        """Like process_generator for a sync generator, whose ``next()`` runs in a thread."""
        done = object()
        last = None
        while True:
            item = await asyncio.to_thread(next, generator, done)
            if item is done:
                return last
            assert isinstance(item, dict), "a generator of progress must yield dicts"
            await self.send_event("progress", item)
            last = item

    async def add_client(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        """Feed ``queue`` with the latest event, then every live one (seed API)."""
        await coordinator.add_client(self, queue)

    async def remove_client(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        await coordinator.remove_client(self, queue)

    def stream_url(self, signed: bool = False, expires_in: float | None = None) -> str:
        """The path of this task's SSE stream; ``signed`` adds a view token valid for
        ``expires_in`` seconds (the TOKEN_EXPIRES_IN setting by default)."""
        return coordinator.stream_url(self, signed=signed, expires_in=expires_in)

    def cancel_url(self, expires_in: float | None = None) -> str:
        """The path that cancels this task, with a cancel token (``POST`` it)."""
        return coordinator.cancel_url(self, expires_in=expires_in)

    # Django-style pairs: ``x()`` for sync code (on Django's own connection, in the caller's
    # transaction), ``ax()`` for async code. Neither opens a connection of its own.

    def start(self) -> None:
        """Queue this task durably (idempotent), for a worker to run."""
        coordinator.start_task_sync(self)

    async def astart(self) -> None:
        """Queue this task durably (idempotent); claimed here when this loop runs a worker."""
        await coordinator.start_task(self)

    def cancel(self) -> bool:
        """Ask for this task to be cancelled, wherever it runs. False if already finished."""
        key = registry.key_of(self)
        return coordinator.cancel_task_sync(key.app_label, key.model_name, key.task_id)

    async def acancel(self) -> bool:
        """Ask for this task to be cancelled, wherever it runs. False if already finished."""
        key = registry.key_of(self)
        return await coordinator.cancel_task(key.app_label, key.model_name, key.task_id)

    def events(self, after: int = 0) -> list[dict[str, Any]]:
        """The logged events after seq ``after``, as seed queue items."""
        return coordinator.history_sync(self, after)

    async def aevents(self, after: int = 0) -> list[dict[str, Any]]:
        """The logged events after seq ``after``, as seed queue items."""
        return await coordinator.history(self, after)


class TaskRun(models.Model):
    """One row per started task: its run state (read-only here; written by SQL)."""

    app_label = models.TextField()
    model_name = models.TextField()
    task_id = models.BigIntegerField()
    db_table = models.TextField()
    pk_column = models.TextField()
    status = models.TextField(choices=STATUS_CHOICES)
    attempt = models.IntegerField()
    releases = models.IntegerField()
    max_attempts = models.IntegerField()
    timeout_seconds = models.FloatField(null=True)
    lease_owner = models.TextField(null=True)
    lease_expires_at = models.DateTimeField(null=True)
    last_seq = models.BigIntegerField()
    final_value = models.JSONField(null=True)
    error = models.JSONField(null=True)
    cancel_requested_at = models.DateTimeField(null=True)
    created_at = models.DateTimeField()
    queued_at = models.DateTimeField()
    started_at = models.DateTimeField(null=True)
    finished_at = models.DateTimeField(null=True)
    updated_at = models.DateTimeField()

    class Meta:
        managed = False
        db_table = "streaming_taskrun"

    def __str__(self) -> str:
        return f"{self.app_label}.{self.model_name}#{self.task_id} {self.status}"


class TaskEvent(models.Model):
    """One row per event of the log (read-only here; written by SQL)."""

    app_label = models.TextField()
    model_name = models.TextField()
    task_id = models.BigIntegerField()
    seq = models.BigIntegerField()
    attempt = models.IntegerField()
    event_type = models.TextField()
    data = models.JSONField()
    created_at = models.DateTimeField()

    class Meta:
        managed = False
        db_table = "streaming_taskevent"
        ordering = ["app_label", "model_name", "task_id", "seq"]

    def __str__(self) -> str:
        return f"{self.app_label}.{self.model_name}#{self.task_id} {self.seq} {self.event_type}"
