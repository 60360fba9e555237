"""Baseline policies, for comparison and for users who want them (pure).

Each maps one service's per-backend observations to weights. The kernel
draws one backend per connection from the weights, so a per-request
algorithm (least-connections, P2C) is approximated by the distribution it
would produce over the next tick, computed from the same information:

* `static`: the configured weights.
* `random`, `round-robin`: even weights. With a random draw per connection
  both are even in expectation; the kernel has no rotation state.
* `least-connections`: weights ∝ 1 / (1 + open connections): the backend
  with fewer open connections gets more of the new ones.
* `p2c-ewma`: Linkerd's default: power of two choices over PeakEWMA cost =
  latency EWMA (peak-sensitive, decay time `decay` = 10 s, 30 ms default
  before any sample) × (in-flight + 1). Two backends are drawn uniformly
  with replacement and the cheaper wins, so the backend of cost rank r
  (0 = cheapest) of n is chosen with probability (2(n - r) - 1) / n².
"""

from __future__ import annotations

import math

import numpy as np


def static(configured: np.ndarray) -> np.ndarray:
    w = np.maximum(np.asarray(configured, dtype=np.float64), 0.0)
    return w


def even(n: int) -> np.ndarray:
    return np.ones(n)


def least_connections(open_connections: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.maximum(np.asarray(open_connections, dtype=np.float64), 0.0))


def p2c_probabilities(cost: np.ndarray) -> np.ndarray:
    """Probability that power-of-two-choices picks each backend, ties shared."""
    c = np.asarray(cost, dtype=np.float64)
    n = c.size
    if n == 0:
        return c
    # rank with ties averaged: P(i) = (2 * #(cost_j > c_i) + #(cost_j == c_i)) / n²
    greater = (c[None, :] > c[:, None]).sum(axis=1)
    equal = (c[None, :] == c[:, None]).sum(axis=1)
    return (2.0 * greater + equal) / (n * n)


def p2c_probability_rows(cost: np.ndarray, present: np.ndarray) -> np.ndarray:
    """`p2c_probabilities` for every row of a (services x backends) matrix, over the
    entries in `present` (the others get 0)."""
    c = np.asarray(cost, dtype=np.float64)
    pres = np.asarray(present, dtype=bool)
    n = pres.sum(axis=1)
    other = pres[:, None, :]      # j, compared with i
    greater = ((c[:, None, :] > c[:, :, None]) & other).sum(axis=2)
    equal = ((c[:, None, :] == c[:, :, None]) & other).sum(axis=2)
    p = (2.0 * greater + equal) / np.maximum(n * n, 1)[:, None]
    return np.where(pres, p, 0.0)


class PeakEwma:
    """Linkerd's PeakEWMA latency estimate for a set of backends (any array shape)."""

    def __init__(self, n: int | tuple[int, ...], default_rtt: float = 0.030, decay: float = 10.0) -> None:
        self.value = np.full(n, default_rtt)
        self.decay = decay

    def observe(self, latency: np.ndarray, dt: float) -> np.ndarray:
        """Fold in this tick's mean latency (NaN: no sample): a peak replaces the
        estimate at once, a lower value is blended in with weight 1 - e^(-dt/decay)."""
        lat = np.asarray(latency, dtype=np.float64)
        have = np.isfinite(lat)
        w = math.exp(-dt / self.decay)
        blended = self.value * w + np.where(have, lat, 0.0) * (1 - w)
        self.value = np.where(have, np.where(lat > self.value, lat, blended), self.value)
        return self.value

    def weights(self, inflight: np.ndarray) -> np.ndarray:
        return p2c_probabilities(self.value * (np.maximum(inflight, 0.0) + 1.0))
