"""Fault isolation and the loop's schedule (the real Agent on an in-memory
datapath; no kernel, no root).

* a service whose policy step raises keeps its last tables and is reported,
  while the other services' weights go on moving;
* a tick that raises is logged and counted, and the loop goes on;
* reloads delivered faster than the tick period do not starve the ticks;
* a SIGTERM that arrives during a reload is not lost.

The first two need a fault injection: once the config is validated at the edge
no input we know of makes the engine or a tick raise, and what is tested is
that a future bug in one policy step cannot stop every service's routing.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import numpy as np
from structlog.testing import capture_logs

from equilibriumd.agent import daemon
from equilibriumd.datapath.memory import MemoryDatapath
from equilibriumd.game.engine import EquilibriumEngine

from .support import config, service_yaml
from .test_metrics_memory import memory_agent, samples, scrape

WEB = service_yaml("web", "10.96.0.1:80", ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"])
DB = service_yaml("db", "10.96.0.2:5432", ["10.0.1.1:5432", "10.0.1.2:5432"])
#: requests per tick that make the injected fault fire: only db's backends see it
POISON = 777


def _traffic(a: daemon.Agent, dp: MemoryDatapath) -> None:
    """web: its first backend answers in 300 ms, the others in 3 ms; db: POISON requests."""
    web = list(a.rec.services["web"].backends.values())
    for bid in web:
        lat = 0.3 if bid == web[0] else 0.003
        dp.add_telemetry(bid, requests=50, resp_2xx=50, req_ns_sum=int(50 * lat * 1e9), attempts=50,
                         established=50, closed=50)
    for bid in a.rec.services["db"].backends.values():
        dp.add_telemetry(bid, requests=POISON, resp_2xx=POISON, req_ns_sum=POISON * 1_000_000, attempts=POISON,
                         established=POISON, closed=POISON)


def test_a_service_whose_policy_raises_keeps_its_tables_and_the_others_go_on(monkeypatch: Any) -> None:
    dp = MemoryDatapath()
    a = memory_agent(config(WEB, DB), dp)
    db_row, web_row = a.router.layout.row["db"], a.router.layout.row["web"]
    db_table = a.rec.rows.counts[db_row].copy()
    db_writes = len([w for w in dp.writes if w.map == "eq_lb_slots"])
    real = EquilibriumEngine.update

    def update(self: EquilibriumEngine, obs: Any, now: float) -> np.ndarray:
        if (obs.requests == POISON).any():   # the injected bug: one service's input breaks the step
            raise FloatingPointError("injected")
        return real(self, obs, now)

    monkeypatch.setattr(EquilibriumEngine, "update", update)
    web_before = a.router.weights_now[web_row].copy()
    with capture_logs() as logs:
        for _ in range(20):
            _traffic(a, dp)
            a.tick()
    web_after = a.router.weights_now[web_row]
    assert web_after[0] < web_before[0] - 0.2, (web_before, web_after)    # web learned: the slow one loses
    assert (a.rec.rows.counts[db_row] == db_table).all()                  # db kept its last good table
    assert a.router.failed.keys() == {"db"} and "FloatingPointError" in a.router.failed["db"]
    assert a.service_errors == {"db": 1}                                  # benched once, not every tick
    failed = [e for e in logs if e["event"] == "service_failed"]
    assert len(failed) == 1 and failed[0]["service"] == "db" and "injected" in failed[0]["error"]
    assert db_writes <= len([w for w in dp.writes if w.map == "eq_lb_slots"])
    snap = a.answer({"cmd": "status"})
    by = {s["name"]: s for s in snap["services"]}
    assert by["db"]["error"] and by["web"]["error"] is None
    assert snap["agent"]["services_failing"] == {"db": a.router.failed["db"]}
    assert samples(scrape(a), "equilibrium_service_errors")[("db",)] == 1
    # a reload tries it again (here: still failing, benched again and counted)
    a.apply(config(WEB, DB))
    _traffic(a, dp)
    a.tick()
    assert a.service_errors == {"db": 2} and "db" in a.router.failed


def test_a_stateless_policy_that_raises_benches_only_its_service(monkeypatch: Any) -> None:
    from equilibriumd.policy import baselines

    a = memory_agent(config(WEB.replace("\n  backends", "\n  policy: least-connections\n  backends"),
                            DB.replace("\n  backends", "\n  policy: least-connections\n  backends")))
    real = baselines.least_connections

    def least(open_: np.ndarray) -> np.ndarray:
        if open_.shape[-1] and (open_ == POISON).any():
            raise ZeroDivisionError("injected")
        return real(open_)

    monkeypatch.setattr(baselines, "least_connections", least)
    dp = a.dp
    assert isinstance(dp, MemoryDatapath)
    for bid in a.rec.services["db"].backends.values():
        dp.add_telemetry(bid, established=POISON)   # open connections: established - closed
    web_row = a.router.layout.row["web"]
    web = list(a.rec.services["web"].backends.values())
    dp.add_telemetry(web[0], established=9)
    a.tick()   # this tick: the policy's rows keep their weights while the culprit is found
    assert set(a.router.failed) == {"db"} and a.service_errors == {"db": 1}
    a.tick()
    assert a.service_errors == {"db": 1}
    w = a.router.weights_now[web_row]
    assert w[0] < w[1], w   # web's step ran: its busy backend gets less


def _loop(a: daemon.Agent) -> threading.Thread:
    t = threading.Thread(target=a.loop, daemon=True)
    t.start()
    return t


def test_a_tick_that_raises_is_counted_and_the_loop_goes_on(monkeypatch: Any) -> None:
    a = memory_agent(config(WEB, top="tick: 50ms\n"))
    calls = []
    real = a.tick

    def tick() -> None:
        calls.append(time.monotonic())
        if len(calls) <= 2:
            raise RuntimeError("injected tick bug")
        real()

    monkeypatch.setattr(a, "tick", tick)
    with capture_logs() as logs:
        t = _loop(a)
        time.sleep(0.6)
        a.request_stop()
        t.join(5)
    assert not t.is_alive()
    assert len(calls) >= 5 and a.ticks >= 3, calls
    assert a.tick_errors == 2
    failed = [e for e in logs if e["event"] == "tick_failed"]
    assert len(failed) == 2 and "injected tick bug" in failed[0]["error"] and failed[0].get("exc_info")
    assert samples(scrape(a), "equilibrium_agent_tick_errors")[()] == 2


def test_reloads_faster_than_the_tick_do_not_starve_it(monkeypatch: Any) -> None:
    period, seconds = 0.1, 3.0
    a = memory_agent(config(WEB, top="tick: 100ms\n"))
    reloads = []

    def reload() -> bool:   # a reload that takes longer than the interval between deliveries
        reloads.append(time.monotonic())
        time.sleep(0.06)
        return True

    monkeypatch.setattr(a, "reload", reload)
    stop = threading.Event()

    def flap() -> None:   # a flapping annotation: a delivery every 50 ms
        while not stop.wait(0.05):
            a.request_reload()

    f = threading.Thread(target=flap, daemon=True)
    t = _loop(a)
    f.start()
    time.sleep(seconds)
    stop.set()
    f.join()
    a.request_stop()
    t.join(5)
    assert not t.is_alive()
    assert a.ticks / (seconds / period) >= 0.8, (a.ticks, len(reloads))
    assert len(reloads) >= 10   # the reloads ran too (coalesced: fewer than the deliveries)


def test_a_sigterm_during_a_reload_is_not_lost(monkeypatch: Any) -> None:
    a = memory_agent(config(WEB, top="tick: 100ms\n"))
    started = threading.Event()

    def reload() -> bool:   # a slow reload (a big cluster's config)
        started.set()
        time.sleep(0.3)
        return True

    monkeypatch.setattr(a, "reload", reload)
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    a.install_signals()

    def during() -> None:
        started.wait(5)
        os.kill(os.getpid(), signal.SIGTERM)   # during the reload ...
        time.sleep(0.02)
        a._on_hup(0, None)                      # ... and a cluster change right after it

    done = threading.Event()
    watchdog_fired = []

    def watchdog() -> None:   # a lost SIGTERM must fail the test, not hang it
        if not done.wait(5):
            watchdog_fired.append(True)
            a.stop_event.set()
            a._wake.set()

    try:
        threading.Thread(target=during, daemon=True).start()
        threading.Thread(target=watchdog, daemon=True).start()
        a._on_hup(0, None)
        t0 = time.monotonic()
        a.loop()   # on this thread: the signal handler runs here
        took = time.monotonic() - t0
    finally:
        done.set()
        for s, h in old.items():
            signal.signal(s, h)
    assert not watchdog_fired and took < 1.5, took


def test_services_left_out_of_the_maps_are_shown_by_status_and_metrics() -> None:
    from types import SimpleNamespace

    from equilibriumd.cli.ctl import _status_text
    from equilibriumd.discovery.build import BuildResult

    a = memory_agent(config(WEB))
    a.kube = SimpleNamespace(last_result=BuildResult(a.config, left_out=["late.ns"],
                                                     capped={"big.ns": (14, 15)}), stop=lambda: None)
    snap = a.answer({"cmd": "status"})
    assert snap["agent"]["services_not_admitted"] == ["late.ns"]
    text = _status_text(snap)
    assert "not admitted" in text and "late.ns" in text and "14 of its 15 endpoints" in text
    fams = scrape(a)
    assert samples(fams, "equilibrium_discovery_services_not_admitted")[()] == 1
    assert samples(fams, "equilibrium_discovery_services_capped")[()] == 1


def test_a_failing_service_keeps_its_own_table_across_a_reload_that_moves_its_row(monkeypatch: Any) -> None:
    """After a reload the rows move (a service that sorts first is added): a service whose
    step then raises keeps its own last table, found by name, not another row's or the
    configured split."""
    dp = MemoryDatapath()
    a = memory_agent(config(WEB, DB), dp)
    db = list(a.rec.services["db"].backends.values())
    for _ in range(20):   # db learns: its first backend is slow
        for k, bid in enumerate(db):
            lat = 0.3 if k == 0 else 0.003
            dp.add_telemetry(bid, requests=50, resp_2xx=50, req_ns_sum=int(50 * lat * 1e9), attempts=50)
        a.tick()
    first = service_yaml("aaa", "10.96.0.3:80", ["10.0.2.1:80", "10.0.2.2:80", "10.0.2.3:80", "10.0.2.4:80"])
    a.apply(config(first, WEB, DB))
    db_sid = a.rec.services["db"].id
    db_before = dp.read_slots(db_sid, dp.service(db_sid).gen & 1).copy()
    counts = np.unique(db_before, return_counts=True)[1]
    assert counts.min() < 100, counts   # learned: not the configured split
    real = EquilibriumEngine.update

    def update(self: EquilibriumEngine, obs: Any, now: float) -> np.ndarray:
        if (obs.requests == POISON).any():
            raise FloatingPointError("injected")
        return real(self, obs, now)

    monkeypatch.setattr(EquilibriumEngine, "update", update)
    _traffic(a, dp)
    a.tick()
    assert set(a.router.failed) == {"db"}
    assert (dp.read_slots(db_sid, dp.service(db_sid).gen & 1) == db_before).all()


def test_a_full_node_swaps_a_leaving_service_for_a_joining_one(monkeypatch: Any) -> None:
    """With the maps full (admission keeps them so), a reload where one service goes
    and another comes needs the leaving one's id: it is applied in two steps, not
    refused (before: CapacityError, and the new service never got in)."""
    from equilibriumd.datapath import constants

    monkeypatch.setattr(constants, "MAX_SERVICES", 2)
    a = memory_agent(config(WEB, DB))
    other = service_yaml("cache", "10.96.0.9:6379", ["10.0.3.1:6379"])
    a.apply(config(WEB, other))
    assert sorted(a.rec.services) == ["cache", "web"]
    assert a.router.layout.names == ["web", "cache"]


def test_a_full_node_swaps_a_backend(monkeypatch: Any) -> None:
    """The same with backend ids: every id in use, one endpoint replaced by another."""
    from equilibriumd.datapath import constants

    monkeypatch.setattr(constants, "MAX_BACKENDS", 5)
    a = memory_agent(config(WEB, DB))
    web2 = service_yaml("web", "10.96.0.1:80", ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.4:80"])
    before = a.rec.services["web"].backends
    a.apply(config(web2, DB))
    after = a.rec.services["web"].backends
    assert [str(x) for x in after] == ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.4:80"]
    assert [before[k] for k in list(after)[:2]] == [after[k] for k in list(after)[:2]]   # kept ids kept
