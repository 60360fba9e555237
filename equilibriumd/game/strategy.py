"""Mixed strategies: sampling, exploration floor, and slot-table apportionment.

Role in routing: a service's mixed strategy over backends is written into a
table of ``n_slots`` slots and the kernel picks a random slot, so the share of
slots is the probability of each backend. A floor keeps every available
backend in the table, so it keeps being measured (and a learner can notice
when it becomes good again).

Contracts (``weights`` may be a vector or a (services x backends) matrix; rows
are handled independently; ``available`` defaults to all entries):

- ``normalize(weights, available=None)``: non-negative weights scaled to sum
  to 1 over available entries (uniform over them when all weights are 0);
  unavailable entries get 0.
- ``with_floor(weights, floor, available=None)``: the normalized strategy
  mixed with the uniform one, ``(1 - n * floor) * w + floor`` on the ``n``
  available entries. Guarantee: a probability vector in which every available
  entry has at least ``floor``; entries already above it move by at most
  ``n * floor`` in total variation. Requires ``n * floor <= 1``.
- ``to_slot_counts(weights, n_slots=1024, floor=0.0, available=None)``:
  integer slot counts by largest-remainder (Hamilton) apportionment after
  reserving ``ceil(floor * n_slots)`` slots for every available backend.
  Guarantee: counts are integers, sum exactly to ``n_slots`` in every row with
  an available backend (0 otherwise), every available backend gets at least
  ``ceil(floor * n_slots)`` slots and unavailable ones get none, and each count
  differs from its exact quota (reserve plus proportional share of the rest)
  by less than 1. Ties in the remainders go to the lower index, so the result
  is deterministic. Raises ``ValueError`` if the reserve does not fit.
- ``normalize_rows(w, where)``, ``cap_rows(target, cap, where)``,
  ``floor_rows(w, mask, quarantined, floor, trickle)``: the live engine's
  (``game.engine``) steps over (services x backends) matrices: rows scaled
  to distributions, each entry held to a cap with the excess handed to the
  others, and an exploration floor with a smaller trickle for quarantined
  backends.
- ``slot_table(counts)``: the table itself: backend index repeated count times.
- ``sample(strategy, rng, size=None)``: draws actions from a probability vector
  with the given ``numpy.random.Generator``; deterministic for a given seed.

Reference: M. Balinski & H. P. Young, *Fair Representation* (1982) for
largest-remainder apportionment.
"""

from __future__ import annotations

import math

import numpy as np

from .normal_form import ArrayLike, FloatArray, IntArray


def _rows(weights: ArrayLike, available: ArrayLike | None) -> tuple[FloatArray, np.ndarray, bool]:
    w = np.asarray(weights, dtype=np.float64)
    vector = w.ndim == 1
    w2 = np.atleast_2d(w)
    if w2.ndim != 2:
        raise ValueError("weights must be a vector or a (services, backends) matrix")
    if (w2 < 0).any() or not np.isfinite(w2).all():
        raise ValueError("weights must be finite and non-negative")
    av = (
        np.ones(w2.shape, dtype=bool)
        if available is None
        else np.atleast_2d(np.asarray(available, dtype=bool))
    )
    if av.shape != w2.shape:
        raise ValueError("available must have the shape of weights")
    return w2, av, vector


def normalize(weights: ArrayLike, available: ArrayLike | None = None) -> FloatArray:
    """Scale non-negative weights to a distribution over available entries."""
    w, av, vector = _rows(weights, available)
    out = _normalize(w, av)
    return out[0] if vector else out


def _normalize(w: FloatArray, av: np.ndarray) -> FloatArray:
    w = np.where(av, w, 0.0)
    total = w.sum(axis=1, keepdims=True)
    n = av.sum(axis=1, keepdims=True)
    uniform = av / np.maximum(n, 1)
    return np.where(total > 0.0, w / np.where(total > 0.0, total, 1.0), uniform)


def with_floor(weights: ArrayLike, floor: float, available: ArrayLike | None = None) -> FloatArray:
    """Mix with uniform so every available entry gets at least ``floor``."""
    w, av, vector = _rows(weights, available)
    n = av.sum(axis=1, keepdims=True)
    if floor < 0 or (n * floor > 1.0 + 1e-12).any():
        raise ValueError("floor must be >= 0 and floor * n_available <= 1")
    p = _normalize(w, av)
    out = np.where(av, (1.0 - n * floor) * p + floor, 0.0)
    return out[0] if vector else out


