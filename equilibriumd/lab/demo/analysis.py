"""The demo's figures, computed from the load generator's records (pure: numpy, no I/O).

Every request record carries its start time (its arrival: with a new
connection per request, when connect() was called, which is when the kernel
chose the backend), the backend that answered (X-Backend) and its latency.
Times here are seconds since the load started.

Definitions (also written into the summary):

shift_seconds     time from the slow-down until the slowed backend's share of
                  requests (see below), over the trailing 1 s, is <= 5 % and stays
                  <= 5 % for the next 3 s (the first such window end, minus
                  t_slow; checked every 0.1 s)
recovery_seconds  time from the restore until its share over the trailing 2 s
                  is within 0.05 of even (1/3)
oscillation       max over the service's backends of the std-dev of their
                  shares in consecutive 1 s windows, in the settled part of the
                  slow period (t_slow + shift + 5 .. t_restore) and after
                  recovery (t_restore + recovery + 5 .. end); the larger of both
p99 before/during/after   p99 latency of the service's requests started in
                  [0, t_slow), [t_slow + 5, t_restore), [t_restore + recovery, end)

Requests that failed (no X-Backend) are left out of the shares and counted
as client errors.

Shares are of requests, by the X-Backend of each answer. With a new
connection per request (`--clients new`) that is the share of new
connections; with keep-alive pools (`--clients pooled`) it is where the
requests went, whatever connection carried them, which is what a pooled
client's users see.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


@dataclass
class Requests:
    """One service's requests as arrays: start time (s since load start),
    backend index (-1: failed), latency (s), ok (status 200)."""

    t: np.ndarray
    backend: np.ndarray
    latency: np.ndarray
    ok: np.ndarray
    names: list[str]

    @classmethod
    def from_records(cls, records: Sequence[dict[str, Any]], names: Sequence[str], t0: float) -> "Requests":
        index = {n: i for i, n in enumerate(names)}
        n = len(records)
        t = np.empty(n)
        b = np.empty(n, dtype=np.int64)
        lat = np.empty(n)
        ok = np.empty(n, dtype=bool)
        for k, r in enumerate(records):
            t[k] = r["t"] - t0
            b[k] = index.get(r.get("b") or "", -1)
            lat[k] = r.get("lat", np.nan)
            ok[k] = r.get("st") == 200
        order = np.argsort(t, kind="stable")
        return cls(t[order], b[order], lat[order], ok[order], list(names))

    @property
    def n_backends(self) -> int:
        return len(self.names)

    def counts(self, start: float, end: float) -> np.ndarray:
        """Requests per backend started in [start, end) (answered ones only)."""
        lo, hi = np.searchsorted(self.t, [start, end], side="left")
        b = self.backend[lo:hi]
        return np.bincount(b[b >= 0], minlength=self.n_backends)[: self.n_backends]

    def shares(self, start: float, end: float) -> np.ndarray | None:
        c = self.counts(start, end)
        s = c.sum()
        return c / s if s > 0 else None

    def latencies(self, start: float, end: float, ok_only: bool = True) -> np.ndarray:
        lo, hi = np.searchsorted(self.t, [start, end], side="left")
        lat = self.latency[lo:hi]
        return lat[self.ok[lo:hi]] if ok_only else lat


def share_series(req: Requests, start: float, end: float, width: float = 1.0,
                 step: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(window starts, shares [windows x backends] (NaN if empty), totals) for
    windows [s, s + width) from start while s + width <= end."""
    step = step or width
    starts = np.arange(start, end - width + 1e-9, step)
    shares = np.full((len(starts), req.n_backends), np.nan)
    totals = np.zeros(len(starts), dtype=np.int64)
    for k, s in enumerate(starts):
        c = req.counts(s, s + width)
        totals[k] = c.sum()
        if totals[k]:
            shares[k] = c / totals[k]
    return starts, shares, totals


