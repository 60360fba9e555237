"""Potential games: Wardrop and optimal splits, marginal-cost tolls, Rosenthal's potential.

Role in routing: a service's backends are parallel links; callers spreading
a demand over them play a nonatomic congestion game, whose equilibrium (the
Wardrop split) minimizes the Beckmann potential while the social optimum
minimizes total latency. Marginal-cost tolls make the two coincide.

Contracts (``demand`` >= 0; models from ``congestion``; flows are arrays over
links, or (..., links) for a batch of services with ``demand`` shaped (...)):

- ``wardrop(demand, free_flow, slope) -> flow`` and ``optimum(demand,
  free_flow, slope) -> flow`` for affine links ``l_e(x) = free_flow[e] +
  slope[e] * x`` (fixed public API).
- ``wardrop_split(demand, model)`` / ``optimal_split(demand, model)`` for any
  ``LatencyModel``. Guarantee: ``flow >= 0``, ``flow.sum() == demand`` (to
  ~1e-12 relative) and (Wardrop) every used link has the least latency,
  unused links are no faster; (optimum) the same for marginal cost
  ``d/dx [x l(x)]``, which for convex ``x l(x)`` is the KKT condition of
  minimizing ``total_cost``. Links of constant latency at the common level
  share the remaining demand equally (any split among them is equivalent).
  Raises ``ValueError`` when the demand exceeds the total capacity.
- ``total_cost(flow, model) = sum x l(x)``; ``price_of_anarchy(demand, model)``
  is the Wardrop cost over the optimal cost (4/3 for Pigou's network, the
  worst case for affine latencies).
- ``marginal_cost_tolls(demand, model) -> tau``, ``tau_e = x*_e l'_e(x*_e)``
  at the optimum ``x*``. Guarantee (Beckmann, McGuire & Winsten 1956): the
  Wardrop split of ``model.tolled(tau)`` is the optimal split, so its
  latency (without tolls) equals the optimal cost.
- ``beckmann_potential(flow, model) = sum_e int_0^{x_e} l_e``; the Wardrop
  split minimizes it over all splits of the same demand.
- Atomic games: ``resource_loads(profile, n_resources)``, ``player_cost(profile,
  player, costs)`` and ``rosenthal_potential(profile, costs)``
  ``= sum_e sum_{k=1}^{n_e} c_e(k)`` where ``costs[e, k-1] = c_e(k)``.
  Guarantee (Rosenthal 1973): when one player changes strategy, the potential
  changes by exactly that player's change in cost, so best-response dynamics
  terminate at a pure Nash equilibrium.

References: M. Beckmann, C. McGuire, C. Winsten, *Studies in the Economics of
Transportation* (1956); R. Rosenthal, "A class of games possessing pure-strategy
Nash equilibria", Int. J. Game Theory 2 (1973); T. Roughgarden & E. Tardos,
"How bad is selfish routing?", J. ACM 49 (2002); D. Monderer & L. Shapley,
"Potential games", GEB 14 (1996).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .congestion import Affine, LatencyModel
from .normal_form import ArrayLike, FloatArray, IntArray

_BISECTION_STEPS = 200


def wardrop(demand: ArrayLike, free_flow: ArrayLike, slope: ArrayLike) -> FloatArray:
    """Wardrop (user-equilibrium) flows on parallel affine links."""
    return wardrop_split(demand, Affine(np.asarray(free_flow, float), np.asarray(slope, float)))


def optimum(demand: ArrayLike, free_flow: ArrayLike, slope: ArrayLike) -> FloatArray:
    """System-optimal flows on parallel affine links."""
    return optimal_split(demand, Affine(np.asarray(free_flow, float), np.asarray(slope, float)))


def wardrop_split(demand: ArrayLike, model: LatencyModel) -> FloatArray:
    """Flows equalizing latency on used links (the Wardrop equilibrium)."""
    return _equalize(demand, model, marginal=False)


def optimal_split(demand: ArrayLike, model: LatencyModel) -> FloatArray:
    """Flows equalizing marginal cost on used links (the social optimum)."""
    return _equalize(demand, model, marginal=True)


def total_cost(flow: ArrayLike, model: LatencyModel) -> FloatArray:
    """Total latency ``sum_e x_e l_e(x_e)`` (over the last axis)."""
    x = np.asarray(flow, dtype=np.float64)
    # 0 * inf on an unused saturated link must count as 0.
    return np.asarray(np.where(x > 0.0, x * model.latency(x), 0.0).sum(axis=-1))


def price_of_anarchy(demand: ArrayLike, model: LatencyModel) -> FloatArray:
    """Wardrop cost divided by optimal cost."""
    return total_cost(wardrop_split(demand, model), model) / total_cost(
        optimal_split(demand, model), model
    )


def marginal_cost_tolls(demand: ArrayLike, model: LatencyModel) -> FloatArray:
    """Pigouvian tolls ``x*_e l'_e(x*_e)`` that make the Wardrop split optimal."""
    x = optimal_split(demand, model)
    return np.where(x > 0.0, x * model.derivative(x), 0.0)


