"""Issue 16's scenarios (scenarios.PEER_SCENARIOS) and metrics (metrics.peer_metrics, the
benchmark's seed-by-seed ratios and targets): each scenario's defining property, each metric
on a small hand-made run whose figures are computed by hand below."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from equilibriumd.lab.bench import routing
from equilibriumd.lab.sim.engine import FAIL_LATENCY, Run, simulate
from equilibriumd.lab.sim.metrics import (
    METRICS,
    PEER_METRICS,
    aggregate,
    node_regret,
    p99_doubling_load,
    peer_metrics,
    run_metrics,
    social_optimum,
)
from equilibriumd.lab.sim.scenarios import NAMES, PEER_SCENARIOS, RAMPS, SCENARIOS, Backend, Scenario


def _f(x: object) -> float:
    """A field of Scenario.state_at (typed object) as a number."""
    return float(x)  # type: ignore[arg-type]


SHORT = 0.25   # scenarios scaled to a quarter of their length (every time scaled, rates unchanged)


def test_peer_scenarios_are_opt_in() -> None:
    assert PEER_SCENARIOS == ("linkerd-2016", "prequal-ramp", "fast-and-slow", "two-failing", "cold-scale-up",
                              "homogeneous-cpu", "zone-skew")
    for s in PEER_SCENARIOS:
        assert s in SCENARIOS and s not in NAMES


@pytest.mark.parametrize("policy", ["equilibrium", "round-robin"])
@pytest.mark.parametrize("name", PEER_SCENARIOS)
def test_each_runs(name: str, policy: str) -> None:
    """One short seed: every request reaches a backend present at its arrival, and every
    metric, issue 16's too, comes out in range."""
    sc = SCENARIOS[name].scaled(SHORT)
    r = simulate(sc, policy, 0)
    assert r.arrival.size > 1000
    for i in range(0, r.arrival.size, 211):
        assert sc.state_at(float(r.arrival[i]))[int(r.backend[i])]["present"]
    m = {**run_metrics(r, sc), **peer_metrics(r, sc)}
    assert set(PEER_METRICS) <= set(m)
    assert 0.0 <= m["success_within_1s"] <= 1.0
    assert m["mean_latency_seconds"] > 0 and m["throughput_per_second"] > 0
    assert m["node_regret_seconds"] is not None
    if name not in RAMPS:
        assert m["p99_doubling_load"] is None


def test_linkerd_2016() -> None:
    sc = SCENARIOS["linkerd-2016"]
    assert len(sc.backends) == 11 and sc.rate == ((0, 1000.0),) and sc.timeout == 1.0
    assert sc.stream == "linkerd-replica"        # the same requests as linkerd-replica, seed by seed
    slow = [t for t in np.arange(0.0, 60.0, 0.5) if _f(sc.state_at(t)[0]["delay"]) > 0]
    assert slow[0] == 15.0 and slow[-1] == 44.5  # 2 s for 30 s, then back
    assert _f(sc.state_at(20.0)[0]["delay"]) + sc.backends[0].mean == pytest.approx(2.0)
    assert all(_f(sc.state_at(20.0)[b]["delay"]) == 0.0 for b in range(1, 11))
    short = sc.scaled(SHORT)
    r = simulate(short, "round-robin", 0)
    on0 = r.backend == 0
    inside = on0 & (r.arrival >= 15.0 * SHORT) & (r.arrival < 45.0 * SHORT)
    before = on0 & (r.arrival < 15.0 * SHORT)
    assert inside.sum() > 100 and np.all(r.latency[inside] > 1.9)
    assert np.all(r.latency[before] < 0.2)
    # round robin keeps sending 1/11 to the slow one: its success within 1 s is about 1 - 1/11 there
    s = peer_metrics(r, short)["success_within_1s"]
    assert 0.9 < s < 0.99


def test_prequal_ramp() -> None:
    sc = SCENARIOS["prequal-ramp"]
    cap = sum(b.capacity for b in sc.backends)
    assert cap == pytest.approx(700.0) and RAMPS["prequal-ramp"] == pytest.approx(cap)
    assert sc.rate_at(0.0) == pytest.approx(0.75 * cap) and sc.rate_at(19.9) == pytest.approx(0.75 * cap)
    assert sc.rate_at(sc.duration) == pytest.approx(1.75 * cap)
    assert sc.rate_at(80.0) == pytest.approx(1.25 * cap)
    r = simulate(sc.scaled(SHORT), "round-robin", 0)
    early = np.sum(r.arrival < 5.0 * SHORT) / (5.0 * SHORT)
    late = np.sum(r.arrival >= sc.duration * SHORT - 2.0) / 2.0
    assert early == pytest.approx(525.0, rel=0.15) and late == pytest.approx(1225.0, rel=0.1)
    # round robin's p99 doubles on the way up, past the 0.75x hold and by capacity at the latest
    d = peer_metrics(r, sc.scaled(SHORT))["p99_doubling_load"]
    assert d is not None and 0.75 < d <= 1.05


