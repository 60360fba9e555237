"""The engine's opt-in panic threshold (EquilibriumParams.panic_threshold, engine.panic_rows)."""

from __future__ import annotations

import numpy as np
import pytest

from equilibriumd.config import ConfigError, parse
from equilibriumd.game.engine import EquilibriumEngine, Observation, panic_rows
from equilibriumd.types import EquilibriumParams

#: row 0: backends 1-3 fail every request (3 of 4 quarantined); row 1: backend 3 fails
FAILING = np.array([[False, True, True, True], [False, False, False, True]])


def run(params: EquilibriumParams, failing: np.ndarray, ticks: int = 40,
        seed: int = 7) -> tuple[list[np.ndarray], EquilibriumEngine]:
    """A deterministic sequence: 200 requests a tick per service, latencies 10-40 ms with noise,
    failing backends answering every request with an error."""
    rng = np.random.default_rng(seed)
    mask = np.ones(failing.shape, dtype=bool)
    e = EquilibriumEngine(mask, params, now=0.0)
    base = np.array([0.010, 0.020, 0.030, 0.040])
    out = []
    for k in range(ticks):
        req = np.round(200 * e.weights)
        lat = base * rng.lognormal(0.0, 0.1, failing.shape)
        err = np.where(failing, req, 0.0)
        obs = Observation(latency=lat, requests=req, errors=err, inflight=np.ones(failing.shape),
                          seconds=0.5, served=req - err)
        out.append(e.update(obs, now=0.5 * (k + 1)).copy())
    return out, e


def test_three_of_four_quarantined_spread_evenly() -> None:
    """At 50 %: the healthy backend of a service with 3 of 4 quarantined gets its even share
    (0.25), where without panic it gets nearly everything."""
    off, e_off = run(EquilibriumParams(), FAILING)
    on, e_on = run(EquilibriumParams(panic_threshold=0.5), FAILING)
    assert e_off.quarantined[0].tolist() == [False, True, True, True]
    assert e_on.quarantined[0].tolist() == [False, True, True, True]   # quarantine itself goes on
    assert off[-1][0, 0] > 0.9
    assert on[-1][0, 0] <= 0.25 + 1e-9
    assert np.allclose(on[-1][0], 0.25)
    assert e_on.state is not None and e_on.state.panic.tolist() == [True, False]
    assert e_off.state is not None and e_off.state.panic.tolist() == [False, False]


def test_rows_above_the_threshold_are_bit_identical() -> None:
    """Row 1 (3 of 4 healthy, 75 % >= 50 %) gets exactly the weights it gets with panic off,
    tick by tick, even while row 0 of the same engine is in panic; and with no row in panic
    the whole sequence is bit-identical to the default engine."""
    off, _ = run(EquilibriumParams(), FAILING)
    on, _ = run(EquilibriumParams(panic_threshold=0.5), FAILING)
    # row 0 drives a different traffic pattern, row 1 sees the same observations
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(off, on))
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(off, on))
    quiet = FAILING.copy()
    quiet[0] = [False, False, True, True]       # 2 of 4 healthy: 50 % is not below 50 %
    off, e_off = run(EquilibriumParams(), quiet)
    on, e_on = run(EquilibriumParams(panic_threshold=0.5), quiet)
    assert e_on.quarantined[0].tolist() == [False, False, True, True]
    assert all(np.array_equal(a, b) for a, b in zip(off, on))
    assert np.array_equal(e_off.q, e_on.q) and np.array_equal(e_off.lat, e_on.lat)


def test_default_is_off_and_changes_nothing() -> None:
    """The default threshold is 0 (disabled): the default engine and one with 0 set explicitly
    give bit-identical sequences, with no row ever in panic, even with 3 of 4 failing."""
    assert EquilibriumParams().panic_threshold == 0.0
    a, ea = run(EquilibriumParams(), FAILING, seed=3)
    b, eb = run(EquilibriumParams(panic_threshold=0.0), FAILING, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert ea.state is not None and not ea.state.panic.any()


def test_panic_rows() -> None:
    """Even weights over present backends in rows below the threshold; others as they were;
    absent backends stay at 0; a row with nothing present is not in panic."""
    mask = np.array([[True, True, True, False], [True, True, True, True], [False] * 4])
    quar = np.array([[False, True, True, False], [False, True, False, False], [False] * 4])
    w = np.array([[0.98, 0.01, 0.01, 0.0], [0.6, 0.01, 0.39, 0.0], [0.0] * 4])
    out, panic = panic_rows(w, mask, quar, 0.5)
    assert panic.tolist() == [True, False, False]
    assert np.allclose(out[0], [1 / 3, 1 / 3, 1 / 3, 0.0])
    assert np.array_equal(out[1:], w[1:])
    _, panic = panic_rows(w, mask, quar, 1.0)    # threshold 100 %: any quarantine panics
    assert panic.tolist() == [True, True, False]


def test_config_accepts_and_bounds_the_threshold() -> None:
    cfg = parse("equilibrium: {panic_threshold: 0.5}\nservices: []\n", "f.yaml")
    assert cfg.equilibrium.panic_threshold == 0.5
    with pytest.raises(ConfigError, match=r"f\.yaml:2: equilibrium\.panic_threshold: must be <= 1"):
        parse("services: []\nequilibrium: {panic_threshold: 1.5}\n", "f.yaml")
    with pytest.raises(ConfigError, match=r"f\.yaml:1: equilibrium\.panic_threshold: .*>= 0"):
        parse("equilibrium: {panic_threshold: -0.1}\nservices: []\n", "f.yaml")
