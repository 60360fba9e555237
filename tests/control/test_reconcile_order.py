"""The reconciler's write order and id allocation, against an in-memory datapath
that records every write (no kernel, no root).

Each scenario is also replayed write by write (`check_every_instant`): at no
instant may a connect to a frontend find a slot naming a backend that is not
that service's own active entry, shares that disagree with the live half, or
an n_avail that disagrees with it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from equilibriumd.agent.reconcile import CapacityError, Reconciler
from equilibriumd.agent.routing import Layout, build_layout
from equilibriumd.config import BackendConfig, ServiceConfig
from equilibriumd.config import parse_addr as fe
from equilibriumd.datapath import constants
from equilibriumd.datapath.memory import MemoryDatapath
from equilibriumd.datapath.slots import apportion, build_table, unpack
from equilibriumd.types import Addr

from .support import check_every_instant, config, configured, ids_of, index, service_yaml

ACTIVE, DRAINING = constants.BE_ACTIVE, constants.BE_DRAINING
WEB = service_yaml("web", "10.96.0.1:80", ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"])
DB = service_yaml("db", "10.96.0.2:5432", ["10.0.1.1:5432", "10.0.1.2:5432"])


def start_with(*services: str) -> tuple[MemoryDatapath, Reconciler]:
    dp = MemoryDatapath()
    rec = Reconciler(dp)
    if services:
        c = config(*services)
        rec.apply(c, configured(c))
    return dp, rec


def test_new_service_backends_then_table_then_flip_then_frontend_last():
    dp, rec = start_with(WEB)
    c = config(WEB, DB)
    start = len(dp.writes)
    rep = rec.apply(c, configured(c))
    assert rep.added == ["db"] and rep.tables_written == ["db"]   # web is unchanged: nothing written for it
    db = rec.services["db"]
    ids = sorted(db.backends.values())
    assert ids == [3, 4] and db.id == 1
    mine = [i for i, w in enumerate(dp.writes) if i >= start]
    maps = [dp.writes[i].map for i in mine]
    # every backend entry before the table that names it
    table_at = index(dp, start, map="eq_lb_slots")
    assert len(table_at) == 1 and set(unpack(dp.writes[table_at[0]].values[0])[0].tolist()) == set(ids)
    for bid in ids:
        assert max(index(dp, start, map="eq_lb_be", key=bid)) < table_at[0]
        # counters zeroed before the id names the new backend (its epoch restarts the telemetry)
        assert max(index(dp, start, map="eq_tel_be", key=bid)) < min(index(dp, start, map="eq_lb_be", key=bid))
    # the half (its slots carry the shares), then the eq_lb_svc update that makes it live
    flip_at = index(dp, start, map="eq_lb_svc", key=db.id)
    assert table_at[0] < flip_at[0] and len(flip_at) == 1
    assert dp.writes[flip_at[0]].values[0][0] == 0 == dp.writes[table_at[0]].keys[0] - 2 * db.id
    # the frontend last of everything written for the service
    assert maps[-1] == "eq_lb4_fe" and dp.writes[mine[-1]].op == "update"
    assert dp.writes[mine[-1]].keys == ((fe("10.96.0.2:5432"), "tcp"),) and dp.writes[mine[-1]].values == (db.id,)
    assert maps.count("eq_lb4_fe") == 1
    assert dp.name(db.id) == "db" and index(dp, start, map="eq_svc_name")[0] < mine[-1]
    check_every_instant(dp)


def test_removed_service_frontend_deleted_first():
    dp, rec = start_with(WEB, DB)
    db = rec.services["db"]
    start = len(dp.writes)
    c = config(WEB)
    rep = rec.apply(c, configured(c))
    assert rep.removed == ["db"]
    ops = dp.ops(start)
    assert ops[0] == ("eq_lb4_fe", "delete", ((fe("10.96.0.2:5432"), "tcp"),))
    assert ("eq_lb_svc", "update", (db.id,)) in ops[1:]
    assert {k for m, _, ks in ops if m == "eq_lb_be" for k in ks} == set(db.backends.values())
    assert dp.name(db.id) == "" and [s.name for s in dp.services()] == ["web"]
    assert {b.id for b in dp.backends()} == set(rec.services["web"].backends.values())
    check_every_instant(dp)


def test_table_half_is_written_before_the_flip_on_every_change():
    dp, rec = start_with(WEB)
    web = rec.services["web"]
    for weights in ([3.0, 1.0, 1.0], [1.0, 1.0, 5.0], [0.0, 1.0, 0.0]):
        start, live = len(dp.writes), web.gen
        rec.apply(config(WEB), {"web": weights})
        web = rec.services["web"]
        assert web.gen == live ^ 1, "a change goes to the idle half"
        ops = dp.ops(start)
        assert ops == [("eq_lb_slots", "update_batch", (web.id * 2 + web.gen,)),
                       ("eq_lb_svc", "update", (web.id,))]
        assert dp.writes[-1].values[0][0] == web.gen
        assert np.array_equal(dp.read_slots(web.id, web.gen), build_table([0, 1, 2], weights))
    # the same weights again: nothing to write
    start = len(dp.writes)
    rep = rec.apply(config(WEB), {"web": [0.0, 1.0, 0.0]})
    assert rep.tables_written == [] and dp.writes[start:] == []
    check_every_instant(dp)


def test_draining_is_written_after_the_live_table_stopped_pointing_at_it():
    dp, rec = start_with(WEB)
    web = rec.services["web"]
    drained = web.backends[fe("10.0.0.2:80")]
    start = len(dp.writes)
    c = config(service_yaml("web", "10.96.0.1:80",
                            ["10.0.0.1:80", {"address": "10.0.0.2:80", "state": "draining"}, "10.0.0.3:80"]))
    rec.apply(c, configured(c))
    web = rec.services["web"]
    state_at = index(dp, start, map="eq_lb_be", key=drained)
    flip_at = index(dp, start, map="eq_lb_svc", key=web.id)
    assert len(state_at) == 1 and dp.writes[state_at[0]].values[0][2] == DRAINING
    assert flip_at and flip_at[-1] < state_at[0]
    live = dp.read_slots(web.id, dp.service(web.id).gen)
    assert drained not in live and dp.service(web.id).n_avail == 2
    assert dp.read_shares(web.id, web.gen, [drained]) == [0]
    # and back: active again before any table names it
    start = len(dp.writes)
    rec.apply(config(WEB), configured(config(WEB)))
    state_at = index(dp, start, map="eq_lb_be", key=drained)
    table_at = index(dp, start, map="eq_lb_slots")
    assert dp.writes[state_at[0]].values[0][2] == ACTIVE and state_at[0] < table_at[0]
    assert drained in dp.read_slots(web.id, dp.service(web.id).gen)
    check_every_instant(dp)


def test_a_dropped_backend_is_cleared_after_the_flip():
    dp, rec = start_with(WEB)
    web = rec.services["web"]
    gone = web.backends[fe("10.0.0.3:80")]
    start = len(dp.writes)
    c = config(service_yaml("web", "10.96.0.1:80", ["10.0.0.1:80", "10.0.0.2:80"]))
    rec.apply(c, configured(c))
    clear_at = index(dp, start, map="eq_lb_be", key=gone)
    assert dp.writes[clear_at[0]].values[0][2] == constants.BE_UNUSED
    assert index(dp, start, map="eq_lb_svc")[-1] < clear_at[0]
    assert gone not in {b.id for b in dp.backends()}
    check_every_instant(dp)


def test_ids_are_stable_across_reloads_and_restarts():
    dp, rec = start_with(WEB, DB)
    before = {n: dict(a.backends) for n, a in rec.services.items()}
    sids = {n: a.id for n, a in rec.services.items()}
    # reordered backends, one more, services in the other order: every kept address keeps its id
    c = config(DB, service_yaml("web", "10.96.0.1:80", ["10.0.0.3:80", "10.0.0.9:80", "10.0.0.1:80", "10.0.0.2:80"]))
    rec.apply(c, configured(c))
    after = {n: dict(a.backends) for n, a in rec.services.items()}
    assert {n: a.id for n, a in rec.services.items()} == sids
    assert after["db"] == before["db"]
    for addr, bid in before["web"].items():
        assert after["web"][addr] == bid
    assert after["web"][fe("10.0.0.9:80")] not in set(before["web"].values()) | set(before["db"].values())
    # a restarted agent adopts the pinned state: same ids, and the same config writes nothing
    rec2 = Reconciler(dp)
    assert rec2.adopt() == 2
    assert {n: (a.id, dict(a.backends)) for n, a in rec2.services.items()} == \
        {n: (a.id, dict(a.backends)) for n, a in rec.services.items()}
    start = len(dp.writes)
    rep = rec2.apply(c, configured(c))
    assert rep.added == rep.removed == rep.tables_written == [] and dp.writes[start:] == []
    check_every_instant(dp)


def test_renamed_service_with_the_same_frontend_keeps_its_id():
    dp, rec = start_with(WEB, DB)
    old = rec.services["web"]
    start = len(dp.writes)
    c = config(DB, WEB.replace("name: web", "name: www"))
    rep = rec.apply(c, configured(c))
    www = rec.services["www"]
    assert "web" not in rec.services and www.id == old.id and www.backends == old.backends
    # only the name changes: no frontend churn, no table, no backend write
    assert dp.ops(start) == [("eq_svc_name", "update", (old.id,))]
    assert rep.removed == [] and dp.name(old.id) == "www"
    assert [s.name for s in dp.services()] == ["www", "db"]
    check_every_instant(dp)


def test_frontend_change_moves_the_key_after_the_new_table():
    dp, rec = start_with(WEB)
    web = rec.services["web"]
    start = len(dp.writes)
    c = config(WEB.replace("10.96.0.1:80", "10.96.0.7:80"))
    rec.apply(c, configured(c))
    assert rec.services["web"].id == web.id
    ops = dp.ops(start)
    assert ops[-2:] == [("eq_lb4_fe", "delete", ((fe("10.96.0.1:80"), "tcp"),)),
                        ("eq_lb4_fe", "update", ((fe("10.96.0.7:80"), "tcp"),))]
    assert dp.frontend_of(fe("10.96.0.7:80"), "tcp") == web.id and dp.frontend_of(fe("10.96.0.1:80"), "tcp") is None
    check_every_instant(dp)


def test_swapping_frontends_leaves_both_services_reachable():
    dp, rec = start_with(WEB, DB)
    c = config(WEB.replace("10.96.0.1:80", "10.96.0.2:5432"), DB.replace("10.96.0.2:5432", "10.96.0.1:80"))
    rec.apply(c, configured(c))
    for a in rec.services.values():
        assert dp.frontend_of(a.frontend, a.protocol) == a.id, "%s is not reachable at %s" % (a.name, a.frontend)


def test_a_new_service_on_a_removed_ones_frontend_is_reachable():
    dp, rec = start_with(WEB, DB)
    c = config(WEB, service_yaml("pg", "10.96.0.2:5432", ["10.0.9.1:5432"]))   # db goes, pg takes its address
    rec.apply(c, configured(c))
    pg = rec.services["pg"]
    assert dp.frontend_of(pg.frontend, pg.protocol) == pg.id


def test_a_reused_backend_id_starts_from_zero_counters():
    dp, rec = start_with(WEB, DB)
    reader = dp.telemetry()
    gone = rec.services["db"].backends[fe("10.0.1.1:5432")]
    dp.add_telemetry(gone, requests=1000, cpu=1)
    reader.tick(rec.epochs, rec.id_span())
    # db drops its first backend (its id is freed, the span of ids in use stays) ...
    db1 = service_yaml("db", "10.96.0.2:5432", ["10.0.1.2:5432"])
    c = config(WEB, db1)
    rec.apply(c, configured(c))
    assert rec.id_span() > gone
    reader.tick(rec.epochs, rec.id_span())
    # ... and a new service's backend gets that id: counters zeroed before the entry names it
    c = config(WEB, db1, service_yaml("api", "10.96.0.3:80", ["10.0.2.1:80"]))
    start = len(dp.writes)
    rec.apply(c, configured(c))
    assert rec.services["api"].backends[fe("10.0.2.1:80")] == gone, "the lowest free id is handed out"
    assert max(index(dp, start, map="eq_tel_be", key=gone)) < min(index(dp, start, map="eq_lb_be", key=gone))
    assert dp.telemetry().totals(gone + 1)[0][gone].sum() == 0
    d = reader.tick(rec.epochs, rec.id_span())
    assert d["requests"][gone] == 0           # the epoch restarts the id: not 0 - 1000 wrapped around
    dp.add_telemetry(gone, requests=5)
    assert reader.tick(rec.epochs, rec.id_span())["requests"][gone] == 5
    check_every_instant(dp)


# --- capacity --------------------------------------------------------------------------
def test_over_capacity_services_raise_with_nothing_written():
    base = config()
    full = dataclasses.replace(base, services=tuple(
        ServiceConfig("s%d" % i, Addr(4, "10.96.%d.%d" % (i // 256, i % 256), 80), "tcp",
                      (BackendConfig(Addr(4, "10.1.%d.%d" % (i // 256, i % 256), 80)),))
        for i in range(constants.MAX_SERVICES)))
    dp = MemoryDatapath()
    rec = Reconciler(dp)
    rec.apply(full, configured(full))
    assert len(dp.services()) == constants.MAX_SERVICES
    extra = config(service_yaml("new", "10.97.0.1:80", ["10.2.0.1:80"]))   # a new service while all ids are held
    start, held = len(dp.writes), dict(rec.services)
    with pytest.raises(CapacityError, match="service id"):
        rec.check(extra)
    with pytest.raises(CapacityError, match="service id"):
        rec.apply(extra, configured(extra))
    assert dp.writes[start:] == [] and rec.services == held


def test_over_capacity_backends_raise_with_nothing_written(monkeypatch):
    # a node with room for 4 backend ids: replacing 3 backends by 2 new ones needs 5 at
    # once (the old ones stay in the live table until the flip)
    monkeypatch.setattr(constants, "MAX_BACKENDS", 4)
    dp, rec = start_with(WEB)
    c = config(service_yaml("web", "10.96.0.1:80", ["10.0.0.7:80", "10.0.0.8:80"]))
    start = len(dp.writes)
    with pytest.raises(CapacityError, match="backend id"):
        rec.check(c)
    with pytest.raises(CapacityError, match="backend id"):
        rec.apply(c, configured(c))
    assert dp.writes[start:] == []
    one = config(service_yaml("web", "10.96.0.1:80", ["10.0.0.1:80", "10.0.0.8:80"]))
    rec.apply(one, configured(one))   # one new id fits
    check_every_instant(dp)


# --- the per-tick path ------------------------------------------------------------------
def three_services() -> tuple[MemoryDatapath, Reconciler, Layout]:
    c = config(WEB, DB, service_yaml("api", "10.96.0.3:80",
                                     ["10.0.2.1:80", {"address": "10.0.2.2:80", "state": "draining"}, "10.0.2.3:80"]))
    dp = MemoryDatapath()
    rec = Reconciler(dp)
    rec.apply(c, configured(c))
    lay = build_layout(c, ids_of(rec, c))
    rec.set_layout(lay)
    return dp, rec, lay


def test_tick_writes_changed_tables_in_two_batches():
    dp, rec, lay = three_services()
    w = np.zeros(lay.shape)
    w[0, :3] = [5.0, 5.0, 5.0]        # web: the same split as applied: counts unchanged
    w[1, :2] = [3.0, 1.0]             # db
    w[2, :3] = [1.0, 9.0, 3.0]        # api: the draining backend's weight counts for nothing
    start = len(dp.writes)
    gens = {n: a.gen for n, a in rec.services.items()}
    assert rec.write_weights(w) == 2
    writes = dp.writes[start:]
    assert [(x.map, x.op) for x in writes] == [("eq_lb_slots", "update_batch"),
                                               ("eq_lb_svc", "update_batch")]
    db, api = rec.services["db"], rec.services["api"]
    assert writes[0].keys == (db.id * 2 + (gens["db"] ^ 1), api.id * 2 + (gens["api"] ^ 1))
    assert writes[1].keys == (db.id, api.id)
    for (name, r), packed in zip((("db", 1), ("api", 2)), writes[0].values):
        table = unpack(packed)[0]
        ids = lay.ids[r, :int(lay.present[r].sum())]
        want = build_table(ids.tolist(), np.where(lay.routable[r, :ids.size], w[r, :ids.size], 0.0))
        assert np.array_equal(table, want), name
        assert np.array_equal(dp.read_slots(rec.services[name].id, gens[name] ^ 1), want)
    assert dp.read_shares(api.id, gens["api"] ^ 1, [int(i) for i in lay.ids[2, :3]]) == [256, 0, 768]
    flags = constants.SVC_P2C | constants.SVC_SWEEP
    assert writes[1].values == ((gens["db"] ^ 1, 2, 2, flags), (gens["api"] ^ 1, 2, 3, flags))
    # the same weights again: no write at all
    start = len(dp.writes)
    assert rec.write_weights(w) == 0 and dp.writes[start:] == []
    check_every_instant(dp)


def test_apply_after_ticks_writes_the_idle_half():
    dp, rec, lay = three_services()
    w = np.where(lay.present, 1.0, 0.0)
    w[0, :3] = [1.0, 2.0, 3.0]
    rec.write_weights(w)
    live = dp.service(rec.services["web"].id).gen
    # a reload with the tick's weights: the reconciler knows what the tick wrote
    c = config(WEB, DB, service_yaml("api", "10.96.0.3:80",
                                     ["10.0.2.1:80", {"address": "10.0.2.2:80", "state": "draining"}, "10.0.2.3:80"]))
    weights = {"web": [1.0, 2.0, 3.0], "db": [1.0, 1.0], "api": [1.0, 1.0, 1.0]}
    start = len(dp.writes)
    assert rec.apply(c, weights).tables_written == []
    assert dp.writes[start:] == []
    # a reload that changes web: its idle half (not the live one the tick wrote) is written
    weights["web"] = [1.0, 0.0, 0.0]
    rec.apply(c, weights)
    assert dp.ops(start)[0] == ("eq_lb_slots", "update_batch", (rec.services["web"].id * 2 + (live ^ 1),))
    assert dp.service(rec.services["web"].id).gen == live ^ 1
    check_every_instant(dp)


def test_apportion_matches_what_the_tick_writes():
    # the tick's vectorized table equals build_table row by row, including rows with nothing routable
    dp, rec, lay = three_services()
    rng = np.random.default_rng(4)
    for _ in range(20):
        w = rng.random(lay.shape) * (rng.random(lay.shape) > 0.3)
        rec.write_weights(w)
        for name, r in lay.row.items():
            a = rec.services[name]
            n = int(lay.present[r].sum())
            ids = lay.ids[r, :n].tolist()
            masked = np.where(lay.routable[r, :n], w[r, :n], 0.0)
            got = dp.read_slots(a.id, dp.service(a.id).gen)
            assert np.array_equal(got, build_table(ids, masked)), name
            assert dp.read_shares(a.id, dp.service(a.id).gen, ids) == apportion(masked).tolist()
    check_every_instant(dp)


def tables_written(dp: MemoryDatapath) -> set[int]:
    return {int(k) for x in dp.writes if x.map == "eq_lb_slots" for k in x.keys}


def test_both_halves_carry_their_own_shares_through_any_ticks():
    """Each slot carries its backend's slots in the same half: after any sequence
    of ticks, both halves' shares are exactly what their tables hold."""
    dp, rec, lay = three_services()
    rng = np.random.default_rng(7)
    for k in range(40):
        w = np.where(lay.present, rng.choice([1.0, 2.0, 3.0], size=lay.shape), 0.0)
        if k % 3 == 0:
            w[0] = np.where(lay.present[0], 1.0, 0.0)     # web: back and forth between splits
        rec.write_weights(w)
        for r, name in enumerate(lay.names):
            a = rec.services[name]
            ids = [int(i) for i in lay.ids[r, :int(lay.present[r].sum())]]
            for half in (0, 1):
                if a.id * 2 + half not in tables_written(dp):
                    continue   # a half no one wrote yet
                table = dp.read_slots(a.id, half)
                assert dp.read_shares(a.id, half, ids) == [int((table == i).sum()) for i in ids], (k, name, half)
    check_every_instant(dp)
