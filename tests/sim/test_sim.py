"""Fast tests of the routing simulator (equilibriumd.lab.sim): pure, no root."""

from __future__ import annotations

import numpy as np
import pytest

from equilibriumd.datapath.slots import apportion
from equilibriumd.lab.sim import policies
from equilibriumd.lab.sim.engine import simulate
from equilibriumd.lab.sim.metrics import aggregate, erlang_c, run_metrics, social_optimum
from equilibriumd.lab.sim.scenarios import SCENARIOS, Backend, Scenario


def short(name: str, f: float = 0.4) -> Scenario:
    return SCENARIOS[name].scaled(f)


@pytest.mark.parametrize("policy", ["equilibrium", "p2c-ewma", "oracle"])
def test_deterministic_for_a_seed(policy: str) -> None:
    sc = short("slow-backend", 0.3)
    a, b = simulate(sc, policy, 7), simulate(sc, policy, 7)
    assert np.array_equal(a.backend, b.backend)
    assert np.array_equal(a.latency, b.latency)
    assert np.array_equal(a.error, b.error)
    c = simulate(sc, policy, 8)
    assert c.arrival.size != a.arrival.size or not np.array_equal(c.arrival, a.arrival)


def test_same_traffic_for_every_policy() -> None:
    sc = short("heterogeneous", 0.2)
    a, b = simulate(sc, "random", 1), simulate(sc, "oracle", 1)
    assert np.array_equal(a.arrival, b.arrival)


@pytest.mark.parametrize("policy", ["equilibrium", "least-connections", "oracle", "p2c-ewma@kernel"])
def test_conservation(policy: str) -> None:
    """Every request goes to exactly one backend present at its arrival and is answered once."""
    sc = short("churn", 0.5)
    r = simulate(sc, policy, 2)
    n = r.arrival.size
    assert n > 1000
    assert r.backend.shape == r.latency.shape == r.error.shape == (n,)
    assert np.all(np.diff(r.arrival) >= 0)
    assert np.all(r.latency > 0) and np.all(np.isfinite(r.latency))
    for i in range(0, n, 97):
        st = sc.state_at(float(r.arrival[i]))
        assert st[int(r.backend[i])]["present"], (i, r.arrival[i], r.backend[i])
    # the expected number of arrivals (Poisson, 360/s)
    assert abs(n - 360 * sc.duration) < 5 * np.sqrt(360 * sc.duration)


def test_oracle_beats_random_on_heterogeneous() -> None:
    sc = short("heterogeneous", 0.5)
    p_or = run_metrics(simulate(sc, "oracle", 0), sc)["p99_seconds"]
    p_rnd = run_metrics(simulate(sc, "random", 0), sc)["p99_seconds"]
    assert p_or <= p_rnd
    assert p_or < 0.5


def test_kernel_split_follows_the_slot_table(monkeypatch: pytest.MonkeyPatch) -> None:
    weights = [0.6, 0.3, 0.1]
    monkeypatch.setattr(policies.KernelAgent, "weights", lambda self, present, delta, now: list(weights))
    sc = Scenario("split", "fixed weights", tuple(Backend(None, 0.01) for _ in range(3)), ((0, 2000.0),), 10.0,
                  warmup=0.0, steady=(0.0, 10.0))
    r = simulate(sc, "random@kernel", 0)            # balance: weighted (one slot per connection)
    expect = apportion(weights, 1024) / 1024
    got = np.bincount(r.backend, minlength=3) / r.backend.size
    sd = np.sqrt(expect * (1 - expect) / r.backend.size)
    assert np.all(np.abs(got - expect) < 4 * sd), (got, expect)


def test_kernel_p2c_steers_by_weight_and_evens_load_per_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    """balance: p2c (the equilibrium policy's default): the split still follows the
    weights, and a backend that holds connections longer gets fewer new ones."""
    weights = [0.5, 0.5]
    monkeypatch.setattr(policies.KernelAgent, "weights", lambda self, present, delta, now: list(weights))
    # backend 1 answers in 40 ms, backend 0 in 10 ms (pure delays): at 2,000/s backend 1
    # holds four times the connections per request sent, so p2c sends it fewer.
    sc = Scenario("split", "fixed weights", (Backend(None, 0.01), Backend(None, 0.04)), ((0, 2000.0),), 10.0,
                  warmup=0.0, steady=(0.0, 10.0))
    got = np.bincount(simulate(sc, "equilibrium", 0).backend, minlength=2) / 1.0
    got /= got.sum()
    flat = np.bincount(simulate(sc, "random@kernel", 0).backend, minlength=2) / 1.0
    flat /= flat.sum()
    assert abs(flat[1] - 0.5) < 0.02
    assert 0.25 < got[1] < 0.4, got   # P2C on equal weights: 1/2 - (mixed pairs going to backend 0)


def test_p2c_ewma_follows_peaks_and_decays() -> None:
    p = policies.Proxy("p2c-ewma", 2, 1, np.random.default_rng(0))
    p.done(0, 0, 1.0, 0.5)
    assert p.rtt[0][0] == 0.5                      # a peak replaces the estimate
    p.done(0, 0, 11.0, 0.1)                        # 10 s later: weight e^-1 on the old value
    assert abs(p.rtt[0][0] - (0.5 * np.exp(-1) + 0.1 * (1 - np.exp(-1)))) < 1e-12


def test_erlang_c_and_optimum() -> None:
    assert abs(erlang_c(1, 0.5) - 0.5) < 1e-12
    # two equal M/M/1 queues: the optimum splits evenly: T = 1 / (mu - lam/2)
    sc = Scenario("two", "", (Backend(1, 0.01), Backend(1, 0.01)), ((0, 100.0),), 10.0, steady=(0.0, 10.0))
    assert abs(social_optimum(sc) - 1 / (100 - 50)) < 1e-6


def test_aggregate_handles_missing() -> None:
    rows = [{"p99_seconds": 0.1, "shift_seconds": None}, {"p99_seconds": 0.3, "shift_seconds": None},
            {"p99_seconds": 0.2, "shift_seconds": 1.0}]
    a = aggregate(rows)
    assert abs(a["p99_seconds"] - 0.2) < 1e-12
    assert a["shift_seconds"] is None            # missing in most seeds
    lo, hi = a["ci95"]["p99_seconds"]
    assert lo < 0.2 < hi


def test_every_scenario_and_policy_runs() -> None:
    for name in SCENARIOS:
        sc = short(name, 0.1)
        for pol in ("equilibrium-tolls", "p2c-least-request@kernel", "round-robin"):
            m = run_metrics(simulate(sc, pol, 0), sc)
            assert m["success_ratio"] is not None
