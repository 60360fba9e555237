"""Client connection pools and the rebalancer in the routing simulator (pure, no root).

The run-level checks rebuild what happened from the requests alone (arrival,
wait, latency, connection, client) and the log of closes, not from the
pools' own bookkeeping, so a pool that overfills or a close of a busy
connection shows up as a contradiction.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import numpy as np
import pytest

from equilibriumd.lab.sim import policies
from equilibriumd.lab.sim.engine import Run, simulate
from equilibriumd.lab.sim.metrics import aggregate, run_metrics
from equilibriumd.lab.sim.pools import DRAIN, EXCESS, UNBOUND, NodePools, PoolLog, PoolSpec
from equilibriumd.lab.sim.scenarios import POOLED, SCENARIOS, Backend, Scenario

# --- the pool and the rebalancer on their own ------------------------------------------


def _node(spec: PoolSpec, backends: list[int], t: float = 0.0) -> tuple[NodePools, list]:
    """A node with one pool holding a connection per entry of `backends`, all idle since t."""
    n = NodePools(spec, 3)
    log = PoolLog()
    conns = [n.open_conn(i, 0, b, t, log) for i, b in enumerate(backends)]
    for c in conns:
        assert n.release(c, t) is None
    return n, conns


def test_pool_is_lifo_and_waiters_are_fifo() -> None:
    n, (a, b) = _node(PoolSpec(clients=1, size=2), [0, 1])
    assert n.acquire(0) is b                     # the most recently returned first
    assert n.acquire(0) is a
    assert n.acquire(0) is None and not n.can_open(0)
    n.wait(0, 7)
    n.wait(0, 8)
    assert n.release(a, 1.0) == 7                # handed to the first waiter, not put back
    assert n.release(b, 1.1) == 8
    assert n.release(a, 1.2) is None and n.acquire(0) is a
    with pytest.raises(RuntimeError):
        n.open_conn(9, 0, 0, 2.0, PoolLog())     # a full pool opens nothing


def test_rebalance_closes_only_idle_old_quiet_connections_within_the_budget() -> None:
    spec = PoolSpec(clients=1, size=8, max_closes=3, min_age=2.0, min_idle=0.010)
    # two connections to backend 1, six to backend 0; the table sends everything to backend 1
    n, conns = _node(spec, [1, 1, 0, 0, 0, 0, 0, 0])
    busy = n.acquire(0)                          # one of backend 0's is carrying a request
    assert busy is conns[7]
    slots, present = [0, 1024, 0], [True, True, True]
    rng = np.random.default_rng(0)
    assert n.rebalance(1.0, slots, present, rng) == []          # younger than min_age
    conns[2].last = 2.995                                       # traffic 5 ms before the next walk
    out = n.rebalance(3.0, slots, present, rng)
    assert len(out) == 3                                        # max_closes
    assert all(c.backend == 0 and why == EXCESS for c, why in out)
    assert conns[2] not in [c for c, _ in out] and busy not in [c for c, _ in out]
    assert n.open == [3, 2, 0]
    out = n.rebalance(3.5, slots, present, rng)                 # the next tick: the quiet one is idle now
    assert conns[2] in [c for c, _ in out] and len(out) == 2
    assert n.open == [1, 2, 0]                                  # only the busy one is left
    assert n.release(busy, 3.6) is None
    assert n.rebalance(4.0, slots, present, rng) == [(busy, EXCESS)]


def test_rebalance_drains_a_backend_that_left_and_leaves_a_fair_split_alone() -> None:
    spec = PoolSpec(clients=1, size=8, max_closes=8)
    n, _ = _node(spec, [0, 0, 0, 1, 1, 1, 2, 2])
    rng = np.random.default_rng(1)
    # equal thirds of the table: 3/3/2 is within the noise of the draw: nothing moves
    assert n.rebalance(5.0, [342, 341, 341], [True, True, True], rng) == []
    # backend 2 left: its idle connections go, whatever the quotas
    out = n.rebalance(5.5, [512, 512, 0], [True, True, False], rng)
    assert sorted(why for _, why in out) == [DRAIN, DRAIN] and n.open == [3, 3, 0]


# --- whole runs ---------------------------------------------------------------------------


def _intervals(r: Run) -> tuple[np.ndarray, np.ndarray]:
    """Each request's (start on its connection, end of its response)."""
    assert r.wait is not None
    return r.arrival + r.wait, r.arrival + r.latency


def _closed_at(r: Run) -> dict[int, float]:
    assert r.pools is not None
    return dict(zip(r.pools.close_conn, r.pools.close_t))


