"""equilibriumctl against a running agent (admin socket) and a stopped one (pins)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time

import pytest

from equilibriumd.agent.admin import socket_path
from equilibriumd.lab.testbed import TestBackends

from helpers import PY, REPO, write_config

pytestmark = pytest.mark.root


def ctl(pin_dir: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "equilibriumd.cli.ctl", *args, "--pin-dir", pin_dir],
                          capture_output=True, text=True, cwd=REPO, timeout=30)


def test_status_explain_watch_and_pins_when_down(tmp_path, cgroup, agent, frontend_ip, pin_dir):
    tb = TestBackends(3)
    try:
        cfg = write_config(tmp_path / "c.yaml", [{"name": "bus", "frontend": frontend_ip + ":80",
                                                  "backends": [{"address": a} for a in tb.addrs]}],
                           policy="equilibrium", tick="0.2s")
        a = agent(cfg).start()
        mode = os.stat(socket_path(pin_dir)).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600  # root only
        with cgroup.enter():
            import socket
            for _ in range(30):
                with socket.create_connection((frontend_ip, 80), timeout=2) as s:
                    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    while s.recv(4096):
                        pass
        time.sleep(0.6)  # a few ticks
        r = ctl(pin_dir, "status", "-o", "json")
        assert r.returncode == 0, r.stderr
        st = json.loads(r.stdout)
        assert st["agent"]["ticks"] >= 2 and st["agent"]["map_errors_total"] == 0
        svc = st["services"][0]
        assert svc["name"] == "bus" and svc["policy"] == "equilibrium" and svc["balance"] == "p2c"
        assert svc["status"] in ("converged", "converging", "diverging")
        probs = [b["probability"] for b in svc["backends"]]
        assert abs(sum(probs) - 1) < 1e-6
        r = ctl(pin_dir, "explain", "bus", "-o", "json")
        assert r.returncode == 0, r.stderr
        ex = json.loads(r.stdout)
        assert {"payoff", "regret", "p_failing", "quarantined"} <= set(ex["backends"][0])
        assert ex["changes"], "the first weights are recorded as a change"
        r = ctl(pin_dir, "explain", "bus")  # the table renders
        assert r.returncode == 0 and "REGRET" in r.stdout and "Why:" in r.stdout
        r = ctl(pin_dir, "explain", "nope")
        assert r.returncode == 1 and "no service 'nope'" in r.stderr
        r = ctl(pin_dir, "watch", "--count", "2", "--interval", "0.1")
        assert r.returncode == 0 and r.stdout.count("SERVICE") == 2

        assert a.stop(signal.SIGTERM) == 0
        r = ctl(pin_dir, "status")
        assert r.returncode == 1 and "no agent is running" in r.stderr
        r = ctl(pin_dir, "services", "-o", "json")  # pinned maps answer without the agent
        assert r.returncode == 0 and json.loads(r.stdout)["services"][0]["name"] == "bus"
        assert json.loads(r.stdout)["services"][0]["balance"] == "p2c"   # from the service's flags
        r = ctl(pin_dir, "backends", "bus", "-o", "json")
        assert r.returncode == 0
        bes = json.loads(r.stdout)["backends"]
        assert sum(b["requests_total"] for b in bes) == 30
        assert all(b["active_connections"] == 0 for b in bes)   # every connection closed
    finally:
        tb.close()


def test_ctl_without_a_datapath_says_so(tmp_path):
    r = ctl(str(tmp_path / "nothing-here"), "services")
    assert r.returncode == 1 and "no Equilibrium datapath" in r.stderr


def test_watch_refuses_an_interval_it_cannot_keep(tmp_path):
    """issue 14: `watch --interval 0` (or negative) spun or crashed; refused before anything runs."""
    for bad in ("0", "-1", "0.01", "1e9"):
        r = ctl(str(tmp_path / "nothing-here"), "watch", "--interval", bad)
        assert r.returncode == 2 and "--interval" in r.stderr, (bad, r.stderr)
