"""Django admin for streaming: the run and event tables, read-only, and a base for task models.

``streaming_taskrun`` and ``streaming_taskevent`` are registered here (Django's admin finds
this module by itself when ``django.contrib.admin`` is installed), read-only: SQL writes them.
Register your own task models with :class:`StreamTaskAdmin`::

    from django.contrib import admin
    from streaming.admin import StreamTaskAdmin
    from myapp.models import Report


    @admin.register(Report)
    class ReportAdmin(StreamTaskAdmin):
        list_display = (*StreamTaskAdmin.list_display, "title")
        # Where ``manage.py runserver_stream`` answers, when not on this site's origin:
        stream_base_url = "https://stream.example.com"

Its change page shows the run state, the result (``final_value``, or ``error``), the latest
events and a link to the task's watch page; its actions start and cancel tasks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, ClassVar, TypeVar

from django.apps import apps
from django.contrib import admin, messages
from django.core.paginator import Paginator
from django.db import connection, models, transaction
from django.db.models import Q, QuerySet
from django.http import HttpRequest
from django.urls import NoReverseMatch, reverse
from django.utils import formats, timezone
from django.utils.html import format_html, format_html_join
from django.utils.http import urlencode
from django.utils.safestring import SafeString

from streaming import conf, notifier, queries, registry, tokens
from streaming.coordinator import coordinator
from streaming.events import FINISHED, Status, TaskKey
from streaming.models import StreamTask, TaskEvent, TaskRun

T = TypeVar("T")

#: How many of a task's events its change page shows (the newest first).
LATEST_EVENTS = 20
#: Characters of an event's JSON data shown in a list before it is cut short.
DATA_PREVIEW_CHARS = 120
#: The event types offered by the events' filter are those of the latest this many events
#: (a DISTINCT over the whole log would read every row of it on each page view).
EVENT_TYPE_SAMPLE = 10_000

_FINISHED_STATUSES = sorted(str(s) for s in FINISHED)


# -- deleting tasks with their logs ----------------------------------------------------------


# A task's events and run, deleted with its row in one transaction (Django's, since the row
# is deleted by the admin through the ORM), as cleanup_old_tasks does; the statements are in
# streaming/sql/queries.sql with the others.
# A worker still running one of them is fenced off at once (its appends and its finish find
# no run row and write nothing); the cancel NOTIFY makes it stop now rather than at its next
# append or heartbeat.
def delete_logs(model: type[StreamTask], task_ids: Sequence[int]) -> int:
    """Delete these tasks' events and runs (in the caller's transaction); how many runs."""
    if not task_ids:
        return 0
    key = registry.key_of_model(model, 0)
    params: dict[str, Any] = {
        "app_label": key.app_label,
        "model_name": key.model_name,
        "task_ids": list(task_ids),
    }
    with connection.cursor() as cursor:
        # Runs first: that locks them, so no append can add an event after the events'
        # delete (an append updates its run row before inserting its event).
        cursor.execute(queries.get("delete_task_runs"), params)
        runs = cursor.fetchall()
        cursor.execute(queries.get("delete_task_events"), params)
        live = [int(run_id) for run_id, unfinished in runs if unfinished]
        for payload in notifier.encode({}, [], live):
            cursor.execute(
                queries.get("notify_in_transaction"),
                {"channel": conf.get().CHANNEL, "payload": payload},
            )
    return len(runs)


# -- pieces shared by the admins ----------------------------------------------------------------


def task_models() -> list[type[StreamTask]]:
    """The concrete task models of this project (what the app config puts in the registry)."""
    return [
        m
        for m in apps.get_models()
        if issubclass(m, StreamTask) and not m._meta.proxy and not m._meta.swapped
    ]


def _admin_url(name: str, *args: Any) -> str | None:
    try:
        return reverse(f"admin:{name}", args=args)
    except NoReverseMatch:  # not registered with this admin site
        return None


def _task_link(app_label: str, model_name: str, task_id: int) -> str:
    """``app.Model #id``, linked to the task's change page when its model is registered."""
    label = f"{app_label}.{model_name} #{task_id}"
    url = _admin_url(f"{app_label}_{model_name.lower()}_change", task_id)
    return format_html('<a href="{}">{}</a>', url, label) if url else label


