"""Zero-sum LP: published values, nashpy cross-checks, and the LP's own constraints."""

import nashpy
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from equilibriumd.game import nash, zero_sum

# No deadline (LP times vary on a loaded CI machine), few examples, reproducible.
PROPERTY = settings(deadline=None, max_examples=40, derandomize=True)


def test_matching_pennies() -> None:
    x, y, v = zero_sum.solve([[1, -1], [-1, 1]])
    assert v == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_allclose(x, [0.5, 0.5], atol=1e-9)
    np.testing.assert_allclose(y, [0.5, 0.5], atol=1e-9)


def test_rock_paper_scissors() -> None:
    A = np.array([[0, -1, 1], [1, 0, -1], [-1, 1, 0]])
    x, y, v = zero_sum.solve(A)
    assert v == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_allclose(x, np.full(3, 1 / 3), atol=1e-9)
    np.testing.assert_allclose(y, np.full(3, 1 / 3), atol=1e-9)


def test_saddle_point_and_known_value() -> None:
    # Pure saddle at (row 0, col 1): value 2.
    x, y, v = zero_sum.solve([[3, 2, 4], [1, 0, 5]])
    assert v == pytest.approx(2.0)
    np.testing.assert_allclose(x, [1, 0], atol=1e-9)
    np.testing.assert_allclose(y, [0, 1, 0], atol=1e-9)
    # Classic 2x2 without saddle: [[2, -1], [-1, 1]] has value 1/5.
    _, _, v = zero_sum.solve([[2, -1], [-1, 1]])
    assert v == pytest.approx(0.2)


@pytest.mark.parametrize("seed", range(12))
def test_value_matches_nashpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    m, n = rng.integers(2, 6, size=2)
    A = rng.normal(size=(m, n)).round(3)
    x, y, v = zero_sum.solve(A)
    game = nashpy.Game(A)
    xs, ys = game.linear_program()
    assert v == pytest.approx(float(xs @ A @ ys), abs=1e-7)
    found = list(game.vertex_enumeration())
    assert found
    for xe, ye in found:
        assert v == pytest.approx(float(xe @ A @ ye), abs=1e-7)
    # Our strategies are a Nash equilibrium of the zero-sum game.
    assert nash.exploitability([A, -A], [x, y]) <= 1e-7


@PROPERTY
@given(
    arrays(
        np.float64,
        st.tuples(st.integers(1, 6), st.integers(1, 6)),
        elements=st.floats(-100, 100, allow_nan=False),
    )
)
def test_lp_solution_satisfies_its_constraints(A: np.ndarray) -> None:
    x, y, v = zero_sum.solve(A)
    tol = 1e-7 * max(1.0, float(np.abs(A).max()))
    for s in (x, y):
        assert (s >= 0).all() and s.sum() == pytest.approx(1.0)
    assert (x @ A >= v - tol).all()  # x secures v against every column
    assert (A @ y <= v + tol).all()  # y concedes at most v against every row


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        zero_sum.solve(np.zeros((0, 3)))
    with pytest.raises(ValueError):
        zero_sum.solve([[np.nan]])


def test_the_small_game_simplex_agrees_with_highs() -> None:
    """Games up to SIMPLEX_MAX_ENTRIES are solved by the numpy simplex (the agent's flood
    defence must not load scipy); its value is HiGHS's, degenerate (integer) games included."""
    rng = np.random.default_rng(7)
    for k in range(200):
        m, n = int(rng.integers(1, 9)), int(rng.integers(1, 20))
        A = rng.normal(size=(m, n)) * (100.0 if k % 2 else 1.0)
        if k % 4 == 0:
            A = np.round(A)                     # ties: degenerate pivots
        xs = zero_sum._maximin_simplex(A)
        assert xs is not None and (xs >= 0).all() and xs.sum() == pytest.approx(1.0)
        xh = zero_sum._maximin_highs(A)
        tol = 1e-9 * max(1.0, float(np.abs(A).max()))
        assert float(np.min(xs @ A)) == pytest.approx(float(np.min(xh @ A)), abs=tol)


def test_the_flood_defence_loads_no_scipy() -> None:
    import subprocess
    import sys

    code = ("import sys, numpy as np\nfrom equilibriumd.policy import defence\n"
            "defence.minimax(np.random.default_rng(1).normal(size=(6, 15)))\n"
            "print('scipy' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
