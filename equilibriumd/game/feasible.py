"""Feasible payoffs: which caller quota vectors the backends' capacity can serve.

Role in routing: callers ask for rates (quotas); backends have capacities and
each caller may only use some backends. A quota vector is feasible when some
assignment of the callers' traffic to their allowed backends respects every
capacity. Requests outside the set are projected back onto it.

The feasible set, for capacities ``c`` (backends) and an ``access`` mask
(callers x backends, default all True), is
``F = { X @ 1 : X >= 0, X[c, b] = 0 where not access[c, b], 1 @ X <= c }``,
a convex polytope (a polymatroid) of quota vectors.

Contracts:

- ``is_feasible(quota, capacity, access=None, tol=1e-9) -> bool``: exact, by a
  max-flow linear program (HiGHS); with full access it is
  ``quota >= 0 and sum(quota) <= sum(capacity)``.
- ``assignment(quota, capacity, access=None) -> X | None``: a witness
  assignment, or None when infeasible.
- ``max_min_fair(demand, capacity) -> q``: the max-min fair point of ``F``
  below ``demand`` with full access (water-filling): every caller gets
  ``min(demand, level)``, the level chosen so the shares use the whole
  capacity when demand exceeds it. Guarantee: ``q`` is feasible, ``q <=
  demand``, ``sum(q) == min(sum(demand), capacity)``, and no caller's share
  can grow without shrinking one that is no larger (the agent's fair shares
  of an overloaded service, policy.cooperation).
- ``project(quota, capacity, access=None) -> q``: the Euclidean projection of
  the requested quota vector onto ``F`` (the closest feasible vector).
  Guarantee: ``q`` is in ``F``; ``q == quota`` when ``quota`` is feasible;
  with full access it is exact in closed form (clip at 0, then, if over
  capacity, subtract the common level that brings the sum to capacity); with
  restricted access it is computed by accelerated projected gradient (FISTA
  with adaptive restart); every iterate is feasible, and it stops when the
  Frank-Wolfe duality gap certifies ``||q - projection|| <= tol * max(1,
  max|quota|)`` (strong convexity: distance^2 <= 2 * gap), or after
  ``max_iter`` steps.

References: S. Fujishige, *Submodular Functions and Optimization* (2005) for
the polymatroid structure; A. Beck & M. Teboulle, "A fast iterative
shrinkage-thresholding algorithm", SIAM J. Imaging Sci. 2 (2009) for FISTA;
W. Wang & M. Carreira-Perpinan, "Projection onto the probability simplex"
(2013) for the sort-based projection.
"""

from __future__ import annotations

import numpy as np

from .normal_form import ArrayLike, FloatArray


def _inputs(
    quota: ArrayLike, capacity: ArrayLike, access: ArrayLike | None
) -> tuple[FloatArray, FloatArray, np.ndarray]:
    q = np.asarray(quota, dtype=np.float64)
    c = np.asarray(capacity, dtype=np.float64)
    if q.ndim != 1 or c.ndim != 1:
        raise ValueError("quota and capacity must be vectors")
    if (c < 0).any() or not np.isfinite(q).all() or not np.isfinite(c).all():
        raise ValueError("capacities must be non-negative and everything finite")
    acc = (
        np.ones((q.size, c.size), dtype=bool) if access is None else np.asarray(access, dtype=bool)
    )
    if acc.shape != (q.size, c.size):
        raise ValueError("access must be (callers, backends)")
    return q, c, acc


def assignment(
    quota: ArrayLike, capacity: ArrayLike, access: ArrayLike | None = None, tol: float = 1e-9
) -> FloatArray | None:
    """An assignment ``X`` serving ``quota`` within ``capacity``, or None."""
    q, c, acc = _inputs(quota, capacity, access)
    if (q < -tol).any():
        return None
    callers, backends = np.nonzero(acc)
    k = callers.size
    if k == 0:
        return np.zeros(acc.shape) if (np.abs(q) <= tol).all() else None
    # Maximize served flow; feasible iff it serves every quota.
    A_eq = np.zeros((q.size, k))
    A_eq[callers, np.arange(k)] = 1.0
    A_ub = np.zeros((c.size, k))
    A_ub[backends, np.arange(k)] = 1.0
    # Serve at most the quota per caller, maximize the total.
    from scipy.optimize import linprog  # ~30 MB: only when an LP is solved

    res = linprog(
        -np.ones(k),
        A_ub=np.vstack([A_ub, A_eq]),
        b_ub=np.concatenate([c, np.maximum(q, 0.0)]),
        bounds=[(0.0, None)] * k,
        method="highs",
    )
    if res.status != 0:  # pragma: no cover - always feasible (X = 0) and bounded
        raise RuntimeError(f"feasibility LP failed: {res.message}")
    served = A_eq @ res.x
    if (served < np.maximum(q, 0.0) - tol * max(1.0, float(np.abs(q).max()))).any():
        return None
    X = np.zeros(acc.shape)
    X[callers, backends] = res.x
    return X


