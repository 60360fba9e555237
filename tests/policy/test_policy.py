"""The equilibrium policy and the baselines, on simulated services (pure, no root).

The closed loop here is small on purpose: three backends whose latency grows
with their share of the load (M/M/1-like), noisy per-tick means from Poisson
request counts, a 0.5 s tick. It checks the behaviours the agent relies on:
fast shift off a slow backend, recovery, no oscillation between equals,
quarantine of a failing backend, slow start, floors and tolls.
"""

from __future__ import annotations

import numpy as np
import pytest

from equilibriumd.game.engine import EquilibriumEngine as EquilibriumPolicy
from equilibriumd.game.engine import Observation
from equilibriumd.policy import baselines
from equilibriumd.types import EquilibriumParams

DT = 0.5


def loop(policy: EquilibriumPolicy, seconds: float, latency_fn, errors_fn=None, lam=200.0, seed=1):
    """Run the closed loop; returns (times, weights history)."""
    rng = np.random.default_rng(seed)
    hist, times = [], []
    b = policy.mask.shape[1]
    for k in range(int(seconds / DT)):
        t = k * DT
        w = policy.weights[0]
        n = rng.poisson(lam * w * DT)
        mean = latency_fn(t, w)
        lat = np.array([rng.exponential(mean[i], n[i]).mean() if n[i] else np.nan for i in range(b)])
        err = errors_fn(t, n) if errors_fn else np.zeros(b)
        policy.update(Observation(lat[None], n[None].astype(float), err[None], np.zeros((1, b)), DT), t)
        hist.append(policy.weights[0].copy())
        times.append(t)
    return np.array(times), np.array(hist)


def mm1(slow_from=None, slow_to=None, extra=0.5, mu=300.0, lam=200.0):
    def f(t, w):
        rho = np.minimum(lam * w / mu, 0.95)
        lat = 0.01 / (1 - rho)
        if slow_from is not None and slow_from <= t < slow_to:
            lat = lat + np.array([extra, 0.0, 0.0])
        return lat
    return f


def fresh(n=3, **kw):
    return EquilibriumPolicy(np.ones((1, n), dtype=bool), EquilibriumParams(**kw), now=-1000.0)


def test_shifts_off_a_slow_backend_and_recovers():
    p = fresh()
    t, h = loop(p, 90, mm1(20, 60))
    shift = next(x - 20 for x, w in zip(t, h[:, 0]) if x >= 20 and w < 0.05)
    recover = next(x - 60 for x, w in zip(t, h[:, 0]) if x >= 60 and abs(w - 1 / 3) < 0.05)
    assert shift <= 3.0, shift
    assert recover <= 20.0, recover
    during = h[(t > 30) & (t < 60), 0]
    # the slow backend keeps only about its floor (shrunk: it is 50x slower), but for a tick or two of
    # re-probing if its estimate went unrefreshed for STALE_SECONDS (about 0.3 requests a second
    # reach it here, so a 15 s gap happens)
    assert np.median(during) <= 0.002 and (during > 0.02).sum() <= 2 and during.max() <= 0.05


def test_equal_backends_do_not_oscillate_and_report_converged():
    p = fresh()
    t, h = loop(p, 60, mm1())
    assert h[t > 20].std(axis=0).max() < 0.02
    assert np.allclose(h[-1], 1 / 3, atol=0.03)
    assert p.state is not None and p.state.status_name(0) == "converged"


def test_fast_failing_backend_is_quarantined_then_restored():
    p = fresh()

    def errors(t, n):
        e = np.zeros(3)
        if 10 <= t < 40:
            e[0] = n[0]  # every request to backend 0 fails (fast)
        return e

    def fast_fail(t, w):
        lat = mm1()(t, w)
        if 10 <= t < 40:
            lat[0] = 0.001  # failing fast: must not look attractive
        return lat

    t, h = loop(p, 90, fast_fail, errors)
    during = h[(t > 14) & (t < 40)]
    assert during[:, 0].max() <= p.p.trickle + 1e-9
    assert p.state is not None and not p.state.quarantined[0, 0]
    assert abs(h[-1, 0] - 1 / 3) < 0.06  # back after quarantine and slow start


def test_weights_are_distributions_with_floors():
    p = fresh(n=4)
    rng = np.random.default_rng(3)
    for k in range(200):
        lat = rng.lognormal(-4, 1.5, size=(1, 4))
        req = rng.integers(0, 50, size=(1, 4)).astype(float)
        err = np.minimum(rng.integers(0, 5, size=(1, 4)), req)
        w = p.update(Observation(lat, req, err, np.zeros((1, 4)), DT), k * DT)
        # a slower backend's floor shrinks with its latency ratio, to floor_min_ratio x floor at least
        assert abs(w.sum() - 1) < 1e-9 and (w >= p.p.floor * p.p.floor_min_ratio - 1e-12).all()
        assert (np.abs(w - (p.state.weights if p.state else w)) < 1e-12).all()