def test_fast_and_slow() -> None:
    bs = SCENARIOS["fast-and-slow"].backends
    fast = [b for b in bs if b.mean == 0.020]
    slow = [b for b in bs if b.mean != 0.020]
    assert len(bs) == 16 and len(fast) == 14 and len(slow) == 2
    assert all(b.mean == 16 * 0.020 and b.servers == 2 for b in slow)


def test_two_failing() -> None:
    sc = SCENARIOS["two-failing"]
    assert len(sc.backends) == 20
    assert [s["failing"] for s in sc.state_at(20.0)] == [True, True] + [False] * 18
    assert not any(s["failing"] for s in sc.state_at(10.0)) and not any(s["failing"] for s in sc.state_at(50.0))
    short = sc.scaled(SHORT)
    r = simulate(short, "round-robin", 0)
    on = (r.backend < 2) & (r.arrival >= 15.0 * SHORT + 0.01) & (r.arrival < 45.0 * SHORT)
    assert on.sum() > 100 and r.error[on].all() and np.all(r.latency[on] == FAIL_LATENCY)
    assert not r.error[r.backend >= 2].any()


def test_cold_scale_up() -> None:
    sc = SCENARIOS["cold-scale-up"]
    assert [s["present"] for s in sc.state_at(19.0)] == [True] * 4 + [False] * 4
    st = sc.state_at(20.0)
    assert all(s["present"] for s in st) and [float(s["mult"]) for s in st[4:]] == [4.0] * 4  # type: ignore[arg-type]
    assert all(float(s["mult"]) == 1.0 for s in sc.state_at(36.0))  # type: ignore[arg-type]
    assert sc.rate_at(20.0) == pytest.approx(0.9 * 800.0)            # they join under 90 % load
    short = sc.scaled(SHORT)
    r = simulate(short, "round-robin", 0)
    assert not np.any(r.backend[r.arrival < 20.0 * SHORT] >= 4)
    assert np.any(r.backend[r.arrival >= 20.0 * SHORT] >= 4)


def test_homogeneous_cpu() -> None:
    sc = SCENARIOS["homogeneous-cpu"]
    assert len(set(sc.backends)) == 1 and len(sc.backends) >= 16
    b = sc.backends[0]
    assert b.servers == 1 and b.dist == "normal" and b.std / b.mean <= 0.25   # CPU-bound: small variance
    assert sc.rate_at(30.0) == pytest.approx(0.9 * sum(x.capacity for x in sc.backends))
    assert not sc.events


