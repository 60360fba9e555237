"""Learning survives change (issue 12, point 6): adding, removing or changing one
service leaves every other service's learned state untouched, and a restarted
agent resumes from the state file instead of even weights. The real Agent on
an in-memory datapath (no kernel, no root); a "restart" is a new Agent on the
same datapath, which it adopts as it adopts the pinned maps, and a "kill -9"
is a restart without the clean exit's save. tests/test_restart_resume.py
holds the same against the real kernel and a killed process."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
from click.testing import CliRunner
from discovery.fakeapi import FakeAPIServer
from discovery.objects import endpoint_slice
from discovery.objects import service as kube_service
from structlog.testing import capture_logs

from equilibriumd.agent import persist
from equilibriumd.agent.daemon import Agent, AgentOptions
from equilibriumd.agent.lock import lock_path
from equilibriumd.agent.reconcile import Reconciler
from equilibriumd.agent.routing import LearnedPart
from equilibriumd.cli.daemon import cli
from equilibriumd.config import Config
from equilibriumd.datapath.memory import MemoryDatapath
from equilibriumd.types import SLOTS

from .support import config, service_yaml

WEB = service_yaml("web", "10.96.0.1:80", ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"])
DB = service_yaml("db", "10.96.0.2:5432", ["10.0.1.1:5432", "10.0.1.2:5432"])
API = service_yaml("api", "10.96.0.3:80", ["10.0.2.1:80", "10.0.2.2:80"])
TOLLED = service_yaml("bus", "10.96.0.4:80", ["10.0.3.1:80", "10.0.3.2:80"], policy="equilibrium-tolls")
#: every service's first backend answers in 300 ms, the others in 3 ms
SLOW = {"10.0.0.1:80", "10.0.1.1:5432", "10.0.2.1:80", "10.0.3.1:80"}
EQ = "policy: equilibrium\n"


def agent(cfg: Config, state: Path, dp: MemoryDatapath | None = None, config_path: str = "") -> Agent:
    """The real agent on an in-memory datapath with a state file, started the way
    `Agent.start` does around the pins: adopt what is there, load the state,
    apply. A second call on the same `dp` is a restart."""
    a = Agent(AgentOptions(config_path=config_path, cgroup="", pin_dir="/nonexistent/equilibrium-test",
                           metrics_addr="off", state_file=str(state)))
    a.dp = dp or MemoryDatapath()
    a.rec = Reconciler(a.dp)
    a.rec.adopt()
    a.telemetry = a.dp.telemetry()
    a.config = cfg
    a.load_state()
    a.apply(cfg)
    return a


def learn(a: Agent, ticks: int = 30) -> None:
    """Traffic to every backend, the SLOW ones 100x slower; then tick."""
    dp = a.dp
    assert isinstance(dp, MemoryDatapath) and a.rec is not None
    for _ in range(ticks):
        for s in a.rec.services.values():
            for addr, bid in s.backends.items():
                lat = 0.3 if str(addr) in SLOW else 0.003
                dp.add_telemetry(bid, requests=50, resp_2xx=50, req_ns_sum=int(50 * lat * 1e9), attempts=50,
                                 established=50, closed=50)
        a.tick()


def weights(a: Agent, name: str) -> dict[str, float]:
    lay = a.router.layout
    assert lay is not None
    r = lay.row[name]
    return {str(k): float(w) for k, w in zip(lay.keys[r], a.router.weights_now[r])}


def table_share(a: Agent, name: str, addr: str) -> float:
    """The share of the service's live table the backend holds: what connects get."""
    assert a.rec is not None
    s = a.rec.services[name]
    bid = next(i for k, i in s.backends.items() if str(k) == addr)
    return s.held.get(bid, 0) / SLOTS


def learned_of(a: Agent, name: str, now: float) -> dict[str, Any]:
    """One service's learned state by backend address (and its detector's), at `now`."""
    for p in a.router.learned(now).values():
        if name in p.services:
            i = p.services.index(name)
            sel = np.asarray(p.entry_row) == i
            addrs = [x for x, s in zip(p.addresses, sel) if s]
            out: dict[str, Any] = {"rows": {k: v[i] for k, v in p.rows.items()}}
            for k, v in p.cells.items():
                out[k] = dict(zip(addrs, np.moveaxis(v[..., sel], -1, 0).tolist()))
            return out
    raise KeyError(name)


def assert_same_learning(got: dict[str, Any], want: dict[str, Any], age_slack: float = 0.0) -> None:
    assert got.keys() == want.keys()
    for k in want:
        if k == "age":
            assert got[k].keys() == want[k].keys()
            assert all(0 <= got[k][x] - want[k][x] <= age_slack + 1e-9 for x in want[k]), (got[k], want[k])
        elif k == "rows":
            for n, v in want[k].items():
                assert np.array_equal(got[k][n], v, equal_nan=True), (n, got[k][n], v)
        else:
            assert got[k].keys() == want[k].keys(), k
            for x in want[k]:
                assert np.allclose(got[k][x], want[k][x], rtol=0, atol=1e-12, equal_nan=True), (k, x)


