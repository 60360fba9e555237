"""Backend capacity from telemetry, overload detection and fair admission.

Role in routing: the engine learns *where* to send traffic; this module says
*how much* the backends can take, so an agent can tell a feasible offered
load from an overload and, in an overload, admit callers by max-min fair
shares instead of letting every backend saturate (issue 15, "feasible
payoffs and overload").

Model. Each tick gives, per backend, the served rate x (answers per second),
the mean latency W of those answers and the requests in flight N. The
latency is read as ``W = max(W_answered, N / x)`` once ``N`` reaches
``little_min_inflight`` (Little's law, N = x W, leads the answered mean when
a queue builds up; the engine's step 1 uses the same rule). Latency against
load follows the single-queue law

    W(x) = W0 / (1 - x / mu)     so     1 / W = 1 / W0 - x / (W0 * mu),

linear in x: an M/M/1 queue is the case W0 = 1 / mu (slope exactly -1), a
backend with c workers is approximated by the same curve (its latency also
grows without bound as x nears mu). ``mu`` is the capacity: the rate at
which latency diverges. The line is fitted over a sliding window of ticks by
the Theil-Sen estimator (median of pairwise slopes; it tolerates up to ~29 %
outlying ticks, e.g. a GC pause or a tick with a handful of answers), with
Sen's rank confidence interval for the slope carried through to ``mu``.
Capacity is unknown (NaN) while the window holds fewer than ``min_points``
ticks with answers, or while latency has not been seen to fall with load
(slope >= 0: the load never varied enough to reveal the knee). The largest
served rate in the window is reported beside it (``served_max``) but not
used as a bound: one tick's count of answers is noisy, and a backlog drained
in one tick can exceed mu.

Contracts:

- ``fit_capacity(rate, latency, z=1.96, min_points=8) -> CapacityEstimate``:
  ``rate`` and ``latency`` are (ticks, ...) arrays, NaN where a tick has no
  sample; the result's arrays have the trailing shape.
- ``CapacityEstimator(shape, window, ...)``: the same over a ring buffer fed
  one tick at a time (``update``), read with ``estimate()``.
- ``feasible(offered, capacity, access=None) -> (ok, headroom)``: can the
  backends serve the callers' offered rates; ``headroom`` is ``t - 1`` for
  the largest ``t`` with ``t * offered`` feasible (0.3: 30 % more load fits;
  1 / 1.3 - 1 = -0.23 at 1.3x capacity). Unknown (NaN) capacities are not
  guessed: the answer is ``(True, nan)``, since shedding on a guess would
  refuse load that fits.
- ``fair_admission(demand, capacity_total) -> admitted``: max-min fair
  shares (``feasible.max_min_fair``): every caller at or below the equal
  share ``capacity_total / n`` is admitted in full, the rest share what is
  left equally, and nothing is refused when the total fits.
- ``jain_index(x)``: Jain's fairness index ``(sum x)^2 / (n sum x^2)``, 1 for
  equal values, 1/n when one value has everything.

References: L. Kleinrock, *Queueing Systems* vol. 1 (1975) for M/M/1 and
Little's law; H. Theil (1950) and P. K. Sen, "Estimates of the regression
coefficient based on Kendall's tau", JASA 63 (1968) for the estimator and
its interval; D. Bertsekas & R. Gallager, *Data Networks* (1992) §6.5.2 for
max-min fairness; R. Jain, D. Chiu & W. Hawe, DEC-TR-301 (1984) for the index.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from .feasible import assignment, max_min_fair
from .normal_form import ArrayLike, FloatArray

#: Entries fitted at once: pairwise slopes cost ticks^2 / 2 floats per entry.
_CHUNK = 4096


@dataclass
class CapacityEstimate:
    """Per-entry capacity in requests per second; NaN where unknown."""

    capacity: FloatArray  #: point estimate of mu
    low: FloatArray       #: lower end of Sen's interval carried to mu
    high: FloatArray      #: upper end (inf when the slope's interval reaches 0)
    base: FloatArray      #: W0, the zero-load latency, seconds
    served_max: FloatArray  #: largest served rate in the window (0 when none)


def _mu(a: FloatArray, b: FloatArray) -> FloatArray:
    """Capacity -a/b of the line 1/W = a + b x; NaN unless a > 0 > b."""
    ok = (a > 0) & (b < 0)
    return np.where(ok, -a / np.where(ok, b, -1.0), np.nan)


def _fit_chunk(x: FloatArray, y: FloatArray, z: float, min_points: int) -> tuple[FloatArray, ...]:
    """Theil-Sen fit of y = a + b x per column of (ticks, entries) arrays."""
    n_ticks = x.shape[0]
    valid = np.isfinite(x) & np.isfinite(y)
    i, j = np.triu_indices(n_ticks, k=1)
    dx = x[j] - x[i]
    dy = y[j] - y[i]
    scale = np.nanmax(np.where(valid, np.abs(x), np.nan), axis=0, initial=0.0)
    # pairs at (nearly) the same rate say nothing about the slope
    pair = valid[i] & valid[j] & (np.abs(dx) > 1e-6 * np.maximum(scale, 1e-12))
    slopes = np.where(pair, dy / np.where(pair, dx, 1.0), np.nan)
    n_pairs = pair.sum(axis=0)
    n_pts = valid.sum(axis=0)
    enough = (n_pts >= min_points) & (n_pairs > 0)
    srt = np.sort(slopes, axis=0)                       # NaN last
    cols = np.arange(x.shape[1])

    def at(rank: np.ndarray) -> FloatArray:
        r = np.clip(rank, 0, np.maximum(n_pairs - 1, 0)).astype(np.intp)
        return np.asarray(srt[r, cols])

    # median of the valid slopes (mean of the two middle ones for an even count)
    b = 0.5 * (at((n_pairs - 1) // 2) + at(n_pairs // 2))
    # Sen's interval: ranks (N -+ C) / 2, C = z * sqrt(var of Kendall's S)
    c = z * np.sqrt(n_pts * (n_pts - 1) * (2 * n_pts + 5) / 18.0)
    b_lo = at(np.floor((n_pairs - c) / 2.0))
    b_hi = at(np.ceil((n_pairs + c) / 2.0) - 1)

    def intercept(slope: FloatArray) -> FloatArray:
        with warnings.catch_warnings():          # all-NaN columns (no samples) are expected
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.asarray(np.nanmedian(np.where(valid, y - slope * x, np.nan), axis=0))

    with np.errstate(all="ignore"):
        a = np.where(enough, intercept(np.where(enough, b, 0.0)), np.nan)
        mu = np.where(enough, _mu(a, b), np.nan)
        # a steeper fall (b_lo) means a lower capacity; a slope interval that reaches 0 an unbounded one
        mu_lo = np.where(enough, _mu(intercept(np.where(enough, b_lo, 0.0)), b_lo), np.nan)
        mu_hi = np.where(enough & (b_hi < 0), _mu(intercept(np.where(enough, b_hi, 0.0)), b_hi), np.inf)
        base = np.where(enough & (a > 0), 1.0 / np.where(a > 0, a, 1.0), np.nan)
    served = np.nanmax(np.where(valid, x, np.nan), axis=0, initial=0.0)
    served = np.where(np.isfinite(served), served, 0.0)
    # the interval brackets the estimate (the intercepts are refitted per slope)
    mu_lo = np.where(np.isfinite(mu), np.fmin(mu_lo, mu), np.nan)
    mu_hi = np.where(np.isfinite(mu), np.maximum(mu_hi, mu), np.nan)
    return mu, mu_lo, mu_hi, base, served


def fit_capacity(rate: ArrayLike, latency: ArrayLike, z: float = 1.96, min_points: int = 8) -> CapacityEstimate:
    """Capacity per entry from (ticks, ...) served rates and latencies (NaN: no sample)."""
    x = np.asarray(rate, dtype=np.float64)
    w = np.asarray(latency, dtype=np.float64)
    if x.shape != w.shape or x.ndim < 1:
        raise ValueError("rate and latency must have the same (ticks, ...) shape")
    trailing = x.shape[1:]
    x2 = x.reshape(x.shape[0], -1)
    ok = np.isfinite(x2) & (x2 > 0) & np.isfinite(w.reshape(x2.shape)) & (w.reshape(x2.shape) > 0)
    x2 = np.where(ok, x2, np.nan)
    y2 = np.where(ok, 1.0 / np.where(ok, w.reshape(x2.shape), 1.0), np.nan)
    parts = [_fit_chunk(x2[:, k:k + _CHUNK], y2[:, k:k + _CHUNK], z, min_points)
             for k in range(0, max(x2.shape[1], 1), _CHUNK)]
    cat = [np.concatenate([p[n] for p in parts]).reshape(trailing) for n in range(5)]
    return CapacityEstimate(capacity=cat[0], low=cat[1], high=cat[2], base=cat[3], served_max=cat[4])


class CapacityEstimator:
    """`fit_capacity` over the last `window` ticks, fed one tick at a time."""

    def __init__(self, shape: tuple[int, ...], window: int = 30, min_points: int = 8,
                 little_min_inflight: float = 3.0, z: float = 1.96) -> None:
        if window < 2 or min_points < 2:
            raise ValueError("window and min_points must be >= 2")
        self.shape = tuple(shape)
        self.window, self.min_points, self.z = window, min_points, z
        self.little_min_inflight = little_min_inflight
        self._rate = np.full((window, *self.shape), np.nan)
        self._lat = np.full((window, *self.shape), np.nan)
        self._next = 0

    def update(self, served: ArrayLike, latency: ArrayLike, seconds: float,
               inflight: ArrayLike | None = None) -> None:
        """One tick: answers served, their mean latency (NaN: none), requests in flight now."""
        if seconds <= 0:
            raise ValueError("seconds must be > 0")
        rate = np.asarray(served, dtype=np.float64) / seconds
        lat = np.asarray(latency, dtype=np.float64)
        if inflight is not None:
            n = np.asarray(inflight, dtype=np.float64)
            little = np.where((n >= self.little_min_inflight) & (rate > 0), n / np.where(rate > 0, rate, 1.0),
                              np.nan)
            lat = np.where(np.isfinite(little) & np.isfinite(lat), np.maximum(lat, little), lat)
        k = self._next % self.window
        self._rate[k] = np.where(rate > 0, rate, np.nan)
        self._lat[k] = lat
        self._next += 1

    def estimate(self) -> CapacityEstimate:
        return fit_capacity(self._rate, self._lat, z=self.z, min_points=self.min_points)


def feasible(offered: ArrayLike, capacity: ArrayLike, access: ArrayLike | None = None,
             tol: float = 1e-6) -> tuple[bool, float]:
    """(whether the backends can serve the callers' offered rates, headroom t* - 1)."""
    q = np.atleast_1d(np.asarray(offered, dtype=np.float64))
    c = np.atleast_1d(np.asarray(capacity, dtype=np.float64))
    if (q < 0).any() or not np.isfinite(q).all():
        raise ValueError("offered rates must be finite and >= 0")
    if np.isnan(c).any():
        return True, float("nan")       # an unknown capacity: no overload on a guess
    total = float(q.sum())
    if access is None:
        if total <= 0:
            return True, float("inf")
        t = float(c.sum()) / total
        return t >= 1.0 - tol, t - 1.0
    # restricted access: the largest feasible scale t, by bisection on the max-flow LP
    if total <= 0:
        return True, float("inf")
    ok = assignment(q, c, access) is not None
    lo, hi = 0.0, float(c.sum()) / total
    if assignment(hi * q, c, access) is not None:
        return ok, hi - 1.0
    while hi - lo > tol * max(hi, 1.0):
        mid = 0.5 * (lo + hi)
        if assignment(mid * q, c, access) is not None:
            lo = mid
        else:
            hi = mid
    return ok, lo - 1.0


def fair_admission(demand_per_caller: ArrayLike, capacity_total: float) -> FloatArray:
    """Max-min fair admitted rate per caller; everything when the capacity is unknown (NaN)."""
    d = np.maximum(np.asarray(demand_per_caller, dtype=np.float64), 0.0)
    if np.isnan(capacity_total):
        return d
    return max_min_fair(d, max(float(capacity_total), 0.0))


def jain_index(x: ArrayLike) -> float:
    """Jain's fairness index of non-negative values (1.0 for an empty or all-zero vector)."""
    v = np.asarray(x, dtype=np.float64).ravel()
    s2 = float((v * v).sum())
    return 1.0 if v.size == 0 or s2 == 0 else float(v.sum() ** 2 / (v.size * s2))


class ServiceCapacity:
    """One service's capacity (requests / s) from per-backend telemetry, tick by tick.

    A backend is *backlogged* in a tick when, at both its ends, more requests are in flight than
    it keeps busy (``inflight - served_rate x base_latency >= backlog``, Little's law; the base
    latency is the least tick mean seen, fading up slowly): its servers never idled, so what it
    served is a sample of its capacity, averaged over such ticks (exponentially, `half_life`
    seconds). Only backlogged ticks count: a peak of noisy counts overestimates, and under
    shedding a busy backend serves what is admitted, not what it could (an estimate from those
    would ratchet down with the shedding). A backend never seen backlogged is read from the
    `CapacityEstimator` fit (Sen's lower bound, at least its largest smoothed served rate), and
    is unknown (NaN, and so is the total) while the fit has no answer: its served rate alone is
    only a lower bound, and shedding on a guess would refuse load that fits (issue 15, item 2)."""

    def __init__(self, backends: int, window: int = 30, backlog: float = 3.0, half_life: float = 5.0,
                 base_half_life: float = 60.0) -> None:
        self.fit = CapacityEstimator((backends,), window=window)
        self.backlog, self.half_life, self.base_half_life = backlog, half_life, base_half_life
        self.base = np.full(backends, np.nan)       # base latency per backend (seconds)
        self.sat = np.full(backends, np.nan)        # capacity from backlogged ticks
        self.smooth = np.full(backends, np.nan)     # served rate, smoothed
        self.peak = np.zeros(backends)              # largest smoothed served rate
        self.queue = np.zeros(backends)             # requests queued at the last tick's end

    def update(self, served: ArrayLike, latency: ArrayLike, seconds: float, inflight: ArrayLike) -> None:
        """One tick: answers per backend, their mean latency (NaN: none), in flight now."""
        self.fit.update(served, latency, seconds, inflight)
        rate = np.asarray(served, dtype=np.float64) / seconds
        lat = np.asarray(latency, dtype=np.float64)
        n = np.asarray(inflight, dtype=np.float64)
        k = 0.5 ** (seconds / self.half_life)
        self.smooth = np.where(np.isfinite(self.smooth), k * self.smooth + (1 - k) * rate, rate)
        self.peak = np.maximum(self.peak, self.smooth)
        up = 0.5 ** (seconds / self.base_half_life)
        with np.errstate(invalid="ignore"):
            self.base = np.where(np.isfinite(lat), np.fmin(lat, self.base / up), self.base)
            queue = n - rate * np.where(np.isfinite(self.base), self.base, np.inf)
            full = (queue >= self.backlog) & (self.queue >= self.backlog) & (rate > 0)
        self.queue = np.where(np.isfinite(queue), queue, 0.0)
        self.sat = np.where(full, np.where(np.isfinite(self.sat), k * self.sat + (1 - k) * rate, rate), self.sat)

    def per_backend(self) -> FloatArray:
        low = self.fit.estimate().low
        guess = np.where(np.isfinite(low), np.fmax(low, self.peak), np.nan)
        cap = np.where(np.isfinite(self.sat), self.sat, guess)
        return np.where(cap > 0, cap, np.nan)

    def total(self) -> float:
        return float(self.per_backend().sum())     # NaN if any backend is unknown
