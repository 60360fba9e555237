"""Lyapunov functions and the hysteresis detector."""

import numpy as np
import pytest

from equilibriumd.game.convergence import (
    CONVERGED,
    CONVERGING,
    DIVERGING,
    ConvergenceDetector,
    regret_potential,
)
from equilibriumd.game.regret import RegretMatcher


def test_regret_potential() -> None:
    assert regret_potential([-1.0, 2.0, 3.0]) == pytest.approx(13.0)
    np.testing.assert_allclose(regret_potential([[1.0, -1.0], [0.0, 0.0]]), [1.0, 0.0])


def test_regret_potential_growth_bound_under_regret_matching() -> None:
    # Blackwell: E[Phi_T] <= T |A| Delta^2 for regret matching, on any sequence.
    rng = np.random.default_rng(0)
    learner = RegretMatcher(6)
    for t in range(1, 1001):
        learner.observe(rng.uniform(0, 1, 6))
        assert regret_potential(learner.cumulative_regret()) <= t * 6 * 1.0
    assert regret_potential(learner.cumulative_regret()) > 0


def test_hysteresis() -> None:
    det = ConvergenceDetector((), enter=0.1, exit=0.3, patience=3, smoothing=1.0)
    states = [int(det.update(d)) for d in [0.5, 0.05, 0.05, 0.05, 0.2, 0.25, 0.05, 0.35, 0.05]]
    assert states == [
        CONVERGING,
        CONVERGING,
        CONVERGING,
        CONVERGED,  # needs 3 ticks below enter
        CONVERGED,
        CONVERGED,
        CONVERGED,  # between thresholds: stays converged
        CONVERGING,  # above exit: leaves
        CONVERGING,  # one tick below enter is not enough to re-enter
    ]
    assert det.names()[()] == "converging"


def test_diverging_and_batch() -> None:
    det = ConvergenceDetector((3,), enter=0.1, exit=0.3, patience=2, smoothing=0.5)
    rising = [0.4, 0.8, 1.6, 3.2]
    for d in rising:
        state = det.update(np.array([d, 0.0, np.nan]))
    assert state[0] == DIVERGING
    assert state[1] == CONVERGED
    assert state[2] == CONVERGING  # missing measurements never count as converged
    assert det.distance[1] == 0.0
    det.reset(np.array([True, False, False]))
    assert det.state[0] == CONVERGING and np.isnan(det.distance[0])
    with pytest.raises(ValueError):
        ConvergenceDetector(enter=0.3, exit=0.1)
