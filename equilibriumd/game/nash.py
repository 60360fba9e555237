"""Nash equilibrium checks: best response, exploitability, epsilon-Nash, Wardrop.

Role in routing: "is the current split an equilibrium, and how far from one
is it?"; ``wardrop_gap_batch`` answers that for all services at once. The
agent's engine computes its own Wardrop gap on effective latencies
(``engine``); these checks serve analysis, tests and the simulator.

Contracts (payoff convention of ``normal_form``: every player maximizes):

- ``best_response(payoffs, strategies, player) -> (action, gain)``: a pure
  action maximizing ``player``'s expected payoff against the others' mixed
  strategies (lowest index on ties) and how much it improves on the
  player's current expected payoff (>= 0). Exact.
- ``exploitability(payoffs, strategies) -> float``: the sum over players of
  the gain from a unilateral best response (NashConv). Guarantee: >= 0, and
  == 0 exactly at a Nash equilibrium; a profile is an epsilon-Nash
  equilibrium whenever ``exploitability <= epsilon``.
- ``is_epsilon_nash(payoffs, strategies, epsilon) -> bool``: no player can gain
  more than ``epsilon`` by deviating.
- ``wardrop_gap(latency, flow, available=None, used_threshold=0.0) -> float``:
  for a routing split, ``max latency over used backends - min latency over
  available backends`` (0 if nothing is used). A backend is used when its
  flow share exceeds ``used_threshold``.
  Guarantee: ``wardrop_gap <= epsilon`` iff the split is an epsilon-Wardrop
  equilibrium: every used backend is within epsilon of the least latency and
  no unused backend is more than epsilon faster than any used one.
- ``is_wardrop(...)``: ``wardrop_gap(...) <= epsilon``.
- ``wardrop_gap_batch(latency, flow, available, used_threshold)``: the same for
  every row of (services x backends) arrays, vectorized; rows without an
  available backend get 0.

References: J. Nash, "Non-cooperative games", Ann. Math. 54 (1951);
J. G. Wardrop, "Some theoretical aspects of road traffic research",
Proc. ICE 1 (1952); M. Lanctot et al., "A unified game-theoretic approach to
multiagent reinforcement learning" (NeurIPS 2017) for NashConv.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .normal_form import (
    ArrayLike,
    FloatArray,
    as_payoffs,
    as_strategies,
    deviation_payoffs,
)


def best_response(
    payoffs: Sequence[ArrayLike], strategies: Sequence[ArrayLike], player: int
) -> tuple[int, float]:
    """A pure best response for ``player`` and its gain over the current strategy."""
    arrays = as_payoffs(payoffs)
    strats = as_strategies(strategies, arrays[0].shape)
    values = deviation_payoffs(arrays, strats, player)
    action = int(np.argmax(values))
    gain = float(values[action] - values @ strats[player])
    return action, max(gain, 0.0)


def exploitability(payoffs: Sequence[ArrayLike], strategies: Sequence[ArrayLike]) -> float:
    """Sum over players of the gain from a best response (0 exactly at Nash)."""
    arrays = as_payoffs(payoffs)
    return float(sum(best_response(arrays, strategies, i)[1] for i in range(len(arrays))))


def is_epsilon_nash(
    payoffs: Sequence[ArrayLike], strategies: Sequence[ArrayLike], epsilon: float
) -> bool:
    """True when no player gains more than ``epsilon`` by a unilateral deviation."""
    arrays = as_payoffs(payoffs)
    return all(best_response(arrays, strategies, i)[1] <= epsilon for i in range(len(arrays)))


def wardrop_gap(
    latency: ArrayLike,
    flow: ArrayLike,
    available: ArrayLike | None = None,
    used_threshold: float = 0.0,
) -> float:
    """Max latency of a used backend minus the least latency of any available one."""
    lat = np.asarray(latency, dtype=np.float64)[None, :]
    fl = np.asarray(flow, dtype=np.float64)[None, :]
    av = None if available is None else np.asarray(available, dtype=bool)[None, :]
    return float(wardrop_gap_batch(lat, fl, av, used_threshold)[0])


def is_wardrop(
    latency: ArrayLike,
    flow: ArrayLike,
    epsilon: float,
    available: ArrayLike | None = None,
    used_threshold: float = 0.0,
) -> bool:
    """True when the split is an epsilon-Wardrop equilibrium."""
    return wardrop_gap(latency, flow, available, used_threshold) <= epsilon


def wardrop_gap_batch(
    latency: ArrayLike,
    flow: ArrayLike,
    available: ArrayLike | None = None,
    used_threshold: float = 0.0,
) -> FloatArray:
    """Row-wise ``wardrop_gap`` over (services x backends) arrays."""
    lat = np.asarray(latency, dtype=np.float64)
    fl = np.asarray(flow, dtype=np.float64)
    if lat.shape != fl.shape or lat.ndim != 2:
        raise ValueError("latency and flow must be (services, backends) arrays of one shape")
    av = np.ones(lat.shape, dtype=bool) if available is None else np.asarray(available, dtype=bool)
    total = np.where(av, fl, 0.0).sum(axis=1, keepdims=True)
    share = np.where(av, fl, 0.0) / np.where(total > 0.0, total, 1.0)
    used = av & (share > used_threshold)
    least = np.where(av, lat, np.inf).min(axis=1)
    worst_used = np.where(used, lat, -np.inf).max(axis=1)
    gap = worst_used - least
    # Rows with nothing used (or nothing available) are trivially at equilibrium.
    return np.where(np.isfinite(gap), np.maximum(gap, 0.0), 0.0)
