"""Logging of the commands' own, for projects that configure none for the package.

A project started with ``django-admin startproject`` has no ``LOGGING``: Django's defaults
give handlers to ``django`` only, so every INFO line of ``streaming`` (where a server
listens, each task claimed and finished) would go nowhere, and uvicorn's warnings would
come out bare. ``configure`` (called by ``runserver_stream`` and ``runworker_stream``)
gives them a plain stderr handler, unless the project configured them itself: then it
changes nothing, so that no line is ever logged twice.
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
ACCESS_LOGGER = "streaming.access"


def level_for(verbosity: int) -> int:
    """The package's level for Django's ``--verbosity``: 0 warnings, 1 info, 2+ debug."""
    if verbosity <= 0:
        return logging.WARNING
    return logging.INFO if verbosity == 1 else logging.DEBUG


def uvicorn_level(verbosity: int) -> str:
    """uvicorn's own level: warnings only (the package logs where it listens), 2 info,
    3 debug (a line per connection)."""
    return {2: "info", 3: "debug"}.get(verbosity, "warning")


def configure(verbosity: int, access_log: bool = False) -> bool:
    """Give ``streaming`` (and ``uvicorn``) a stderr handler when nothing would show their
    lines; True when it did.

    Nothing would: neither the root logger nor the package's loggers (``streaming`` or any
    ``streaming.*``) have a handler. Then ``streaming`` gets one at ``level_for(verbosity)``
    and uvicorn, likewise unconfigured, one for its warnings. With ``access_log``, the access
    lines (INFO) show even at verbosity 0. A project that configured any of them keeps its
    configuration as it is: levels, handlers and format.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    attached = False
    if not _configured("streaming"):
        package = logging.getLogger("streaming")
        package.addHandler(handler)
        package.setLevel(level_for(verbosity))
        if access_log:
            logging.getLogger(ACCESS_LOGGER).setLevel(logging.INFO)
        attached = True
    if not _configured("uvicorn"):
        logging.getLogger("uvicorn").addHandler(handler)
    return attached


def _configured(name: str) -> bool:
    """Whether the root logger, ``name`` or a logger below it has a handler."""
    if logging.getLogger().handlers or logging.getLogger(name).handlers:
        return True
    prefix = name + "."
    return any(
        isinstance(logger, logging.Logger) and logger.handlers
        for other, logger in logging.Logger.manager.loggerDict.items()
        if other.startswith(prefix)
    )
