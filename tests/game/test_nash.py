"""Best response, exploitability (cross-checked with nashpy), epsilon-Nash, Wardrop."""

import nashpy
import numpy as np
import pytest

from equilibriumd.game import nash
from equilibriumd.game.normal_form import deviation_payoffs, expected_payoffs

PD = [np.array([[3.0, 0.0], [5.0, 1.0]]), np.array([[3.0, 5.0], [0.0, 1.0]])]


def test_best_response_and_exploitability_in_prisoners_dilemma() -> None:
    coop = [np.array([1.0, 0.0]), np.array([1.0, 0.0])]
    action, gain = nash.best_response(PD, coop, 0)
    assert action == 1 and gain == pytest.approx(2.0)
    assert nash.exploitability(PD, coop) == pytest.approx(4.0)
    defect = [np.array([0.0, 1.0]), np.array([0.0, 1.0])]
    assert nash.exploitability(PD, defect) == 0.0
    assert nash.is_epsilon_nash(PD, defect, 0.0)
    assert not nash.is_epsilon_nash(PD, coop, 1.99)
    assert nash.is_epsilon_nash(PD, coop, 2.0)


@pytest.mark.parametrize("seed", range(15))
def test_nashpy_equilibria_have_zero_exploitability(seed: int) -> None:
    rng = np.random.default_rng(seed)
    m, n = rng.integers(2, 5, size=2)
    A, B = rng.normal(size=(m, n)), rng.normal(size=(m, n))
    found = list(nashpy.Game(A, B).vertex_enumeration())
    assert found
    for x, y in found:
        assert nash.exploitability([A, B], [x, y]) <= 1e-8


@pytest.mark.parametrize("seed", range(15))
def test_exploitability_matches_nashpy_utilities(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    m, n = rng.integers(2, 6, size=2)
    A, B = rng.normal(size=(m, n)), rng.normal(size=(m, n))
    x, y = rng.dirichlet(np.ones(m)), rng.dirichlet(np.ones(n))
    game = nashpy.Game(A, B)
    ux, uy = game[x, y]
    best_x = max(game[np.eye(m)[i], y][0] for i in range(m))
    best_y = max(game[x, np.eye(n)[j]][1] for j in range(n))
    expected = (best_x - ux) + (best_y - uy)
    assert nash.exploitability([A, B], [x, y]) == pytest.approx(expected, abs=1e-10)
    assert expected > 0  # a random mixed profile is (almost surely) not an equilibrium
    # nashpy agrees on which profiles are (non-)equilibria.
    assert not all(game.is_best_response(x, y))


def test_three_player_contraction() -> None:
    rng = np.random.default_rng(7)
    payoffs = [rng.normal(size=(2, 3, 4)) for _ in range(3)]
    s = [rng.dirichlet(np.ones(k)) for k in (2, 3, 4)]
    brute = np.einsum("abc,b,c->a", payoffs[0], s[1], s[2])
    np.testing.assert_allclose(deviation_payoffs(payoffs, s, 0), brute)
    mid = np.einsum("abc,a,c->b", payoffs[1], s[0], s[2])
    np.testing.assert_allclose(deviation_payoffs(payoffs, s, 1), mid)
    total = np.einsum("abc,a,b,c->", payoffs[2], *s)
    assert expected_payoffs(payoffs, s)[2] == pytest.approx(total)


def test_rejects_non_distributions() -> None:
    with pytest.raises(ValueError):
        nash.exploitability(PD, [np.array([0.7, 0.7]), np.array([1.0, 0.0])])
    with pytest.raises(ValueError):
        nash.exploitability(PD, [np.array([1.0, 0.0])])


def test_wardrop_condition() -> None:
    # Both used, equal latency: equilibrium.
    assert nash.wardrop_gap([1.0, 1.0, 3.0], [0.5, 0.5, 0.0]) == 0.0
    # A used backend 0.4 slower than the best one.
    assert nash.wardrop_gap([1.0, 1.4], [0.5, 0.5]) == pytest.approx(0.4)
    assert nash.is_wardrop([1.0, 1.4], [0.5, 0.5], epsilon=0.5)
    assert not nash.is_wardrop([1.0, 1.4], [0.5, 0.5], epsilon=0.3)
    # An unused backend that is faster breaks the condition.
    assert nash.wardrop_gap([1.0, 0.2], [1.0, 0.0]) == pytest.approx(0.8)
    # An absent backend is ignored even if it looks faster.
    assert nash.wardrop_gap([1.0, 0.2], [1.0, 0.0], available=[True, False]) == 0.0
    # Exploration traffic below the threshold does not count as use.
    assert nash.wardrop_gap([1.0, 5.0], [0.99, 0.01], used_threshold=0.02) == 0.0


def test_wardrop_gap_batch_matches_rows() -> None:
    rng = np.random.default_rng(1)
    lat = rng.uniform(0, 1, (20, 6))
    flow = rng.uniform(0, 1, (20, 6)) * (rng.uniform(size=(20, 6)) < 0.6)
    av = rng.uniform(size=(20, 6)) < 0.8
    batch = nash.wardrop_gap_batch(lat, flow, av, 0.05)
    rows = [nash.wardrop_gap(lat[i], flow[i], av[i], 0.05) for i in range(20)]
    np.testing.assert_allclose(batch, rows)
    assert (batch >= 0).all()
