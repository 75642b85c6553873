"""The Django ORM seam of the runtime: loading task instances with usable connections."""

from __future__ import annotations

from typing import Any

from asgiref.sync import sync_to_async
from django.core.exceptions import ObjectDoesNotExist
from django.db import InterfaceError, OperationalError, connections

from streaming import registry
from streaming.events import TaskKey
from streaming.exceptions import DatabaseUnavailable, TaskNotFound


def discard_broken_django_connections() -> None:
    """Close this thread's Django connections that no longer answer (the server restarted).

    Django checks its connections when each of its own requests starts; our task runs and
    HTTP handlers are not Django requests, so without this one database restart would
    leave the ORM's connection broken for good: every later task load, every ORM call in
    ``process()`` and every stream lookup would fail. Call it in the ORM's thread.
    """
    for conn in connections.all(initialized_only=True):
        if conn.connection is not None and not conn.is_usable():
            conn.close()


def load(key: TaskKey) -> Any:
    """The task instance ``key`` names (sync); UnknownTaskModel or TaskNotFound if none,
    DatabaseUnavailable when Postgres could not answer."""
    discard_broken_django_connections()
    model = registry.resolve(key.app_label, key.model_name)
    try:
        return model._default_manager.get(pk=key.task_id)
    except ObjectDoesNotExist as exc:
        raise TaskNotFound(f"task {key.path} does not exist") from exc
    except (OperationalError, InterfaceError) as exc:
        # The server restarted or the connection broke: retryable, like the pool's errors.
        discard_broken_django_connections()
        raise DatabaseUnavailable(f"loading task {key.path}: {exc}") from exc


#: ``load`` for the event loop: it runs in asgiref's thread, where the ORM may run.
load_task = sync_to_async(load)
