"""Small helpers shared by the benchmark scripts: medians, tables, JSON, machine facts."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def median(values: Iterable[float]) -> float:
    """Median of the values (nan when there are none)."""
    vals = list(values)
    return float(statistics.median(vals)) if vals else float("nan")


def spread(values: Iterable[float]) -> tuple[float, float]:
    """(min, max) of the values (nan, nan when there are none)."""
    vals = list(values)
    return (min(vals), max(vals)) if vals else (float("nan"), float("nan"))


def median_ci(values: Iterable[float], conf: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval for the median (order statistics,
    binomial/sign-test): with n values sorted, [x_(k), x_(n+1-k)] for the
    largest k with P(Binom(n, 1/2) <= k - 1) <= (1 - conf) / 2; at 95 % that is
    the whole range (min, max) up to n = 8, [x_(3), x_(10)] for 12 and
    [x_(4), x_(13)] for 16.
    (nan, nan) when there are no values."""
    vals = sorted(v for v in values if v == v)
    n = len(vals)
    if not n:
        return (float("nan"), float("nan"))
    alpha = (1.0 - conf) / 2
    k, below, term = 1, 0.0, 0.5 ** n      # below = P(B <= k - 1); term = P(B = k - 1)
    while k < (n + 1) // 2:
        below += term                       # now P(B <= k - 1)
        if below + term * (n - k + 1) / k > alpha:   # P(B <= k) too large: x_(k+1) would miss
            break
        term = term * (n - k + 1) / k       # P(B = k)
        k += 1
    return (vals[k - 1], vals[n - k])


def fmt(value: float | None, digits: int = 1) -> str:
    """A number for a table cell; '-' for missing or nan."""
    if value is None or value != value:
        return "-"
    return "%.*f" % (digits, value)


def ms(seconds: float | None) -> str:
    """Seconds as milliseconds for a table cell: no decimals from 100 ms, one below; '-' for missing."""
    if seconds is None:
        return "-"
    return "%.0f" % (seconds * 1e3) if seconds >= 0.1 else "%.1f" % (seconds * 1e3)


def num(value: float | None, digits: int = 3) -> str:
    """A number for a table cell with `digits` decimals; '-' for missing."""
    return "-" if value is None else "%.*f" % (digits, value)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool] | None = None) -> str:
    """Plain text table: the first column left-aligned, the others right-aligned
    unless `right` says otherwise."""
    align = list(right) if right is not None else [False] + [True] * (len(headers) - 1)
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        out = [str(c).rjust(w) if a else str(c).ljust(w) for c, w, a in zip(cells, widths, align)]
        return "  ".join(out).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


def write_json(path: str | Path, data: Any) -> Path:
    """Write `data` as indented JSON, creating the directory; returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, p)
    return p


def machine() -> dict[str, Any]:
    """Facts a reader needs to compare runs: CPUs, kernel, CPU model."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"nproc": os.cpu_count() or 0, "kernel": platform.release(), "cpu": model,
            "python": platform.python_version()}


def progress(message: str) -> None:
    """One progress line on stderr (stdout carries the result table)."""
    print("[bench] " + message, file=sys.stderr, flush=True)