@pytest.mark.parametrize("slow, ratio", [(0.1, 0.2), (0.05, (0.01 + 0.005) / (0.05 + 0.005))])
def test_a_slower_backend_explores_at_a_floor_scaled_by_its_latency(slow: float, ratio: float) -> None:
    """Exploration costs about the same latency per backend: a backend L times slower than the best
    (with L0 = latency_floor added) keeps floor / L of the traffic, never under floor_min_ratio x floor."""
    def run(**kw: float) -> float:
        p = fresh(n=3, **kw)
        for k in range(120):
            req = np.round(1000 * DT * p.weights)
            lat = np.array([[0.01, 0.01, slow]])
            p.update(Observation(lat, req, np.zeros((1, 3)), np.zeros((1, 3)), DT), k * DT)
        return float(p.weights[0, 2])

    scaled, fixed = run(), run(floor_min_ratio=1.0)
    floor = EquilibriumParams().floor
    # at the floor (plus what inertia keeps above it) with a fixed floor; scaled by the ratio otherwise
    assert floor <= fixed < 2 * floor
    assert scaled / fixed == pytest.approx(ratio, rel=0.05)


def test_absent_backends_get_nothing_and_new_ones_slow_start():
    mask = np.array([[True, True, False]])
    p = EquilibriumPolicy(mask, EquilibriumParams(slow_start=10.0), now=-1000.0)
    t, h = loop(p, 10, mm1())
    assert (h[:, 2] == 0).all()
    p.set_mask(np.ones((1, 3), dtype=bool), now=10.0)
    rng_t = []
    for k in range(40):
        now = 10.0 + k * DT
        lat = np.full((1, 3), 0.01)
        p.update(Observation(lat, np.full((1, 3), 30.0), np.zeros((1, 3)), np.zeros((1, 3)), DT), now)
        rng_t.append(p.weights[0, 2])
    assert rng_t[1] < 0.15  # capped while young
    assert abs(rng_t[-1] - 1 / 3) < 0.05  # full share after the ramp


def test_tolls_move_heterogeneous_split_toward_the_optimum():
    # Two affine links: l1(x) = 0.01 + 0.02x, l2(x) = 0.02 + 0.0x (x = share).
    # Wardrop equalises l: 0.01 + 0.02 x1 = 0.02 -> x1 = 0.5 (and beyond is as slow);
    # the optimum equalises marginal cost: 0.01 + 0.04 x1 = 0.02 -> x1 = 0.25.
    def affine(t, w):
        return np.array([0.01 + 0.02 * w[0], 0.02])

    # One run is a noisy closed loop (a seed can sit near 0.5 for its whole last
    # minute), so the split is averaged over five seeds.
    xs = []
    for seed in range(1, 6):
        plain = EquilibriumPolicy(np.ones((1, 2), dtype=bool), EquilibriumParams(deadband=0.02, latency_floor=0.0),
                                  now=-1000)
        tolled = EquilibriumPolicy(np.ones((1, 2), dtype=bool),
                                   EquilibriumParams(deadband=0.02, latency_floor=0.0, tolls=True), now=-1000)
        _, hp = loop(plain, 120, affine, lam=2000, seed=seed)
        _, ht = loop(tolled, 120, affine, lam=2000, seed=seed)
        xs.append((hp[-60:, 0].mean(), ht[-60:, 0].mean()))
    x_plain, x_toll = np.mean(xs, axis=0)
    assert abs(x_plain - 0.5) < 0.02 and x_toll < x_plain - 0.035, xs


@pytest.mark.parametrize("bad", [{"inertia": 2}, {"deadband": -1}, {"quarantine_exit": 0.95},
                                 {"patience": 0}, {"regime_change": 0.5}])
def test_params_validated(bad):
    with pytest.raises(ValueError):
        EquilibriumParams(**bad)


def test_p2c_probabilities_exact():
    # n = 3, costs ranked 0 < 1 < 2: P = (2(n-r)-1)/n^2 = 5/9, 3/9, 1/9
    assert np.allclose(baselines.p2c_probabilities(np.array([1.0, 2.0, 3.0])), [5 / 9, 3 / 9, 1 / 9])
    assert np.allclose(baselines.p2c_probabilities(np.array([2.0, 2.0])), [0.5, 0.5])
    p = baselines.p2c_probabilities(np.random.default_rng(0).random(7))
    assert abs(p.sum() - 1) < 1e-12