def test_zone_skew() -> None:
    sc = SCENARIOS["zone-skew"]
    n = len(sc.backends)
    assert len(set(sc.backends)) == 1
    assert [float(s["delay"]) for s in sc.state_at(1.0)] == [0.0] * (n // 2) + [0.005] * (n // 2)  # type: ignore[arg-type]
    assert sc.rate_at(10.0) > sum(b.capacity for b in sc.backends[: n // 2])   # the local zone alone can't
    r = simulate(sc.scaled(SHORT), "round-robin", 0)
    assert np.all(r.latency[r.backend >= n // 2] >= 0.005)


# --- metrics on hand-made runs ----------------------------------------------------------

def _run(rows: list[tuple[float, int, int, float, bool]], nb: int = 2) -> Run:
    a = np.array(rows, dtype=object)
    return Run("hand", "hand", 0, a[:, 0].astype(float), a[:, 1].astype(np.int64), a[:, 2].astype(np.int64),
               a[:, 3].astype(float), a[:, 4].astype(bool), nb)


def _flat(nodes: int = 2, duration: float = 2.0) -> Scenario:
    return Scenario("hand", "", (Backend(1, 0.01), Backend(1, 0.01)), ((0, 10.0),), duration, nodes=nodes,
                    warmup=0.0, steady=(0.0, duration), timeout=1.0)


# (arrival, node, backend, latency, 5xx); windows [0, 1) and [1, 2)
ROWS = [(0.1, 0, 0, 0.1, False), (0.3, 1, 1, 0.3, False), (0.6, 0, 1, 0.5, False),
        (1.1, 0, 0, 0.2, False), (1.4, 1, 1, 0.001, True), (1.7, 1, 0, 1.5, False)]


def test_peer_metrics_by_hand() -> None:
    m = peer_metrics(_run(ROWS), _flat())
    # 2xx within 1 s: the first four of six
    assert m["success_within_1s"] == pytest.approx(4 / 6)
    assert m["throughput_per_second"] == pytest.approx(4 / 2.0)
    # costs 0.1, 0.3, 0.5, 0.2, 1.0 (the 5xx costs the timeout), 1.5 (late: its latency)
    assert m["mean_latency_seconds"] == pytest.approx(3.6 / 6)
    # backend costs per window: b0 0.1 then (0.2 + 1.5) / 2 = 0.85; b1 (0.3 + 0.5) / 2 = 0.4 then 1.0.
    # node 0 (2 requests in w0, 1 in w1) paid 0.8; b0 fixed 2 x 0.1 + 0.85 = 1.05; b1 2 x 0.4 + 1.0
    # = 1.8: regret -0.25. Node 1 (1 in w0, 2 in w1) paid 2.8; b0 0.1 + 1.7 = 1.8; b1 0.4 + 2.0: regret 1.0.
    assert m["node_regret_seconds"] == pytest.approx((-0.25 + 1.0) / 6)
    assert m["p99_doubling_load"] is None                      # not a ramp


def test_node_regret_carries_costs_over_empty_windows() -> None:
    # b1 gets nothing in w0: its first known cost (0.2, w1) stands in for it there
    r = _run([(0.2, 0, 0, 0.1, False), (1.2, 0, 1, 0.2, False), (1.5, 0, 0, 0.5, False)])
    sc = _flat(nodes=1)
    cost = np.where(r.error, sc.timeout, r.latency)
    # paid 0.8; b0 fixed 0.1 + 2 x 0.5 = 1.1; b1 0.2 + 2 x 0.2 = 0.6
    assert node_regret(r, sc, cost) == pytest.approx((0.8 - 0.6) / 3)


def _ramp_run(switch: float | None) -> tuple[Run, Scenario]:
    """Load 1x (100 req/s of capacity 100) until t=10, then +0.1x per second; answers at
    0.1 s before the ramp, 0.15 s on it, and 0.25 s (over twice 0.1) from `switch`."""
    sc = Scenario("ramp", "", (Backend(1, 0.01),), ((0, 100.0), (10.0, 100.0), (20.0, 200.0)), 20.0,
                  warmup=0.0, steady=(0.0, 10.0))
    t = np.concatenate([np.linspace(0.0, 10.0, 300, endpoint=False), np.arange(10.0, 20.0, 1 / 1200)])
    lat = np.where(t < 10.0, 0.1, 0.15)
    if switch is not None:
        lat = np.where(t >= switch, 0.25, lat)
    n = t.size
    return Run("ramp", "hand", 0, t, np.zeros(n, np.int64), np.zeros(n, np.int64), lat, np.zeros(n, bool), 1), sc


def test_p99_doubling_load_by_hand() -> None:
    # bins of 0.025x from 1.0x: t=13.1 (1.31x) is in [1.3, 1.325), whose mean load is 1.3125
    r, sc = _ramp_run(13.1)
    assert p99_doubling_load(r, sc, 100.0) == pytest.approx(1.3125, abs=1e-3)
    r, sc = _ramp_run(None)                                    # 0.15 never reaches 2 x 0.1
    assert p99_doubling_load(r, sc, 100.0) is None


def test_social_optimum_md1() -> None:
    """Deterministic service (cs^2 = 0): the M/D/1 wait, half the M/M/1's."""
    sc = Scenario("md1", "", (Backend(1, 0.01, dist="normal", std=0.0),), ((0, 50.0),), 10.0, steady=(0.0, 10.0))
    # rho 0.5: W = rho / (2 mu (1 - rho)) = 0.5 / (2 x 100 x 0.5) = 5 ms, + 10 ms of service
    assert social_optimum(sc) == pytest.approx(0.015, rel=1e-4)


def test_aggregate_adds_peer_metrics_only_when_present() -> None:
    base = dict.fromkeys(METRICS, 0.1)
    assert "success_within_1s" not in aggregate([base, base])
    got = aggregate([{**base, "success_within_1s": 0.9, "mean_latency_seconds": 0.2},
                     {**base, "success_within_1s": 1.0, "mean_latency_seconds": 0.4}])
    assert got["success_within_1s"] == pytest.approx(0.95) and got["mean_latency_seconds"] == pytest.approx(0.3)


# --- the benchmark's seed-by-seed ratios and targets ------------------------------------------

def _res(p99: list[float], mean: list[float], **extra: Any) -> dict[str, Any]:
    per: dict[str, list[float | None]] = {k: [None] * len(p99) for k in routing.PAIRED_METRICS}
    per["p99_seconds"], per["mean_latency_seconds"] = list(p99), list(mean)
    return {"p99_seconds": float(np.mean(p99)), "per_seed": per, **extra}


def test_peer_paired_and_targets_by_hand() -> None:
    sim = {"a": {"equilibrium": _res([0.2, 0.3], [0.2, 0.3]), "p2c-ewma": _res([0.4, 0.3], [0.105, 0.21]),
                 "oracle": _res([0.1, 0.1], [0.1, 0.2])},
           "b": {"equilibrium": _res([0.5, 0.5], [0.1, 0.1]), "p2c-ewma": _res([0.25, 0.25], [0.3, 0.3]),
                 "oracle": _res([0.2, 0.2], [0.1, 0.1])}}
    t = routing.peer_targets(sim)
    pa = t["paired"]
    # equilibrium's mean latency over the oracle's, seed by seed: 2.0 and 1.5
    assert pa["a"]["equilibrium"]["vs_oracle"]["mean_latency_seconds"]["mean_ratio"] == pytest.approx(1.75)
    # p2c-ewma's p99 over equilibrium's: 2.0 and 1.0, at or below in one seed
    x = pa["a"]["p2c-ewma"]["vs_equilibrium"]["p99_seconds"]
    assert x["mean_ratio"] == pytest.approx(1.5) and x["seeds_at_or_below"] == 1 and x["seeds"] == 2
    assert "vs_equilibrium" not in pa["a"]["equilibrium"]
    pv = t["p99_vs_best_peer"]
    assert pv["ratios"]["a"]["ratio"] == pytest.approx(0.25 / 0.35)       # means 0.25 vs 0.35
    assert pv["ratios"]["b"]["ratio"] == pytest.approx(2.0)
    assert pv["at_or_below"] == ["a"] and pv["met_half"] and not pv["never_above"]
    poa = t["price_of_anarchy"]["scenarios"]
    # a: p2c-ewma 1.05 on both seeds reaches 1.10, equilibrium's 1.75 does not; b: no peer does (3.0)
    assert poa["a"]["applies"] and poa["a"]["met"] is False
    assert not poa["b"]["applies"] and poa["b"]["met"] is None
    assert t["price_of_anarchy"]["met"] is False


def test_homogeneous_and_linkerd_targets() -> None:
    sim = {"homogeneous-cpu": {"equilibrium": _res([0.104], [0.1], throughput_per_second=980.0),
                               "round-robin": _res([0.1], [0.1], throughput_per_second=1000.0)},
           "linkerd-2016": {"equilibrium": _res([0.2], [0.2], success_within_1s=0.9994)}}
    t = routing.peer_targets(sim)
    h = t["homogeneous_vs_round_robin"]
    assert h["throughput_ratio"] == pytest.approx(0.98) and h["p99_ratio"] == pytest.approx(1.04) and h["met"]
    assert t["linkerd_2016_success"]["met"] is False


def test_task_adds_peer_metrics_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routing, "PEER_SUITE", False)
    _, _, _, met, _, _ = routing._task(("steady", "round-robin", 1))
    assert "success_within_1s" not in met                     # the default set: as before
    _, _, _, met, _, _ = routing._task(("zone-skew", "round-robin", 1))
    assert set(PEER_METRICS) <= set(met)


def test_suite_peers_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    rc = routing.main(["--suite", "peers", "--scenarios", "zone-skew", "--policies", "round-robin,oracle",
                       "--seeds", "2", "--workers", "1", "--no-live", "--plots", "", "--json", str(out),
                       "--markdown", ""])
    assert rc == 0
    res = json.loads(out.read_text())
    rr = res["scenarios"]["zone-skew"]["round-robin"]
    assert len(rr["per_seed"]["mean_latency_seconds"]) == 2 and rr["success_within_1s"] == 1.0
    ratio = res["targets"]["peers"]["paired"]["zone-skew"]["round-robin"]["vs_oracle"]["mean_latency_seconds"]
    assert ratio["mean_ratio"] > 1.0 and ratio["seeds"] == 2
    routing.PEER_SUITE = False


def test_the_peers_suite_writes_beside_the_default_one() -> None:
    """`scripts/bench routing` (suite all) runs the default suite, then the peers suite into
    NAME-peers files next to the default suite's."""
    assert routing._beside("bench-results/routing.json", "peers") == "bench-results/routing-peers.json"
    assert routing._beside("/tmp/x/r.md", "peers") == "/tmp/x/r-peers.md"