def is_feasible(
    quota: ArrayLike, capacity: ArrayLike, access: ArrayLike | None = None, tol: float = 1e-9
) -> bool:
    """True when the capacities can serve the quota vector."""
    return assignment(quota, capacity, access, tol) is not None


def _project_capped_simplex(v: FloatArray, cap: FloatArray, support: np.ndarray) -> FloatArray:
    """Column-wise projection onto ``{x >= 0 on support, 0 off it, sum x <= cap}``."""
    x = np.where(support, np.maximum(v, 0.0), 0.0)
    over = x.sum(axis=0) > cap
    if not over.any():
        return x
    # For columns over capacity, find theta with sum max(v - theta, 0) == cap.
    vs = np.where(support, v, -np.inf)[:, over]
    u = -np.sort(-vs, axis=0)
    finite = np.isfinite(u)
    css = np.cumsum(np.where(finite, u, 0.0), axis=0)
    k = np.arange(1, u.shape[0] + 1)[:, None]
    theta_k = (css - cap[over]) / k
    valid = finite & (u > theta_k)
    last = u.shape[0] - 1 - np.argmax(valid[::-1], axis=0)
    theta = theta_k[last, np.arange(u.shape[1])]
    # No valid k happens only for zero capacity: everything goes to 0.
    theta = np.where(valid.any(axis=0), theta, u[0])
    x[:, over] = np.where(support[:, over], np.maximum(v[:, over] - theta, 0.0), 0.0)
    return x


def max_min_fair(demand: ArrayLike, capacity: float) -> FloatArray:
    """Water-filling shares of ``capacity`` for ``demand`` (full access)."""
    d = np.maximum(np.asarray(demand, dtype=np.float64), 0.0)
    if capacity < 0 or not np.isfinite(capacity):
        raise ValueError("capacity must be finite and >= 0")
    if d.sum() <= capacity:
        return d
    s = np.sort(d)
    # the level L with sum(min(d, L)) == capacity: below it the k smallest demands are met
    below = np.r_[0.0, np.cumsum(s)[:-1]]
    levels = (capacity - below) / (s.size - np.arange(s.size))
    k = int(np.argmax(levels <= s))          # first demand the level does not reach
    return np.minimum(d, levels[k])


def project(
    quota: ArrayLike,
    capacity: ArrayLike,
    access: ArrayLike | None = None,
    *,
    tol: float = 1e-6,
    max_iter: int = 100_000,
) -> FloatArray:
    """Euclidean projection of ``quota`` onto the feasible set."""
    q, c, acc = _inputs(quota, capacity, access)
    if acc.all():
        # Full access: F = {q >= 0, sum q <= sum c}, a capped simplex.
        return _project_capped_simplex(q[:, None], np.array([c.sum()]), np.ones((q.size, 1), bool))[
            :, 0
        ]
    if is_feasible(q, c, acc):
        return q.copy()
    # Minimize 0.5 * ||X 1 - q||^2 over per-backend capped simplices (FISTA with
    # adaptive restart). The gradient's Lipschitz constant is the largest number
    # of backends a caller may use.
    L = float(max(acc.sum(axis=1).max(), 1))
    scale = max(1.0, float(np.abs(q).max()))
    X = np.zeros(acc.shape)
    Y = X.copy()
    t = 1.0
    for _ in range(max_iter):
        cur = X.sum(axis=1)
        if np.sqrt(2.0 * max(_duality_gap(q, cur, c, acc), 0.0)) <= tol * scale:
            break
        grad = (Y.sum(axis=1) - q)[:, None] * acc
        X_new = _project_capped_simplex(Y - grad / L, c, acc)
        t_new = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
        if float(np.sum(grad * (X_new - X))) > 0.0:
            # Momentum points uphill: restart it (O'Donoghue & Candes 2015).
            t_new, Y = 1.0, X_new.copy()
        else:
            Y = X_new + ((t - 1.0) / t_new) * (X_new - X)
        X, t = X_new, t_new
    return np.asarray(X.sum(axis=1))


def _duality_gap(target: FloatArray, q: FloatArray, cap: FloatArray, acc: np.ndarray) -> float:
    """Frank-Wolfe gap ``max_{z in F} (target - q) . (z - q)`` of the projection at ``q``.

    The linear maximization over F is greedy: each backend gives its whole
    capacity to the allowed caller with the largest positive coefficient.
    Strong convexity gives ``||q - projection||^2 <= 2 * gap``.
    """
    w = target - q
    best = np.where(acc, w[:, None], -np.inf).max(axis=0)
    return float(np.sum(cap * np.maximum(best, 0.0)) - w @ q)
