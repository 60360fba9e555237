"""Repeated game: per-caller reputation over time, with decay.

Role in routing (run by the agent: policy.cooperation): the agent remembers
how each caller behaved toward each service across periods (stayed within its
fair share or flooded; evidence the other callers did not corroborate); the
reputation weighs the caller's evidence (policy.evidence) and its slack before
a punishment (folk), and old behaviour fades so a caller can redeem itself.

Model: a beta reputation per caller (Josang & Ismail 2002) with exponential
forgetting. Evidence counts ``good`` and ``bad`` are discounted by
``0.5 ** (dt / half_life)`` before new evidence is added; the score is the
posterior mean ``(good + a) / (good + bad + a + b)`` under a Beta(a, b) prior.

Contracts:

- ``Reputation(n_callers, half_life=..., prior=(a, b))``; ``update(good, bad,
  dt=1.0)`` with non-negative evidence per caller; ``score()`` per caller.
  Guarantee: scores lie strictly in (0, 1); more good evidence never lowers
  a score and more bad evidence never raises it; with no new evidence the
  score moves monotonically toward the prior mean ``a / (a + b)``, and
  evidence older than ``k`` half-lives weighs ``2^-k`` of fresh evidence.
- ``trusted(threshold)``: callers whose score is at least ``threshold``.
- ``resize(n_callers)``: keep existing callers, new ones start at the prior.

Reference: A. Josang & R. Ismail, "The beta reputation system", Bled
eCommerce Conference (2002); G. Mailath & L. Samuelson, *Repeated Games and
Reputations* (2006).
"""

from __future__ import annotations

import numpy as np

from .normal_form import ArrayLike, BoolArray, FloatArray


class Reputation:
    """Decaying beta reputation for ``n_callers`` callers."""

    def __init__(
        self, n_callers: int, *, half_life: float = 120.0, prior: tuple[float, float] = (1.0, 1.0)
    ) -> None:
        if n_callers < 0 or half_life <= 0 or prior[0] <= 0 or prior[1] <= 0:
            raise ValueError("need n_callers >= 0, half_life > 0 and a positive prior")
        self.half_life = half_life
        self.prior = (float(prior[0]), float(prior[1]))
        self._good = np.zeros(n_callers)
        self._bad = np.zeros(n_callers)

    def __len__(self) -> int:
        return int(self._good.size)

    def resize(self, n_callers: int) -> None:
        keep = min(n_callers, self._good.size)
        good, bad = np.zeros(n_callers), np.zeros(n_callers)
        good[:keep], bad[:keep] = self._good[:keep], self._bad[:keep]
        self._good, self._bad = good, bad

    def take(self, index: ArrayLike) -> None:
        """Keep only the callers at ``index``, in that order (the others left)."""
        i = np.asarray(index, dtype=np.int64)
        self._good, self._bad = self._good[i], self._bad[i]

    def update(self, good: ArrayLike, bad: ArrayLike, dt: float = 1.0) -> FloatArray:
        """Decay by ``dt`` ticks, add the evidence, return the new scores."""
        g = np.broadcast_to(np.asarray(good, dtype=np.float64), self._good.shape)
        b = np.broadcast_to(np.asarray(bad, dtype=np.float64), self._bad.shape)
        if (g < 0).any() or (b < 0).any() or dt < 0:
            raise ValueError("evidence and dt must be non-negative")
        keep = 0.5 ** (dt / self.half_life)
        self._good = self._good * keep + g
        self._bad = self._bad * keep + b
        return self.score()

    def evidence(self) -> tuple[FloatArray, FloatArray]:
        """The decayed (good, bad) evidence per caller."""
        return self._good.copy(), self._bad.copy()

    def score(self) -> FloatArray:
        a, b = self.prior
        return np.asarray((self._good + a) / (self._good + self._bad + a + b))

    def trusted(self, threshold: float) -> BoolArray:
        return np.asarray(self.score() >= threshold)