def to_slot_counts(
    weights: ArrayLike,
    n_slots: int = 1024,
    floor: float = 0.0,
    available: ArrayLike | None = None,
) -> IntArray:
    """Largest-remainder slot counts with a per-backend reserve of ``ceil(floor * n_slots)``."""
    if n_slots < 1:
        raise ValueError("n_slots must be >= 1")
    w, av, vector = _rows(weights, available)
    reserve = math.ceil(floor * n_slots - 1e-9) if floor > 0 else 0
    n = av.sum(axis=1)
    if (n * reserve > n_slots).any():
        raise ValueError("the floor's reserve does not fit in n_slots for some row")
    p = _normalize(w, av)
    rest = (n_slots - n * reserve).astype(np.float64)
    quota = p * rest[:, None]
    base = np.floor(quota)
    frac = quota - base
    # Slots left after the integer parts; a small epsilon absorbs float error.
    left = np.rint(rest - base.sum(axis=1)).astype(np.int64)
    frac = np.where(av, frac, -1.0)
    # Stable sort on -frac: larger remainders first, ties to the lower index.
    order = np.argsort(-frac, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(w.shape[1])[None, :].repeat(w.shape[0], 0), axis=1)
    bonus = rank < left[:, None]
    counts = (base + bonus + np.where(av, reserve, 0)).astype(np.int64)
    counts = np.where(n[:, None] > 0, counts, 0)
    return counts[0] if vector else counts


def slot_table(counts: ArrayLike) -> IntArray:
    """The slot table for one service: backend index ``b`` repeated ``counts[b]`` times."""
    c = np.asarray(counts, dtype=np.int64)
    if c.ndim != 1 or (c < 0).any():
        raise ValueError("counts must be a non-negative vector")
    return np.repeat(np.arange(c.size, dtype=np.int64), c)


def sample(
    strategy: ArrayLike, rng: np.random.Generator, size: int | None = None
) -> int | IntArray:
    """Draw action indices from a probability vector using ``rng``."""
    p = np.asarray(strategy, dtype=np.float64)
    if p.ndim != 1 or (p < 0).any() or abs(p.sum() - 1.0) > 1e-9:
        raise ValueError("strategy must be a probability vector")
    if size is None:
        return int(rng.choice(p.size, p=p))
    return np.asarray(rng.choice(p.size, size=size, p=p), dtype=np.int64)


def normalize_rows(w: FloatArray, where: np.ndarray) -> FloatArray:
    """Rows scaled to sum to 1 over `where` (negative entries count as 0; even when all are 0)."""
    w = np.where(where, np.maximum(w, 0.0), 0.0)
    s = w.sum(axis=1, keepdims=True)
    n = where.sum(axis=1, keepdims=True)
    even = np.where(where, 1.0 / np.maximum(n, 1), 0.0)
    return np.where(s > 0, w / np.where(s > 0, s, 1.0), even)


def cap_rows(target: FloatArray, cap: FloatArray, where: np.ndarray) -> FloatArray:
    """Limit each weight to its cap and hand the excess to the uncapped (two passes suffice here)."""
    t = target.copy()
    for _ in range(3):
        over = where & (t > cap)
        if not over.any():   # nothing over its cap: the rest of the pass changes nothing
            break
        excess = np.where(over, t - cap, 0.0).sum(axis=1, keepdims=True)
        t = np.where(over, cap, t)
        room = where & ~over & (t < cap)
        rs = np.where(room, t, 0.0).sum(axis=1, keepdims=True)
        add = np.divide(excess, rs, out=np.zeros_like(rs), where=rs > 0)
        t = np.where(room, t * (1 + add), t)
    return t


def floor_rows(w: FloatArray, mask: np.ndarray, quarantined: np.ndarray, floor: float | FloatArray,
               trickle: float) -> FloatArray:
    """Give every present backend at least its floor (trickle when quarantined), scaling the rest.
    `floor` is one share for all, or one per backend (the engine's latency-scaled floors)."""
    low = np.where(quarantined, trickle, floor)
    low = np.where(mask, low, 0.0)
    # quarantined backends get exactly the trickle; the others share the rest with a floor each
    free = mask & ~quarantined
    w = np.where(free, np.maximum(w, 0.0), 0.0)
    rest = 1.0 - np.where(quarantined, trickle, 0.0).sum(axis=1, keepdims=True)
    n_free = free.sum(axis=1, keepdims=True)
    base = np.where(free, floor, 0.0)
    spare = np.maximum(rest - base.sum(axis=1, keepdims=True), 0.0)
    s = w.sum(axis=1, keepdims=True)
    share = np.divide(w, s, out=np.where(free, 1.0 / np.maximum(n_free, 1), 0.0), where=s > 0)
    out = np.where(free, base + spare * share, np.where(quarantined & mask, low, 0.0))
    all_q = (n_free == 0)[:, 0]
    if all_q.any():  # everything quarantined: keep probing all of them evenly
        out[all_q] = normalize_rows(np.where(mask[all_q], 1.0, 0.0), mask[all_q])
    return out
