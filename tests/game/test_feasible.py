"""Capacity feasibility and projection onto the feasible quota set."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from equilibriumd.game import feasible

# No deadline (LP times vary on a loaded CI machine), few examples, reproducible.
PROPERTY = settings(deadline=None, max_examples=40, derandomize=True)


def test_pooled_feasibility_and_projection() -> None:
    cap = [3.0, 2.0]
    assert feasible.is_feasible([1.0, 4.0], cap)
    assert not feasible.is_feasible([2.0, 4.0], cap)
    assert not feasible.is_feasible([-1.0, 1.0], cap)
    # Over by 1: subtract 0.5 from each (both stay positive).
    np.testing.assert_allclose(feasible.project([2.0, 4.0], cap), [1.5, 3.5])
    np.testing.assert_allclose(feasible.project([-1.0, 6.0], cap), [0.0, 5.0])
    np.testing.assert_allclose(feasible.project([1.0, 1.0], cap), [1.0, 1.0])


def test_restricted_access() -> None:
    # Caller 0 may use only backend 0 (capacity 1); caller 1 both.
    cap = [1.0, 2.0]
    access = [[True, False], [True, True]]
    assert feasible.is_feasible([1.0, 2.0], cap, access)
    assert not feasible.is_feasible([1.5, 1.0], cap, access)  # caller 0 alone exceeds backend 0
    X = feasible.assignment([1.0, 2.0], cap, access)
    assert X is not None
    np.testing.assert_allclose(X.sum(axis=1), [1.0, 2.0], atol=1e-9)
    assert (X.sum(axis=0) <= np.array(cap) + 1e-9).all() and X[0, 1] == 0.0
    # Projection of (3, 0): caller 0 is capped at 1.
    np.testing.assert_allclose(feasible.project([3.0, 0.0], cap, access), [1.0, 0.0], atol=1e-6)


@PROPERTY
@given(st.integers(0, 10_000), st.integers(1, 5), st.integers(1, 4))
def test_projection_is_feasible_and_optimal(seed: int, n_callers: int, n_backends: int) -> None:
    rng = np.random.default_rng(seed)
    cap = rng.uniform(0, 5, n_backends)
    access = rng.uniform(size=(n_callers, n_backends)) < 0.7
    quota = rng.uniform(-1, 6, n_callers)
    q = feasible.project(quota, cap, access)
    assert feasible.is_feasible(q, cap, access, tol=1e-6)
    # Variational inequality: (quota - q) . (z - q) <= 0 for every feasible z;
    # test against random feasible points built from random assignments.
    for _ in range(20):
        X = rng.uniform(0, 1, (n_callers, n_backends)) * access
        col = X.sum(axis=0)
        X = X * np.where(col > cap, cap / np.where(col > 0, col, 1), 1.0)
        z = X.sum(axis=1)
        assert float((quota - q) @ (z - q)) <= 1e-4 * max(1.0, float(np.abs(quota).max())) ** 2
    if feasible.is_feasible(quota, cap, access):
        np.testing.assert_allclose(q, quota)


def test_full_access_matches_general_solver() -> None:
    rng = np.random.default_rng(4)
    cap, quota = rng.uniform(0, 3, 3), rng.uniform(0, 4, 4)
    pooled = feasible.project(quota, cap)
    # Same set, but forcing the iterative path through a (redundant) zero-capacity backend.
    access = np.ones((4, 4), dtype=bool)
    access[0, 3] = False
    general = feasible.project(quota, np.append(cap, 0.0), access)
    np.testing.assert_allclose(general, pooled, atol=1e-5)
