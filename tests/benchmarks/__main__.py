"""``python -m tests.benchmarks [--quick] [--json PATH] [--only NAME,…]``: run and report."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from tests.benchmarks import harness, stack
from tests.benchmarks.context import Context

Scenario = Callable[[Context], Awaitable[list[harness.Result]]]


# name -> "module:function" under tests.benchmarks, imported when it runs (after Django
# is set up: the scenario modules import models).
SCENARIOS = {
    "write_one": "write:write_one",
    "write_64": "write:write_many",
    "notify": "write:notify_placement",
    "latency": "latency:run",
    "fanout": "fanout:run",
    "replay": "replay:run",
    "memory": "memory:run",
    "many_tasks": "manytasks:run",
}
NAMES = list(SCENARIOS)


def scenario(name: str) -> Scenario:
    module, _, func = SCENARIOS[name].partition(":")
    return getattr(importlib.import_module(f"tests.benchmarks.{module}"), func)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.benchmarks", description=__doc__)
    p.add_argument("--quick", action="store_true", help="short smoke run (well under 2 min)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument(
        "--only", metavar="NAME[,NAME]", help=f"run only these scenarios: {', '.join(NAMES)}"
    )
    p.add_argument("--repeat", type=int, help="runs per scenario (default 1 quick, 3 full)")
    p.add_argument(
        "--no-fsync",
        action="store_true",
        help="embedded server only: keep its fsync=off default (not durable)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work dir (server logs)")
    args = p.parse_args(argv)
    chosen = NAMES if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(chosen) - set(NAMES))
    if unknown:
        p.error(f"unknown scenario(s): {', '.join(unknown)}; choose from {', '.join(NAMES)}")
    args.names = chosen
    return args


async def run_all(ctx: Context, names: list[str]) -> list[harness.Result]:
    results: list[harness.Result] = []
    for name in names:
        started = time.monotonic()
        print(f"== {name} ...", file=sys.stderr, flush=True)
        rows = await scenario(name)(ctx)
        for row in rows:
            print(
                f"   {row.scenario}: {row.metric} ours {harness.fmt(row.ours)}, baseline "
                f"{harness.fmt(row.baseline)}, ratio {harness.fmt(row.ratio)} -> "
                f"{row.passed}",
                file=sys.stderr,
                flush=True,
            )
        print(f"   ({time.monotonic() - started:.1f} s)", file=sys.stderr, flush=True)
        results.extend(rows)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    began = time.monotonic()
    load_start = harness.load()
    if load_start and load_start[0] > 0.35 * (os.cpu_count() or 1):
        print(
            f"warning: load average {load_start[0]} at start: other work on this machine "
            "will skew the figures",
            file=sys.stderr,
        )
    with stack.provision(fsync=not args.no_fsync, keep=args.keep) as st:
        ctx = Context(st, quick=args.quick, repeat=args.repeat or (1 if args.quick else 3))
        runner: Callable[[Coroutine[Any, Any, list[harness.Result]]], list[harness.Result]]
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            runner = asyncio.run
        results = runner(run_all(ctx, args.names))
        info = harness.machine(
            {
                "postgres": st.pg_info,
                "quick": args.quick,
                "loadavg_start": load_start,
                "repeat": ctx.repeat,
                "command": "python -m tests.benchmarks "
                + " ".join(sys.argv[1:] if argv is None else argv),
            }
        )
        if args.keep:
            print(f"work dir kept: {st.workdir}", file=sys.stderr)
    info["seconds"] = round(time.monotonic() - began, 1)
    print(harness.table(results))
    print(
        f"\n{info['date']}  nproc={info['nproc']}  python {info['python']}  postgres "
        f"{info['postgres']['server_version']} (fsync={info['postgres']['fsync']})  "
        f"load {load_start} -> {info['loadavg_end']}  {info['seconds']} s"
    )
    if args.json:
        harness.write_json(args.json, results, info)
    return 0 if all(r.passed is not False for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