def beckmann_potential(flow: ArrayLike, model: LatencyModel) -> FloatArray:
    """Beckmann's potential ``sum_e int_0^{x_e} l_e(s) ds`` (over the last axis)."""
    return np.asarray(model.integral(np.asarray(flow, dtype=np.float64)).sum(axis=-1))


def _equalize(demand: ArrayLike, model: LatencyModel, marginal: bool) -> FloatArray:
    inverse = model.flow_at_marginal if marginal else model.flow_at_latency
    level_of = model.marginal if marginal else model.latency
    const = np.asarray(model.constant())
    d = np.asarray(demand, dtype=np.float64)
    if (d < 0).any() or not np.isfinite(d).all():
        raise ValueError("demand must be finite and non-negative")
    zero = np.zeros(const.shape)
    base = level_of(zero)  # cost of the first unit on each link
    # Constant links cap the common level: past it they absorb any extra flow.
    cap_level = np.where(const, base, np.inf).min(axis=-1)
    finite_capacity = np.where(const, 0.0, model.capacity()).sum(axis=-1)
    if ((d >= finite_capacity) & ~np.isfinite(cap_level)).any():
        raise ValueError("demand exceeds the total capacity of the links")

    def finite_flow(level: FloatArray) -> FloatArray:
        return np.where(const, 0.0, inverse(level[..., None]))

    lo = np.asarray(base.min(axis=-1), dtype=np.float64)
    hi = lo + 1.0
    # Grow the bracket until the non-constant links alone carry the demand or
    # the level reaches the cheapest constant link.
    for _ in range(2000):
        short = (finite_flow(hi).sum(axis=-1) < d) & (hi < cap_level)
        if not short.any():
            break
        hi = np.where(short, lo + 2.0 * (hi - lo), hi)
    hi = np.minimum(hi, np.where(np.isfinite(cap_level), cap_level, hi))
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        over = finite_flow(mid).sum(axis=-1) >= d
        hi = np.where(over, mid, hi)
        lo = np.where(over, lo, mid)
        if np.all(hi - lo <= 1e-15 * np.maximum(1.0, np.abs(hi))):
            break
    level = hi
    flow = finite_flow(level)
    rest = np.maximum(d - flow.sum(axis=-1), 0.0)
    at_level = const & (base <= level[..., None] * (1 + 1e-12) + 1e-300)
    n_at = at_level.sum(axis=-1)
    share = np.where(n_at > 0, rest / np.where(n_at > 0, n_at, 1), 0.0)
    flow = flow + np.where(at_level, share[..., None], 0.0)
    # Bisection leaves the finite part a hair above demand; rescale so the
    # flows add up to the demand exactly, without moving any level visibly.
    total = flow.sum(axis=-1)
    scale = np.where(total > 0.0, d / np.where(total > 0.0, total, 1.0), 0.0)
    return np.asarray(flow * scale[..., None])


def resource_loads(profile: Sequence[Sequence[int] | int], n_resources: int) -> IntArray:
    """How many players use each resource; a strategy is a resource or a set of them."""
    counts = np.zeros(n_resources, dtype=np.int64)
    for strategy in profile:
        idx = np.unique(np.atleast_1d(np.asarray(strategy, dtype=np.int64)))
        counts[idx] += 1
    return counts


def player_cost(profile: Sequence[Sequence[int] | int], player: int, costs: ArrayLike) -> float:
    """Player's cost ``sum_{e in a_player} c_e(n_e)``; ``costs[e, k-1] = c_e(k)``."""
    c = np.asarray(costs, dtype=np.float64)
    loads = resource_loads(profile, c.shape[0])
    idx = np.unique(np.atleast_1d(np.asarray(profile[player], dtype=np.int64)))
    return float(c[idx, loads[idx] - 1].sum())


def rosenthal_potential(profile: Sequence[Sequence[int] | int], costs: ArrayLike) -> float:
    """Rosenthal's potential ``sum_e sum_{k=1}^{n_e} c_e(k)``."""
    c = np.asarray(costs, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] < len(profile):
        raise ValueError("costs must be (resources, >= players) with costs[e, k-1] = c_e(k)")
    loads = resource_loads(profile, c.shape[0])
    cum = np.concatenate([np.zeros((c.shape[0], 1)), np.cumsum(c, axis=1)], axis=1)
    return float(cum[np.arange(c.shape[0]), loads].sum())
