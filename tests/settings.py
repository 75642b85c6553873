"""Settings of the example project; manage.py and the tests use them.

A development project: its SECRET_KEY is public and it lets anyone do anything
(``streaming.policy.AllowAll``), so that the README's curl and EventSource lines work as
they do with the seed. Never serve it on a network others reach; see README, "Security".
"""

from __future__ import annotations

import os
from pathlib import Path

from streaming import dburl
from streaming.conf import from_environ

BASE_DIR = Path(__file__).resolve().parent.parent
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "streaming-example-not-secret")
DEBUG = os.environ.get("DJANGO_DEBUG", "") == "1"
ALLOWED_HOSTS = ["*"]
USE_TZ = True
TIME_ZONE = "UTC"
ROOT_URLCONF = "tests.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.admin",
    "streaming",
    "tests",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]


# manage.py sets DATABASE_URL (the shared embedded server in .pgdata/) when it is unset and the
# command needs a database; so does the test plugin (a throwaway server). The fallback serves
# what only imports the settings (mypy's Django plugin, manage.py check).
_TEST_DATABASE = {"NAME": os.environ.get("STREAMING_TEST_DB_NAME") or None}
if os.environ.get("DATABASE_URL"):
    DATABASES = {"default": dburl.database(TEST=_TEST_DATABASE)}
else:
    DATABASES = {
        "default": dburl.database(
            "postgresql://postgres@127.0.0.1:5432/streaming", TEST=_TEST_DATABASE
        )
    }

STREAMING = {
    "POLICY": "streaming.policy.AllowAll",  # development only: see the module docstring
    **from_environ(dict(os.environ)),
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        "streaming": {
            "handlers": ["console"],
            "level": os.environ.get("STREAMING_LOG_LEVEL", "INFO"),
        }
    },
}