# --- a restart ------------------------------------------------------------------
def test_a_restart_resumes_every_service_from_the_last_periodic_save(tmp_path):
    state = tmp_path / "state"
    a = agent(config(WEB, DB, top=EQ), state)
    learn(a)
    before = {n: weights(a, n) for n in ("web", "db")}
    assert before["web"]["10.0.0.1:80"] < 0.05 and before["db"]["10.0.1.1:5432"] < 0.05, before
    t0 = time.monotonic()
    was = {n: learned_of(a, n, t0) for n in ("web", "db")}
    a.saver.start(a.router, a._state_lock)   # the run loop's periodic save (copy here, write on a thread)
    a.saver.wait()
    assert a.saver.saves == 1

    with capture_logs() as logs:   # kill -9: no clean-exit save; a new agent adopts the same datapath
        b = agent(config(WEB, DB, top=EQ), state, a.dp)
    restored = [e for e in logs if e["event"] == "state_restored"]
    assert len(restored) == 1 and restored[0]["services"] == 2 and restored[0]["n_dropped"] == 0, logs
    for n in ("web", "db"):
        for addr, w in before[n].items():
            assert abs(weights(b, n)[addr] - w) < 1e-9, (n, addr)
            assert abs(table_share(b, n, addr) - w) < 0.01, (n, addr)   # the first tables hold it
        # and everything behind the weights: regrets, latency and error estimates,
        # beliefs, quarantine, slow-start ages, the convergence detector
        assert_same_learning(learned_of(b, n, time.monotonic()), was[n], age_slack=time.monotonic() - t0 + 1)


def test_a_clean_exit_saves_and_a_first_start_has_nothing_to_resume(tmp_path):
    state = tmp_path / "sub" / "state"   # a directory that does not exist yet
    with capture_logs() as logs:
        a = agent(config(WEB, top=EQ), state)
    assert not [e for e in logs if e["event"].startswith("state_")], logs   # no file: a first start, no noise
    learn(a)
    before = weights(a, "web")
    with capture_logs() as logs:
        a.save_state()
    assert [e["event"] for e in logs] == ["state_saved"] and logs[0]["bytes"] == state.stat().st_size
    assert oct(state.stat().st_mode & 0o777) == "0o600" and os.listdir(state.parent) == ["state"]
    b = agent(config(WEB, top=EQ), state, a.dp)
    assert all(abs(weights(b, "web")[k] - w) < 1e-9 for k, w in before.items())


def test_tolled_services_resume_their_congestion_fit(tmp_path):
    state = tmp_path / "state"
    a = agent(config(WEB, TOLLED, top=EQ), state)
    learn(a)
    t0 = time.monotonic()
    was = learned_of(a, "bus", t0)
    assert "fit" in was and any(v[0] > 0 for v in was["fit"].values())   # samples were taken
    a.save_state()
    b = agent(config(WEB, TOLLED, top=EQ), state, a.dp)
    assert_same_learning(learned_of(b, "bus", time.monotonic()), was, age_slack=time.monotonic() - t0 + 1)


def test_ages_advance_by_the_time_no_agent_ran(tmp_path):
    """Slow start counts real time: a backend that joined just before a restart
    does not start its ramp over, nor skip the time the agent was down."""
    state = tmp_path / "state"
    a = agent(config(WEB, top=EQ), state)
    a.save_state()
    t = time.time()
    saved, later = persist.read(str(state), now_unix=t), persist.read(str(state), now_unix=t + 100)
    assert saved is not None and later is not None
    age, age_later = saved.parts["equilibrium"].cells["age"], later.parts["equilibrium"].cells["age"]
    assert np.allclose(age_later - age, 100)