@pytest.mark.parametrize("policy", ["equilibrium", "p2c-ewma"])
def test_pool_reuse(policy: str) -> None:
    """Connections are reused, carry one request at a time, keep their backend (kernel)
    or are unbound (proxy), and no pool ever holds more than its size."""
    sc = replace(SCENARIOS["heterogeneous-pooled"].scaled(0.3), pool=PoolSpec(clients=4, size=4))
    r = simulate(sc, policy, 3)
    assert r.conn is not None and r.client is not None and r.pools is not None
    assert np.all(r.conn >= 0)
    assert np.unique(r.conn).size < r.arrival.size / 20         # connections carry many requests
    assert r.pools.peak <= 4
    start, end = _intervals(r)
    assert np.all(r.wait >= 0) and np.all(end > start)
    assert (r.wait > 0).any()                                   # 4 x 4 is tight at 416/s: some wait
    closed = _closed_at(r)
    by_conn: dict[int, list[int]] = defaultdict(list)
    for i in np.argsort(start, kind="stable").tolist():
        by_conn[int(r.conn[i])].append(i)
    life: dict[tuple[int, int], list[tuple[float, float]]] = defaultdict(list)
    mixed = 0
    for c, reqs in by_conn.items():
        pools = {(int(r.node[i]), int(r.client[i])) for i in reqs}
        assert len(pools) == 1, (c, pools)                      # a connection belongs to one pool
        for a, b in zip(reqs, reqs[1:]):
            assert start[b] >= end[a] - 1e-12, (c, a, b)        # one request at a time
        backends = set(r.backend[reqs].tolist())
        if policies.kind(policy) == "kernel":
            assert len(backends) == 1, (c, backends)            # bound at connect
        mixed += len(backends) > 1
        life[pools.pop()].append((float(start[reqs[0]]), closed.get(c, np.inf)))
    if policies.kind(policy) == "request":
        assert mixed > 0                                        # the proxy picks per request
    for key, spans in life.items():                             # open connections per pool, over time
        ev = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans], key=lambda x: (x[0], x[1]))
        assert max(np.cumsum([d for _, d in ev])) <= 4, key


def test_rebalancer_closes_only_idle_connections_within_limits() -> None:
    # backend 0 is slow from 7.5 to 20 s; the pools open most connections in the first
    # seconds, so a min_age of 8 s holds some closes back (a tight budget, to see it bind)
    spec = PoolSpec(max_closes=2, min_age=8.0)
    sc = replace(SCENARIOS["slow-backend-pooled"].scaled(0.5), pool=spec)
    r = simulate(sc, "equilibrium", 0)
    assert r.pools is not None and r.conn is not None
    log = r.pools
    assert len(log.close_t) >= 5
    # while it is slow, the slow backend gives up its connections, first and most (once it
    # recovers, the others give theirs up to it: policy.rebalance's shortfall rule). Late in the
    # slow spell the two healthy ones may even out between them (seen at 18.5 s since the
    # kernel's first draw sweeps the table: the pools' connections follow the table more closely)
    slow = [b for b, t in zip(log.close_backend, log.close_t) if t < 20.0]
    assert len(slow) >= 10 and set(slow[:10]) == {0} and slow.count(0) >= 0.8 * len(slow), slow
    per_tick = defaultdict(int)
    for t, k in zip(log.close_t, log.close_node):
        per_tick[(t, k)] += 1
    assert max(per_tick.values()) <= spec.max_closes
    assert max(per_tick.values()) == spec.max_closes            # the budget did bind
    start, end = _intervals(r)
    for c, tc in _closed_at(r).items():
        mine = r.conn == c
        assert mine.any()
        assert not np.any(mine & (start <= tc) & (end > tc)), c         # nothing in flight
        assert np.max(end[mine]) <= tc - spec.min_idle + 1e-12, c       # quiet for min_idle
        assert np.min(start[mine]) <= tc - spec.min_age + 1e-12, c      # old enough
        assert not np.any(mine & (start > tc)), c                       # and never used again


def _fixed_weights(monkeypatch: pytest.MonkeyPatch, switch: float, after: list[float]) -> None:
    def weights(self: policies.KernelAgent, present: tuple[int, ...], delta: object, now: float) -> list[float]:
        return list(after) if now >= switch else [1.0] * len(present)
    monkeypatch.setattr(policies.KernelAgent, "weights", weights)


def _pure(policy_pool: PoolSpec) -> Scenario:
    return Scenario("fixed", "3 equal pure-delay backends, pooled", tuple(Backend(None, 0.02) for _ in range(3)),
                    ((0, 400.0),), 30.0, warmup=0.0, steady=(20.0, 30.0), pool=policy_pool)