def _json_text(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=False, sort_keys=indent is not None)


def _preview(value: Any, chars: int = DATA_PREVIEW_CHARS) -> str:
    text = _json_text(value)
    return text if len(text) <= chars else text[: chars - 1] + "…"


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else str(formats.localize(timezone.localtime(moment)))


def _pre(value: Any) -> SafeString:
    return format_html(
        '<pre style="margin:0;white-space:pre-wrap;max-height:24em;overflow:auto">{}</pre>',
        _json_text(value, indent=2),
    )


def _events_url(app_label: str, model_name: str, task_id: int) -> str | None:
    url = _admin_url("streaming_taskevent_changelist")
    if url is None:
        return None
    query = {TaskModelFilter.parameter_name: f"{app_label}.{model_name}", "task_id": str(task_id)}
    return f"{url}?{urlencode(query)}"


def events_table(rows: Sequence[TaskEvent], all_events_url: str | None = None) -> SafeString:
    """Events as a compact read-only table (seq, attempt, type, time, data)."""
    if not rows:
        return format_html("<p>{}</p>", "No events yet.")
    body = format_html_join(
        "",
        "<tr><td>{}</td><td>{}</td><td><strong>{}</strong></td><td>{}</td>"
        '<td><code style="white-space:pre-wrap;overflow-wrap:anywhere">{}</code></td></tr>',
        (
            (
                ev.seq,
                ev.attempt,
                ev.event_type,
                ev.created_at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
                _preview(ev.data, 300),
            )
            for ev in rows
        ),
    )
    more = (
        format_html('<p><a href="{}">All events of this task</a></p>', all_events_url)
        if all_events_url
        else ""
    )
    return format_html(
        '<table class="streaming-events" style="width:100%"><thead><tr><th>seq</th>'
        "<th>attempt</th><th>type</th><th>at (UTC)</th><th>data</th></tr></thead>"
        "<tbody>{}</tbody></table>{}",
        body,
        more,
    )


def latest_events(key: TaskKey, limit: int = LATEST_EVENTS) -> list[TaskEvent]:
    """A task's latest events, newest first: one query (on the log's unique index)."""
    return list(
        TaskEvent.objects.filter(
            app_label=key.app_label, model_name=key.model_name, task_id=key.task_id
        ).order_by("-seq")[:limit]
    )


class TaskModelFilter(admin.SimpleListFilter):
    """Filter runs or events by task model (``app.Model``): the choices are this project's
    task models, so listing them reads nothing from the (possibly large) tables."""

    title = "task model"
    parameter_name = "task_model"

    def lookups(
        self, request: HttpRequest, model_admin: admin.ModelAdmin[Any]
    ) -> list[tuple[str, str]]:
        labels = {f"{m._meta.app_label}.{m._meta.object_name}" for m in task_models()}
        value = self.value()
        if value:
            labels.add(value)  # a model no longer installed, kept while it is selected
        return [(label, label) for label in sorted(labels)]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if not value:
            return queryset
        app_label, _, model_name = value.partition(".")
        return queryset.filter(app_label=app_label, model_name=model_name)


class EventTypeFilter(admin.SimpleListFilter):
    """Filter events by type: the types seen in the latest events, and the one selected."""

    title = "event type"
    parameter_name = "event_type"

    def lookups(
        self, request: HttpRequest, model_admin: admin.ModelAdmin[Any]
    ) -> list[tuple[str, str]]:
        latest = TaskEvent.objects.order_by("-id").values("id")[:EVENT_TYPE_SAMPLE]
        types = set(
            TaskEvent.objects.filter(id__in=latest).values_list("event_type", flat=True).distinct()
        )
        value = self.value()
        if value:
            types.add(value)
        return [(t, t) for t in sorted(types)]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        return queryset.filter(event_type=value) if value else queryset


