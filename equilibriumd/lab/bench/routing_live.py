"""Live subset of the routing benchmark: the real datapath and agent, real
sockets, test backends (root only).

Scenarios `heterogeneous`, `slow-backend`, `fast-failing`, each run
`seconds` (default 24 s) per policy: `equilibrium`, `round-robin`,
`p2c-ewma` through the kernel (the real agent, `equilibriumd run --config
... --cgroup ... --pin-dir ... --metrics-addr off`, attached to a child
cgroup made here; frontends in 127.77.61.0/24), and HAProxy from Debian
(`balance leastconn`, `mode http`, server connections not reused) on the
same backends as an external peer, and `prequal-proxy`: Prequal (NSDI 2024)
as a reverse proxy in Python (equilibriumd.lab.prequal_proxy: asynchronous
probes of each backend's requests in flight and latency at that RIF, the
simulator's parameters), on the same backends, also one upstream connection
per request. It adds a userspace hop in Python, whose cost is in its numbers:
`run` measures it (p50 through the proxy vs direct to a backend at 50 req/s,
"prequal_proxy_overhead").

* Backends: `equilibriumd.lab.testbed.TestBackends`, one asyncio process, names
  b0, b1, ... (the X-Backend header tells the client who answered).
* Capacity (heterogeneous 1:1:2:4): the test backends have no concurrency
  limit, so a capacity is emulated by feedback: every 50 ms the bench reads
  each backend's requests in progress n (requests read minus answered) and
  sets its latency to an exponential with mean (n + 1) / mu, mu = 25, 25,
  50, 100 req/s — the conditional response time of an M/M/1 queue holding n
  requests. Load 65 % of the 200 req/s.
* slow-backend: 3 backends, latency 20 ± 5 ms; backend 0 +500 ms from 6 s
  to 16 s. fast-failing: backend 0 answers 503 after 1 ms from 6 s to 16 s.
  150 req/s.
* Client: an open-loop Poisson generator (asyncio, a subprocess that joins
  the client cgroup before its first socket), one request per connection
  (`Connection: close`), latency to the response headers, 5 s give-up.
* Metrics: those of the simulation (equilibriumd.lab.sim.metrics), from the
  first 3 s on; no social optimum (cost_ratio null).

The agent restarts for each policy on the same pin directory (the programs
stay loaded and pinned between runs); everything is undone at the end:
agent and servers stopped by PID, `equilibriumd teardown --pin-dir`,
cgroups removed.

Pool scenarios (bench.pools_live): the same kind of scenarios with
keep-alive clients (a Python urllib3 pool, wrk), connection rebalancing on
and off; `run` runs them after the scenarios above (`pools=False` skips
them) and returns them under "pools"; `table` renders them too. Alone:

    python -m equilibriumd.lab.bench.routing_live --pools-only --json FILE
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import common, pools_live
from .agentproc import start_agent

POLICIES = ("equilibrium", "round-robin", "p2c-ewma", "haproxy-leastconn", "prequal-proxy")
#: the proxy overhead measurement: a low, open-loop load on backends without added latency
OVERHEAD_RATE, OVERHEAD_SECONDS = 50.0, 6.0
SCENARIOS = ("heterogeneous", "slow-backend", "fast-failing")
WARMUP = 3.0
BASE = {"dist": "normal", "mean": 0.020, "std": 0.005}
MU = (25.0, 25.0, 50.0, 100.0)


class LiveError(RuntimeError):
    pass


CLIENT = r'''
import asyncio, json, os, random, sys, time
cg, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
rate, secs, seed = float(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
if cg:
    with open(os.path.join(cg, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
out = []
async def one(t_rel):
    t0 = time.monotonic()
    status, backend = 0, ""
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
        w.write(b"GET / HTTP/1.1\r\nHost: live\r\nConnection: close\r\n\r\n")
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
        lat = time.monotonic() - t0
        lines = head.decode(errors="replace").split("\r\n")
        status = int(lines[0].split()[1])
        for l in lines[1:]:
            if l.lower().startswith("x-backend:"):
                backend = l.split(":", 1)[1].strip()
        w.close()
    except Exception:
        lat = time.monotonic() - t0
    out.append((t_rel, lat, status, backend))
async def main():
    rng = random.Random(seed)
    start = time.monotonic()
    tasks = []
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= secs:
            break
        d = start + t - time.monotonic()
        if d > 0:
            await asyncio.sleep(d)
        tasks.append(asyncio.ensure_future(one(t)))
    await asyncio.gather(*tasks)
asyncio.run(main())
print(json.dumps(out))
'''


def _scenario_spec(name: str, secs: float) -> dict[str, Any]:
    from equilibriumd.lab.sim.scenarios import Backend, Scenario
    third = secs / 4
    if name == "heterogeneous":
        sc = Scenario(name, "live: capacities 1:1:2:4 emulated (M/M/1 feedback), 130 req/s", tuple(
            Backend(1, 1 / m) for m in MU), ((0, 130.0),), secs, warmup=WARMUP, steady=(secs / 2, secs))
        return {"sc": sc, "n": 4, "rate": 130.0, "events": [], "emulate": True}
    slow = name == "slow-backend"
    t_on, t_off = max(6.0, third), max(16.0, 2.6 * third)
    sc = Scenario(name, "live", tuple(Backend(None, 0.02) for _ in range(3)), ((0, 150.0),), secs,
                  warmup=WARMUP, steady=(t_on + 4.0, t_off), bad=(0, t_on, t_off))
    bad = ({"latency": {"dist": "normal", "mean": 0.52, "std": 0.005}} if slow else
           {"error_ratio": 1.0, "latency": 0.001})
    good = {"latency": BASE, "error_ratio": 0.0}
    return {"sc": sc, "n": 3, "rate": 150.0, "events": [(t_on, 0, bad), (t_off, 0, good)], "emulate": False}


class _Emulator(threading.Thread):
    """Capacity by feedback: latency mean (n + 1) / mu from requests in progress."""

    def __init__(self, tb: Any, mu: tuple[float, ...]) -> None:
        super().__init__(daemon=True)
        self.tb, self.mu, self.stop = tb, mu, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            try:
                st = self.tb.stats_all()
                for i, s in enumerate(st):
                    n = max(int(s["requests"]) - sum(s["responses"].values()) - int(s.get("closed_mid_request", 0)), 0)
                    self.tb.set(i, latency={"dist": "exponential", "mean": (n + 1) / self.mu[i]})
            except Exception:  # server closing
                return


class _Timeline(threading.Thread):
    def __init__(self, tb: Any, events: list[tuple[float, int, dict[str, Any]]]) -> None:
        super().__init__(daemon=True)
        self.tb, self.events, self.stop = tb, events, threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        for at, b, beh in self.events:
            if self.stop.wait(max(0.0, t0 + at - time.monotonic())):
                return
            self.tb.set(b, **beh)


def _client(cg: str, addr: str, rate: float, secs: float, seed: int) -> list[tuple[float, float, int, str]]:
    host, port = addr.rsplit(":", 1)
    r = subprocess.run([sys.executable, "-c", CLIENT, cg, host, port, str(rate), str(secs), str(seed)],
                       capture_output=True, text=True, timeout=secs + 60)
    if r.returncode != 0:
        raise LiveError("client failed: %s" % r.stderr.strip()[-1000:])
    return [tuple(x) for x in json.loads(r.stdout.strip().splitlines()[-1])]  # type: ignore[misc]


def _metrics(rows: list[tuple[float, float, int, str]], spec: dict[str, Any]) -> dict[str, Any]:
    from equilibriumd.lab.sim.engine import Run
    from equilibriumd.lab.sim.metrics import run_metrics
    sc = spec["sc"]
    names = ["b%d" % i for i in range(spec["n"])]
    t = np.array([r[0] for r in rows])
    lat = np.array([r[1] for r in rows])
    status = np.array([r[2] for r in rows])
    b = np.array([names.index(r[3]) if r[3] in names else 0 for r in rows])
    err = (status == 0) | (status >= 500)
    lat = np.where(status == 0, 5.0, lat)
    run = Run(sc.name, "", 0, t, np.zeros(t.size, dtype=np.int64), b, lat, err, spec["n"])
    m = run_metrics(run, sc, optimum=float("nan"))
    m["cost_ratio"] = None
    m["requests"] = int(t.size)
    m["no_answer"] = int((status == 0).sum())
    return m


def _start_agent(res: Any, cfg: Path, cg: str, pin: str, log: Path) -> subprocess.Popen[Any]:
    return start_agent(res, cfg, cg, pin, log, LiveError)


def _haproxy(res: Any, tmp: str, listen: str, backends: list[str]) -> subprocess.Popen[Any]:
    from .datapath import _wait_listening, stop_process
    servers = "\n".join("    server b%d %s" % (i, a) for i, a in enumerate(backends))
    cfg = Path(tmp) / "haproxy.cfg"
    cfg.write_text("global\n    maxconn 4096\n\ndefaults\n    mode http\n    timeout connect 5s\n"
                   "    timeout client 30s\n    timeout server 30s\n    http-reuse never\n"
                   "    option http-server-close\n\nfrontend live\n    bind %s\n    default_backend live\n\n"
                   "backend live\n    balance leastconn\n%s\n" % (listen, servers))
    log = Path(tmp) / "haproxy.log"
    with open(log, "w") as lf:
        p = subprocess.Popen(["/usr/sbin/haproxy", "-f", str(cfg), "-db"], stdout=lf, stderr=subprocess.STDOUT)
    res.defer("stop haproxy", lambda: stop_process(p, "haproxy"))
    _wait_listening(listen, p, log)
    return p


def _prequal_proxy(res: Any, tmp: str, listen: str, backends: list[str], seed: int) -> subprocess.Popen[Any]:
    """Start equilibriumd.lab.prequal_proxy on `listen`; returns once it prints `ready`."""
    import select

    from .datapath import stop_process
    root = str(Path(__file__).resolve().parents[3])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-m", "equilibriumd.lab.prequal_proxy", "--listen", listen, "--seed", str(seed)]
    for a in backends:
        cmd += ["--backend", a]
    log = Path(tmp) / "prequal-proxy.log"
    with open(log, "a") as lf:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=lf, stdin=subprocess.DEVNULL, env=env)
    res.defer("stop prequal-proxy", lambda: stop_process(p, "prequal-proxy"))
    assert p.stdout is not None
    r, _, _ = select.select([p.stdout], [], [], 15.0)
    line = p.stdout.readline().decode() if r else ""
    if not line.startswith("ready "):
        stop_process(p, "prequal-proxy")
        raise LiveError("prequal-proxy did not start: %r %s" % (line, log.read_text()[-2000:]))
    return p


def proxy_overhead(res: Any, tmp: str, seed: int = 7) -> dict[str, Any]:
    """p50/p99 of a request through prequal-proxy vs direct to one backend, at a low load
    (OVERHEAD_RATE req/s for OVERHEAD_SECONDS, backends with no added latency), by the same
    client as the scenarios (a new connection per request, time to the response headers);
    through HAProxy too (a hop in C, for scale) when it is installed."""
    from equilibriumd.lab.testbed import TestBackends

    from .datapath import stop_process
    out: dict[str, Any] = {"rate": OVERHEAD_RATE, "seconds": OVERHEAD_SECONDS}
    with TestBackends(3, names=["b0", "b1", "b2"], seed=seed) as tb:
        addr = "127.77.63.250:9250"
        p = _prequal_proxy(res, tmp, addr, tb.addrs, seed)
        hp = None
        runs = [("direct", tb.addrs[0]), ("proxy", addr)]
        if os.path.exists("/usr/sbin/haproxy"):
            runs.append(("haproxy", "127.77.63.251:9251"))
            hp = _haproxy(res, tmp, runs[-1][1], tb.addrs)
        try:
            for what, a in runs:
                rows = _client("", a, OVERHEAD_RATE, OVERHEAD_SECONDS, seed)
                lat = np.array([r[1] for r in rows if r[2] == 200])
                out[what] = {"requests": len(rows), "ok": int(lat.size),
                             "p50_seconds": float(np.percentile(lat, 50)) if lat.size else None,
                             "p99_seconds": float(np.percentile(lat, 99)) if lat.size else None}
        finally:
            stop_process(p, "prequal-proxy")
            if hp is not None:
                stop_process(hp, "haproxy")
    d, v = out["direct"]["p50_seconds"], out["proxy"]["p50_seconds"]
    out["p50_added_seconds"] = (v - d) if d is not None and v is not None else None
    common.progress("prequal-proxy overhead: p50 %s direct, %s through the proxy"
                    % (common.ms(d), common.ms(v)))
    return out


def run(seconds: float | None = None, scenarios: tuple[str, ...] = SCENARIOS,
        policies: tuple[str, ...] = POLICIES, pools: bool = True,
        pool_runs: tuple[pools_live.PoolRun, ...] = pools_live.RUNS) -> dict[str, Any]:
    """Run the live subset; returns {"scenarios": {scenario: {policy: metrics}}, "note": ...,
    "pools": {...}} (the pool scenarios, bench.pools_live; {"error": ...} if they failed:
    the scenarios above are kept)."""
    out = _run_scenarios(seconds, scenarios, policies)
    if pools:
        out["pools"] = run_pools(pool_runs)
    return out


def run_pools(pool_runs: tuple[pools_live.PoolRun, ...] = pools_live.RUNS,
              seconds: float | None = None) -> dict[str, Any]:
    """The pool scenarios alone (bench.pools_live); a failure is returned as {"error": ...}."""
    try:
        return pools_live.run_pools(pool_runs, seconds)
    except (pools_live.PoolsError, LiveError, OSError, subprocess.SubprocessError, ValueError) as e:
        common.progress("live pool scenarios failed: %s" % e)
        return {"error": str(e)}


def _run_scenarios(seconds: float | None, scenarios: tuple[str, ...],
                   policies: tuple[str, ...]) -> dict[str, Any]:
    if os.geteuid() != 0:
        raise LiveError("the live subset needs root")
    if not os.path.exists("/usr/sbin/haproxy") and "haproxy-leastconn" in policies:
        raise LiveError("haproxy not installed (apt-get install haproxy)")
    from equilibriumd.cgroups import cgroup2_root
    from equilibriumd.lab.testbed import TestBackends

    from .datapath import Resources, make_cgroup, stop_process

    secs = seconds or 24.0
    res = Resources()
    out: dict[str, Any] = {"scenarios": {}, "seconds_per_run": secs,
                           "note": "%g s per run, one seed; metrics from t=%g s" % (secs, WARMUP)}
    tag = secrets.token_hex(3)
    pin = "/sys/fs/bpf/eqroute-%s" % tag
    try:
        tmp = tempfile.mkdtemp(prefix="eqroute-")
        res.defer("remove %s" % tmp, lambda: shutil.rmtree(tmp, ignore_errors=True))
        root = cgroup2_root()
        cg = make_cgroup(res, root, "eqroute-%s-agent" % tag)
        cg_plain = make_cgroup(res, root, "eqroute-%s-plain" % tag)
        res.defer("teardown %s" % pin, lambda: None if subprocess.run(
            [sys.executable, "-m", "equilibriumd", "teardown", "--pin-dir", pin], capture_output=True) else None)
        k = 0
        for sname in scenarios:
            spec = _scenario_spec(sname, secs)
            out["scenarios"][sname] = {}
            for pol in policies:
                k += 1
                n = spec["n"]
                with TestBackends(n, behaviour={"latency": BASE}, names=["b%d" % i for i in range(n)],
                                  seed=k) as tb:
                    agent = None
                    if pol == "haproxy-leastconn":
                        addr = "127.77.62.%d:%d" % (k, 8000 + k)
                        hp = _haproxy(res, tmp, addr, tb.addrs)
                        ccg = cg_plain
                    elif pol == "prequal-proxy":
                        addr = "127.77.63.%d:%d" % (k, 9000 + k)
                        hp = _prequal_proxy(res, tmp, addr, tb.addrs, k)
                        ccg = cg_plain
                    else:
                        addr = "127.77.61.%d:80" % k
                        cfg = Path(tmp) / ("%s-%s.yaml" % (sname, pol))
                        cfg.write_text("tick: 0.5s\npolicy: %s\nservices:\n  - name: live%d\n    frontend: %s\n"
                                       "    backends:\n%s" % (pol, k, addr, "".join(
                                           "      - address: %s\n        weight: 1\n" % a for a in tb.addrs)))
                        agent = _start_agent(res, cfg, cg, pin, Path(tmp) / ("agent-%d.log" % k))
                        ccg = cg
                    threads: list[Any] = [_Timeline(tb, spec["events"])]
                    if spec["emulate"]:
                        threads.append(_Emulator(tb, MU))
                    common.progress("live %s / %s: %g s at %g req/s via %s" % (sname, pol, secs, spec["rate"], addr))
                    for th in threads:
                        th.start()
                    try:
                        rows = _client(ccg, addr, spec["rate"], secs, 1000 + k)
                    finally:
                        for th in threads:
                            th.stop.set()
                        for th in threads:
                            th.join(timeout=5)
                    if agent is not None:
                        stop_process(agent, "agent")
                    else:
                        stop_process(hp, pol)
                    m = _metrics(rows, spec)
                    out["scenarios"][sname][pol] = m
                    common.progress("  p99 %.1f ms, success %.4f, %d requests"
                                    % ((m["p99_seconds"] or float("nan")) * 1e3, m["success_ratio"] or 0,
                                       m["requests"]))
        if "prequal-proxy" in policies:
            out["prequal_proxy_overhead"] = proxy_overhead(res, tmp)
    finally:
        res.close()
    return out


def table(live: dict[str, Any]) -> str:
    """The scenarios (one request per connection), then the pool scenarios if they ran."""
    headers = ["scenario", "policy", "requests", "p50 ms", "p99 ms", "p99.9 ms", "success", "shift s", "oscill."]
    rows = []
    for s, pols in live.get("scenarios", {}).items():
        for p, m in pols.items():
            rows.append([s, p, str(m["requests"]), common.ms(m["p50_seconds"]), common.ms(m["p99_seconds"]),
                         common.ms(m["p999_seconds"]), common.num(m["success_ratio"], 4),
                         common.num(m["shift_seconds"], 1), common.num(m["oscillation"])])
    parts = [common.table(headers, rows, right=[False, False] + [True] * 7)] if rows else []
    ov = live.get("prequal_proxy_overhead")
    if ov:
        def f(x: float | None) -> str:
            return "-" if x is None else "%.2f" % (x * 1e3)
        parts.append("prequal-proxy (a Python hop) at %g req/s: p50 %s ms direct to a backend, %s ms through "
                     "the proxy; p99 %s / %s ms" % (ov["rate"], f(ov["direct"]["p50_seconds"]),
                                                    f(ov["proxy"]["p50_seconds"]), f(ov["direct"]["p99_seconds"]),
                                                    f(ov["proxy"]["p99_seconds"]))
                     + ("; through HAProxy p50 %s, p99 %s ms" % (f(ov["haproxy"]["p50_seconds"]),
                                                                f(ov["haproxy"]["p99_seconds"]))
                        if "haproxy" in ov else ""))
    if live.get("pools") is not None:
        parts.append(pools_live.table(live["pools"]))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import signal

    from .datapath import _raise_exit
    ap = argparse.ArgumentParser(prog="python -m equilibriumd.lab.bench.routing_live")
    ap.add_argument("--seconds", type=float, default=24.0, help="length of each scenario run")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--pools-only", action="store_true", help="only the pool scenarios (bench.pools_live)")
    ap.add_argument("--no-pools", action="store_true", help="skip the pool scenarios")
    ap.add_argument("--pool-runs", default="",
                    help="pool runs whose key (scenario/clients/policy/mode) contains one of these "
                         "comma-separated strings (default: all)")
    ap.add_argument("--pool-seconds", type=float, default=None,
                    help="length of each pool run (default %g)" % pools_live.RUN_SECONDS)
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)
    if a.pools_only and a.no_pools:
        ap.error("--pools-only and --no-pools exclude each other")
    if os.geteuid() != 0:
        print("routing_live: run as root (it loads BPF programs)", file=sys.stderr)
        return 2
    try:
        runs = pools_live.select_runs(a.pool_runs)
    except pools_live.PoolsError as e:
        ap.error(str(e))
    # SIGTERM/SIGHUP end the run through the `finally`s that undo what it started
    old = {sig: signal.signal(sig, _raise_exit) for sig in (signal.SIGTERM, signal.SIGHUP)}
    t0 = time.monotonic()
    try:
        if a.pools_only:
            r: dict[str, Any] = {"pools": run_pools(runs, a.pool_seconds)}
        else:
            r = run(a.seconds, tuple(a.scenarios.split(",")), tuple(a.policies.split(",")), pools=False)
            if not a.no_pools:
                r["pools"] = run_pools(runs, a.pool_seconds)
    except LiveError as e:
        print("routing_live: %s" % e, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("routing_live: interrupted (cleaned up)", file=sys.stderr)
        return 130
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
    r["wall_seconds"] = round(time.monotonic() - t0, 1)
    r["machine"] = common.machine()
    print(table(r))
    if a.json:
        print("\nJSON: %s  (%.0f s)" % (common.write_json(a.json, r), r["wall_seconds"]))
    return 1 if "error" in r.get("pools", {}) else 0


if __name__ == "__main__":
    sys.exit(main())
