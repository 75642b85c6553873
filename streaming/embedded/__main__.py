"""The command line: ``python -m streaming.embedded {url,psql,supervise} DATA_DIR``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from streaming import embedded
from streaming.embedded.binaries import find_bindir
from streaming.embedded.shared import ensure_shared_server
from streaming.embedded.supervisor import supervise


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m streaming.embedded {url,psql,supervise} DATA_DIR``."""
    parser = argparse.ArgumentParser(
        prog="python -m streaming.embedded", description=embedded.__doc__
    )
    commands = parser.add_subparsers(dest="command", required=True)
    url = commands.add_parser(
        "url",
        help="start (or reuse) the shared server and print its URL; it stops a couple "
        "of seconds after this command exits unless another process uses it",
    )
    url.add_argument("data_dir", type=Path)
    psql = commands.add_parser(
        "psql", help="run psql on the shared server, keeping it up meanwhile"
    )
    psql.add_argument("data_dir", type=Path)
    psql.add_argument("psql_args", nargs=argparse.REMAINDER)
    sup = commands.add_parser("supervise", help="internal: run the shared server (detaches)")
    sup.add_argument("data_dir", type=Path)
    sup.add_argument("--status-fd", type=int)
    args = parser.parse_args(argv)
    if args.command == "supervise":
        return _detach_and_supervise(args.data_dir, args.status_fd)
    database_url = ensure_shared_server(args.data_dir)
    if args.command == "url":
        print(database_url)
        return 0
    exe = find_bindir() / "psql"
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is psql's (it cancels the query)
    return subprocess.run([str(exe), database_url, *args.psql_args], check=False).returncode


def _detach_and_supervise(data_dir: Path, status_fd: int | None) -> int:
    if os.fork():  # the starter waits for this parent; the child is reparented and lives on
        os._exit(0)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s supervisor[%(process)d] %(levelname)s %(message)s"
    )
    return supervise(data_dir, status_fd)


if __name__ == "__main__":
    sys.exit(main())
