"""Correlated-equilibrium LP: Chicken, objectives, violation check, random games."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from equilibriumd.game import correlated

# No deadline (LP times vary on a loaded CI machine), few examples, reproducible.
PROPERTY = settings(deadline=None, max_examples=40, derandomize=True)

CHICKEN = [np.array([[6.0, 2.0], [7.0, 0.0]]), np.array([[6.0, 7.0], [2.0, 0.0]])]


def test_chicken_welfare_max_gives_525_each() -> None:
    p = correlated.solve(CHICKEN, objective="welfare")
    np.testing.assert_allclose(correlated.expected_payoffs(CHICKEN, p), [5.25, 5.25], atol=1e-8)
    np.testing.assert_allclose(p, [[0.5, 0.25], [0.25, 0.0]], atol=1e-8)
    assert correlated.max_violation(CHICKEN, p) <= 1e-9


def test_chicken_fair_max_min() -> None:
    p = correlated.solve(CHICKEN, objective="fair")
    assert correlated.expected_payoffs(CHICKEN, p).min() == pytest.approx(5.25, abs=1e-8)


def test_fair_objective_differs_when_welfare_is_unequal() -> None:
    # Battle of the sexes: welfare max is a pure equilibrium (3 and 2),
    # max-min fairness mixes the two pure equilibria to 2.5 each.
    u1 = np.array([[3.0, 0.0], [0.0, 2.0]])
    u2 = np.array([[2.0, 0.0], [0.0, 3.0]])
    fair = correlated.solve([u1, u2], objective="fair")
    np.testing.assert_allclose(correlated.expected_payoffs([u1, u2], fair), [2.5, 2.5], atol=1e-8)
    welfare = correlated.solve([u1, u2])
    assert correlated.expected_payoffs([u1, u2], welfare).sum() == pytest.approx(5.0)


def test_max_violation_detects_non_equilibria() -> None:
    both_dare = np.array([[0.0, 0.0], [0.0, 1.0]])
    # Told "dare" while the other dares, swerving gains 2 - 0 = 2.
    assert correlated.max_violation(CHICKEN, both_dare) == pytest.approx(2.0)
    assert correlated.max_violation(CHICKEN, np.full((2, 2), 0.3)) >= 0.2 - 1e-12
    assert correlated.max_violation(CHICKEN, np.array([[1.1, 0.0], [0.0, -0.1]])) >= 0.1 - 1e-12
    with pytest.raises(ValueError):
        correlated.max_violation(CHICKEN, np.ones(3))


def test_bad_objective() -> None:
    with pytest.raises(ValueError):
        correlated.solve(CHICKEN, objective="nope")  # type: ignore[arg-type]


@PROPERTY
@given(
    st.integers(0, 10_000),
    st.lists(st.integers(2, 3), min_size=2, max_size=3),
    st.sampled_from(["welfare", "fair"]),
)
def test_lp_solution_satisfies_constraints_and_beats_pure_nash(
    seed: int, shape: list[int], objective: str
) -> None:
    rng = np.random.default_rng(seed)
    payoffs = [rng.integers(-5, 6, size=shape).astype(float) for _ in shape]
    p = correlated.solve(payoffs, objective=objective)  # type: ignore[arg-type]
    assert p.shape == tuple(shape)
    assert correlated.max_violation(payoffs, p) <= 1e-7
    value = correlated.expected_payoffs(payoffs, p)
    score = value.sum() if objective == "welfare" else value.min()
    # Every pure Nash equilibrium is a correlated equilibrium, so the optimum is at least as good.
    for profile in np.ndindex(*shape):
        q = np.zeros(shape)
        q[profile] = 1.0
        if correlated.max_violation(payoffs, q) <= 1e-12:
            v = correlated.expected_payoffs(payoffs, q)
            assert score >= (v.sum() if objective == "welfare" else v.min()) - 1e-7


def test_empirical_distribution() -> None:
    p = correlated.empirical_distribution([[0, 1], [0, 1], [1, 0], [0, 0]], (2, 2))
    np.testing.assert_allclose(p, [[0.25, 0.5], [0.25, 0.0]])