# --- adding, removing, changing services -------------------------------------------------
def test_adding_a_service_by_sighup_keeps_a_learned_weight(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(EQ + "services:\n" + WEB)
    a = agent(config(WEB, top=EQ), tmp_path / "state", config_path=str(path))
    learn(a)
    before = weights(a, "web")
    path.write_text(EQ + "services:\n" + WEB + DB)
    assert a.reload()
    assert set(a.router.layout.names) == {"web", "db"}
    assert all(abs(weights(a, "web")[k] - w) < 0.01 for k, w in before.items()), (before, weights(a, "web"))
    assert all(abs(table_share(a, "web", k) - w) < 0.01 for k, w in before.items())


def test_adding_a_service_by_kubernetes_discovery_keeps_a_learned_weight(tmp_path):
    """The cluster adds a Service: discovery delivers a new Config and the agent
    applies it through the same reload (KubernetesSource against a loopback
    API server, as in tests/discovery)."""
    from equilibriumd.discovery import KubernetesSource
    from equilibriumd.discovery.client import api_client_for

    api = FakeAPIServer()
    src = None
    try:
        api.put("Service", kube_service("web", ip="10.96.0.1", ports=[("http", 80, "http", "TCP")]))
        api.put("EndpointSlice", endpoint_slice("web", "web-0", ["10.0.0.1", "10.0.0.2", "10.0.0.3"],
                                                port=80, port_name="http"))
        src = KubernetesSource("node-a", lambda _c: None, api_client_for(api.url), base=config(top=EQ),
                               debounce=0.05, max_delay=0.5, watch_timeout=10)
        src.start()
        first = src.wait_for_first(timeout=20)
        a = agent(first, tmp_path / "state")
        a.kube = src
        web = first.services[0].name
        learn(a)
        before = weights(a, web)
        assert before["10.0.0.1:80"] < 0.05, before

        api.put("Service", kube_service("db", ip="10.96.0.2", ports=[("pg", 5432, "pg", "TCP")]))
        api.put("EndpointSlice", endpoint_slice("db", "db-0", ["10.0.1.1", "10.0.1.2"], port=5432, port_name="pg"))
        deadline = time.monotonic() + 20
        while len((src.latest() or first).services) < 2:
            assert time.monotonic() < deadline, "discovery did not deliver the new Service"
            time.sleep(0.02)
        assert a.reload()   # what the agent's loop does when discovery calls back
        assert len(a.router.layout.names) == 2
        assert all(abs(weights(a, web)[k] - w) < 0.01 for k, w in before.items()), (before, weights(a, web))
        assert all(abs(table_share(a, web, k) - w) < 0.01 for k, w in before.items())
    finally:
        if src is not None:
            src.stop()
        api.close()


def test_changing_one_service_leaves_the_others_learned_state_untouched(tmp_path):
    path = tmp_path / "c.yaml"
    a = agent(config(WEB, DB, API, top=EQ), tmp_path / "state", config_path=str(path))
    learn(a)
    now = time.monotonic()
    web = learned_of(a, "web", now)
    # db removed, api gains a backend, and a new service comes
    api2 = service_yaml("api", "10.96.0.3:80", ["10.0.2.1:80", "10.0.2.2:80", "10.0.2.3:80"])
    path.write_text(EQ + "services:\n" + api2 + WEB + TOLLED)
    assert a.reload()
    assert_same_learning(learned_of(a, "web", now), web)


def test_a_removed_service_is_dropped_and_a_new_one_starts_fresh(tmp_path):
    state = tmp_path / "state"
    a = agent(config(WEB, DB, top=EQ), state)
    learn(a)
    web = weights(a, "web")
    a.save_state()

    with capture_logs() as logs:   # restarted with db gone and api new
        b = agent(config(WEB, API, top=EQ), state, a.dp)
    restored = next(e for e in logs if e["event"] == "state_restored")
    assert restored["services"] == 1 and restored["dropped"] == ["db"], restored
    assert all(abs(weights(b, "web")[k] - w) < 1e-9 for k, w in web.items())
    assert list(weights(b, "api").values()) == [0.5, 0.5]   # fresh: even
    b.save_state()
    saved = persist.read(str(state))
    assert saved is not None and saved.parts["equilibrium"].services == ["web", "api"]   # db is gone from the file

    c = agent(config(WEB, API, DB, top=EQ), state, b.dp)   # db back: it starts over
    assert list(weights(c, "db").values()) == [0.5, 0.5]


# --- files that cannot be used -----------------------------------------------------
def _good_file(tmp_path: Path) -> tuple[bytes, MemoryDatapath]:
    a = agent(config(WEB, top=EQ), tmp_path / "good")
    learn(a)
    a.save_state()
    assert a.dp is not None and isinstance(a.dp, MemoryDatapath)
    return (tmp_path / "good").read_bytes(), a.dp


def _flip(data: bytes) -> bytes:
    mid = len(data) // 2
    return data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 64]) + data[mid + 64:]


def _reencode(data: bytes, change: Any) -> bytes:
    saved = persist.decode(data)
    change(saved.parts["equilibrium"])
    return persist.encode(saved.parts, saved.saved_unix)


def _foreign(data: bytes) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(json.dumps({"format": "something-else"}).encode(), dtype=np.uint8))
    return buf.getvalue()


def _nan_weight(p: LearnedPart) -> None:
    p.cells["weights"][0] = np.nan


def _short_cells(p: LearnedPart) -> None:
    p.cells["q"] = p.cells["q"][:-1]


def _bad_row(p: LearnedPart) -> None:
    p.entry_row[0] = 7