def search_tasks(queryset: QuerySet[Any], search_term: str) -> QuerySet[Any]:
    """Runs or events matching every word of ``search_term``: a task id (``42``), a task path
    (``app/Model/42``, ``Model/42``, ``Model#42``), or an app label or model name."""
    for word in search_term.replace("#", "/").split():
        parts = [p for p in word.split("/") if p]
        if not parts:
            continue
        q = Q()
        if parts[-1].isdigit() and len(parts[-1]) <= 18 and len(parts) <= 3:  # a bigint
            q &= Q(task_id=int(parts[-1]))
            names = parts[:-1]
            if len(names) == 2:
                q &= Q(app_label=names[0], model_name__iexact=names[1])
            elif names:
                q &= Q(model_name__iexact=names[0])
        else:
            q = Q(app_label__iexact=word) | Q(model_name__iexact=word)
        queryset = queryset.filter(q)
    return queryset


class EstimatedCountPaginator(Paginator):
    """Counts an unfiltered log from Postgres's statistics instead of reading every row."""

    @property
    def count(self) -> int:
        query = getattr(self.object_list, "query", None)
        if query is not None and not query.where:
            table = query.model._meta.db_table
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass",
                    [table],
                )
                row = cursor.fetchone()
            if row is not None and row[0] > 10_000:
                return int(row[0])
        return super().count


