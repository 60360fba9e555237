"""Convergence: Lyapunov functions and a detector with hysteresis.

Role in routing: the agent reports per service whether learning has settled
(``converged``), is settling (``converging``) or is moving away
(``diverging``), and how far it is from equilibrium, without flapping.

Contracts:

- ``regret_potential(regret)``: ``sum (R^+)^2`` over the last axis, the
  Blackwell/Hart-Mas-Colell potential of regret matching. Guarantee: under
  regret matching its expected growth per round is at most ``|A| Delta^2``
  (so ``max R^+ / T <= Delta sqrt(|A| / T)``), and it is 0 exactly when no
  action has positive regret.
- ``beckmann_potential(flow, model)``: re-exported from ``potential``; the
  Wardrop split minimizes it.
- ``ConvergenceDetector(shape=(), enter=..., exit=..., patience=..., smoothing=...)``:
  fed one non-negative distance to equilibrium per entry each tick (e.g. a
  Wardrop gap or an average regret), it keeps an exponentially weighted
  ``distance`` and a state per entry. Guarantee (hysteresis): an entry
  becomes ``CONVERGED`` only after ``patience`` consecutive ticks with the
  smoothed distance at or below ``enter``, and leaves it only when the smoothed
  distance exceeds ``exit`` (> ``enter``); outside ``CONVERGED`` it is
  ``DIVERGING`` when the smoothed distance has risen for ``patience``
  consecutive ticks and is above ``exit``, else ``CONVERGING``. Works on any
  array shape, so one detector serves all services (``update`` costs a few
  vector operations).

References: D. Blackwell, "An analog of the minimax theorem for vector
payoffs", Pacific J. Math. 6 (1956); Hart & Mas-Colell (2000); for
hysteresis, the two-threshold (Schmitt trigger) rule.
"""

from __future__ import annotations

import numpy as np

from .normal_form import ArrayLike, FloatArray
from .potential import beckmann_potential

__all__ = [
    "CONVERGED",
    "CONVERGING",
    "DIVERGING",
    "STATE_NAMES",
    "ConvergenceDetector",
    "beckmann_potential",
    "regret_potential",
]

CONVERGING = 0
CONVERGED = 1
DIVERGING = 2
STATE_NAMES = ("converging", "converged", "diverging")


def regret_potential(regret: ArrayLike) -> FloatArray:
    """``sum (R^+)^2`` over the last axis."""
    pos = np.maximum(np.asarray(regret, dtype=np.float64), 0.0)
    return np.asarray((pos * pos).sum(axis=-1))


class ConvergenceDetector:
    """Per-entry converged / converging / diverging with two thresholds."""

    def __init__(
        self,
        shape: tuple[int, ...] = (),
        *,
        enter: float = 0.01,
        exit: float = 0.03,
        patience: int = 5,
        smoothing: float = 0.3,
    ) -> None:
        if not 0.0 <= enter < exit:
            raise ValueError("need 0 <= enter < exit")
        if patience < 1 or not 0.0 < smoothing <= 1.0:
            raise ValueError("need patience >= 1 and smoothing in (0, 1]")
        self.enter = enter
        self.exit = exit
        self.patience = patience
        self.smoothing = smoothing
        self._distance = np.full(shape, np.nan)
        self._state = np.full(shape, CONVERGING, dtype=np.int8)
        self._below = np.zeros(shape, dtype=np.int64)
        self._rising = np.zeros(shape, dtype=np.int64)

    @property
    def distance(self) -> FloatArray:
        """Smoothed distance to equilibrium (NaN before the first update)."""
        return self._distance.copy()

    @property
    def state(self) -> np.ndarray:
        """State codes: CONVERGING (0), CONVERGED (1), DIVERGING (2)."""
        return self._state.copy()

    def names(self) -> np.ndarray:
        """State names, same shape as ``state``."""
        flat = np.asarray(STATE_NAMES, dtype=object)[self._state.reshape(-1)]
        return flat.reshape(self._state.shape)

    def reset(self, where: ArrayLike) -> None:
        """Forget the history of the selected entries (e.g. backends changed)."""
        sel = np.asarray(where, dtype=bool)
        self._distance[sel] = np.nan
        self._state[sel] = CONVERGING
        self._below[sel] = 0
        self._rising[sel] = 0

    def remap(self, source: np.ndarray) -> None:
        """Carry history to a new set of entries: new entry i takes old entry
        ``source[i]`` (a vector), or starts afresh where ``source[i] < 0``."""
        src = np.asarray(source, dtype=np.intp)
        have = src >= 0
        pick = np.where(have, src, 0)

        def take(a: np.ndarray, fresh: float | int) -> np.ndarray:
            out = a[pick] if a.size else np.full(src.shape, fresh, dtype=a.dtype)
            return np.where(have, out, fresh).astype(a.dtype)

        self._distance = take(self._distance, np.nan)
        self._state = take(self._state, CONVERGING)
        self._below = take(self._below, 0)
        self._rising = take(self._rising, 0)

    def update(self, distance: ArrayLike) -> np.ndarray:
        """Fold in this tick's distances; returns the new state codes."""
        d = np.asarray(distance, dtype=np.float64)
        if d.shape != self._distance.shape:
            raise ValueError(f"distance must have shape {self._distance.shape}")
        d = np.where(np.isfinite(d), np.maximum(d, 0.0), self.exit * 2.0)
        prev = self._distance
        fresh = np.isnan(prev)
        cur = np.where(fresh, d, prev + self.smoothing * (d - np.where(fresh, 0.0, prev)))
        self._below = np.where(cur <= self.enter, self._below + 1, 0)
        self._rising = np.where(~fresh & (cur > prev), self._rising + 1, 0)
        was = self._state == CONVERGED
        stay = was & (cur <= self.exit)
        become = ~was & (self._below >= self.patience)
        converged = stay | become
        diverging = ~converged & (self._rising >= self.patience) & (cur > self.exit)
        self._state = np.where(
            converged, CONVERGED, np.where(diverging, DIVERGING, CONVERGING)
        ).astype(np.int8)
        self._distance = cur
        return self._state.copy()
