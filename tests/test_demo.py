"""scripts/demo (the UrbanMove demo) and its open-loop load generator.

The root tests run the real thing: the agent with the `equilibrium` policy on
15 test backends, load from `equilibriumd.lab.loadgen` in a child cgroup, bus-1
slowed by 500 ms and restored; with a new connection per request, and with
keep-alive pools (`--clients pooled`) whose connections the agent's rebalancer
moves. The other tests check the figures' arithmetic on synthetic records, the
topology file, the load generator's open loop and its pools.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from equilibriumd.lab import loadgen
from equilibriumd.lab.demo import analysis, topology
from equilibriumd.lab.demo.run import timeline_for

from helpers import PY, REPO, RST

# --- figures on synthetic records ----------------------------------------------------------


def _records(rate: float, end: float, share_of_b0, seed: int = 0) -> list[dict]:
    """Poisson arrivals; backend 0 gets share_of_b0(t), the others split the rest."""
    rng = np.random.default_rng(seed)
    t, out = 0.0, []
    while True:
        t += rng.exponential(1.0 / rate)
        if t >= end:
            return out
        p0 = share_of_b0(t)
        u = rng.random()
        b = 0 if u < p0 else (1 if u < p0 + (1 - p0) / 2 else 2)
        out.append({"t": 1000.0 + t, "s": "bus", "b": "bus-%d" % (b + 1), "lat": 0.5 if b == 0 and 20 <= t < 60
                    else 0.006, "st": 200})


def _share(t: float) -> float:
    if t < 22:          # even, then the agent moves away 2 s after the slow-down
        return 1 / 3
    if t < 62:          # floor while slow, and 2 s after the restore
        return 0.008
    if t < 66:          # ramps back over 4 s
        return 0.008 + (t - 62) / 4 * (1 / 3 - 0.008)
    return 1 / 3


def test_figures_on_a_known_trace():
    req = analysis.Requests.from_records(_records(250, 80, _share), ["bus-1", "bus-2", "bus-3"], 1000.0)
    f = analysis.figures(req, 0, 20.0, 60.0, 80.0)
    # the share over the trailing second is <= 5 % about 1 s after the switch at 22 s
    assert 2.5 <= f["shift_seconds"] <= 3.5, f
    # within 0.05 of 1/3 over the trailing 2 s: late in the ramp (62..66 s)
    assert 4.0 <= f["recovery_seconds"] <= 7.5, f
    # only sampling noise left: sqrt(p(1-p)/n) ~ 0.03 at 250/s
    assert f["oscillation"] < 0.045
    assert f["p99_latency_seconds"]["before"] == pytest.approx(0.006)
    assert f["p99_latency_seconds"]["after"] == pytest.approx(0.006)
    assert f["slowed_share_settled"] < 0.02


def test_figures_when_nothing_happens():
    req = analysis.Requests.from_records(_records(250, 40, lambda t: 1 / 3), ["bus-1", "bus-2", "bus-3"], 1000.0)
    f = analysis.figures(req, 0, 10.0, 30.0, 40.0)
    assert f["shift_seconds"] is None
    assert f["oscillation_slow_period"] is None  # no shift, no settled slow period
    assert f["recovery_seconds"] is not None  # it never left
    assert f["oscillation"] < 0.05  # sampling noise only


def test_failed_requests_are_not_shares():
    recs = [{"t": 0.1 * i, "s": "bus", "b": None, "lat": 2.0, "st": 0, "err": "timeout"} for i in range(10)]
    recs += [{"t": 0.1 * i, "s": "bus", "b": "bus-2", "lat": 0.01, "st": 200} for i in range(10)]
    req = analysis.Requests.from_records(recs, ["bus-1", "bus-2", "bus-3"], 0.0)
    assert list(req.shares(0, 1)) == [0.0, 1.0, 0.0]
    assert req.latencies(0, 1).size == 10


def test_timeline_scaling():
    assert timeline_for(80)["slow_at"] == 20 and timeline_for(80)["restore_at"] == 60
    assert timeline_for(120)["restore_at"] == 60 and not timeline_for(120)["scaled"]
    t = timeline_for(40)
    assert (t["slow_at"], t["restore_at"], t["scaled"]) == (10, 30, True)


def test_standalone_yaml_is_the_builtin_topology():
    services, source = topology.load()
    assert source.endswith("daemonset/examples/urbanmove/standalone.yaml")
    assert [(s.name, s.frontend, s.backends) for s in services] == \
        [(s.name, s.frontend, s.backends) for s in topology.builtin()]
    assert [s.name for s in services] == ["gateway", "bus", "trajet", "user", "ticket"]
    for s in services:
        assert s.frontend.startswith("127.77.") and len(s.backends) == 3


# --- the load generator ---------------------------------------------------------------------


def test_loadgen_parsing():
    t = loadgen.Target.parse("bus=127.77.0.11:80@200")
    assert (t.name, t.host, t.port, t.rate) == ("bus", "127.77.0.11", 80, 200.0)
    with pytest.raises(argparse.ArgumentTypeError):
        loadgen.Target.parse("bus=127.77.0.11@200")
    assert loadgen.parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Backend: bus-2\r\n\r\nok") == \
        (200, "bus-2")
    assert loadgen.parse_response(b"HTTP/1.1 503 Service Unavailable\r\n\r\n") == (503, None)
    assert loadgen.parse_response(b"garbage") == (0, None)


def test_loadgen_stays_open_loop_when_a_backend_is_slow(tmp_path):
    """A backend taking 0.5 s does not slow the offered rate down: requests
    pile up in flight instead (closed-loop clients would send 2 per second)."""
    from equilibriumd.lab.testbed import TestBackends

    with TestBackends(2, behaviours=[{"latency": 0.5}, {}], names=["slow", "fast"]) as tb:
        out = tmp_path / "r.jsonl"
        targets = []
        for i, name in enumerate(("slow", "fast")):
            h, p = tb.address(i)
            targets += ["--target", "%s=%s:%d@100" % (name, h, p)]
        subprocess.run([PY, "-m", "equilibriumd.lab.loadgen", "--duration", "3", "--out", str(out), "--seed", "3"]
                       + targets, check=True, cwd=REPO, timeout=30)
        lines = [json.loads(x) for x in out.read_text().splitlines()]
        assert "start" in lines[0]
        summary = lines[-1]["summary"]["targets"]
        recs = [x for x in lines if "s" in x]
        for name in ("slow", "fast"):
            assert 200 <= summary[name]["sent"] <= 400, summary  # 100/s for 3 s, Poisson
            assert summary[name]["errors"] == {}
            assert {r["b"] for r in recs if r["s"] == name} == {name}
        assert summary["slow"]["max_inflight"] >= 30  # ~50 in flight at 100/s x 0.5 s
        assert min(r["lat"] for r in recs if r["s"] == "slow") >= 0.5
        assert tb.stats(0)["connections"] == summary["slow"]["sent"]  # a new connection per request


def test_loadgen_pooled_reuses_keepalive_connections(tmp_path):
    """--clients pooled: the same open-loop arrivals on keep-alive pools. A fast
    backend needs a few connections for all its requests; a slow one fills its
    pools (8 x 8) and the rest of its requests wait for a connection, in the open loop."""
    from equilibriumd.lab.testbed import TestBackends

    with TestBackends(2, behaviours=[{"latency": 0.5}, {}], names=["slow", "fast"]) as tb:
        out = tmp_path / "r.jsonl"
        targets = []
        for i, name in enumerate(("slow", "fast")):
            h, p = tb.address(i)
            targets += ["--target", "%s=%s:%d@100" % (name, h, p)]
        subprocess.run([PY, "-m", "equilibriumd.lab.loadgen", "--duration", "3", "--out", str(out), "--seed", "3",
                        "--clients", "pooled"] + targets, check=True, cwd=REPO, timeout=30)
        lines = [json.loads(x) for x in out.read_text().splitlines()]
        summary = lines[-1]["summary"]
        assert summary["clients"] == "pooled"
        recs = [x for x in lines if "s" in x]
        for name, i in (("slow", 0), ("fast", 1)):
            s = summary["targets"][name]
            assert s["errors"] == {} and s["ok"] == s["sent"], s
            assert (s["pools"], s["pool_size"]) == (8, 8)
            assert tb.stats(i)["connections"] == s["connections_opened"] == \
                sum(1 for r in recs if r["s"] == name and not r["reused"])
            assert s["requests_reused"] == sum(1 for r in recs if r["s"] == name and r["reused"])
            assert s["dead_replaced"] == 0
            assert set(recs[0]) == {"t", "s", "b", "lat", "st", "reused", "c"}
        fast, slow = summary["targets"]["fast"], summary["targets"]["slow"]
        assert fast["connections_opened"] <= 24 and fast["requests_reused"] >= 0.9 * fast["sent"], fast
        assert slow["pool_peak"] == 8 and slow["waited"] > 0, slow
        assert slow["connections_opened"] <= 64  # never more than the pools hold
        assert min(r["lat"] for r in recs if r["s"] == "slow") >= 0.5


class _ResettingServer:
    """HTTP/1.1 keep-alive responses, then a reset (RST) of the connection `after`
    seconds later: what the agent's rebalancer does to an idle pooled connection."""

    def __init__(self, after: float) -> None:
        self.after = after
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.stopping = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopping:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        buf = b""
        with c:
            while b"\r\n\r\n" not in buf:
                data = c.recv(4096)
                if not data:
                    return
                buf += data
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Backend: rst\r\n\r\nok")
            time.sleep(self.after)
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)

    def close(self) -> None:
        self.stopping = True
        self.sock.close()