UNUSABLE = {
    "garbage": lambda d: os.urandom(4096),
    "empty": lambda d: b"",
    "truncated": lambda d: d[:len(d) // 2],
    "corrupt": _flip,
    "foreign": _foreign,
    "nan-weight": lambda d: _reencode(d, _nan_weight),
    "mismatched-cells": lambda d: _reencode(d, _short_cells),
    "mismatched-rows": lambda d: _reencode(d, _bad_row),
}


@pytest.mark.parametrize("damage", sorted(UNUSABLE) + ["version", "too-big"])
def test_an_unusable_file_is_ignored_with_a_warning(tmp_path, damage):
    good, dp = _good_file(tmp_path)
    state = tmp_path / "state"
    if damage == "version":
        saved = persist.decode(good)
        with mock.patch.object(persist, "VERSION", 99):
            state.write_bytes(persist.encode(saved.parts, saved.saved_unix))
    else:
        state.write_bytes(UNUSABLE[damage](good) if damage != "too-big" else good)
    with mock.patch.object(persist, "MAX_BYTES", 1000 if damage == "too-big" else persist.MAX_BYTES):
        with capture_logs() as logs:
            b = agent(config(WEB, top=EQ), state, dp)   # never raises
    warned = [e for e in logs if e["event"] == "state_ignored"]
    assert len(warned) == 1 and warned[0]["log_level"] == "warning" and warned[0]["file"] == str(state), logs
    assert warned[0]["reason"], warned
    assert not [e for e in logs if e["event"] == "state_restored"]
    assert list(weights(b, "web").values()) == pytest.approx([1 / 3] * 3)   # even: learning starts over
    learn(b, ticks=5)   # ... and goes on
    b.save_state()   # the next save replaces the bad file with a good one
    assert persist.read(str(state)) is not None


def test_changed_constants_are_not_resumed(tmp_path):
    good, dp = _good_file(tmp_path)
    (tmp_path / "state").write_bytes(good)
    with capture_logs() as logs:
        b = agent(config(WEB, top=EQ + "equilibrium:\n  deadband: 0.3\n"), tmp_path / "state", dp)
    warned = [e for e in logs if e["event"] == "state_ignored"]
    assert len(warned) == 1 and warned[0]["policy"] == "equilibrium" and "constants" in warned[0]["reason"]
    assert list(weights(b, "web").values()) == pytest.approx([1 / 3] * 3)


def test_a_resume_that_fails_changes_nothing(tmp_path):
    """All or nothing: one bad part, and no engine is replaced."""
    a = agent(config(WEB, TOLLED, top=EQ), tmp_path / "state")
    learn(a)
    parts = a.router.learned()
    parts["equilibrium-tolls"].cells["q"][0] = -1.0
    engines = {p: part.engine for p, part in a.router.parts.items()}
    w = a.router.weights_now.copy()
    with pytest.raises(ValueError, match="equilibrium-tolls"):
        a.router.resume(parts)
    assert {p: part.engine for p, part in a.router.parts.items()} == engines
    assert np.array_equal(a.router.weights_now, w)


def test_a_failed_save_keeps_the_old_file_and_warns_once(tmp_path):
    state = tmp_path / "state"
    a = agent(config(WEB, top=EQ), state)
    a.save_state()
    old = state.read_bytes()
    learn(a)
    with mock.patch.object(persist.os, "replace", side_effect=OSError(28, "No space left on device")):
        with capture_logs() as logs:
            a.save_state()
            a.save_state()
    assert state.read_bytes() == old and os.listdir(tmp_path) == ["state"]   # no temporary file left
    assert [e["event"] for e in logs] == ["state_save_failed"] and "No space" in logs[0]["error"]
    with capture_logs() as logs:
        a.save_state()
    assert [e["event"] for e in logs] == ["state_save_recovered", "state_saved"]
    assert state.read_bytes() != old


def test_off_disables_the_state_file(tmp_path):
    a = Agent(AgentOptions(config_path="", cgroup="", pin_dir="/nonexistent/equilibrium-test", state_file="off"))
    assert a.saver is None
    a.load_state()
    a.save_state()   # nothing to do, nothing written


def test_the_default_file_sits_next_to_the_lock():
    pin = "/sys/fs/bpf/equilibrium"
    path = persist.default_path(pin)
    assert os.path.dirname(path) == os.path.dirname(lock_path(pin))
    assert path.endswith(".state") and os.path.basename(path)[:-6] == os.path.basename(lock_path(pin))[:-4]
    assert Agent(AgentOptions(config_path="", cgroup="", pin_dir=pin)).saver.path == path  # type: ignore[union-attr]
    out = CliRunner().invoke(cli, ["run", "--help"]).output
    assert "--state-file" in out and "[default: %g]" % persist.SAVE_EVERY in out
