"""Creating a task from JSON field values (``POST /tasks/{app}/{model}``)."""

from __future__ import annotations

from typing import Any

from asgiref.sync import sync_to_async
from django.core.exceptions import FieldDoesNotExist, ValidationError

from streaming import registry
from streaming.exceptions import InvalidFields

# Fields the package sets itself; the run-state fields are not editable, so refused anyway.
_RESERVED = frozenset({"created_at", "updated_at", "completed_at", "final_value"})


def build(model: registry.TaskModel, body: dict[str, Any]) -> Any:
    """An unsaved, validated task of ``model``; InvalidFields names each refused field."""
    errors: dict[str, list[str]] = {}
    values: dict[str, Any] = {}
    for name, value in body.items():
        try:
            field = model._meta.get_field(name)
        except FieldDoesNotExist:
            errors[name] = ["unknown field"]
            continue
        if (
            not getattr(field, "editable", False)
            or getattr(field, "primary_key", False)
            or (name in _RESERVED)
        ):
            errors[name] = ["this field cannot be set"]
            continue
        values[getattr(field, "attname", name)] = value
    if errors:
        raise InvalidFields(errors)
    task = model(**values)
    try:
        task.full_clean(exclude=["created_at", "updated_at"])
    except ValidationError as exc:
        raise InvalidFields({k: [str(m) for m in v] for k, v in exc.message_dict.items()}) from exc
    return task


async def create(model: registry.TaskModel, body: dict[str, Any]) -> Any:
    """Validate and save a new task of ``model`` from field values."""
    task = await sync_to_async(build)(model, body)
    await task.asave()
    return task
