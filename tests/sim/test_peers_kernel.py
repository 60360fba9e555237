"""The peers' @kernel forms (issue 16, sim.peers_kernel): hand-computed weights on small fixed
states, and one short end-to-end simulation each."""

from __future__ import annotations

import math

import numpy as np
import pytest

from equilibriumd.datapath.telemetry import COUNTER
from equilibriumd.lab.sim import peers, peers_kernel, policies
from equilibriumd.lab.sim.engine import simulate
from equilibriumd.lab.sim.metrics import run_metrics
from equilibriumd.lab.sim.peers import ServerState
from equilibriumd.lab.sim.scenarios import SCENARIOS

from .test_peers import SHORT, oracle_p99  # noqa: F401  (oracle_p99: the fixture)


def view(rifs: list[int], busy: list[float] | None = None) -> peers.ServerView:
    """A fixed server state (the same at every time)."""
    u = busy or [0.0] * len(rifs)
    return lambda b, t: ServerState(rifs[b], 0, u[b], 0.02)


def delta(answered: list[int], inflight: list[int], errors: list[int] | None = None,
          lat: float = 0.02) -> object:
    e = errors or [0] * len(answered)
    return policies.make_delta(0.5, [float(a) for a in answered], [float(a) for a in answered],
                               [float(x) for x in e], [a * lat for a in answered], inflight)


def test_registered_opt_in() -> None:
    assert set(peers_kernel.PEERS_KERNEL) == {"grpc-wrr@kernel", "envoy-least-request-weighted@kernel",
                                              "jsq-stale@kernel", "linkerd-penalty-ewma@kernel"}
    balance = {"grpc-wrr@kernel": "weighted", "envoy-least-request-weighted@kernel": "p2c",
               "jsq-stale@kernel": "weighted", "linkerd-penalty-ewma@kernel": "p2c"}
    kinds = {"grpc-wrr@kernel": peers_kernel.GrpcWrrKernel,
             "envoy-least-request-weighted@kernel": peers_kernel.EnvoyWeightedKernel,
             "jsq-stale@kernel": peers_kernel.JsqStaleKernel,
             "linkerd-penalty-ewma@kernel": peers_kernel.LinkerdPenaltyKernel}
    for p in policies.PEERS_KERNEL:
        assert policies.kind(p) == "kernel"
        assert p not in policies.ALL and p not in policies.PEERS     # the default set is unchanged
        a = policies.KernelAgent(p, 0.5)
        assert isinstance(a.router, kinds[p])
        assert a.balance == balance[p]
        # no telemetry yet: even weights (every agent's first table)
        w = a.weights((0, 1, 2), None, 0.0)
        assert len(w) == 3 and max(w) == min(w) > 0
    with pytest.raises(ValueError):
        peers_kernel.make("prequal@kernel")


# --- Envoy weighted least request ------------------------------------------------------------------

def test_envoy_weights_by_hand() -> None:
    assert peers_kernel.envoy_weights([80.0, 80.0, 160.0, 320.0], [3.0, 0.0, 1.0, 7.0]) == \
        pytest.approx([20.0, 80.0, 80.0, 40.0])
    assert peers_kernel.envoy_weights([1.0, 1.0], [-2.0, 1.0]) == pytest.approx([1.0, 0.5])   # clamped at 0


def test_envoy_kernel_reads_the_ticks_inflight() -> None:
    a = policies.KernelAgent("envoy-least-request-weighted@kernel", 0.5)
    sc = SCENARIOS["heterogeneous"]                  # capacities 80, 80, 160, 320 req/s
    peers_kernel.attach(sc, [a], view([0, 0, 0, 0]))
    d = delta([5, 5, 5, 5], [3, 0, 1, 7])
    assert a.weights((0, 1, 2, 3), d, 0.5) == pytest.approx([20.0, 80.0, 80.0, 40.0])
    # a subset of the backends present: their own rows of the delta
    assert a.weights((1, 3), d, 1.0) == pytest.approx([80.0, 40.0])
    # equal static weights among those present: Envoy's P2C path (an even table, the kernel's
    # two-choice draw on live counts), not 1 / (active + 1) frozen for a tick
    assert a.weights((0, 1), d, 1.5) == pytest.approx([80.0, 80.0])
    b = policies.KernelAgent("envoy-least-request-weighted@kernel", 0.5)
    peers_kernel.attach(SCENARIOS["slow-backend"], [b], view([0, 0, 0]))     # 3 equal backends
    assert b.weights((0, 1, 2), delta([5, 5, 5], [4, 0, 1]), 0.5) == pytest.approx([200.0] * 3)