def test_peak_ewma_jumps_up_decays_down():
    e = baselines.PeakEwma(1, default_rtt=0.03, decay=10.0)
    e.observe(np.array([0.5]), 0.5)
    assert e.value[0] == 0.5  # a peak is taken at once
    e.observe(np.array([0.01]), 10.0)  # one decay time later: about 1/e of the way back
    assert 0.5 * np.exp(-1) < e.value[0] < 0.5 * np.exp(-1) + 0.02
    e.observe(np.array([np.nan]), 1.0)  # no sample: unchanged
    assert 0.18 < e.value[0] < 0.21


def test_least_connections_prefers_fewer_open():
    w = baselines.least_connections(np.array([0, 9, 3]))
    assert w[0] > w[2] > w[1]


def test_a_backend_nothing_measures_is_forgotten_and_tried_again() -> None:
    """Pooled clients stop sending to a backend once its connections moved: no
    answer refreshes its estimate. After STALE_SECONDS it is unknown again and its
    weight rises through slow start (so the rebalancer gives it a few connections
    and the truth comes back)."""
    from equilibriumd.game.engine import STALE_SECONDS

    p = EquilibriumPolicy(np.ones((1, 3), dtype=bool), EquilibriumParams())
    slow = np.array([[0.5, 0.01, 0.01]])
    t = 0.0
    for _ in range(40):   # 20 s: backend 0 slow, measured
        p.update(Observation(slow, np.array([[5.0, 50.0, 50.0]]), np.zeros((1, 3)), np.zeros((1, 3)), DT), t)
        t += DT
    floor = float(p.weights[0, 0])
    assert floor < 0.05 and np.isfinite(p.lat[0, 0])
    unseen = np.array([[np.nan, 0.01, 0.01]])
    ticks = int(STALE_SECONDS / DT)
    for _ in range(ticks - 1):   # nothing answers on backend 0 (its connections moved away)
        p.update(Observation(unseen, np.array([[0.0, 50.0, 50.0]]), np.zeros((1, 3)), np.zeros((1, 3)), DT), t)
        t += DT
    assert np.isfinite(p.lat[0, 0]) and p.weights[0, 0] < 0.05   # not yet
    p.update(Observation(unseen, np.array([[0.0, 50.0, 50.0]]), np.zeros((1, 3)), np.zeros((1, 3)), DT), t)
    t += DT
    assert np.isnan(p.lat[0, 0])   # forgotten: unknown again
    seen = []
    for _ in range(40):
        p.update(Observation(unseen, np.array([[0.0, 50.0, 50.0]]), np.zeros((1, 3)), np.zeros((1, 3)), DT), t)
        t += DT
        seen.append(float(p.weights[0, 0]))
    assert seen[3] < 0.2 < seen[-1], seen   # tried again through slow start: small first, then more


def test_floors_stay_whole_under_overload_and_for_a_passing_collapse() -> None:
    """The shrunk floor is for a backend that stays slow while the rest are fine: not when most of
    the service looks collapsed (overload: the 'best' is an outlier whose queue drained), and not
    before the collapse has lasted `patience` ticks."""
    def run(lat: list[float], ticks: int) -> np.ndarray:
        p = fresh(n=len(lat))
        for k in range(ticks):
            req = np.round(1000 * DT * p.weights)
            p.update(Observation(np.array([lat]), req, np.zeros((1, len(lat))), np.zeros((1, len(lat))), DT), k * DT)
        return p.weights[0]

    floor = EquilibriumParams().floor
    heavy = run([1.0, 1.0, 1.0, 0.05], 60)                     # 3 of 4 collapsed: overload
    assert (heavy[:3] >= floor - 1e-12).all()
    one = run([0.01, 0.01, 0.5], 60)                           # one of 3, for good: its floor shrinks
    assert one[2] < 0.5 * floor

    def first_tick(**kw: int) -> float:
        """Backend 2 (no weight yet) answers its first requests 50x slower than the others."""
        p = fresh(n=3, **kw)
        p.weights = np.array([[0.5, 0.5, 0.0]])
        obs = Observation(np.array([[0.01, 0.01, 0.5]]), np.array([[250.0, 250.0, 5.0]]), np.zeros((1, 3)),
                          np.zeros((1, 3)), DT)
        return float(p.update(obs, 0.0)[0, 2])

    assert first_tick() == pytest.approx(floor)                 # collapsed for 1 tick of `patience` (4)
    assert first_tick(patience=1) == pytest.approx(floor * EquilibriumParams().floor_min_ratio)
