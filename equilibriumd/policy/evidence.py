"""Judging a backend by what its callers corroborate: one caller cannot make a
backend look worse than the other callers see it.

Any process can make a backend look bad: open connections and abandon them,
send half a request and hang up, or simply run behind a NetworkPolicy that
drops its SYNs. The kernel attributes every observation to (caller cgroup,
backend) as well (`datapath.evidence`: each caller's last second or so). Here
each caller's failures count only as far as the **other** callers of the same
backend corroborate them: caller c's failures are capped at its tries x the
failure rate the other callers see (leave-one-out), and a backend's
**credibility** is the share of its failures that survive the caps. The router
multiplies the backend's failures this tick by it; latency the same way (a
caller's time to first byte capped at its responses x the others' mean).

* one caller against the rest, however much it sends: its failures are capped
  at the rate the others see (0 for healthy peers), so it cannot move routing;
* a backend bad for everyone: everyone's failures corroborate everyone else's,
  credibility 1, counted in full at once (no lag: shift targets unchanged);
* a backend with a single caller: nobody to corroborate, nobody else to
  protect; its failures count in full (credibility 1), as before;
* what the callers of a backend claim together, by volume, still counts: a
  party that controls several cgroups sending most of a backend's traffic can
  move it (README, trust model). Failures of callers without a slot (a backend
  has CB_SLOTS) are scaled by the same credibility.

O(backends x slots) numpy, no sort and no per-caller state: the kernel keeps
the windows. NaN credibility: no failures (or no latency) in the window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..datapath.evidence import Evidence


def _rowsum(x: np.ndarray) -> np.ndarray:
    """Sum over the (few) slots of each row: column adds beat a reduction along a short axis."""
    out = x[:, 0].copy()
    for j in range(1, x.shape[1]):
        out += x[:, j]
    return out


def corroborated(tried: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """Per slot, the part of its `bad` (n, slots) that the other slots of its row
    corroborate: its bad capped at its tried x the others' bad / tried (all of it
    when it is the row's only caller)."""
    total_tried, total = _rowsum(tried), _rowsum(bad)
    others_tried = total_tried[:, None] - tried
    others_bad = total[:, None] - bad
    rate = np.divide(others_bad, others_tried, out=np.zeros_like(others_bad), where=others_tried > 0)
    return np.where(others_tried > 0, np.minimum(bad, tried * rate), bad)


def credibility(tried: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """Per row (backend), the share of `bad` (n, slots) that the other slots of the
    row corroborate; NaN for rows without bad."""
    total = _rowsum(bad)
    return np.divide(_rowsum(corroborated(tried, bad)), total, out=np.full(total.shape, np.nan), where=total > 0)


@dataclass
class Verdict:
    """Per backend id: how much of its failures and latency its callers corroborate
    (0..1; NaN: nothing to judge), and how many callers sent it evidence lately."""

    req_failed: np.ndarray     #: of request-level failures (5xx, unanswered, refused, timed out)
    conn_failed: np.ndarray    #: of connect failures (refused, reset, timed out)
    req_latency: np.ndarray    #: of time to first byte
    conn_latency: np.ndarray   #: of connect time
    callers: np.ndarray
    #: failures the other callers did not corroborate, per (row, slot) with any:
    #: (rows, cgroups, amounts) — bad for those callers' reputations (policy.cooperation)
    disputed: tuple[np.ndarray, np.ndarray, np.ndarray] = (np.zeros(0, dtype=np.int64),
                                                           np.zeros(0, dtype=np.uint64), np.zeros(0))

    @staticmethod
    def none(n: int) -> "Verdict":
        return Verdict(np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan),
                       np.zeros(n, dtype=np.int64))


#: what each credibility compares: (tried, bad) counter names, request level and connection level;
#: latency: (answered, time) — the telemetry's definitions (datapath.telemetry)
_REQ_TRIED = ("requests", "refused", "timed_out")
_REQ_BAD = ("resp_5xx", "req_errors", "refused", "timed_out")
_CONN_BAD = ("refused", "reset", "timed_out")


class Judge:
    """Judges every backend id each tick, in buffers it keeps (no allocation per tick
    beyond the verdict: a node-sized tick would otherwise fault its pages in anew)."""

    def __init__(self) -> None:
        self._buf = np.zeros((0, 0, 0), dtype=np.float32)
        #: weight of each caller's evidence (cgroup ids -> 0..1; None: all 1): a caller
        #: with a poor reputation has its failures scaled down (policy.cooperation.trust)
        self.trust: Callable[[np.ndarray], np.ndarray] | None = None

    def __call__(self, e: Evidence) -> Verdict:
        n, k = e.scale.shape
        if self._buf.shape[1:] != (n, k):
            self._buf = np.zeros((2, n, k), dtype=np.float32)
        tried, bad = self._buf
        v = Verdict.none(n)
        v.callers = _rowsum(e.live.astype(np.int64))
        several = v.callers >= 2    # a single caller is judged alone: no verdict
        if not several.any():
            return v
        # request level for backends that were sent HTTP requests lately, else connection level
        http = _rowsum(e.total(("requests",), out=tried)) > 0
        for out, t, x, level in ((v.req_failed, _REQ_TRIED, _REQ_BAD, http),
                                 (v.req_latency, ("responses",), ("req_ns_sum",), http),
                                 (v.conn_failed, ("attempts",), _CONN_BAD, ~http),
                                 (v.conn_latency, ("established",), ("conn_ns_sum",), ~http)):
            judged = several & level
            if not judged.any():
                continue
            e.total(x, out=bad)     # idle and free slots have scale 0: they count for nothing
            rows = np.flatnonzero(judged & (_rowsum(bad) > 0))
            if rows.size == 0:
                continue
            e.total(t, out=tried)
            t_r, b_r = tried[rows], bad[rows]
            if self.trust is not None:
                b_r = b_r * self.trust(e.cgroups[rows])
            counted = corroborated(t_r, b_r)
            total = _rowsum(b_r)
            out[rows] = np.divide(_rowsum(counted), total, out=np.full(total.shape, np.nan), where=total > 0)
            if out is v.req_failed or out is v.conn_failed:
                gap = bad[rows] - counted
                i, j = np.nonzero(gap > 0.5)
                v.disputed = (np.r_[v.disputed[0], rows[i]], np.r_[v.disputed[1], e.cgroups[rows][i, j]],
                              np.r_[v.disputed[2], gap[i, j]])
        return v


def by_caller(e: Evidence) -> list[list[dict[str, Any]]]:
    """Per row (backend), what each live caller slot holds and how much of its
    request-level failures the other callers corroborate (what `explain` shows:
    which callers' evidence moved the backend's weight, and which was discounted)."""
    live = e.live
    tried, bad = e.total(_REQ_TRIED) * live, e.total(_REQ_BAD) * live
    counted = corroborated(tried, bad)
    ns, resp = e.total(("req_ns_sum",)), e.total(("responses",))
    out: list[list[dict[str, Any]]] = []
    for r in range(live.shape[0]):
        out.append([{"cgroup": int(e.cgroups[r, j]), "requests": round(float(tried[r, j]), 1),
                     "failures": round(float(bad[r, j]), 1), "counted_failures": round(float(counted[r, j]), 1),
                     "latency_seconds": _per(ns[r, j] * 1e-9, resp[r, j])}
                    for j in np.flatnonzero(live[r])])
    return out


def _per(total: float, n: float) -> float | None:
    return round(float(total) / float(n), 6) if n > 0 else None


def judge(e: Evidence) -> Verdict:
    """The verdict for every backend id of `e` (a one-off `Judge`)."""
    return Judge()(e)