def test_loadgen_pooled_replaces_a_connection_reset_while_idle(tmp_path):
    """A pooled connection the peer reset while it was idle is found by the check
    before reuse and replaced by a new one: no request fails."""
    srv = _ResettingServer(after=0.02)
    try:
        out = tmp_path / "r.jsonl"
        subprocess.run([PY, "-m", "equilibriumd.lab.loadgen", "--duration", "2", "--out", str(out),
                        "--arrivals", "constant", "--clients", "pooled", "--pools", "1", "--pool-size", "2",
                        "--target", "rst=127.0.0.1:%d@10" % srv.port], check=True, cwd=REPO, timeout=30)
    finally:
        srv.close()
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    s = lines[-1]["summary"]["targets"]["rst"]
    recs = [x for x in lines if "s" in x]
    assert s["errors"] == {} and s["ok"] == s["sent"] >= 15, s
    # every request after the first finds its connection reset (100 ms apart, reset after 20 ms)
    assert s["dead_replaced"] == s["sent"] - 1 and s["dead_replaced_by_backend"] == {"rst": s["sent"] - 1}, s
    assert s["requests_reused"] == 0 and s["connections_opened"] == s["sent"] == srv.connections, s
    assert all(r["st"] == 200 and r["reused"] is False for r in recs)