def p99_series(req: Requests, start: float, end: float, width: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    starts = np.arange(start, end - width + 1e-9, width)
    out = np.full(len(starts), np.nan)
    for k, s in enumerate(starts):
        lat = req.latencies(s, s + width)
        if lat.size:
            out[k] = float(np.percentile(lat, 99))
    return starts, out


def percentile(values: np.ndarray, q: float = 99) -> float | None:
    return float(np.percentile(values, q)) if values.size else None


def shift_seconds(req: Requests, slowed: int, t_slow: float, t_end: float, threshold: float = 0.05,
                  width: float = 1.0, hold: float = 3.0, step: float = 0.1) -> float | None:
    """See the module docstring; None if it never happens before t_end."""
    t = t_slow + width
    while t + hold <= t_end + 1e-9:
        ok = True
        u = t
        while u <= t + hold + 1e-9:
            sh = req.shares(u - width, u)
            if sh is None or sh[slowed] > threshold:
                ok = False
                break
            u += step
        if ok:
            return round(t - t_slow, 3)
        t += step
    return None


def recovery_seconds(req: Requests, slowed: int, t_restore: float, t_end: float, tolerance: float = 0.05,
                     width: float = 2.0, step: float = 0.1) -> float | None:
    even = 1.0 / req.n_backends
    t = t_restore + width
    while t <= t_end + 1e-9:
        sh = req.shares(t - width, t)
        if sh is not None and abs(sh[slowed] - even) <= tolerance:
            return round(t - t_restore, 3)
        t += step
    return None


def oscillation(req: Requests, start: float, end: float, min_windows: int = 3) -> float | None:
    """Max over backends of the std-dev of 1 s-window shares in [start, end)."""
    if end - start < min_windows:
        return None
    _, shares, totals = share_series(req, start, end, 1.0)
    shares = shares[totals > 0]
    if len(shares) < min_windows:
        return None
    return float(np.max(np.std(shares, axis=0)))


def weight_oscillation(t: Sequence[float], weights: Sequence[Sequence[float | None]],
                       windows: Sequence[Sequence[float] | None]) -> float | None:
    """Max over backends of the std-dev of the agent's sampled weights (one sample
    per tick, at times `t`, seconds since the load started) in each [start, end)
    window; the largest over the windows. The agent's own steadiness, to set
    beside the request shares' (which also carry the clients' noise)."""
    if not len(t):
        return None
    w = np.array([[np.nan if x is None else x for x in row] for row in weights], dtype=float)
    ts = np.asarray(t, dtype=float)
    out = []
    for win in windows:
        if win is None:
            continue
        sel = (ts >= win[0]) & (ts < win[1])
        if sel.sum() >= 3 and w.ndim == 2:
            out.append(float(np.nanmax(np.nanstd(w[sel], axis=0))))
    return max(out) if out else None


def figures(req: Requests, slowed: int, t_slow: float, t_restore: float, t_end: float) -> dict[str, Any]:
    """All the headline figures for the slowed service."""
    shift = shift_seconds(req, slowed, t_slow, t_restore)
    recovery = recovery_seconds(req, slowed, t_restore, t_end)
    slow_from = t_slow + (shift if shift is not None else 0.0) + 5.0
    osc_slow = oscillation(req, slow_from, t_restore) if shift is not None else None
    osc_after = oscillation(req, t_restore + recovery + 5.0, t_end) if recovery is not None else None
    parts = [x for x in (osc_slow, osc_after) if x is not None]
    after_from = t_restore + (recovery if recovery is not None else 5.0)
    during = req.shares(slow_from, t_restore) if shift is not None else None
    return {
        "shift_seconds": shift,
        "recovery_seconds": recovery,
        "oscillation": max(parts) if parts else None,
        "oscillation_slow_period": osc_slow,
        "oscillation_after_recovery": osc_after,
        "oscillation_windows": {"slow_period": [round(slow_from, 2), t_restore] if osc_slow is not None else None,
                                "after_recovery": ([round(t_restore + recovery + 5.0, 2), t_end]
                                                   if osc_after is not None and recovery is not None else None)},
        "p99_latency_seconds": {
            "before": percentile(req.latencies(0.0, t_slow)),
            "during": percentile(req.latencies(t_slow + 5.0, t_restore)),
            "after": percentile(req.latencies(after_from, t_end)),
        },
        "p99_windows": {"before": [0.0, t_slow], "during": [t_slow + 5.0, t_restore],
                        "after": [round(after_from, 2), t_end]},
        "slowed_share_settled": float(during[slowed]) if during is not None else None,
        "shares_before": _rounded(req.shares(0.0, t_slow)),
        "shares_during": _rounded(during),
        "shares_after": _rounded(req.shares(after_from, t_end)),
    }


def _rounded(a: np.ndarray | None) -> list[float] | None:
    return None if a is None else [round(float(x), 4) for x in a]
