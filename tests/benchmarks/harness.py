"""Results: rows of the table, targets, repetition, the printed table and the JSON file."""

from __future__ import annotations

import json
import math
import operator
import os
import platform
import re
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

_TARGET = re.compile(r"(ratio|ours)\s*(>=|<=|==)\s*([0-9.]+)")
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
}


@dataclass
class Result:
    """One row: our figure, the baseline's from the same run, and the target it must meet.

    ``target`` reads like ``ratio >= 0.6`` (ours / baseline) or ``ours <= 30`` (absolute).
    """

    scenario: str
    metric: str
    unit: str
    ours: float
    baseline: float | None
    target: str
    baseline_name: str = ""
    note: str = ""
    samples: dict[str, list[float]] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.baseline == 0:
            return None
        return self.ours / self.baseline

    @property
    def passed(self) -> bool | None:
        match = _TARGET.fullmatch(self.target.strip())
        if match is None:
            return None  # reported only
        on, op, value = match.groups()
        subject = self.ratio if on == "ratio" else self.ours
        if subject is None or math.isnan(subject):
            return False
        # Ratios are judged at the two decimals the table shows (two runs that both keep up
        # with an offered load differ in the fourth); absolute figures exactly.
        return _OPS[op](round(subject, 2 if on == "ratio" else 9), float(value))

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["ratio"] = self.ratio
        out["passed"] = self.passed
        return out


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-quantile (0..1) of already sorted values, nearest rank."""
    if not sorted_values:
        return math.nan
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index]


def histogram_percentile(hist: dict[int, int], q: float, resolution: float) -> float:
    """The q-quantile of a histogram of ``value // resolution`` buckets (upper bucket edge)."""
    total = sum(hist.values())
    if not total:
        return math.nan
    rank = max(1, math.ceil(q * total))
    seen = 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen >= rank:
            return (bucket + 1) * resolution
    return math.nan


def fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 0.1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def table(results: list[Result]) -> str:
    """The results as a fixed-width text table (also valid Markdown)."""
    head = ["scenario", "metric", "ours", "baseline", "ratio", "target", "pass"]
    rows = [head]
    for r in results:
        verdict = {True: "PASS", False: "FAIL", None: "report"}[r.passed]
        base = fmt(r.baseline) + (f" ({r.baseline_name})" if r.baseline_name else "")
        rows.append(
            [
                r.scenario,
                f"{r.metric} [{r.unit}]",
                fmt(r.ours),
                base,
                fmt(r.ratio),
                r.target or "-",
                verdict,
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def machine(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "memory": run_command(["free", "-h"]),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "loadavg_end": load(),
    }
    info.update(extra or {})
    return info


def load() -> list[float]:
    """The 1, 5 and 15 minute load averages: anything else running skews every figure."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run_command(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def write_json(path: str, results: list[Result], info: dict[str, Any]) -> None:
    doc = {"machine": info, "date": info["date"], "results": [r.as_json() for r in results]}
    with open(path, "w") as out:
        json.dump(doc, out, indent=2)
        out.write("\n")
