"""The router (agent.routing.Router) on synthetic telemetry: what it learned
follows each (service, backend address) across layouts, the baseline
policies' rows, and explain() (no kernel, no root)."""

from __future__ import annotations

import numpy as np
import pytest

from equilibriumd.agent.routing import Router, build_layout
from equilibriumd.config import Config
from equilibriumd.datapath.telemetry import TelemetryDelta
from equilibriumd.lab.sim.policies import make_delta

from .support import config, service_yaml

WEB = service_yaml("web", "10.96.0.1:80", ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"])
DB5 = service_yaml("db", "10.96.0.2:80", ["10.0.1.%d:80" % i for i in range(1, 6)])
TICK = 0.5


def delta(n_ids: int, latency: dict[int, float], inflight: dict[int, int] | None = None,
          errors: dict[int, float] | None = None, sent: float = 100.0) -> TelemetryDelta:
    """One tick: `sent` requests to each backend id in `latency`, all answered after
    that many seconds (`errors` of them 5xx); other ids idle."""
    s = [sent if i in latency else 0.0 for i in range(n_ids)]
    lat_sum = [s[i] * latency.get(i, 0.0) for i in range(n_ids)]
    e5 = [(errors or {}).get(i, 0.0) for i in range(n_ids)]
    infl = [(inflight or {}).get(i, 0) for i in range(n_ids)]
    return make_delta(TICK, s, s, e5, lat_sum, infl)


def learn(r: Router, n_ids: int, latency: dict[int, float], ticks: int, t0: float = 0.0) -> float:
    t = t0
    for _ in range(ticks):
        t += TICK
        r.tick(delta(n_ids, latency), TICK, now=t)
    return t


def learn_following(r: Router, name: str, latency: dict[int, float], ticks: int, t0: float = 0.0,
                    rate: float = 300.0) -> float:
    """Ticks whose telemetry follows the weights, as real traffic does: each backend id of
    `name` gets its share of `rate` requests a tick, answered after latency[id] seconds."""
    assert r.layout is not None
    i = r.layout.row[name]
    ids = [int(x) for x in r.layout.ids[i, :int(r.layout.present[i].sum())]]
    n_ids = int(r.layout.ids.max()) + 1      # every service's ids: the others idle
    t = t0
    for _ in range(ticks):
        t += TICK
        w = share(row(r, name))
        s = [0.0] * n_ids
        for j, b in enumerate(ids):
            s[b] = rate * float(w[j])
        lat_sum = [s[b] * latency.get(b, 0.0) for b in range(n_ids)]
        r.tick(make_delta(TICK, s, s, [0.0] * n_ids, lat_sum, [0] * n_ids), TICK, now=t)
    return t


def row(r: Router, name: str) -> np.ndarray:
    assert r.layout is not None
    i = r.layout.row[name]
    return r.current()[i, :int(r.layout.present[i].sum())].copy()


def share(w: np.ndarray) -> np.ndarray:
    return w / w.sum()


def learned_web() -> tuple[Router, float]:
    """web's backend 0 slow, 1 a little slow, 2 fast, traffic following the weights: after 9
    ticks backend 2 has most of the weight and 0 and 1 are near the floor (distinct, not equal)."""
    r = Router()
    r.set_layout(build_layout(config(WEB), {"web": [0, 1, 2]}), now=0.0)
    assert np.allclose(share(row(r, "web")), 1 / 3)
    t = learn_following(r, "web", {0: 0.2, 1: 0.04, 2: 0.01}, 9)
    return r, t


def test_learning_survives_adding_an_unrelated_service():
    r, t = learned_web()
    before = share(row(r, "web"))
    assert before[0] < 0.05 and before[2] > 0.9
    # one more service, listed first (web moves to row 1) and wider (5 backends)
    c = config(DB5, WEB)
    r.set_layout(build_layout(c, {"db": [3, 4, 5, 6, 7], "web": [0, 1, 2]}), now=t)
    assert r.layout is not None and r.layout.row["web"] == 1
    assert np.allclose(share(row(r, "web")), before)
    assert np.allclose(share(row(r, "db")), 1 / 5)     # the new service starts even
    # and keeps learning from where it was: one more tick of the same telemetry moves it no further back
    learn_following(r, "web", {0: 0.2, 1: 0.04, 2: 0.01}, 1, t)
    assert share(row(r, "web"))[0] <= before[0] + 1e-9


def test_removing_a_backend_keeps_the_others_in_proportion():
    r, t = learned_web()
    w = share(row(r, "web"))
    assert abs(w[1] - w[2]) > 0.5        # very different: an even restart would show
    c = config(service_yaml("web", "10.96.0.1:80", ["10.0.0.2:80", "10.0.0.3:80"]))
    r.set_layout(build_layout(c, {"web": [1, 2]}), now=t)
    assert np.allclose(share(row(r, "web")), w[1:] / w[1:].sum())


def test_a_backend_joining_a_running_service_starts_small():
    r, t = learned_web()
    c = config(service_yaml("web", "10.96.0.1:80", ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80"]))
    w_old = share(row(r, "web"))
    r.set_layout(build_layout(c, {"web": [0, 1, 2, 3]}), now=t)
    w = share(row(r, "web"))
    assert w[3] < 0.05                                   # slow start, not an even share
    assert np.allclose(w[:3] / w[:3].sum(), w_old)


def policies_config() -> Config:
    return config(
        service_yaml("st", "10.96.0.1:80", [{"address": "10.0.0.1:80", "weight": 3}, "10.0.0.2:80"],
                     policy="static"),
        service_yaml("rr", "10.96.0.2:80", ["10.0.1.1:80", "10.0.1.2:80", "10.0.1.3:80"], policy="round-robin"),
        service_yaml("lc", "10.96.0.3:80", ["10.0.2.1:80", "10.0.2.2:80"], policy="least-connections"),
        service_yaml("eq", "10.96.0.4:80", ["10.0.3.1:80", {"address": "10.0.3.2:80", "state": "draining"},
                                            "10.0.3.3:80"]),
    )


IDS = {"st": [0, 1], "rr": [2, 3, 4], "lc": [5, 6], "eq": [7, 8, 9]}


def test_baseline_rows():
    c = policies_config()
    r = Router()
    r.set_layout(build_layout(c, IDS), now=0.0)
    r.tick(delta(10, {i: 0.01 for i in range(10)}, inflight={5: 3, 6: 0}), TICK, now=TICK)
    assert row(r, "st").tolist() == [3.0, 1.0]
    assert row(r, "rr").tolist() == [1.0, 1.0, 1.0]
    assert row(r, "lc").tolist() == pytest.approx([1 / 4, 1.0])   # 1 / (1 + open connections)
    eq = row(r, "eq")
    assert eq[1] == 0.0 and eq.sum() == pytest.approx(1.0)         # draining: not routable
    # another tick with the open counts reversed: least-connections follows
    r.tick(delta(10, {i: 0.01 for i in range(10)}, inflight={5: 0, 6: 9}), TICK, now=2 * TICK)
    assert row(r, "lc").tolist() == pytest.approx([1.0, 0.1])


def test_a_service_without_ids_gets_its_configured_split():
    c = policies_config()
    r = Router()
    r.set_layout(build_layout(c, {k: v for k, v in IDS.items() if k != "eq"}), now=0.0)
    # the configured weights as they are (the reconciler drops the draining one's)
    assert row(r, "eq").tolist() == [1.0, 1.0, 1.0]
    assert row(r, "st").tolist() == [3.0, 1.0]


def test_explain_shapes():
    c = policies_config()
    r = Router()
    r.set_layout(build_layout(c, IDS), now=0.0)
    r.tick(delta(10, {i: 0.01 for i in range(10)}), TICK, now=TICK)
    ex = r.explain("eq")
    assert ex["policy"] == "equilibrium" and ex["status"] in ("converged", "converging", "diverging")
    for key in ("payoff", "regret", "target", "effective_latency_seconds", "p_failing", "quarantined",
                "tolls_seconds"):
        assert len(ex[key]) == 3, key
        assert ex[key][1] is None, key                  # the draining backend is not routable
        assert ex[key][0] is not None and ex[key][2] is not None, key
    for key in ("distance", "wardrop_gap_seconds", "regret_potential"):
        assert isinstance(ex[key], float), key
    assert len(ex["changes"]) == 1 and set(ex["changes"][0]) == {"at", "weights", "why"}
    assert set(ex["changes"][0]["weights"]) == {"10.0.3.1:80", "10.0.3.2:80", "10.0.3.3:80"}
    st = r.explain("st")
    assert set(st) == {"policy", "changes"} and st["policy"] == "static"
    assert st["changes"][0]["weights"] == {"10.0.0.1:80": 0.75, "10.0.0.2:80": 0.25}
    with pytest.raises(KeyError):
        r.explain("nope")


def test_change_history_keeps_the_last_ten_and_follows_its_service():
    """explain's changes: the last CHANGES_KEPT big moves, oldest first; kept when an
    unrelated service is added (the row moves), dropped when the service's backends change."""
    from equilibriumd.agent import routing

    web = service_yaml("web", "10.96.0.1:80", ["10.0.0.1:80", "10.0.0.2:80"], policy="static")
    c = config(web)
    r = Router()
    r.set_layout(build_layout(c, {"web": [0, 1]}), now=0.0)
    for k in range(routing.CHANGES_KEPT + 3):   # alternate between two splits: every tick a big move
        w = np.array([[0.9, 0.1]]) if k % 2 else np.array([[0.1, 0.9]])
        r._record(w)
    got = r.explain("web")["changes"]
    assert len(got) == routing.CHANGES_KEPT
    assert [x["weights"]["10.0.0.1:80"] for x in got] == [0.9 if k % 2 else 0.1
                                                            for k in range(3, routing.CHANGES_KEPT + 3)]
    assert all(x["why"] == "policy static" for x in got)
    # an unrelated service added in front: web's row moves, its history with it
    c2 = config(service_yaml("db", "10.96.0.2:80", ["10.0.1.1:80"], policy="static"), web)
    r.set_layout(build_layout(c2, {"db": [2], "web": [0, 1]}), now=1.0)
    assert r.layout.row["web"] == 1 and r.explain("web")["changes"] == got
    # web's backends change: its history describes other backends, so it starts again
    c3 = config(service_yaml("web", "10.96.0.1:80", ["10.0.0.1:80", "10.0.0.3:80"], policy="static"))
    r.set_layout(build_layout(c3, {"web": [0, 3]}), now=2.0)
    assert r.explain("web")["changes"] == []
