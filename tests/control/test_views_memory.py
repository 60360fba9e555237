"""equilibriumctl's views (equilibriumd.views) over an in-memory datapath the
reconciler wrote: what they show is what the maps hold (no kernel, no root)."""

from __future__ import annotations

import numpy as np
import pytest

from equilibriumd import views
from equilibriumd.agent.reconcile import Reconciler
from equilibriumd.agent.routing import build_layout
from equilibriumd.config import parse_addr
from equilibriumd.datapath import constants
from equilibriumd.datapath.memory import MemoryDatapath
from equilibriumd.datapath.slots import shares as slot_shares
from equilibriumd.datapath.structs import Budget

from .support import config, configured, ids_of, service_yaml

C = config(
    service_yaml("web", "10.96.0.1:80", [{"address": "10.0.0.1:80", "weight": 3}, "10.0.0.2:80",
                                         {"address": "10.0.0.3:80", "state": "draining"}]),
    service_yaml("db", "10.96.0.2:5432", ["10.0.1.1:5432", "10.0.1.2:5432"], balance="weighted"),
)


@pytest.fixture
def applied() -> tuple[MemoryDatapath, Reconciler]:
    dp = MemoryDatapath()
    rec = Reconciler(dp)
    rec.apply(C, configured(C))
    return dp, rec


def test_services(applied):
    dp, rec = applied
    web, db = rec.services["web"], rec.services["db"]
    ids = sorted(web.backends.values())
    dp.add_selections(ids[0], 7, cpu=0)
    dp.add_selections(ids[0], 3, cpu=1)
    dp.add_selections(ids[1], 5, cpu=1)
    dp.add_service_errors(web.id, no_backend=2, stale_slot=1, cpu=1)
    rows = {r["name"]: r for r in views.services(dp)}
    assert set(rows) == {"web", "db"}
    w = rows["web"]
    assert (w["id"], w["frontend"], w["protocol"]) == (web.id, "10.96.0.1:80", "tcp")
    assert (w["backends_total"], w["backends_available"], w["balance"]) == (3, 2, "p2c")
    assert (w["selections_total"], w["no_backend_total"], w["stale_slot_total"]) == (15, 2, 1)
    d = rows["db"]
    assert (d["id"], d["backends_total"], d["backends_available"], d["balance"]) == (db.id, 2, 2, "weighted")
    assert d["selections_total"] == d["no_backend_total"] == 0


def test_backends_shares_are_the_live_tables(applied):
    dp, rec = applied
    web = rec.services["web"]
    data = views.backends(dp, "web")
    by_addr = {b["address"]: b for b in data["backends"]}
    assert [b["state"] for b in data["backends"]] == ["active", "active", "draining"]
    assert [by_addr[a]["share"] for a in ("10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80")] == [0.75, 0.25, 0.0]
    live = slot_shares(dp.read_slots(web.id, dp.service(web.id).gen))
    assert [b["share"] for b in data["backends"]] == [round(live.get(b["id"], 0.0), 6) for b in data["backends"]]
    assert by_addr["10.0.0.1:80"]["weight"] == 3.0
    # a tick flips web to the other half: the view follows the live half
    lay = build_layout(C, ids_of(rec, C))
    rec.set_layout(lay)
    w = np.zeros(lay.shape)
    w[0, :3] = [1.0, 3.0, 0.0]
    w[1, :2] = [1.0, 1.0]
    rec.write_weights(w)
    data = views.backends(dp, "web")
    assert [b["share"] for b in data["backends"]] == [0.25, 0.75, 0.0]


def test_backends_counters_are_the_injected_ones(applied):
    dp, rec = applied
    bid = rec.services["db"].backends[parse_addr("10.0.1.2:5432")]
    dp.add_telemetry(bid, cpu=0, established=10, closed=7, requests=20, resp_2xx=15, resp_5xx=3,
                     req_hist={10: 18})
    dp.add_telemetry(bid, cpu=1, refused=2, requests=2, req_errors=1, rtt_sum_us=3000, rtt_samples=3)
    dp.set_active(bid, 3)
    row = next(b for b in views.backends(dp, "db")["backends"] if b["id"] == bid)
    assert (row["connections_total"], row["open_connections"], row["active_connections"]) == (10, 3, 3)
    assert (row["requests_total"], row["responses_2xx_total"], row["responses_5xx_total"]) == (22, 15, 3)
    assert row["connect_refused_total"] == row["connect_errors_total"] == 2
    # failed: 5xx + unanswered + refused, over requests + refused
    assert row["error_ratio"] == round((3 + 1 + 2) / (22 + 2), 6)
    assert row["rtt_seconds"] == pytest.approx(0.001)
    assert 2 ** 10 * 1e-6 <= row["latency_p50_seconds"] < 2 ** 11 * 1e-6
    other = next(b for b in views.backends(dp, "db")["backends"] if b["id"] != bid)
    assert other["requests_total"] == 0 and other["latency_p50_seconds"] is None


