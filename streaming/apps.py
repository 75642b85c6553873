"""Django app configuration for streaming: fills the task registry once the models are loaded."""

from __future__ import annotations

from django.apps import AppConfig, apps


class StreamingConfig(AppConfig):
    name = "streaming"
    verbose_name = "Streaming tasks"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from streaming import checks, registry  # noqa: F401  (checks registers itself)
        from streaming.models import StreamTask

        registry.fill(
            [
                m
                for m in apps.get_models()
                # Proxies too: a proxy's own process() runs its tasks, keyed by its own name.
                if issubclass(m, StreamTask) and not m._meta.abstract and not m._meta.swapped
            ]
        )