def test_a_down_weighted_backend_loses_its_pooled_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights move off backend 0 at t=10: with rebalancing its connections follow
    (down to the few the noise band of policy.rebalance lets it keep: 2 % of ~50
    connections is 1, and up to 3 are within the band); without, the pools keep
    sending it a third of the requests."""
    _fixed_weights(monkeypatch, 10.0, [0.02, 0.49, 0.49])
    share = {}
    for pol in ("equilibrium", "equilibrium@no-rebalance"):
        r = simulate(_pure(PoolSpec()), pol, 0)
        late = r.arrival >= 20.0
        share[pol] = float(np.mean(r.backend[late] == 0))
    assert share["equilibrium"] < 0.1, share
    assert share["equilibrium@no-rebalance"] > 0.2, share


def test_equal_backends_see_few_closes(monkeypatch: pytest.MonkeyPatch) -> None:
    sc = SCENARIOS["steady-pooled"].scaled(0.5)
    m = run_metrics(simulate(sc, "equilibrium", 1), sc)
    assert m["connections"] > 10
    assert m["close_fraction_per_second"] <= 0.05, m
    # the measure can fail: weights that jump every tick make the rebalancer churn
    rng = np.random.default_rng(5)
    monkeypatch.setattr(policies.KernelAgent, "weights",
                        lambda self, present, delta, now: rng.dirichlet([1.0] * len(present)).tolist())
    noisy = run_metrics(simulate(sc, "equilibrium", 1), sc)
    assert noisy["close_fraction_per_second"] > 0.05, noisy


@pytest.mark.parametrize("policy", ["equilibrium", "p2c-ewma@kernel", "p2c-ewma", "oracle"])
def test_pooled_runs_are_deterministic(policy: str) -> None:
    sc = SCENARIOS["churn-pooled"].scaled(0.3)
    a, b = simulate(sc, policy, 4), simulate(sc, policy, 4)
    for x, y in ((a.backend, b.backend), (a.latency, b.latency), (a.conn, b.conn), (a.wait, b.wait)):
        assert np.array_equal(x, y)
    assert a.pools is not None and b.pools is not None
    assert a.pools.close_t == b.pools.close_t and a.pools.close_conn == b.pools.close_conn
    c = simulate(sc, policy, 5)
    assert c.arrival.size != a.arrival.size or not np.array_equal(c.arrival, a.arrival)


def test_a_pooled_scenario_shares_its_twins_traffic() -> None:
    for name in POOLED:
        sc = SCENARIOS[name]
        assert sc.pool is not None and sc.twin in SCENARIOS and SCENARIOS[sc.twin].pool is None
        a, b = simulate(sc.scaled(0.1), "random", 2), simulate(SCENARIOS[sc.twin].scaled(0.1), "random", 2)
        assert np.array_equal(a.arrival, b.arrival)


def test_pool_metrics_aggregate() -> None:
    sc = SCENARIOS["steady-pooled"].scaled(0.2)
    rows = [run_metrics(simulate(sc, "equilibrium", s), sc) for s in range(2)]
    agg = aggregate(rows)
    assert agg["connections"] is not None and agg["pool_wait_ratio"] is not None
    assert "connections" not in aggregate([{"p99_seconds": 0.1}])   # per-connection runs: no pool keys
    proxy = run_metrics(simulate(sc, "p2c-ewma", 0), sc)
    assert proxy["connections"] is None and proxy["pool_wait_ratio"] is not None


def test_unbound_connections_for_proxies() -> None:
    n, (c,) = _node(PoolSpec(clients=1, size=1), [UNBOUND])
    assert n.open == [0, 0, 0] and c.backend == UNBOUND
    # the rebalancer never touches a proxy's connections
    assert n.rebalance(10.0, [1024, 0, 0], [True, True, True], np.random.default_rng(0)) == []


def test_more_walks_share_the_ticks_budget() -> None:
    """PoolSpec.walks > 1 (an option, not the design's default): the extra walks
    between two ticks use what is left of that tick's quotas and budget."""
    spec = PoolSpec(max_closes=2, walks=5)
    sc = replace(SCENARIOS["slow-backend-pooled"].scaled(0.5), pool=spec)
    r = simulate(sc, "equilibrium", 0)
    assert r.pools is not None
    t = np.asarray(r.pools.close_t)
    assert np.any(np.abs(t / sc.tick - np.round(t / sc.tick)) > 1e-6)     # some closes between ticks
    per_tick = np.bincount(np.floor(t / sc.tick + 1e-9).astype(np.int64))
    assert per_tick.max() <= spec.max_closes
