"""Two-player zero-sum games solved exactly by linear programming (a small tableau
simplex here, HiGHS for large games).

Role in routing: the minmax defence against floods, where the defender's
mixed strategy is randomized in the kernel so an attacker cannot predict it.

Contracts:

- ``solve(A) -> (x, y, value)``: the row player picks ``x`` to maximize
  ``x @ A @ y`` and the column player picks ``y`` to minimize it.
  Guarantee (von Neumann's minmax theorem, up to the LP tolerance ~1e-9):
  ``min(x @ A) == value == max(A @ y)``, i.e. ``x`` secures at least
  ``value`` against every column and ``y`` concedes at most ``value``
  against every row; ``x`` and ``y`` are probability vectors.
- ``security_level(A, x)``: the payoff ``x`` guarantees, ``min(x @ A)``.

Reference: J. von Neumann, "Zur Theorie der Gesellschaftsspiele" (1928);
G. Dantzig's LP formulation, see e.g. Nisan et al., *Algorithmic Game
Theory* (2007), ch. 1.
"""

from __future__ import annotations

import numpy as np

from .normal_form import ArrayLike, FloatArray


def solve(A: ArrayLike) -> tuple[FloatArray, FloatArray, float]:
    """Return optimal mixed strategies ``(x, y)`` and the value of ``A``."""
    M = np.asarray(A, dtype=np.float64)
    if M.ndim != 2 or 0 in M.shape:
        raise ValueError(f"A must be a non-empty matrix, got shape {M.shape}")
    if not np.isfinite(M).all():
        raise ValueError("A must be finite")
    x, value = _maximin(M)
    y, _ = _maximin(-M.T)
    return x, y, value


def security_level(A: ArrayLike, x: ArrayLike) -> float:
    """The payoff the row strategy ``x`` guarantees against any column."""
    return float(np.min(np.asarray(x, dtype=np.float64) @ np.asarray(A, dtype=np.float64)))


#: games up to this many entries are solved by the tableau simplex below (numpy only);
#: larger ones by HiGHS (scipy.optimize: ~30 MB of RSS the agent does not want to carry
#: for the defence's 6 x ~15 games)
SIMPLEX_MAX_ENTRIES = 4096


def _maximin(M: FloatArray) -> tuple[FloatArray, float]:
    x = _maximin_simplex(M) if M.size <= SIMPLEX_MAX_ENTRIES else None
    if x is None:
        x = _maximin_highs(M)
    # Report the security level of the returned x rather than the LP's v so the
    # value and the strategy agree exactly.
    return x, float(np.min(x @ M))


def _maximin_simplex(M: FloatArray, max_pivots: int = 10_000) -> FloatArray | None:
    """The row player's maximin strategy by the textbook reduction of a matrix game to
    one LP in standard form: shift the payoffs positive (P = M - min M + 1), then
    maximize sum(w) s.t. P w <= 1, w >= 0 from the slack basis (feasible at w = 0, so
    one phase). At the optimum the slacks' reduced costs u solve the dual,
    min sum(u) s.t. P^T u >= 1, and x = u / sum(u). Bland's rule: no cycling.
    None if it did not finish within `max_pivots` (HiGHS then)."""
    m, n = M.shape
    P = M - M.min() + 1.0
    T = np.zeros((m + 1, n + m + 1))
    T[:m, :n] = P
    T[:m, n:n + m] = np.eye(m)
    T[:m, -1] = 1.0
    T[m, :n] = -1.0
    basis = list(range(n, n + m))
    eps = 1e-12
    for _ in range(max_pivots):
        neg = np.flatnonzero(T[m, :-1] < -eps)
        if neg.size == 0:
            u = np.clip(T[m, n:n + m], 0.0, None)
            if u.sum() <= 0:
                return None
            return u / u.sum()
        j = int(neg[0])                                   # Bland: the lowest index enters
        col = T[:m, j]
        ok = np.flatnonzero(col > eps)
        if ok.size == 0:                                  # unbounded: impossible for P > 0
            return None
        ratios = T[ok, -1] / col[ok]
        best = ratios.min()
        tied = ok[ratios <= best + 1e-12 * max(1.0, abs(best))]
        i = int(min(tied, key=lambda r: basis[r]))        # Bland: the lowest basic index leaves
        T[i] /= T[i, j]
        for r in range(m + 1):
            if r != i and T[r, j] != 0.0:
                T[r] -= T[r, j] * T[i]
        basis[i] = j
    return None


def _maximin_highs(M: FloatArray) -> FloatArray:
    # Variables (x_1..x_m, v): maximize v s.t. v <= x @ M[:, j] for every column j.
    m, n = M.shape
    c = np.zeros(m + 1)
    c[-1] = -1.0
    A_ub = np.hstack([-M.T, np.ones((n, 1))])
    b_ub = np.zeros(n)
    A_eq = np.zeros((1, m + 1))
    A_eq[0, :m] = 1.0
    bounds = [(0.0, None)] * m + [(None, None)]
    from scipy.optimize import linprog  # ~30 MB: only for games too large for the simplex above

    res = linprog(c, A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=[1.0], bounds=bounds, method="highs")
    if res.status != 0:  # pragma: no cover - a bounded, feasible LP always solves
        raise RuntimeError(f"zero-sum LP failed: {res.message}")
    x = np.clip(res.x[:m], 0.0, None)
    return np.asarray(x / x.sum(), dtype=np.float64)
