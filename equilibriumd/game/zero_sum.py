"""Two-player zero-sum games solved exactly by linear programming (HiGHS).

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


def _maximin(M: FloatArray) -> tuple[FloatArray, float]:
    # Variables (x_1..x_m, v): maximize v s.t. v <= x @ M[:, j] for every column j.
    m, n = M.shape
    c = np.zeros(m + 1)
    c[-1] = -1.0
    A_ub = np.hstack([-M.T, np.ones((n, 1))])
    b_ub = np.zeros(n)
    A_eq = np.zeros((1, m + 1))
    A_eq[0, :m] = 1.0
    bounds = [(0.0, None)] * m + [(None, None)]
    from scipy.optimize import linprog  # ~30 MB: only when an LP is solved

    res = linprog(c, A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=[1.0], bounds=bounds, method="highs")
    if res.status != 0:  # pragma: no cover - a bounded, feasible LP always solves
        raise RuntimeError(f"zero-sum LP failed: {res.message}")
    x = np.clip(res.x[:m], 0.0, None)
    x /= x.sum()
    # Report the security level of the returned x rather than the LP's v so the
    # value and the strategy agree exactly.
    return x, float(np.min(x @ M))
