"""Correlated equilibria of n-player normal-form games, by linear programming.

Role in routing: the coordinator draws joint recommendations (which backend
each caller should use) from a correlated equilibrium, so no caller gains by
ignoring its recommendation.

A distribution ``p`` over action profiles (an array shaped like the profile
space) is a correlated equilibrium when, for every player i and every pair of
its actions (j, k), switching from j to k whenever told j does not pay::

    sum_{a : a_i = j} p(a) * (u_i(k, a_-i) - u_i(j, a_-i)) <= 0

Contracts:

- ``solve(payoffs, objective="welfare") -> p``: a correlated equilibrium.
  ``"welfare"`` maximizes the sum of expected payoffs; ``"fair"`` maximizes
  the smallest player's expected payoff. Guarantee: ``p`` is a distribution
  and every incentive constraint holds within the LP tolerance (the tests
  check ``max_violation(payoffs, p) <= 1e-7``); the objective is optimal over
  the correlated-equilibrium polytope (which is never empty: it contains every
  Nash equilibrium).
- ``max_violation(payoffs, p) -> float``: the largest violation of any
  constraint defining the polytope: the incentive constraints above, ``p >= 0``
  and ``sum(p) == 1``. Zero exactly when ``p`` is a correlated equilibrium.
  For the empirical joint distribution of play, the incentive part equals the
  largest average conditional (internal) regret of any player.
- ``incentive_matrix(payoffs)``: the constraint rows, one per (i, j, k).
- ``expected_payoffs(payoffs, p)``: each player's expected payoff under ``p``.
- ``empirical_distribution(profiles, shape)``: the frequency of each profile.

Reference: R. Aumann, "Subjectivity and correlation in randomized strategies",
J. Math. Econ. 1 (1974); C. Papadimitriou & T. Roughgarden, "Computing
correlated equilibria in multi-player games", J. ACM 55 (2008).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from .normal_form import ArrayLike, FloatArray, IntArray, as_payoffs

Objective = Literal["welfare", "fair"]


def incentive_matrix(payoffs: Sequence[ArrayLike]) -> FloatArray:
    """Rows ``G`` with ``G @ p.ravel() <= 0`` iff ``p`` meets every incentive constraint."""
    arrays = as_payoffs(payoffs)
    shape = arrays[0].shape
    size = int(np.prod(shape))
    rows: list[FloatArray] = []
    for i, u in enumerate(arrays):
        m = shape[i]
        if m < 2:
            continue
        ui = np.moveaxis(u, i, 0).reshape(m, -1)  # (own action, others' profile)
        for j in range(m):
            # gain[k] = u_i(k, a_-i) - u_i(j, a_-i), placed on the profiles with a_i = j.
            gain = ui - ui[j]
            block = np.zeros((m,) + ui.shape)
            block[:, j, :] = gain
            block = np.delete(block, j, axis=0)
            full = np.moveaxis(block.reshape((m - 1, m) + _others(shape, i)), 1, 1 + i)
            rows.append(full.reshape(m - 1, size))
    if not rows:
        return np.zeros((0, size))
    return np.vstack(rows)


def solve(payoffs: Sequence[ArrayLike], objective: Objective = "welfare") -> FloatArray:
    """A correlated equilibrium maximizing welfare or the minimum expected payoff."""
    arrays = as_payoffs(payoffs)
    shape = arrays[0].shape
    size = int(np.prod(shape))
    n = len(arrays)
    G = incentive_matrix(arrays)
    U = np.vstack([a.reshape(-1) for a in arrays])  # (players, profiles)
    if objective == "welfare":
        c = -U.sum(axis=0)
        A_ub, b_ub = G, np.zeros(G.shape[0])
        A_eq = np.ones((1, size))
        bounds: list[tuple[float | None, float | None]] = [(0.0, None)] * size
    elif objective == "fair":
        # Extra variable t: maximize t subject to U @ p >= t for every player.
        c = np.zeros(size + 1)
        c[-1] = -1.0
        A_ub = np.vstack(
            [np.hstack([G, np.zeros((G.shape[0], 1))]), np.hstack([-U, np.ones((n, 1))])]
        )
        b_ub = np.zeros(A_ub.shape[0])
        A_eq = np.hstack([np.ones((1, size)), np.zeros((1, 1))])
        bounds = [(0.0, None)] * size + [(None, None)]
    else:
        raise ValueError(f"objective must be 'welfare' or 'fair', got {objective!r}")
    from scipy.optimize import linprog  # ~30 MB: only when an LP is solved

    res = linprog(
        c,
        A_ub=A_ub if A_ub.shape[0] else None,
        b_ub=b_ub if A_ub.shape[0] else None,
        A_eq=A_eq,
        b_eq=[1.0],
        bounds=bounds,
        method="highs",
    )
    if res.status != 0:  # pragma: no cover - the CE polytope is non-empty and bounded
        raise RuntimeError(f"correlated-equilibrium LP failed: {res.message}")
    p = np.clip(res.x[:size], 0.0, None)
    p /= p.sum()
    return np.asarray(p.reshape(shape), dtype=np.float64)


def max_violation(payoffs: Sequence[ArrayLike], p: ArrayLike) -> float:
    """Largest violation of any correlated-equilibrium constraint by ``p`` (0 if none)."""
    arrays = as_payoffs(payoffs)
    q = np.asarray(p, dtype=np.float64)
    if q.shape != arrays[0].shape:
        raise ValueError(f"p must have shape {arrays[0].shape}, got {q.shape}")
    flat = q.reshape(-1)
    G = incentive_matrix(arrays)
    worst = 0.0
    if G.shape[0]:
        worst = max(worst, float(np.max(G @ flat)))
    worst = max(worst, float(np.max(-flat)), abs(float(flat.sum()) - 1.0))
    return worst


def expected_payoffs(payoffs: Sequence[ArrayLike], p: ArrayLike) -> FloatArray:
    """Each player's expected payoff when profiles are drawn from ``p``."""
    arrays = as_payoffs(payoffs)
    q = np.asarray(p, dtype=np.float64)
    return np.array([float((a * q).sum()) for a in arrays])


def empirical_distribution(profiles: ArrayLike, shape: tuple[int, ...]) -> FloatArray:
    """Frequency of each action profile in ``profiles`` (rows of action indices)."""
    prof: IntArray = np.asarray(profiles, dtype=np.int64)
    if prof.ndim != 2 or prof.shape[1] != len(shape) or prof.shape[0] == 0:
        raise ValueError("profiles must be a non-empty (T, players) integer array")
    flat = np.ravel_multi_index(tuple(prof.T), shape)
    counts = np.bincount(flat, minlength=int(np.prod(shape))).astype(np.float64)
    return np.asarray((counts / counts.sum()).reshape(shape), dtype=np.float64)


def _others(shape: tuple[int, ...], i: int) -> tuple[int, ...]:
    return shape[:i] + shape[i + 1 :]