class ReadOnlyAdmin(admin.ModelAdmin):
    """Nothing can be added, changed or deleted here (SQL writes these tables)."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # which also drops the delete_selected action (it needs this permission)

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Any], search_term: str
    ) -> tuple[QuerySet[Any], bool]:
        return search_tasks(queryset, search_term), False


# -- the run and event tables ------------------------------------------------------------------


@admin.register(TaskRun)
class TaskRunAdmin(ReadOnlyAdmin):
    """``streaming_taskrun``: one row per started task, newest first."""

    list_display = (
        "id",
        "task",
        "status",
        "attempt",
        "max_attempts",
        "last_seq",
        "lease_owner",
        "queued_at",
        "started_at",
        "finished_at",
    )
    list_display_links = ("id",)
    list_filter = (
        TaskModelFilter,
        "status",
        ("created_at", admin.DateFieldListFilter),
        ("finished_at", admin.DateFieldListFilter),
    )
    search_fields = ("task_id",)  # see search_tasks: ids, paths, names
    search_help_text = "A task id (42), a path (app/Model/42, Model#42), an app or model name."
    ordering = ("-id",)
    list_per_page = 100
    readonly_fields = ("task", "outcome", "cancel_requested_at", "recent_events")
    fieldsets = (
        (None, {"fields": ("task", "status", "attempt", "last_seq", "outcome")}),
        (
            "Lease and limits",
            {
                "fields": (
                    "lease_owner",
                    "lease_expires_at",
                    "cancel_requested_at",
                    "releases",
                    "max_attempts",
                    "timeout_seconds",
                )
            },
        ),
        (
            "Times",
            {"fields": ("created_at", "queued_at", "started_at", "finished_at", "updated_at")},
        ),
        ("Table", {"fields": ("db_table", "pk_column"), "classes": ("collapse",)}),
        (f"Latest {LATEST_EVENTS} events", {"fields": ("recent_events",)}),
    )

    @admin.display(description="task", ordering="task_id")
    def task(self, run: TaskRun) -> str:
        return _task_link(run.app_label, run.model_name, run.task_id)

    @admin.display(description="result")
    def outcome(self, run: TaskRun) -> str:
        if run.error is not None:
            return _pre(run.error)
        if run.status == Status.COMPLETED:
            return _pre(run.final_value)
        return "-"

    @admin.display(description="events")
    def recent_events(self, run: TaskRun) -> str:
        key = TaskKey(run.app_label, run.model_name, run.task_id)
        return events_table(
            latest_events(key), _events_url(run.app_label, run.model_name, run.task_id)
        )


@admin.register(TaskEvent)
class TaskEventAdmin(ReadOnlyAdmin):
    """``streaming_taskevent``: the log, newest first, its data shown compactly."""

    list_display = ("id", "task", "seq", "attempt", "event_type", "data_preview", "created_at")
    list_display_links = ("id",)
    list_filter = (TaskModelFilter, EventTypeFilter, ("created_at", admin.DateFieldListFilter))
    search_fields = ("task_id",)  # see search_tasks: ids, paths, names
    search_help_text = "A task id (42), a path (app/Model/42, Model#42), an app or model name."
    ordering = ("-id",)
    list_per_page = 100
    show_full_result_count = False  # one COUNT(*) of the log per page is enough
    paginator = EstimatedCountPaginator
    readonly_fields = ("task", "data_pretty")
    fields = ("task", "seq", "attempt", "event_type", "created_at", "data_pretty")

    @admin.display(description="task", ordering="task_id")
    def task(self, ev: TaskEvent) -> str:
        return _task_link(ev.app_label, ev.model_name, ev.task_id)

    @admin.display(description="data")
    def data_preview(self, ev: TaskEvent) -> str:
        return format_html("<code>{}</code>", _preview(ev.data))

    @admin.display(description="data")
    def data_pretty(self, ev: TaskEvent) -> str:
        return _pre(ev.data)


# -- a base for the project's task models -------------------------------------------------------

#: The StreamTask fields the run state owns: shown read-only, never in the form.
RUN_FIELDS = (
    "status",
    "attempt",
    "created_at",
    "updated_at",
    "started_at",
    "completed_at",
    "final_value",
    "error",
)
#: What StreamTaskAdmin's change page adds below the model's own fields.
RUN_DISPLAY = ("status", "attempt", "result", "run_state", "watch_link")
TIMES_DISPLAY = ("created_at", "updated_at", "started_at", "completed_at")
EVENTS_DISPLAY = ("latest_events",)


class StreamTaskAdmin(admin.ModelAdmin):
    """A ModelAdmin for StreamTask models: run state, result, latest events, actions.

    The list shows each task's status, attempt and timestamps; the change page adds the run
    state (read-only), the result (``final_value``, or ``error``), the latest
    ``LATEST_EVENTS`` events (newest first, one query) and a link to the watch page. The
    run-state fields are never editable. Actions: start (never-started tasks; needs the add
    permission), cancel (the change permission) and re-run finished tasks as a new attempt
    (add), the same permissions the ``DjangoUsers`` policy asks for.
    """

    #: Where the stream server (``manage.py runserver_stream``) answers, e.g.
    #: ``"https://stream.example.com"``: watch links are ``{stream_base_url}/watch/app/Model/id``.
    #: Empty (the default): a path on this site, for a proxy that routes ``/watch/`` there.
    stream_base_url: ClassVar[str] = ""
    #: Whether watch links carry a signed view token (``?token=``, valid ``TOKEN_EXPIRES_IN``
    #: seconds): for a stream server on another origin whose policy accepts tokens, where the
    #: admin's session cookie is not sent.
    signed_watch_links: ClassVar[bool] = False

    list_display: tuple[str, ...] = (
        "id",
        "status",
        "attempt",
        "created_at",
        "started_at",
        "completed_at",
    )
    list_filter = ("status", "created_at", "completed_at")
    ordering = ("-pk",)
    actions = ("start_selected", "cancel_selected", "rerun_selected")

    # -- the change page ------------------------------------------------------------------

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        own = tuple(super().get_readonly_fields(request, obj))
        return (*own, *RUN_FIELDS, "result", "run_state", "watch_link", "latest_events")

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        if self.fieldsets:
            return super().get_fieldsets(request, obj)
        shown = {*RUN_FIELDS, *RUN_DISPLAY, *EVENTS_DISPLAY}
        own = [f for f in self.get_fields(request, obj) if f not in shown]
        if obj is None:
            return [(None, {"fields": own})]
        return [
            (None, {"fields": own}),
            ("Run", {"fields": RUN_DISPLAY}),
            ("Times", {"fields": TIMES_DISPLAY}),
            (f"Latest {LATEST_EVENTS} events", {"fields": EVENTS_DISPLAY}),
        ]

    def watch_url(self, task: StreamTask) -> str:
        """The task's watch page on the stream server (see ``stream_base_url``)."""
        key = registry.key_of(task)
        url = f"{self.stream_base_url.rstrip('/')}/watch/{key.path}"
        if self.signed_watch_links:
            token = tokens.make(key, "view", conf.get().TOKEN_EXPIRES_IN)
            url += "?" + urlencode({"token": token})
        return url

    @admin.display(description="watch")
    def watch_link(self, task: StreamTask) -> str:
        url = self.watch_url(task)
        return format_html('<a href="{}" target="_blank" rel="noopener">{}</a>', url, url)

    @admin.display(description="result")
    def result(self, task: StreamTask) -> str:
        if task.error is not None:
            return _pre(task.error)
        if task.status == Status.COMPLETED:
            return _pre(task.final_value)
        return "-"

    def _run(self, task: StreamTask) -> TaskRun | None:
        """The task's run row, read once per page (several fields show parts of it)."""
        cached: tuple[TaskRun | None] | None = getattr(task, "_streaming_run", None)
        if cached is None:
            key = registry.key_of(task)
            run = TaskRun.objects.filter(
                app_label=key.app_label, model_name=key.model_name, task_id=key.task_id
            ).first()
            cached = (run,)
            task._streaming_run = cached  # type: ignore[attr-defined]
        return cached[0]

    @admin.display(description="run")
    def run_state(self, task: StreamTask) -> str:
        run = self._run(task)
        if run is None:
            return "Never started."
        url = _admin_url("streaming_taskrun_change", run.pk)
        details = [
            ("run", format_html('<a href="{}">#{}</a>', url, run.pk) if url else f"#{run.pk}"),
            ("last seq", run.last_seq),
            ("max attempts", run.max_attempts),
            ("queued at", _when(run.queued_at)),
        ]
        if run.lease_owner:
            details.append(("lease", f"{run.lease_owner} until {_when(run.lease_expires_at)}"))
        if run.cancel_requested_at:
            details.append(("cancel requested", _when(run.cancel_requested_at)))
        return format_html_join(" · ", "{}: {}", details)

    @admin.display(description="events")
    def latest_events(self, task: StreamTask) -> str:
        key = registry.key_of(task)
        return events_table(
            latest_events(key), _events_url(key.app_label, key.model_name, key.task_id)
        )

    # -- deleting ---------------------------------------------------------------------------

    def delete_model(self, request: HttpRequest, obj: Any) -> None:
        """Delete the task with its events and run (an unfinished one is stopped)."""
        with transaction.atomic():
            delete_logs(type(obj), [obj.pk])
            super().delete_model(request, obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        with transaction.atomic():
            delete_logs(self.model, [int(pk) for pk in queryset.values_list("pk", flat=True)])
            super().delete_queryset(request, queryset)

    # -- actions ----------------------------------------------------------------------------

    @admin.action(description="Start selected tasks (those never started)", permissions=["add"])
    def start_selected(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        tasks = list(queryset)
        queued = 0
        with transaction.atomic():
            for task in tasks:
                queued += coordinator.enqueue_sync_key(type(task), registry.key_of(task)).created
        self._report(request, queued, len(tasks), "queued", "already started")

    @admin.action(description="Cancel selected tasks", permissions=["change"])
    def cancel_selected(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        keys = [registry.key_of(task) for task in queryset]
        cancelled = 0
        for key in keys:
            cancelled += coordinator.cancel_task_sync(key.app_label, key.model_name, key.task_id)
        self._report(request, cancelled, len(keys), "cancelled", "finished or never started")

    @admin.action(description="Re-run selected finished tasks", permissions=["add"])
    def rerun_selected(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        keys = [registry.key_of(task) for task in queryset]
        queued = 0
        with transaction.atomic():
            for key in keys:
                queued += coordinator.rerun_task_sync(key.app_label, key.model_name, key.task_id)
        self._report(request, queued, len(keys), "queued again", "not finished")

    def _report(self, request: HttpRequest, done: int, of: int, what: str, why: str) -> None:
        noun = "task" if done == 1 else "tasks"
        text = f"{done} {noun} {what}."
        if of > done:
            text += f" {of - done} left alone ({why})."
        self.message_user(request, text, messages.SUCCESS if done else messages.WARNING)


def register(*task_models: type[models.Model], site: admin.AdminSite | None = None) -> None:
    """Register task models with a plain :class:`StreamTaskAdmin` (``admin.site`` by default)."""
    (site or admin.site).register(list(task_models), StreamTaskAdmin)


__all__ = [
    "StreamTaskAdmin",
    "TaskEventAdmin",
    "TaskRunAdmin",
    "delete_logs",
    "register",
]
