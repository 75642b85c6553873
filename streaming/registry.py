"""Which models are streaming tasks: URL names to concrete StreamTask subclasses."""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.apps import apps

from streaming.events import TaskKey
from streaming.exceptions import UnknownTaskModel

if TYPE_CHECKING:
    from streaming.models import StreamTask


def task_models() -> list[type[StreamTask]]:
    """Every concrete, non-proxy StreamTask subclass of the installed apps."""
    from streaming.models import StreamTask

    return [
        m for m in apps.get_models()
        if issubclass(m, StreamTask) and not m._meta.abstract and not m._meta.proxy
        and not m._meta.swapped
    ]


def resolve(app_label: str | None, model_name: str) -> type[StreamTask]:
    """The task model for an app label and a case-insensitive model name.

    With no app label the name must be unique among task models. Anything else raises
    UnknownTaskModel with the same message, so callers cannot probe what exists.
    """
    wanted = model_name.lower()
    found = [
        m for m in task_models()
        if m._meta.model_name == wanted and (app_label is None or m._meta.app_label == app_label)
    ]
    if len(found) != 1:
        raise UnknownTaskModel("no such task")
    return found[0]


def key_of(task: StreamTask) -> TaskKey:
    """The identity of a saved task instance."""
    if task.pk is None:
        raise ValueError("the task must be saved before it can be started or streamed")
    meta = type(task)._meta
    return TaskKey(meta.app_label, meta.object_name or type(task).__name__, int(task.pk))


def key_for(app_label: str | None, model_name: str, task_id: int | str) -> TaskKey:
    """The identity named by the public API's (app, model, id) arguments."""
    model = resolve(app_label, model_name)
    return TaskKey(model._meta.app_label, model._meta.object_name or model.__name__,
                   int(task_id))
