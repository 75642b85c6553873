"""The example app's tasks in the Django admin, with streaming's base class."""

from __future__ import annotations

from django.contrib import admin

from streaming.admin import StreamTaskAdmin
from tests.models import (
    AsyncGeneratorTask,
    ContinueTask,
    ExampleTask,
    HttpxFetchTask,
    ScriptedTask,
    SyncGeneratorTask,
    TimeoutTask,
)


@admin.register(ExampleTask)
class ExampleTaskAdmin(StreamTaskAdmin):
    list_display = (*StreamTaskAdmin.list_display, "message", "total_steps")
    search_fields = ("message",)
    # The example's stream server (README, "The example project: two commands"), on another
    # origin than this admin.
    stream_base_url = "http://127.0.0.1:8888"


@admin.register(ScriptedTask)
class ScriptedTaskAdmin(StreamTaskAdmin):
    list_display = (*StreamTaskAdmin.list_display, "ticks", "fail_at")
    stream_base_url = "http://127.0.0.1:8888"


admin.site.register(
    [AsyncGeneratorTask, ContinueTask, HttpxFetchTask, SyncGeneratorTask, TimeoutTask],
    StreamTaskAdmin,
)
