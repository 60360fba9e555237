"""Folk theorem: trigger strategies with minmax punishment, credible length, forgiveness.

Role in routing (run by the agent: policy.cooperation): callers that flood an
overloaded service beyond their fair share (defect) are punished for a finite
number of periods (their connects held to a budget below their share, in the
kernel) and then forgiven. The punishment is long enough that defecting never pays for the
callers' discount factor, short enough to forgive honest mistakes.

Stage game shape for the closed forms: a prisoner's dilemma with temptation
``T``, reward ``R`` (mutual cooperation), punishment ``P`` (mutual defection)
and sucker ``S``, ``T > R > P > S``. Payoffs are discounted by ``delta`` per tick.

Contracts:

- ``min_discount_factor(temptation, reward, punishment) = (T - R) / (T - P)``:
  the smallest delta at which grim trigger (punish forever) sustains
  cooperation. Guarantee: cooperation under grim trigger is a subgame-perfect
  equilibrium iff ``delta >= (T - R) / (T - P)`` (Friedman 1971); mutual
  defection is a stage Nash equilibrium, so the punishment is credible.
- ``punishment_length(gain, reward, punishment, delta) -> int | None``: the
  smallest number of punishment ticks ``L`` with ``gain <= (reward -
  punishment) * sum_{k=1}^{L} delta^k``, i.e. the one-shot deviation gain is
  wiped out by the discounted loss during punishment; ``None`` when even
  punishing forever is not enough (delta below the grim-trigger bound), 0 when
  ``gain <= 0``. Guarantee: with this ``L`` and a punishment profile that is a
  stage Nash equilibrium (e.g. mutual defection in the PD), no one-shot
  deviation is profitable in any state, so by the one-shot deviation
  principle the trigger strategy is subgame perfect (Fudenberg & Tirole 1991,
  sec. 4.2); and ``L - 1`` ticks would not deter.
- ``minmax_value(payoffs, player) -> (value, punisher_strategy)``: the lowest
  payoff the others can hold ``player`` to when it best-responds, by LP. Exact
  for two players; for more it lets the punishers correlate (a joint
  distribution over their profiles), which is at most the independent minmax.
- ``is_individually_rational(payoffs, minmax, tol=1e-9)``: every payoff is at
  least the player's minmax value, the folk theorem's condition for a payoff
  vector to be sustainable.
- ``TriggerStrategy(n, length)``: vectorized state machine over ``n`` callers.
  ``step(deviated)`` returns who is punished this tick: a deviation (re)starts
  ``length`` ticks of punishment; after them the caller is forgiven.

References: J. Friedman, "A non-cooperative equilibrium for supergames",
Rev. Econ. Stud. 38 (1971); D. Fudenberg & E. Maskin, "The folk theorem in
repeated games with discounting or with incomplete information",
Econometrica 54 (1986); D. Fudenberg & J. Tirole, *Game Theory* (1991), ch. 5.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from . import zero_sum
from .normal_form import ArrayLike, BoolArray, FloatArray, as_payoffs


def _check_pd(temptation: float, reward: float, punishment: float) -> None:
    if not temptation > punishment or not reward > punishment:
        raise ValueError("need temptation > punishment and reward > punishment")


def min_discount_factor(temptation: float, reward: float, punishment: float) -> float:
    """Smallest delta sustaining cooperation with grim trigger: ``(T - R) / (T - P)``."""
    _check_pd(temptation, reward, punishment)
    return max((temptation - reward) / (temptation - punishment), 0.0)


def grim_trigger_sustainable(
    temptation: float, reward: float, punishment: float, delta: float
) -> bool:
    """True iff cooperation is a subgame-perfect outcome of grim trigger at ``delta``."""
    return delta >= min_discount_factor(temptation, reward, punishment)


def punishment_length(gain: float, reward: float, punishment: float, delta: float) -> int | None:
    """Shortest punishment making a one-shot deviation with ``gain`` unprofitable."""
    if not reward > punishment:
        raise ValueError("need reward > punishment")
    if not 0.0 <= delta < 1.0:
        raise ValueError("delta must be in [0, 1)")
    if gain <= 0.0:
        return 0
    loss = reward - punishment
    if delta == 0.0 or gain > loss * delta / (1.0 - delta):
        return None
    # delta * (1 - delta^L) / (1 - delta) >= gain / loss  <=>  delta^L <= r.
    r = 1.0 - gain * (1.0 - delta) / (loss * delta)
    if r <= 0.0:
        return None
    length = max(1, math.ceil(math.log(r) / math.log(delta))) if r < 1.0 else 1
    # Correct for floating-point error in the logarithms.
    while length > 1 and _deters(gain, loss, delta, length - 1):
        length -= 1
    while not _deters(gain, loss, delta, length):
        length += 1
    return length


def _deters(gain: float, loss: float, delta: float, length: int) -> bool:
    return gain <= loss * delta * (1.0 - delta**length) / (1.0 - delta) * (1 + 1e-12)


def minmax_value(payoffs: Sequence[ArrayLike], player: int) -> tuple[float, FloatArray]:
    """``player``'s minmax value and the punishers' (joint) strategy achieving it."""
    arrays = as_payoffs(payoffs)
    u = np.moveaxis(arrays[player], player, 0)
    others = u.shape[1:]
    M = u.reshape(u.shape[0], -1)
    # Player maximizes over rows, punishers minimize over columns: a zero-sum game.
    _, y, value = zero_sum.solve(M)
    return value, y.reshape(others)


def is_individually_rational(payoffs: ArrayLike, minmax: ArrayLike, tol: float = 1e-9) -> bool:
    """Every player's payoff is at least its minmax value."""
    p = np.asarray(payoffs, dtype=np.float64)
    m = np.asarray(minmax, dtype=np.float64)
    return bool(np.all(p >= m - tol))


class TriggerStrategy:
    """Finite-punishment trigger with forgiveness for ``n`` callers at once."""

    def __init__(self, n: int, length: int) -> None:
        if n < 0 or length < 0:
            raise ValueError("n and length must be non-negative")
        self.length = length
        self._left = np.zeros(n, dtype=np.int64)

    def resize(self, n: int) -> None:
        """Keep the first callers' state; new callers start cooperating."""
        left = np.zeros(n, dtype=np.int64)
        keep = min(n, self._left.size)
        left[:keep] = self._left[:keep]
        self._left = left

    def take(self, index: ArrayLike) -> None:
        """Keep only the callers at ``index``, in that order (the others left the game)."""
        self._left = self._left[np.asarray(index, dtype=np.int64)]

    @property
    def remaining(self) -> np.ndarray:
        """Punishment ticks left per caller (0: cooperating)."""
        return self._left.copy()

    def step(self, deviated: ArrayLike, length: ArrayLike | None = None) -> BoolArray:
        """Advance one tick; returns who is punished during this tick. ``length``:
        per caller, the punishment a deviation now (re)starts (default ``self.length``;
        e.g. ``punishment_length`` of each deviator's own gain)."""
        dev = np.asarray(deviated, dtype=bool)
        if dev.shape != self._left.shape:
            raise ValueError(f"deviated must have shape {self._left.shape}")
        n = self.length if length is None else np.asarray(length, dtype=np.int64)
        # Count down first so a caller serves exactly ``length`` ticks, then is forgiven.
        self._left = np.maximum(self._left - 1, 0)
        self._left = np.where(dev, n, self._left)
        return self._left > 0
