"""Which models are streaming tasks: filled once at start-up, then plain dict lookups."""

from __future__ import annotations

from typing import Any

from streaming.events import TaskKey
from streaming.exceptions import UnknownTaskModel

# The model classes are typed loosely here: this layer sits below ``streaming.models`` and
# must not import it. Entries are concrete StreamTask subclasses, put here by ``fill``.
TaskModel = type[Any]

_by_label: dict[tuple[str, str], TaskModel] = {}  # (app label, lower-case model name)
_by_name: dict[str, list[TaskModel]] = {}  # lower-case model name -> models of any app


def fill(models: list[TaskModel]) -> None:
    """Set the task models (the app config's ``ready()`` calls this once)."""
    _by_label.clear()
    _by_name.clear()
    for model in models:
        meta = model._meta
        _by_label[(meta.app_label, meta.model_name)] = model
        _by_name.setdefault(meta.model_name, []).append(model)


def resolve(app_label: str | None, model_name: str) -> TaskModel:
    """The task model for an app label and a case-insensitive model name.

    With no app label the name must be unique among task models. Anything else raises
    UnknownTaskModel with the same message, so callers cannot probe what exists.
    """
    wanted = model_name.lower()
    if app_label is not None:
        model = _by_label.get((app_label, wanted))
        if model is None:
            raise UnknownTaskModel("no such task")
        return model
    found = _by_name.get(wanted, [])
    if len(found) != 1:
        raise UnknownTaskModel("no such task")
    return found[0]


def key_of(task: Any) -> TaskKey:
    """The identity of a saved task instance."""
    if task.pk is None:
        raise ValueError("the task must be saved before it can be started or streamed")
    meta = type(task)._meta
    return TaskKey(meta.app_label, meta.object_name or type(task).__name__, int(task.pk))


def key_for(app_label: str | None, model_name: str, task_id: int | str) -> TaskKey:
    """The identity named by the public API's (app, model, id) arguments."""
    return key_of_model(resolve(app_label, model_name), int(task_id))


def key_of_model(model: TaskModel, task_id: int) -> TaskKey:
    return TaskKey(model._meta.app_label, model._meta.object_name or model.__name__, task_id)
