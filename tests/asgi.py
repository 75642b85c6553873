"""The example project's ASGI application: Django's, with the stream routes on the same origin.

``python -m uvicorn tests.asgi:application --port 8000`` serves the admin and every stream
route on one port. Tasks run in ``manage.py runworker_stream`` beside it; with
``EXAMPLE_MOUNT_WORKER=1`` the server process runs them itself (``mount(..., worker=True)``).
"""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
django_application = get_asgi_application()

import streaming.asgi  # noqa: E402  (after Django is set up)

application = streaming.asgi.mount(
    django_application, worker=os.environ.get("EXAMPLE_MOUNT_WORKER", "") == "1"
)