# --- JSQ on the tick's snapshot ----------------------------------------------------------------------

def test_jsq_kernel_all_weight_on_the_shortest() -> None:
    assert peers_kernel.jsq_weights([5, 2, 2, 7]) == [0.0, 1.0, 1.0, 0.0]
    a = policies.KernelAgent("jsq-stale@kernel", 0.5)
    state = {"rifs": [5, 2, 2, 7]}
    peers_kernel.attach(SCENARIOS["heterogeneous"], [a], lambda b, t: ServerState(state["rifs"][b], 0, 0.0, 0.02))
    d = delta([1, 1, 1, 1], [0, 0, 0, 0])
    assert a.weights((0, 1, 2, 3), d, 0.5) == [0.0, 1.0, 1.0, 0.0]         # ties split equally
    assert a.weights((0, 1, 3), d, 1.0) == [0.0, 1.0, 0.0]
    state["rifs"] = [0, 9, 9, 9]                                             # the next tick's snapshot
    assert a.weights((0, 1, 2, 3), d, 1.5) == [1.0, 0.0, 0.0, 0.0]


# --- gRPC weighted round robin -----------------------------------------------------------------------

def orca_fixture() -> peers_kernel.OrcaServers:
    """One 1 s window: backend 0 answers 100 (busy 0.5), backend 1 50 of which 10 5xx (busy 0.25),
    backend 2 none (busy 0)."""
    o = peers_kernel.OrcaServers(3, view([0, 0, 0], busy=[0.5, 0.25, 0.0]))
    for j in range(4):
        o.arrival(0.1 + 0.2 * j)
    for j in range(100):
        o.done(0, 0.005 * j, False)
    for j in range(50):
        o.done(1, 0.01 * j, j < 10)
    return o


def test_orca_reports_last_complete_window() -> None:
    o = orca_fixture()
    assert o.report(0, 0.99) is None                           # the first window is not complete yet
    assert o.report(0, 1.0) == pytest.approx((100.0, 0.0, 0.5))
    assert o.report(1, 1.0) == pytest.approx((50.0, 10.0, 0.25))
    assert o.report(2, 1.0) == pytest.approx((0.0, 0.0, 0.0))
    assert o.report(0, 7.5) == pytest.approx((100.0, 0.0, 0.5))  # windows without arrivals keep it


def test_grpc_kernel_a58_weights_by_hand() -> None:
    a = policies.KernelAgent("grpc-wrr@kernel", 0.5)
    o = orca_fixture()
    r = a.router
    assert isinstance(r, peers_kernel.GrpcWrrKernel)
    r.attach(SCENARIOS["heterogeneous"], view([0, 0, 0]), o)
    got = delta([100, 50, 0], [0, 0, 0])
    # t=1: reports from 0 and 1 (2 got no response: no report); all still in the 10 s blackout: even
    assert a.weights((0, 1, 2), got, 1.0) == [1.0, 1.0, 1.0]
    assert r.nes == {0: 1.0, 1: 1.0}
    # t=11: past the blackout. w0 = 100 / 0.5 = 200; w1 = 50 / (0.25 + 10 / 50 x 1.0) = 111.1;
    # backend 2 has no weight: the mean of the others'
    w1 = 50.0 / (0.25 + 10.0 / 50.0)
    assert a.weights((0, 1, 2), got, 11.0) == pytest.approx([200.0, w1, (200.0 + w1) / 2])
    # only backend 0 keeps answering: 1's weight (last updated at 11) expires 180 s later, and with
    # fewer than two usable weights A58 weighs every backend the same
    only0 = delta([100, 0, 0], [0, 0, 0])
    assert a.weights((0, 1, 2), only0, 190.5) == pytest.approx([200.0, w1, (200.0 + w1) / 2])
    assert a.weights((0, 1, 2), only0, 191.0) == [1.0, 1.0, 1.0]
    assert 1 not in r.nes                                      # expiry resets the blackout
    # a backend that leaves and comes back starts afresh
    a.weights((0, 2), only0, 191.5)
    a.weights((0, 1, 2), got, 192.0)
    assert r.nes[1] == 192.0


