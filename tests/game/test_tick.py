"""The batch engine tick on a simulated routing game."""

import numpy as np
import pytest

from equilibriumd.game import potential
from equilibriumd.game.congestion import Affine
from equilibriumd.game.convergence import CONVERGED
from equilibriumd.game.tick import BatchEngine, TickResult


def _simulate(
    engine: BatchEngine,
    a: np.ndarray,
    b: np.ndarray,
    demand: np.ndarray,
    ticks: int,
    errors: np.ndarray | None = None,
) -> tuple[TickResult, np.ndarray, np.ndarray]:
    S, B = a.shape
    w = np.full((S, B), 1.0 / B)
    result = None
    for _ in range(ticks):
        flow = w * demand[:, None]
        lat = a + b * flow
        err = np.zeros_like(flow) if errors is None else np.minimum(errors * flow, flow)
        result = engine.tick(lat, err, flow)
        w = result.weights
    assert result is not None
    return result, flow, lat


def test_engine_reaches_wardrop_and_reports_convergence() -> None:
    rng = np.random.default_rng(0)
    S, B = 20, 5
    a, b = rng.uniform(0.01, 0.05, (S, B)), rng.uniform(0.0005, 0.002, (S, B))
    demand = rng.uniform(50, 150, S)
    engine = BatchEngine(S, B, latency_budget=0.5, seed=0)
    first, _, _ = _simulate(BatchEngine(S, B, latency_budget=0.5, seed=0), a, b, demand, 1)
    result, flow, lat = _simulate(engine, a, b, demand, 300)
    least = lat.min(axis=1)
    rel_gap = result.wardrop_gap / least
    assert np.median(first.wardrop_gap / least) > 0.3  # uniform split is far from equilibrium
    assert rel_gap.max() <= 0.05
    assert (result.state == CONVERGED).all()
    # Realized total latency is close to the Wardrop equilibrium's.
    model = Affine(a, b)
    eq_cost = potential.total_cost(potential.wardrop(demand, a, b), model)
    assert (potential.total_cost(flow, model) <= 1.05 * eq_cost).all()
    assert (result.slot_counts.sum(axis=1) == engine.n_slots).all()
    assert (result.slot_counts >= np.ceil(engine.floor * engine.n_slots)).all()
    np.testing.assert_allclose(result.weights.sum(axis=1), 1.0)


def test_engine_avoids_failing_backend_and_masks() -> None:
    S, B = 3, 4
    a = np.full((S, B), 0.02)
    b = np.full((S, B), 0.001)
    errors = np.zeros((S, B))
    errors[:, 0] = 0.6  # backend 0 fails most requests
    engine = BatchEngine(S, B, latency_budget=0.5, seed=1)
    mask = np.ones((S, B), dtype=bool)
    mask[2, 3] = False
    engine.set_mask(mask)
    result, _, _ = _simulate(engine, a, b, np.full(S, 100.0), 40, errors)
    assert (result.p_failing[:, 0] > 0.99).all()
    assert (result.weights[:, 0] <= engine.floor + 1e-9).all()
    assert result.slot_counts[2, 3] == 0 and result.weights[2, 3] == 0.0
    assert (result.slot_counts.sum(axis=1) == 1024).all()


def test_engine_is_deterministic() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0.01, 0.05, (4, 3)), rng.uniform(0.001, 0.002, (4, 3))
    r1, _, _ = _simulate(BatchEngine(4, 3, seed=5), a, b, np.full(4, 80.0), 30)
    r2, _, _ = _simulate(BatchEngine(4, 3, seed=5), a, b, np.full(4, 80.0), 30)
    np.testing.assert_array_equal(r1.slot_counts, r2.slot_counts)
    np.testing.assert_array_equal(r1.weights, r2.weights)


def test_engine_validates_floor() -> None:
    with pytest.raises(ValueError):
        BatchEngine(1, 300, floor=0.005)