def test_pick_predicts_the_table_split(applied):
    dp, rec = applied
    data = views.pick(dp, "web", 20_000, seed=1)
    got = {b["address"]: b["predicted_share"] for b in data["backends"]}
    assert got["10.0.0.1:80"] == pytest.approx(0.75, abs=0.02) and got["10.0.0.3:80"] == 0.0
    assert data["unrouted_connects"] == 0 and data["balance"] == "p2c"
    # the first backend holds open connections: p2c moves connects to the idle one
    dp.set_active(rec.services["web"].backends[parse_addr("10.0.0.1:80")], 50)
    loaded = {b["address"]: b["predicted_share"] for b in views.pick(dp, "web", 20_000, seed=1)["backends"]}
    assert loaded["10.0.0.1:80"] < 0.6
    # weighted: open counts do not matter
    dp.set_active(rec.services["db"].backends[parse_addr("10.0.1.1:5432")], 50)
    db = {b["address"]: b["predicted_share"] for b in views.pick(dp, "db", 20_000, seed=1)["backends"]}
    assert db["10.0.1.1:5432"] == pytest.approx(0.5, abs=0.02)


def test_a_service_with_nothing_available_routes_nothing():
    c = config(service_yaml("web", "10.96.0.1:80", [{"address": "10.0.0.1:80", "state": "draining"}]))
    dp = MemoryDatapath()
    Reconciler(dp).apply(c, configured(c))
    data = views.pick(dp, "web", 100, seed=0)
    assert data["unrouted_connects"] == 100
    assert views.services(dp)[0]["backends_available"] == 0
    assert (dp.read_slots(0, 0) == constants.NO_BACKEND).all()


def test_unknown_service(applied):
    dp, _ = applied
    for fn in (views.backends, views.pick, views.callers):
        with pytest.raises(views.UnknownService, match="known: db, web"):
            fn(dp, "nope")
    empty = MemoryDatapath()
    with pytest.raises(views.UnknownService, match="known: none"):
        views.backends(empty, "web")
    assert views.services(empty) == []


def test_callers(applied):
    dp, rec = applied
    dp.add_caller(1234, rec.services["web"].id, connections=5, requests=9, errors=1, cpu=0)
    dp.add_caller(1234, rec.services["web"].id, connections=1, cpu=1)
    dp.add_caller(99, rec.services["db"].id, connections=2)
    web = rec.services["web"]
    first = sorted(web.backends.values())[0]
    dp.add_evidence(1234, first, requests=8, responses=6, resp_5xx=1, req_errors=1, req_ns_sum=6 * 2_000_000)
    dp.add_evidence(77, first, requests=3, responses=3, req_ns_sum=3 * 1_000_000)
    dp.set_budget(1234, web.id, Budget(interval_ns=100_000_000, mode=constants.ENFORCE_THROTTLE, throttled=12))
    rows = {r["cgroup_id"]: r for r in views.callers(dp, "web")}
    assert set(rows) == {1234, 77}          # 77 only holds evidence: no counts of its own yet
    r = rows[1234]
    assert (r["connections_total"], r["requests_total"], r["errors_total"]) == (6, 9, 1)
    assert (r["evidence_requests"], r["evidence_failures"], r["evidence_latency_seconds"]) == (8.0, 2.0, 0.002)
    assert (r["budget_per_second"], r["budget_mode"], r["throttled_total"]) == (10.0, "throttle", 12)
    assert rows[77]["budget_mode"] is None and rows[77]["evidence_requests"] == 3.0
    assert [r["service"] for r in views.callers(dp)] == ["db", "web", "web"]