def test_loadgen_response_framing():
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    assert loadgen.response_end(ok) == (len(ok), True)
    assert loadgen.response_end(ok + b"HTTP/1.1") == (len(ok), True)    # the next response's bytes are not its
    assert loadgen.response_end(ok[:-1]) is None                          # body incomplete
    close = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    assert loadgen.response_end(close) == (len(close), False)
    assert loadgen.response_end(b"HTTP/1.1 200 OK\r\n\r\nok") is None       # no length: ends at EOF
    assert loadgen.response_head(b"HTTP/1.1 200 OK\r\n\r\nok") == (None, True)


# --- the demo on the real kernel --------------------------------------------------------------


@pytest.mark.root
def test_demo_headless_full_run(tmp_path):
    """The full 80 s timeline (slow at 20 s, restore at 60 s), so the targets
    are checked on the run they are defined for: a scaled 40 s run leaves only
    10 s after the restore, and the policy keeps a restored backend at its
    exploration floor (~1 connection per tick) until its latency estimate is
    back within the deadband, which took 5-10 s here. The run takes ~85 s."""
    out = tmp_path / "out"
    summary_file = tmp_path / "summary.json"
    r = subprocess.run([PY, "-m", "equilibriumd.lab.demo", "--headless", "--duration", "80", "--summary",
                        str(summary_file), "--out", str(out)],
                       capture_output=True, text=True, cwd=REPO, timeout=240, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads(summary_file.read_text())
    for key in ("shift_seconds", "recovery_seconds", "oscillation", "p99_latency_seconds", "agent_rss_bytes",
                "agent_tick_seconds", "targets", "client_errors", "timeline", "load"):
        assert key in s, key
    assert set(s["p99_latency_seconds"]) == {"before", "during", "after"}
    assert s["timeline"]["slow_at"] == 20 and s["timeline"]["restore_at"] == 60 and not s["timeline"]["scaled"]
    assert s["load"]["bus"]["achieved_rate"] >= 200
    assert s["client_error_ratio"] <= 0.001, s["load"]
    if s["client_errors"] == 0:  # a failed request names no backend, so only then can every one be matched
        assert s["kernel_selections_match_client"] is True, s["kernel_counters_bus"]
    assert s["shift_seconds"] is not None and s["shift_seconds"] <= 5, s
    assert s["recovery_seconds"] is not None and s["recovery_seconds"] <= 30, s
    # The 0.05 target is reported in s["targets"] and the README. The statistic
    # carries binomial noise of ~0.03 by itself at 250 connections/s in 1 s
    # windows, so a run sits near the line by chance; an oscillating policy
    # measures 0.1-0.25. The test asserts that difference, not the noise.
    assert s["oscillation"] is not None and s["oscillation"] <= 0.08, s
    p99 = s["p99_latency_seconds"]
    assert p99["before"] < 0.1 and p99["after"] < 0.1
    # Scenario 3: ticket floods trajet from 30 s to 50 s (its own cgroup, enforce: throttle)
    assert s["flood_contained_seconds"] is not None and s["flood_contained_seconds"] <= 5, s["flood"]
    assert s["forgiven_seconds"] is not None and s["forgiven_seconds"] <= 30, s["flood"]
    assert s["flood"]["flood_load"]["errors"].get("refused", 0) > 0.5 * s["flood"]["flood_load"]["sent"], s["flood"]
    # the honest callers' trajet p99 once contained vs before: the 1.2 target is in s["targets"]
    # and the README; a ~6 s window of 50 requests/s puts p99 on a handful of requests, so the
    # test asserts the flood's effect is gone (a flood left through measures 4x and more)
    assert s["honest_p99_ratio_during_flood"] is not None and s["honest_p99_ratio_during_flood"] <= 1.5, s["flood"]
    assert s["agent_rss_bytes"] <= 64 * 2 ** 20
    # The median tick is asserted; the max (also in s["targets"]) is one sample
    # and can catch a scheduling hiccup of the 2-core test VM.
    assert s["agent_tick_seconds"]["samples"] >= 100 and s["agent_tick_seconds"]["median"] <= 0.010
    assert set(s["targets"]) >= {"shift_seconds", "recovery_seconds", "oscillation", "agent_rss_bytes",
                                 "agent_tick_seconds_max"}
    png = out / "urbanmove.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20000
    assert json.loads((out / "summary.json").read_text())["shift_seconds"] == s["shift_seconds"]
    # nothing left behind
    assert s["clean_up"]["ok"], s["clean_up"]
    assert not os.path.exists(s["agent"]["pin_dir"])
    assert not os.path.exists(s["agent"]["cgroup"])
    assert not os.path.exists("/proc/%d" % s["agent"]["pid"]) or _is_zombie_or_other(s["agent"]["pid"])


@pytest.mark.root
def test_demo_pooled_clients(tmp_path):
    """`--clients pooled`, 40 s (events scaled: bus-1 slowed 10-30 s, flood 15-25 s):
    the same requests from keep-alive pools. The shift is measured on requests; the
    agent's rebalancer closes idle connections of the slowed backend (the pools
    replace them, steered by the new weights) and no request fails. Recovery is not
    asserted here: a pooled backend regains requests only through the connections
    the pools reopen, which the rebalancer's noise band keeps few (see the summary
    of a full run). Takes ~45 s."""
    out = tmp_path / "out"
    summary_file = tmp_path / "summary.json"
    r = subprocess.run([PY, "-m", "equilibriumd.lab.demo", "--headless", "--clients", "pooled", "--duration", "40",
                        "--summary", str(summary_file), "--out", str(out)],
                       capture_output=True, text=True, cwd=REPO, timeout=200, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads(summary_file.read_text())
    assert s["clients"] == "pooled" and s["timeline"]["slow_at"] == 10 and s["timeline"]["restore_at"] == 30
    for key in ("shift_seconds", "recovery_seconds", "oscillation", "p99_latency_seconds", "flood_contained_seconds",
                "honest_p99_ratio_during_flood", "rebalance", "pooled", "failed_requests"):
        assert key in s, key
    assert set(s["targets"]) >= {"shift_seconds", "recovery_seconds", "oscillation", "bus_requests_per_second",
                                 "flood_contained_seconds"}
    assert "bus_connections_per_second" not in s["targets"]
    assert s["load"]["bus"]["achieved_rate"] >= 200
    # pooled: connections carry many requests, and none failed (a dead idle one is replaced)
    p = s["pooled"]
    assert p["reuse_ratio"] >= 0.95 and p["connections_opened"] < 0.05 * s["requests_total"], p
    assert s["failed_requests"] == 0 and s["client_errors"] == 0, s["load"]
    # the rebalancer closed connections of the slowed backend, and the pools saw them dead
    rb = s["rebalance"]
    assert rb["available"] == "on", rb
    assert rb["closed_by_backend"]["bus"]["bus-1"] >= 1 and rb["closed_by_reason"]["excess"] >= 1, rb
    assert rb["closed_total"] >= rb["closed_by_backend"]["bus"]["bus-1"], rb
    assert rb["slowed_backend_first_close_after_slow_seconds"] is not None
    assert p["dead_replaced_by_backend"].get("bus-1", 0) >= 1, p
    # the kernel selected a backend per connection: as many as the pools opened
    assert s["kernel_selections_match_client"] is True, s["kernel_counters_bus"]
    # the shift, on where requests went
    assert s["shift_seconds"] is not None and s["shift_seconds"] <= 5, s
    assert s["bus"]["slowed_share_settled"] <= 0.05, s["bus"]
    assert s["p99_latency_seconds"]["before"] < 0.1
    # the flood stays new connections: contained as without pools
    assert s["flood_contained_seconds"] is not None and s["flood_contained_seconds"] <= 5, s["flood"]
    assert (out / "urbanmove.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert s["clean_up"]["ok"], s["clean_up"]
    assert not os.path.exists(s["agent"]["pin_dir"]) and not os.path.exists(s["agent"]["cgroup"])


@pytest.mark.root
def test_demo_cleans_up_on_ctrl_c(tmp_path):
    p = subprocess.Popen([PY, "-m", "equilibriumd.lab.demo", "--headless", "--duration", "60", "--out",
                          str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         cwd=REPO, stdin=subprocess.DEVNULL)
    seen = []
    try:
        assert p.stdout is not None
        deadline = time.monotonic() + 120
        for line in p.stdout:
            seen.append(line)
            if line.startswith("demo: load:"):
                break
            assert time.monotonic() < deadline, "".join(seen)
        time.sleep(2)
        p.send_signal(signal.SIGINT)
        rest, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    text = "".join(seen) + rest
    assert p.returncode == 130, text
    assert "cleaning up" in text and "clean-up:" not in text, text
    agent_pid = int(text.split("agent pid ")[1].split()[0])
    assert not os.path.exists("/sys/fs/bpf/eqdemo-%d" % p.pid)
    root = [ln.split()[1] for ln in open("/proc/self/mounts") if ln.split()[2] == "cgroup2"][0]
    assert not os.path.exists(os.path.join(root, "eqdemo-%d" % p.pid))
    assert not os.path.exists("/proc/%d" % agent_pid) or _is_zombie_or_other(agent_pid)


def _is_zombie_or_other(pid: int) -> bool:
    """True if /proc/PID is not a live equilibriumd agent (a reused PID or a zombie)."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            cmd = f.read()
        with open("/proc/%d/stat" % pid) as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z" or b"equilibriumd" not in cmd


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
