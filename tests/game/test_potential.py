"""Wardrop vs optimum (Pigou), tolls, M/M/1 splits, Beckmann and Rosenthal potentials, fits."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from equilibriumd.game import potential
from equilibriumd.game.congestion import MM1, Affine, CongestionFit

# No deadline (LP times vary on a loaded CI machine), few examples, reproducible.
PROPERTY = settings(deadline=None, max_examples=40, derandomize=True)


def test_pigou_network() -> None:
    free_flow, slope = [1.0, 0.0], [0.0, 1.0]
    model = Affine(np.array(free_flow), np.array(slope))
    w = potential.wardrop(1.0, free_flow, slope)
    o = potential.optimum(1.0, free_flow, slope)
    np.testing.assert_allclose(w, [0.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(o, [0.5, 0.5], atol=1e-12)
    assert potential.total_cost(w, model) == pytest.approx(1.0)
    assert potential.total_cost(o, model) == pytest.approx(0.75)
    assert potential.price_of_anarchy(1.0, model) == pytest.approx(4 / 3)


def _random_affine(rng: np.random.Generator, n: int) -> Affine:
    return Affine(rng.uniform(0.0, 2.0, n), rng.uniform(0.1, 3.0, n) * (rng.uniform(size=n) < 0.8))


@pytest.mark.parametrize("seed", range(10))
def test_tolls_bring_wardrop_cost_to_optimum(seed: int) -> None:
    rng = np.random.default_rng(seed)
    model = _random_affine(rng, int(rng.integers(2, 7)))
    demand = float(rng.uniform(0.1, 5.0))
    tau = potential.marginal_cost_tolls(demand, model)
    tolled = potential.wardrop_split(demand, model.tolled(tau))
    best = potential.optimal_split(demand, model)
    np.testing.assert_allclose(tolled, best, atol=1e-8)
    assert potential.total_cost(tolled, model) == pytest.approx(
        float(potential.total_cost(best, model)), rel=1e-9
    )
    assert potential.total_cost(potential.wardrop_split(demand, model), model) >= (
        potential.total_cost(best, model) - 1e-9
    )


def test_pigou_tolls() -> None:
    model = Affine(np.array([1.0, 0.0]), np.array([0.0, 1.0]))
    tau = potential.marginal_cost_tolls(1.0, model)
    np.testing.assert_allclose(tau, [0.0, 0.5])
    tolled = potential.wardrop_split(1.0, model.tolled(tau))
    assert potential.total_cost(tolled, model) == pytest.approx(0.75)


def _check_equilibrium(flow: np.ndarray, level: np.ndarray, demand: float) -> None:
    assert (flow >= 0).all()
    assert flow.sum() == pytest.approx(demand, rel=1e-12, abs=1e-12)
    used = flow > 1e-9
    least = level.min()
    if used.any():
        assert np.abs(level[used] - least).max() <= 1e-7 * max(1.0, least)
    assert (level[~used] >= least - 1e-7).all()


@PROPERTY
@given(st.integers(0, 10_000), st.integers(1, 8), st.floats(0.0, 10.0))
def test_affine_splits_satisfy_their_conditions(seed: int, n: int, demand: float) -> None:
    model = _random_affine(np.random.default_rng(seed), n)
    w = potential.wardrop_split(demand, model)
    _check_equilibrium(w, model.latency(w), demand)
    o = potential.optimal_split(demand, model)
    _check_equilibrium(o, model.marginal(o), demand)


@pytest.mark.parametrize("seed", range(8))
def test_mm1_splits(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 6))
    model = MM1(rng.uniform(1.0, 5.0, n), rng.uniform(0.5, 1.5, n), rng.uniform(0, 0.1, n))
    demand = 0.8 * float(model.capacity().sum())
    w = potential.wardrop_split(demand, model)
    _check_equilibrium(w, model.latency(w), demand)
    o = potential.optimal_split(demand, model)
    _check_equilibrium(o, model.marginal(o), demand)
    assert (w < model.capacity()).all() and (o < model.capacity()).all()
    tau = potential.marginal_cost_tolls(demand, model)
    np.testing.assert_allclose(potential.wardrop_split(demand, model.tolled(tau)), o, atol=1e-7)
    with pytest.raises(ValueError):
        potential.wardrop_split(1.01 * float(model.capacity().sum()), model)


@pytest.mark.parametrize("seed", range(5))
def test_wardrop_minimizes_beckmann(seed: int) -> None:
    rng = np.random.default_rng(seed)
    model = MM1(rng.uniform(1.0, 5.0, 4), rng.uniform(0.5, 1.5, 4))
    demand = 0.6 * float(model.capacity().sum())
    w = potential.wardrop_split(demand, model)
    phi = float(potential.beckmann_potential(w, model))
    for _ in range(50):
        i, j = rng.choice(4, 2, replace=False)
        eps = float(rng.uniform(0, min(w[i], 0.05 * demand)))
        moved = w.copy()
        moved[i] -= eps
        moved[j] += eps
        if (moved < model.capacity()).all():
            assert float(potential.beckmann_potential(moved, model)) >= phi - 1e-12


def test_batched_splits_match_rows() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.uniform(0, 1, (6, 5)), rng.uniform(0.1, 2, (6, 5))
    b[0, 2] = 0.0  # a constant-latency link in one row
    d = rng.uniform(0.5, 4, 6)
    batch = potential.wardrop(d, a, b)
    for s in range(6):
        np.testing.assert_allclose(batch[s], potential.wardrop(d[s], a[s], b[s]), atol=1e-12)


def test_latency_model_inverses() -> None:
    mm1 = MM1(np.array([4.0, 2.0]), np.array([1.0, 0.5]), np.array([0.01, 0.0]))
    x = np.array([1.5, 3.0])
    np.testing.assert_allclose(mm1.flow_at_latency(mm1.latency(x)), x)
    np.testing.assert_allclose(mm1.flow_at_marginal(mm1.marginal(x)), x)
    np.testing.assert_allclose(mm1.flow_at_latency(np.array([0.0, 0.1])), [0.0, 0.0])
    # Integral of the latency, checked against the trapezoid rule.
    s = np.linspace(0, 1.5, 20001)
    lat = mm1.latency(np.stack([s, s], axis=1))[:, 0]
    integral = float(np.sum((lat[1:] + lat[:-1]) / 2 * np.diff(s)))
    assert float(mm1.integral(x)[0]) == pytest.approx(integral, rel=1e-7)


def test_congestion_fit_recovers_models() -> None:
    rng = np.random.default_rng(0)
    affine = CongestionFit((2, 3), kind="affine", forgetting=1.0)
    mm1 = CongestionFit((2, 3), kind="mm1", forgetting=1.0)
    a, b = rng.uniform(0.01, 0.1, (2, 3)), rng.uniform(0.001, 0.01, (2, 3))
    alpha, beta = rng.uniform(50, 100, (2, 3)), rng.uniform(0.5, 1.0, (2, 3))
    for _ in range(30):
        load = rng.uniform(0, 40, (2, 3))
        affine.update(load, a + b * load)
        mm1.update(load, 1.0 / (alpha - beta * load))
    fa, fm = affine.model(), mm1.model()
    assert isinstance(fa, Affine) and isinstance(fm, MM1)
    np.testing.assert_allclose(fa.free_flow, a, rtol=1e-6)
    np.testing.assert_allclose(fa.slope, b, rtol=1e-6)
    np.testing.assert_allclose(fm.alpha, alpha, rtol=1e-6)
    np.testing.assert_allclose(fm.beta, beta, rtol=1e-6)


def test_congestion_fit_forgets_and_stays_valid() -> None:
    fit = CongestionFit((1,), kind="affine", forgetting=0.5)
    for load in (1.0, 2.0, 3.0):
        fit.update([load], [1.0 + load])
    for load in (1.0, 2.0, 3.0) * 10:
        fit.update([load], [5.0 + 2 * load])
    model = fit.model()
    assert isinstance(model, Affine)
    assert model.free_flow[0] == pytest.approx(5.0, rel=1e-3)
    assert model.slope[0] == pytest.approx(2.0, rel=1e-3)
    # Constant load, no samples, falling latency: the fit stays a valid model.
    flat = CongestionFit((3,), kind="mm1")
    flat.update([1.0, 1.0, 5.0], [0.1, np.nan, 0.2], mask=[True, True, True])
    flat.update([1.0, 1.0, 6.0], [0.1, np.nan, 0.1])
    m = flat.model()
    assert isinstance(m, MM1)
    assert (m.beta >= 0).all() and (m.alpha > 0).all()
    assert m.latency(np.array([1.0, 1.0, 1.0]))[0] == pytest.approx(0.1)
    assert flat.samples()[1] == 0.0


ROSENTHAL = st.integers(2, 5).flatmap(
    lambda n_players: st.tuples(
        st.just(n_players),
        st.integers(2, 5),
        st.integers(0, 10_000),
    )
)


@PROPERTY
@given(ROSENTHAL, st.booleans())
def test_rosenthal_potential_tracks_deviator_cost(params: tuple[int, int, int], sets: bool) -> None:
    n_players, n_resources, seed = params
    rng = np.random.default_rng(seed)
    costs = np.cumsum(rng.uniform(0, 3, (n_resources, n_players)), axis=1)

    def strategy() -> list[int] | int:
        if sets:
            k = int(rng.integers(1, n_resources + 1))
            return [int(e) for e in rng.choice(n_resources, k, replace=False)]
        return int(rng.integers(n_resources))

    profile = [strategy() for _ in range(n_players)]
    for _ in range(10):
        i = int(rng.integers(n_players))
        moved = list(profile)
        moved[i] = strategy()
        d_phi = potential.rosenthal_potential(moved, costs) - potential.rosenthal_potential(
            profile, costs
        )
        d_cost = potential.player_cost(moved, i, costs) - potential.player_cost(profile, i, costs)
        assert d_phi == pytest.approx(d_cost, abs=1e-9)
        profile = moved


def test_rosenthal_value() -> None:
    costs = np.array([[1.0, 3.0, 6.0], [2.0, 2.0, 2.0]])
    # Two players on resource 0, one on resource 1: (1 + 3) + 2.
    assert potential.rosenthal_potential([0, 0, 1], costs) == 6.0
    np.testing.assert_array_equal(potential.resource_loads([[0, 1], 0, 1], 2), [2, 2])
