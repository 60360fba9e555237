"""kill -9 during apply (issue 14, point 3), against the real kernel.

A writer process forked from the test runs the agent's own apply path
(`Agent.apply` -> `Reconciler.apply`, and the tick's `Reconciler.write_weights`
table flips) on the pinned maps in a loop over random configurations, and is
SIGKILLed at a random moment; the next writer adopts what the killed one left
pinned (`Reconciler.adopt`, as a restarted agent does) and goes on. Meanwhile
clients in the test's child cgroup connect to two frontends that every
configuration keeps (their backends, weights, states, balance and the first
one's name change; churn services come and go beside them, on pool A's
addresses too): every connect must succeed and land on its own service's
pool, counted by the backends' accepts. After each kill the live tables must
name only their own active backends. At the end the real agent is started on
the pins and must converge to the same tables (by address: ids may differ) as
the agent code applying the same file to an empty in-memory datapath, with no
backend entry left over.
"""

from __future__ import annotations

import gc
import mmap
import os
import random
import signal
import socket
import struct
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from equilibriumd.agent.daemon import Agent, AgentOptions
from equilibriumd.agent.reconcile import Reconciler
from equilibriumd.config import Config, parse
from equilibriumd.datapath import constants
from equilibriumd.datapath.maps import Datapath
from equilibriumd.datapath.memory import DatapathLike, MemoryDatapath

from helpers import ClientProc

MIN_KILLS = 50
MAX_KILLS = 400
LOOP_SECONDS = 25.0     #: the kill loop stops after this once MIN_KILLS are done
MAX_DELAY = 0.05        #: a writer is killed this long (s, at most) after it began to apply
POOL = 5                #: backends per pool (A, B; churn uses C and A)
N_CONFIGS = 40


# --- configurations -----------------------------------------------------------------
def _backends(rng: random.Random, addrs: list[str], need_active: bool) -> list[dict[str, Any]]:
    chosen = rng.sample(addrs, rng.randint(1, len(addrs)))
    out = [{"address": a, "weight": rng.randint(1, 9),
            "state": rng.choice(["active", "active", "draining"])} for a in chosen]
    if need_active and all(b["state"] != "active" for b in out):
        out[rng.randrange(len(out))]["state"] = "active"
    return out


def make_config(rng: random.Random, fe: str, pools: dict[str, list[str]]) -> dict[str, Any]:
    """Services a and b on fe:80 and fe:81 (always there, at least one active backend
    each, the first one sometimes renamed), and 0-3 churn services on fe:82-85."""
    svcs = [
        {"name": rng.choice(["a", "a-renamed"]), "frontend": fe + ":80", "protocol": "tcp",
         "balance": rng.choice(["p2c", "weighted"]), "backends": _backends(rng, pools["a"], True)},
        {"name": "b", "frontend": fe + ":81", "protocol": "tcp",
         "balance": rng.choice(["p2c", "weighted"]), "backends": _backends(rng, pools["b"], True)},
    ]
    ports = rng.sample([82, 83, 84, 85], rng.randint(0, 3))
    for name, port in zip(rng.sample(["c0", "c1", "c2", "c3"], len(ports)), ports):
        svcs.append({"name": name, "frontend": "%s:%d" % (fe, port), "protocol": rng.choice(["tcp", "udp"]),
                     "backends": _backends(rng, pools["c"] + pools["a"], False)})
    rng.shuffle(svcs)
    return {"tick": "0.2s", "policy": "static", "services": svcs}


# --- what the kernel routes by ---------------------------------------------------------
def routing_problems(dp: Datapath, kept: list[str]) -> list[str]:
    """What a connect could hit now: a frontend every configuration has (`kept`,
    "ip:port/proto") that is not in the map (a connect to it would go nowhere), a
    reachable service whose live table half names a backend that is not its own
    active entry, shares that disagree with the half, or an n_avail that disagrees
    with it (tests/control/support.KernelView, on the real maps)."""
    entries = {b.id: b for b in dp.backends()}
    fes = dp.frontends()
    have = {"%s/%s" % fp for fp in fes.values()}
    out = ["frontend %s is gone" % k for k in kept if k not in have]
    for sid, (fe, proto) in fes.items():
        svc = dp.service(sid)
        ids, shares = dp.read_table(sid, svc.gen)
        used, counts = np.unique(ids[ids != constants.NO_BACKEND], return_counts=True)
        for i, c in zip(used.tolist(), counts.tolist()):
            be = entries.get(i)
            if be is None or be.svc != sid or be.state != constants.BE_ACTIVE:
                out.append("%s/%s -> svc %d: slot names backend %d, entry %s" % (fe, proto, sid, i, be))
            if set(shares[ids == i].tolist()) != {c}:
                out.append("%s/%s -> svc %d: backend %d holds %d slots, its slots say %s"
                           % (fe, proto, sid, i, c, set(shares[ids == i].tolist())))
        if (svc.n_avail == 0) != (used.size == 0):
            out.append("%s/%s -> svc %d: n_avail %d with %d backends in the live half"
                       % (fe, proto, sid, svc.n_avail, used.size))
    return out


