"""Creating a task from JSON field values (``POST /tasks/{app}/{model}``)."""

from __future__ import annotations

from typing import Any

from asgiref.sync import sync_to_async
from django.core.exceptions import FieldDoesNotExist, ValidationError
from django.db import OperationalError, connections, router

from streaming import registry
from streaming.db import retrying
from streaming.exceptions import DatabaseUnavailable, InvalidFields
from streaming.orm import discard_broken_django_connections

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
        problem = _type_problem(field, value)
        if problem:
            errors[name] = [problem]
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


def _save(task: Any) -> None:
    """INSERT the task; DatabaseUnavailable only if it could not even connect (retry-safe)."""
    discard_broken_django_connections()
    conn = connections[router.db_for_write(type(task))]
    try:
        task.save(force_insert=True)
    except OperationalError as exc:
        # Retry-safe only when the INSERT cannot have run: no connection was made, or the
        # server had ended the session before reading it (a restart's "terminating
        # connection due to administrator command", a server still starting up).
        if conn.connection is None or _sqlstate(exc) in _ENDED_BEFORE:
            discard_broken_django_connections()
            raise DatabaseUnavailable("could not reach the database to save the task") from exc
        raise


# admin_shutdown, crash_shutdown, cannot_connect_now: the backend ended before the statement.
_ENDED_BEFORE = frozenset({"57P01", "57P02", "57P03"})


def _sqlstate(exc: BaseException) -> str | None:
    cause = exc.__cause__
    return getattr(cause, "sqlstate", None) if cause is not None else None


# The JSON types a field of each kind accepts (bool is not a number here, as in JSON).
_ACCEPTS: dict[str, tuple[type, ...]] = {
    "CharField": (str,),
    "TextField": (str,),
    "SlugField": (str,),
    "EmailField": (str,),
    "URLField": (str,),
    "UUIDField": (str,),
    "DateTimeField": (str,),
    "DateField": (str,),
    "TimeField": (str,),
    "DurationField": (str, int, float),
    "BooleanField": (bool,),
    "IntegerField": (int,),
    "BigIntegerField": (int,),
    "SmallIntegerField": (int,),
    "PositiveIntegerField": (int,),
    "PositiveBigIntegerField": (int,),
    "PositiveSmallIntegerField": (int,),
    "FloatField": (int, float),
    "DecimalField": (int, float, str),
    "ForeignKey": (int, str),
}


def _type_problem(field: Any, value: Any) -> str | None:
    """Why ``value`` (parsed JSON) cannot be this field's, or None. JSONField takes anything."""
    kind = field.get_internal_type()
    if kind == "JSONField" or value is None:
        return None  # None: the field's own null/blank validation decides
    accepted = _ACCEPTS.get(kind)
    if accepted is None:
        return "this field cannot be set over HTTP"
    if isinstance(value, bool) and bool not in accepted:
        return f"expected {_names(accepted)}, got a boolean"
    if not isinstance(value, accepted):
        return f"expected {_names(accepted)}, got {_json_type(value)}"
    if kind in ("FloatField", "DurationField") and isinstance(value, int):
        try:
            float(value)
        except OverflowError:
            return "this number is too large"
    return None


def _names(types: tuple[type, ...]) -> str:
    words = {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}
    return " or ".join(dict.fromkeys(words[t] for t in types))


def _json_type(value: Any) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        float: "a number",
        int: "an integer",
    }.get(type(value), "another type")


async def create(model: registry.TaskModel, body: dict[str, Any], wait: float = 0.0) -> Any:
    """Validate and save a new task of ``model`` from field values.

    A database that cannot be reached is waited for up to ``wait`` seconds; an INSERT whose
    outcome is unknown (the connection broke during it) is never repeated.
    """
    task = await sync_to_async(build)(model, body)
    await retrying(lambda: sync_to_async(_save)(task), wait)
    return task
