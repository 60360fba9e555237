"""Learning survives a kill -9 and a reload (issue 12, point 6), against the real
kernel and the real agent process.

The agent (policy equilibrium, 0.2 s tick) learns that testbed backend 0 is
slow (200 ms against ~1 ms) from real HTTP traffic: a load generator inside
the test's child cgroup, a new connection per request, to a frontend in
127.77.0.0/16. Then the traffic stops, the agent is killed with SIGKILL after
its last periodic save, and restarted on the same pins and state file: with no
traffic to learn from, the slot tables it writes must give backend 0 the share
it had learned (within 0.01), not the even third a fresh start gives. A SIGHUP
that adds a service must not move it either, and a clean exit saves.
tests/control/test_persist.py holds the rest (damaged files, dropped services,
Kubernetes discovery) without a kernel.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from helpers import PY, REPO, AgentProc, stop, write_config

pytestmark = pytest.mark.root

TICK = "0.2s"
SLOW = 0.2     # seconds backend 0 takes to answer
RATE = 150     # requests per second while learning
EVEN = 1 / 3


def service(name: str, frontend: str, addrs: list[str]) -> dict[str, Any]:
    return {"name": name, "frontend": frontend, "protocol": "tcp",
            "backends": [{"address": a, "weight": 1} for a in addrs]}


def shares(pin_dir: str, name: str) -> dict[str, float]:
    """Each backend's share of the service's live slot table (read from the pins,
    `equilibriumctl backends`): what the next connects get."""
    r = subprocess.run([PY, "-m", "equilibriumd.cli.ctl", "backends", name, "--pin-dir", pin_dir, "-o", "json"],
                       capture_output=True, text=True, cwd=REPO, timeout=30)
    assert r.returncode == 0, r.stderr
    return {b["address"]: float(b["share"]) for b in json.loads(r.stdout)["backends"]}


def start_agent(agent: Callable[[Path], AgentProc], cfg: Path, state: Path) -> AgentProc:
    a = agent(cfg)
    a.cmd += ["--state-file", str(state), "--state-every", "0.5"]
    return a.start()


def close_enough(got: dict[str, float], want: dict[str, float], tol: float = 0.01) -> bool:
    return got.keys() == want.keys() and all(abs(got[k] - want[k]) < tol for k in want)


def wait_for_save(state: Path, after_ns: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not (state.exists() and state.stat().st_mtime_ns > after_ns):
        assert time.monotonic() < deadline, "no save of %s within %gs" % (state, timeout)
        time.sleep(0.05)


@pytest.mark.timeout(180)
def test_kill_9_and_restart_resume_a_learned_weight_and_sighup_keeps_it(
        tmp_path, cgroup, pin_dir, agent, testbed, frontend_ip):
    tb = testbed(3, behaviours=[{"latency": SLOW}, {}, {}], seed=5)
    slow = tb.addrs[0]
    fe = frontend_ip + ":80"
    cfg = write_config(tmp_path / "c.yaml", [service("web", fe, tb.addrs)], policy="equilibrium", tick=TICK)
    state = tmp_path / "state"
    a = start_agent(agent, cfg, state)
    assert close_enough(shares(pin_dir, "web"), dict.fromkeys(tb.addrs, EVEN))   # a first start: even

    # learn: traffic until backend 0 is at the floor (the loadgen joins the test's child cgroup)
    out = tmp_path / "load.jsonl"
    load = subprocess.Popen([PY, "-m", "equilibriumd.lab.loadgen", "--cgroup", cgroup.path, "--target",
                             "web=%s@%d" % (fe, RATE), "--duration", "30", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=REPO)
    try:
        deadline = time.monotonic() + 25
        while shares(pin_dir, "web")[slow] > 0.02:
            assert load.poll() is None, load.stderr.read().decode() if load.stderr else ""
            assert time.monotonic() < deadline, "backend 0 was not learned down: %s" % shares(pin_dir, "web")
            time.sleep(0.2)
    finally:   # stop the traffic (by its PID): what follows must not be re-learned
        stop(load, timeout=10)
        if load.stderr is not None:
            load.stderr.close()
    time.sleep(1.0)   # in-flight requests end, the last ticks settle the weights
    learned = shares(pin_dir, "web")
    assert learned[slow] < 0.02, learned
    read_at = time.time_ns()
    wait_for_save(state, read_at)
    assert close_enough(shares(pin_dir, "web"), learned, 0.005)   # no traffic: nothing moved since

    # kill -9: no clean-exit save; the pinned datapath keeps routing on the last tables
    assert a.stop(signal.SIGKILL) == -signal.SIGKILL
    b = start_agent(agent, cfg, state)
    restored = b.wait_event("state_restored")
    assert restored["services"] == 1 and restored["n_dropped"] == 0, restored
    assert b.count("state_ignored") == 0
    time.sleep(1.0)   # several ticks of the restarted agent, with nothing to learn from
    assert b.proc is not None and b.proc.poll() is None
    after = shares(pin_dir, "web")
    print("backend shares learned %s, after kill -9 and restart %s" % (learned, after))
    assert close_enough(after, learned), "restart lost the learned weights: %s, before %s" % (after, learned)

    # SIGHUP with a config that adds a service: the learned weight stays
    write_config(cfg, [service("web", fe, tb.addrs), service("db", frontend_ip + ":81", tb.addrs[1:])],
                 policy="equilibrium", tick=TICK)
    seen = b.count("config_reloaded")
    b.hup()
    b.wait_event("config_reloaded", after=seen)
    assert close_enough(shares(pin_dir, "db"), dict.fromkeys(tb.addrs[1:], 0.5))   # new: fresh, even
    after_hup = shares(pin_dir, "web")
    print("after SIGHUP adding a service %s" % after_hup)
    assert close_enough(after_hup, learned), "reload moved the learned weights: %s, before %s" % (after_hup, learned)

    # a clean exit saves (both services), and the next start resumes both
    assert b.stop() == 0
    saved = [e for e in b.events() if e.get("event") == "state_saved"]
    assert saved and saved[-1]["bytes"] == state.stat().st_size
    c = start_agent(agent, cfg, state)
    assert c.wait_event("state_restored", after=1)["services"] == 2
    assert close_enough(shares(pin_dir, "web"), learned)