def canonical(dp: DatapathLike) -> dict[str, Any]:
    """The routing state by address, not by id: per frontend its service's name,
    counts, flags and live table (each slot as its backend's address and share);
    and every backend entry in use, by (service name, address)."""
    entries = {b.id: b for b in dp.backends()}
    names = {}
    services = {}
    for ps in dp.services():
        names[ps.id] = ps.name
        ids, shares = dp.read_table(ps.id, ps.gen)
        table = [(str(entries[i].address) if i in entries else "?%d" % i, s) if i != constants.NO_BACKEND else None
                 for i, s in zip(ids.tolist(), shares.tolist())]
        services["%s/%s" % (ps.frontend, ps.protocol)] = {
            "name": ps.name, "n_avail": ps.n_avail, "n_backends": ps.n_backends, "flags": ps.flags, "table": table}
    backends = sorted((names.get(b.svc, "<no service %d>" % b.svc), str(b.address), b.state, b.weight)
                      for b in entries.values())
    return {"services": services, "backends": backends}


def reference(config: Config) -> dict[str, Any]:
    """What the agent's code writes for `config` on an empty datapath: a writer
    that was never killed."""
    a = Agent(AgentOptions(config_path="", cgroup="", pin_dir="/nonexistent/eq-kill-test", metrics_addr="off",
                           state_file="off"))
    a.dp = MemoryDatapath()
    a.rec = Reconciler(a.dp)
    a.rec.adopt()
    a.telemetry = a.dp.telemetry()
    a.config = config
    a.apply(config)
    return canonical(a.dp)


# --- the writer --------------------------------------------------------------------------
#: shared with the writers (fork-inherited): applies begun, applies done, table flips
COUNTERS = struct.Struct("qqq")