# --- Linkerd's penalised PeakEWMA --------------------------------------------------------------------

def test_linkerd_kernel_penalty_by_hand() -> None:
    # backend 0 answers ten 5xx in 1 ms each, 1 and 2 ten successes in 20 ms each; nothing in flight
    d = policies.make_delta(0.5, [10.0] * 3, [10.0] * 3, [10.0, 0.0, 0.0], [0.01, 0.2, 0.2], [0, 0, 0])
    pen = peers_kernel.penalized(d)
    assert int(pen.counters[0, COUNTER["req_ns_sum"]]) == 10_000_000 + 10 * 5_000_000_000
    assert int(pen.counters[1, COUNTER["req_ns_sum"]]) == 200_000_000
    assert int(d.counters[0, COUNTER["req_ns_sum"]]) == 10_000_000              # the engine's delta untouched
    out = {}
    for p in ("linkerd-penalty-ewma@kernel", "p2c-ewma@kernel"):
        a = policies.KernelAgent(p, 0.5)
        a.weights((0, 1, 2), None, 0.0)
        out[p] = a.weights((0, 1, 2), d, 0.5)
    # PeakEWMA (30 ms to start, w = e^-0.05): plain, backend 0's 1 ms blends in and it is the cheapest:
    # P2C with replacement over 3, ranks 0 / tie 1-2: (2 x 2 + 1) / 9, (0 + 2) / 9 each
    assert math.exp(-0.05) * 0.03 + (1 - math.exp(-0.05)) * 0.001 < 0.03
    assert out["p2c-ewma@kernel"] == pytest.approx([5 / 9, 2 / 9, 2 / 9])
    # penalised: backend 0's mean is (0.01 + 50) / 10 = 5.001 s, a peak taken at once: the dearest
    assert out["linkerd-penalty-ewma@kernel"] == pytest.approx([1 / 9, 4 / 9, 4 / 9])


# --- one short run each ---------------------------------------------------------------------------------

# the per-request peers' short scenario and its oracle reference (tests/sim/test_peers.py)


@pytest.mark.parametrize("policy", policies.PEERS_KERNEL)
def test_short_run(policy: str, oracle_p99: float) -> None:  # noqa: F811 (the imported fixture)
    r = simulate(SHORT, policy, 1)
    m = run_metrics(r, SHORT)
    assert r.arrival.size > 5000 and not r.error.any() and r.ticks > 0
    assert np.all(np.isfinite(r.latency)) and np.all(r.latency > 0)
    assert set(np.unique(r.backend)) == {0, 1, 2, 3}
    assert m["p99_seconds"] >= oracle_p99 * 0.999
    late = r.arrival > 15.0
    share = np.bincount(r.backend[late], minlength=4) / late.sum()
    if policy == "jsq-stale@kernel":     # a whole tick's traffic on the tick's shortest queues: herding
        assert m["p99_seconds"] > 3 * oracle_p99
    elif policy == "grpc-wrr@kernel":    # even during the 10 s blackout, then the weights follow capacity
        assert share == pytest.approx([0.125, 0.125, 0.25, 0.5], abs=0.04)
    else:
        assert m["p99_seconds"] < 0.5
        assert share[3] > share[0] + 0.15    # the biggest backend takes the most


def test_linkerd_kernel_avoids_fast_failures() -> None:
    sc = SCENARIOS["two-failing"].scaled(0.3)       # backends 0 and 1 fail fast from 4.5 to 13.5 s
    during = {}
    for p in ("linkerd-penalty-ewma@kernel", "p2c-ewma@kernel"):
        r = simulate(sc, p, 1)
        bad = (r.arrival > 5.5) & (r.arrival < 13.5)
        during[p] = float(np.isin(r.backend[bad], [0, 1]).mean())
        assert set(np.unique(r.backend)) == set(range(20))
    # the plain PeakEWMA is drawn to the fast 5xx (above their fair 10 %); the penalised one avoids them
    assert during["p2c-ewma@kernel"] > 0.15
    assert during["linkerd-penalty-ewma@kernel"] < 0.05


def test_deterministic_for_a_seed() -> None:
    sc = SCENARIOS["heterogeneous"].scaled(0.1)
    for p in policies.PEERS_KERNEL:
        a, b = simulate(sc, p, 4), simulate(sc, p, 4)
        assert np.array_equal(a.backend, b.backend) and np.array_equal(a.latency, b.latency)
