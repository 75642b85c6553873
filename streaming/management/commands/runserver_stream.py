"""manage.py runserver_stream: the SSE server and (unless --no-worker) a worker.

It logs where it listens, each task its worker claims and finishes, and (with
``--access-log``) one line per request, on stderr when the project configured no logging
for the package (``streaming.logs``).
"""

from __future__ import annotations

import argparse
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError

from streaming import conf, logs, policy, server
from streaming.serve import ServeOptions, run

DEFAULT_SOCKET = "/tmp/streaming-coordinator.sock"


def port_number(text: str) -> int:
    value = int(text)
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"port must be 1-65535, got {value}")
    return value


class Command(BaseCommand):
    help = "Serve task streams over SSE (Unix socket by default) and run queued tasks."

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--host", help="TCP host to bind (with --port)")
        parser.add_argument("--port", type=port_number, help="TCP port to bind")
        parser.add_argument("--socket", help=f"Unix socket path (default {DEFAULT_SOCKET})")
        parser.add_argument(
            "--no-worker",
            action="store_true",
            help="serve streams only; run no tasks in this process",
        )
        parser.add_argument(
            "--grace",
            type=float,
            default=None,
            help="seconds running tasks get to finish on shutdown",
        )
        parser.add_argument(
            "--access-log",
            action="store_true",
            help="log one line per request (method, path without the query string, status, "
            "client address, duration) to the streaming.access logger",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        verbosity = options["verbosity"]
        logs.configure(verbosity, access_log=options["access_log"])
        host, port, sock = options["host"], options["port"], options["socket"]
        if sock and (host or port):
            raise CommandError("use either --socket or --host/--port, not both")
        if not sock and not (host or port):
            sock = DEFAULT_SOCKET
        settings = conf.get()
        try:
            server.check_secret_key(policy.load(settings))
        except (ImproperlyConfigured, ImportError, TypeError, ValueError) as exc:
            raise CommandError(f"cannot serve: {exc}") from exc
        run(
            ServeOptions(
                host=host or ("127.0.0.1" if port else None),
                port=port or (8888 if host else None),
                socket=sock,
                worker=not options["no_worker"],
                grace=settings.SHUTDOWN_GRACE if options["grace"] is None else options["grace"],
                log_level=logs.uvicorn_level(verbosity),
                access_log=options["access_log"],
            )
        )