def _writer(pin_dir: str, configs: list[Config], seed: int, shared: mmap.mmap, err: Path) -> None:
    """The forked child: the agent's apply and flip path until it is killed. Never returns."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)   # the agent logs to stdout: not into the test's capture
        gc.freeze()   # the test's heap is not the writer's: apply's gc.collect() skips it, as in an agent
        rng = np.random.default_rng(seed)
        a = Agent(AgentOptions(config_path="", cgroup="", pin_dir=pin_dir, metrics_addr="off", state_file="off"))
        a.dp = Datapath(pin_dir)
        a.rec = Reconciler(a.dp)
        a.rec.adopt()   # what the killed writer left, as a restarted agent does
        a.telemetry = a.dp.telemetry()
        started = done = flips = 0
        while True:
            c = configs[int(rng.integers(len(configs)))]
            started += 1
            shared[:COUNTERS.size] = COUNTERS.pack(started, done, flips)
            a.apply(c)
            a.config = c
            done += 1
            shared[:COUNTERS.size] = COUNTERS.pack(started, done, flips)
            for _ in range(int(rng.integers(0, 4))):   # ticks: new weights, the idle half, the flip
                rows = a.rec.rows
                assert rows is not None
                flips += a.rec.write_weights(rng.random(rows.present.shape) + 0.01)
                shared[:COUNTERS.size] = COUNTERS.pack(started, done, flips)
    except BaseException:
        err.write_text(traceback.format_exc())
        os._exit(1)
    os._exit(2)


@pytest.mark.root
@pytest.mark.timeout(300)
def test_kill_9_during_apply_never_misroutes_and_a_restart_converges(
        tmp_path, cgroup, pin_dir, agent, backends, frontend_ip):
    seed = int(os.environ.get("EQ_KILL_SEED", time.time_ns() % (1 << 30)))   # the configs; kill times vary
    print("EQ_KILL_SEED=%d" % seed)
    rng = random.Random(seed)
    bes = {k: backends(POOL, base_ip=21) for k in "abc"}
    pools = {k: [b.addr(i) for i in range(POOL)] for k, b in bes.items()}
    cfgs = [make_config(rng, frontend_ip, pools) for _ in range(N_CONFIGS)]
    configs = [parse(yaml.safe_dump(c, sort_keys=False), "<config %d>" % i) for i, c in enumerate(cfgs)]
    first = tmp_path / "first.yaml"
    first.write_text(yaml.safe_dump(cfgs[0], sort_keys=False))

    # the real agent loads and pins the datapath on the child cgroup, then leaves it
    a = agent(first)
    a.cmd += ["--state-file", "off"]
    a.start()
    a.stop()   # (a clean exit is tests/test_ctl_agent.py's business)

    # a trap on each kept frontend: a connect the programs did not rewrite lands here
    # (counted) instead of being refused like a backend that is not there
    traps = []
    for port in (80, 81):
        t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        t.bind((frontend_ip, port))
        t.listen(4096)
        t.setblocking(False)
        traps.append(t)
    try:
        _kill_loop_and_restart(tmp_path, cgroup, pin_dir, agent, bes, pools, frontend_ip, rng, seed, cfgs, configs,
                               traps)
    finally:
        for t in traps:
            t.close()


def _wait_started(shared: mmap.mmap, pid: int, err: Path, timeout: float = 10.0) -> None:
    """Until the writer has begun its first apply (fork and adoption take a while on a
    busy machine: killing it before would test adoption, not apply)."""
    deadline = time.monotonic() + timeout
    while COUNTERS.unpack(shared[:COUNTERS.size])[0] == 0:
        done, status = os.waitpid(pid, os.WNOHANG)
        assert done == 0, "writer exited (status %#x): %s" % (status, err.read_text() if err.exists() else "")
        assert time.monotonic() < deadline, "writer did not begin to apply within %gs" % timeout
        time.sleep(0.001)


def _trapped(traps: list[socket.socket]) -> int:
    """Connections the traps hold (taken off their queues)."""
    n = 0
    for t in traps:
        while True:
            try:
                c, _ = t.accept()
            except BlockingIOError:
                break
            c.close()
            n += 1
    return n


def _kill_loop_and_restart(tmp_path: Path, cgroup: Any, pin_dir: str, agent: Any, bes: dict[str, Any],
                           pools: dict[str, list[str]],
                           frontend_ip: str, rng: random.Random, seed: int, cfgs: list[dict[str, Any]],
                           configs: list[Config], traps: list[socket.socket]) -> None:
    shared = mmap.mmap(-1, COUNTERS.size)
    kept = ["%s:%d/tcp" % (frontend_ip, port) for port in (80, 81)]
    clients = [ClientProc(cgroup.path, frontend_ip, port, seconds=LOOP_SECONDS + 3) for port in (80, 81)]
    kills = mid_apply = applies = flips = 0
    t0 = time.monotonic()
    with Datapath(pin_dir) as dp:
        while kills < MAX_KILLS and (kills < MIN_KILLS or time.monotonic() - t0 < LOOP_SECONDS):
            shared[:COUNTERS.size] = COUNTERS.pack(0, 0, 0)
            err = tmp_path / ("writer-%d.err" % kills)
            pid = os.fork()
            if pid == 0:
                _writer(pin_dir, configs, seed + kills, shared, err)
            _wait_started(shared, pid, err)   # adopted: now a random point of its applies and flips
            time.sleep(rng.uniform(0.0, MAX_DELAY))
            os.kill(pid, signal.SIGKILL)   # our own child, by PID
            _, status = os.waitpid(pid, 0)
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, \
                "writer %d ended on its own (status %#x): %s" % (kills, status,
                                                                 err.read_text() if err.exists() else "")
            kills += 1
            started, done, n_flips = COUNTERS.unpack(shared[:COUNTERS.size])
            mid_apply += started > done
            applies += done
            flips += n_flips
            bad = routing_problems(dp, kept)
            assert not bad, "after kill %d (%d applies done, one in flight: %s): %s" % (
                kills, done, started > done, bad)
    loop_s = time.monotonic() - t0
    during = [c.result() for c in clients]
    print("kill -9 loop: %d kills in %.1f s (%d mid-apply), %d applies and %d table flips completed; "
          "connects during the loop: %s; backend errors %s" % (kills, loop_s, mid_apply, applies, flips, during,
                                                          {k: dict(b.errors) for k, b in bes.items()}))
    assert kills >= MIN_KILLS and mid_apply > 0
    trapped = _trapped(traps)
    assert trapped == 0, "%d connects to a kept frontend were not translated" % trapped
    for res in during:   # the backends' own errors (an accept that failed) say who refused
        assert res["ok"] > 0 and res["failures"] == {} and res["wrong_peer"] == 0, \
            (res, {k: dict(b.errors) for k, b in bes.items()})

    # the last killed writer's state still routes every connect to its own pool
    after = [ClientProc(cgroup.path, frontend_ip, port, count=300) for port in (80, 81)]
    after_res = [c.result() for c in after]
    for res in after_res:
        assert res["ok"] == 300 and res["failures"] == {} and res["wrong_peer"] == 0, res
    want = {"a": during[0]["ok"] + after_res[0]["ok"], "b": during[1]["ok"] + after_res[1]["ok"]}
    for k in "ab":
        assert bes[k].settle(want[k]) == want[k], "pool %s accepted %s, its frontend's clients got %d through" % (
            k, dict(bes[k].accepts), want[k])
    assert bes["c"].total() == 0   # churn services: nobody connects to them
    assert _trapped(traps) == 0

    # the real agent restarts on the pins and converges to what a never-killed writer wrote
    final_cfg = cfgs[-1]
    final = tmp_path / "final.yaml"
    final.write_text(yaml.safe_dump(final_cfg, sort_keys=False))
    b = agent(final)
    b.cmd += ["--state-file", "off"]
    b.start()
    time.sleep(0.5)   # a couple of ticks: a static policy writes nothing more
    with Datapath(pin_dir) as dp:
        got = canonical(dp)
        assert routing_problems(dp, kept) == []
    ref = reference(configs[-1])
    assert got["services"] == ref["services"]
    assert got["backends"] == ref["backends"], "backend entries left over or missing after the restart"
    end = [ClientProc(cgroup.path, frontend_ip, port, count=300) for port in (80, 81)]
    for c in end:
        res = c.result()
        assert res["ok"] == 300 and res["failures"] == {} and res["wrong_peer"] == 0, res
    assert _trapped(traps) == 0


# --- the same, write by write, without a kernel ----------------------------------------------
class _Killed(BaseException):
    """The writer died here (SIGKILL: nothing after this write happens)."""


class _DyingDatapath(MemoryDatapath):
    """An in-memory datapath whose writer dies at its `limit`-th write."""

    limit: int | None = None

    def _record(self, mname: str, op: str, keys: Any, values: Any = ()) -> None:
        if self.limit is not None and len(self.writes) >= self.limit:
            raise _Killed()
        super()._record(mname, op, keys, values)


def _svc_yaml(name: str, fe: str, addr: str, protocol: str = "tcp") -> dict[str, Any]:
    return {"name": name, "frontend": fe, "protocol": protocol, "backends": [{"address": addr}]}


def _cfg(*svcs: dict[str, Any]) -> Config:
    return parse(yaml.safe_dump({"policy": "static", "services": list(svcs)}, sort_keys=False), "<swap>")


def test_a_kill_in_a_frontend_swap_leaves_no_frontend_behind():
    """Two services swap frontends; the writer dies after any write of that apply; a
    restarted agent adopts and applies a third file. Every frontend key must then
    be one of its services' own: the swap points both keys at one service for a
    moment, and a key the restart cannot see (adoption went by service id) was
    left routing to a removed service's id, the next service to get that id
    (found by the kernel test above: a live half naming other services' backends)."""
    udp, web, other = "10.96.0.1:53", "10.96.0.2:80", "10.96.0.9:80"
    before = _cfg(_svc_yaml("c0", udp, "10.0.0.1:53", "udp"), _svc_yaml("c1", web, "10.0.0.2:80"))
    swap = _cfg(_svc_yaml("c0", web, "10.0.0.3:80"), _svc_yaml("c1", udp, "10.0.0.4:53", "udp"))
    after = _cfg(_svc_yaml("c1", other, "10.0.0.4:80"))
    n, complete = 0, False
    while not complete:
        dp = _DyingDatapath()
        ref = reference(after)
        a = Agent(AgentOptions(config_path="", cgroup="", pin_dir="/nonexistent/eq-kill-test", metrics_addr="off",
                               state_file="off"))
        a.dp, a.rec = dp, Reconciler(dp)
        a.apply(before)
        dp.limit = len(dp.writes) + n
        try:
            a.apply(swap)
            complete = True
        except _Killed:
            pass
        dp.limit = None
        b = Agent(AgentOptions(config_path="", cgroup="", pin_dir="/nonexistent/eq-kill-test", metrics_addr="off",
                               state_file="off"))
        b.dp, b.rec = dp, Reconciler(dp)
        b.rec.adopt()
        b.apply(after)
        keys = [sid for _, _, sid in dp.frontend_keys()]
        assert sorted(keys) == sorted(s.id for s in b.rec.services.values()), \
            "killed after write %d of the swap: frontend keys -> %s, services %s" % (
                n, keys, {s.name: (s.id, str(s.frontend)) for s in b.rec.services.values()})
        assert canonical(dp) == ref, "killed after write %d of the swap" % n
        n += 1
