"""Live pool scenarios of the routing benchmark: keep-alive clients on the real
datapath and agent, with connection rebalancing on and off (root only).

The kernel steers a connection once, at connect(); a client that keeps its
connections sends where the weights pointed when it connected. These runs
measure what the agent's connection rebalancing (equilibriumd/agent/rebalance.py,
bpf/rebalance.bpf.c) changes for two kinds of keep-alive client:

* `pools`: POOLS processes of `equilibriumd.lab.poolclient` (urllib3, the pool
  `requests` uses), each POOL_CONNECTIONS keep-alive connections shared by as
  many worker threads, THINK seconds between a response and the next request
  (one service calling another: a connection is idle a few tens of ms between
  uses). A request that fails is counted, never retried.
* `wrk`: `wrk -t2 -c24 --latency` (closed loop: the next request goes out as
  soon as the response is in, so a connection is never idle for long).

Scenarios (3 backends, 20 +- 5 ms, unless said; each run RUN_SECONDS):

* slow-backend: backend 0 +200 ms from t=10 s to the end. Target (issue):
  pools under `equilibrium` with rebalancing (`mode: idle`, the default):
  from t=15 s on backend 0 serves <= 5 % of the pools' requests, and the
  pools see zero failed requests. Peers: the same with rebalancing off (the
  "before"), `round-robin` and `p2c-ewma` through the kernel, HAProxy
  (`mode http`, leastconn, keeps its own server connections: balances per
  request); wrk with rebalancing idle, with `max_connection_age` MAX_AGE s,
  and off.
* heterogeneous: 4 backends, capacities 1:1:2:4 emulated by feedback as in
  routing_live (latency mean (n + 1) / mu, n requests in progress); pools
  with HET_THINK s of think time (about 65 % of the 200 req/s capacity); wrk
  saturates it (closed loop). Reported: each backend's share from t=15 s
  against its capacity share, p99.
* churn: backends b0..b2 configured, b3 listening but not configured; at
  t=10 s a config reload (SIGHUP) removes b0 (still serving: a pod that
  left the service), at t=18 s another adds b3. Reported: b0's share from
  t=15 s (a removed backend), b3's share from t=23 s (a fair share is 1/3).

Per run: requests, failures (pools: failed requests; wrk: socket errors and
non-2xx responses), backend 0's share from t=15 s (pools: the X-Backend of
every answer; wrk: the test backends' own counters sampled every second),
p50/p99 (pools: requests sent from t=15 s on; wrk: its whole-run
distribution), req/s, the agent's closes by reason (its
`connections_rebalanced` log events), backend 0's open connections (server
side) at t=10, 15 s and the end, and backend 0's table share at the end.

The agent restarts for each run on one pin directory; each run has its own
test backends; everything is undone at the end, also on failure: clients,
agent, HAProxy and servers stopped by PID, `equilibriumd teardown
--pin-dir`, cgroups (children of the cgroup2 root, never the root) removed.
Traffic stays on 127.0.0.0/8.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import common
from .agentproc import start_agent

RUN_SECONDS = 30.0
EVENT_AT = 10.0          #: slow-backend: backend 0 slows down; churn: backend 0 removed
MEASURE_FROM = 15.0      #: shares and the pools' latency from here on
CHURN_ADD_AT = 18.0      #: churn: b3 added
CHURN_ADD_MEASURE = 23.0  #: churn: b3's share from here on
POOLS = 3
POOL_CONNECTIONS = 8
THINK = 0.03             #: seconds between a response and the next request on a pool worker
HET_THINK = 0.15         #: heterogeneous: ~130 req/s from 24 workers, ~65 % of the emulated capacity
WRK_THREADS = 2
WRK_CONNECTIONS = 24
MAX_AGE = 5.0            #: rebalance.max_connection_age of the `max-age` runs, seconds
SLOW_EXTRA = 0.200       #: slow-backend: added to backend 0's latency
SHARE_TARGET = 0.05
BASE_MEAN, BASE_STD = 0.020, 0.005
BASE: dict[str, Any] = {"dist": "normal", "mean": BASE_MEAN, "std": BASE_STD}   # as routing_live
MU = (25.0, 25.0, 50.0, 100.0)                             # as routing_live (heterogeneous)
HAPROXY = "haproxy-leastconn"
WRK = "/usr/bin/wrk"


class PoolsError(RuntimeError):
    pass


_ROOT = Path(__file__).resolve().parents[3]
#: What decides these results besides this file: recorded so a run names the code it measured
SOURCES = ("bpf/rebalance.bpf.c", "bpf/lib/types.h", "equilibriumd/agent/rebalance.py",
           "equilibriumd/agent/daemon.py", "equilibriumd/policy/rebalance.py", "equilibriumd/datapath/rebalance.py",
           "equilibriumd/lab/poolclient.py")


def sources() -> dict[str, Any]:
    """The commit and a digest of each file in SOURCES (the working tree may differ from the commit)."""
    r = subprocess.run(["git", "-C", str(_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    out: dict[str, Any] = {"commit": r.stdout.strip() or None}
    for rel in SOURCES:
        try:
            out[rel] = hashlib.sha256((_ROOT / rel).read_bytes()).hexdigest()[:12]
        except OSError:
            out[rel] = None
    return out


@dataclass(frozen=True)
class PoolRun:
    scenario: str      #: slow-backend | heterogeneous | churn
    clients: str       #: pools | wrk
    policy: str        #: a kernel policy, or HAPROXY
    mode: str = "idle"  #: rebalancing: idle | off | max-age (idle + max_connection_age MAX_AGE); "-" for HAProxy

    @property
    def key(self) -> str:
        return "%s/%s/%s/%s" % (self.scenario, self.clients, self.policy, self.mode)


RUNS: tuple[PoolRun, ...] = (
    PoolRun("slow-backend", "pools", "equilibrium", "idle"),
    PoolRun("slow-backend", "pools", "equilibrium", "off"),
    PoolRun("slow-backend", "pools", "round-robin", "idle"),
    PoolRun("slow-backend", "pools", "p2c-ewma", "idle"),
    PoolRun("slow-backend", "pools", HAPROXY, "-"),
    PoolRun("slow-backend", "wrk", "equilibrium", "idle"),
    PoolRun("slow-backend", "wrk", "equilibrium", "max-age"),
    PoolRun("slow-backend", "wrk", "equilibrium", "off"),
    PoolRun("heterogeneous", "pools", "equilibrium", "idle"),
    PoolRun("heterogeneous", "pools", "equilibrium", "off"),
    PoolRun("heterogeneous", "wrk", "equilibrium", "idle"),
    PoolRun("churn", "pools", "equilibrium", "idle"),
    PoolRun("churn", "pools", "equilibrium", "off"),
    PoolRun("churn", "wrk", "equilibrium", "idle"),
    PoolRun("churn", "wrk", "equilibrium", "max-age"),
)

# One pool process: equilibriumd.lab.poolclient's PoolLoad (what `python -m
# equilibriumd.lab.poolclient` runs), joined to the client cgroup before its
# first socket, started on a line on stdin (all pools at once), and with every
# request's start, latency, status and backend recorded (the CLI reports
# whole-run percentiles only; these runs want them from t=15 s).
POOL_CLIENT = r'''
import json, os, sys, time
cg, url, secs = sys.argv[1], sys.argv[2], float(sys.argv[3])
conns, think = int(sys.argv[4]), float(sys.argv[5])
if cg:
    with open(os.path.join(cg, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
from equilibriumd.lab.poolclient import PoolLoad
pl = PoolLoad(url, conns, conns, think)
rec = []
request = pl.pool.request
def timed(*a, **k):
    t = time.monotonic()
    try:
        r = request(*a, **k)
    except Exception:
        rec.append((round(t - pl.t0, 4), round(time.monotonic() - t, 6), 0, ""))
        raise
    rec.append((round(t - pl.t0, 4), round(time.monotonic() - t, 6), r.status, r.headers.get("X-Backend", "")))
    return r
pl.pool.request = timed
print("ready", flush=True)
sys.stdin.readline()
res = pl.run(secs)
res["log"] = rec
print(json.dumps(res), flush=True)
'''


# --- scenario ------------------------------------------------------------------------

@dataclass
class _Ctx:
    """What a run's timeline acts on."""
    tb: Any
    cfg: Path | None
    agent: subprocess.Popen[Any] | None
    write_config: Callable[[list[int]], None] | None


def _n_backends(scenario: str) -> int:
    return {"slow-backend": 3, "heterogeneous": 4, "churn": 4}[scenario]


def _configured(scenario: str) -> list[int]:
    """Backends in the service at the start."""
    return [0, 1, 2] if scenario == "churn" else list(range(_n_backends(scenario)))


def _events(run: PoolRun, ctx: _Ctx) -> list[tuple[float, str, Callable[[], None]]]:
    if run.scenario == "slow-backend":
        slow = {"dist": "normal", "mean": BASE_MEAN + SLOW_EXTRA, "std": BASE_STD}
        return [(EVENT_AT, "b0 +%.0f ms" % (SLOW_EXTRA * 1e3), lambda: ctx.tb.set(0, latency=slow))]
    if run.scenario == "churn" and ctx.write_config is not None:
        wc = ctx.write_config

        def reload(members: list[int]) -> Callable[[], None]:
            def go() -> None:
                wc(members)
                assert ctx.agent is not None
                ctx.agent.send_signal(signal.SIGHUP)
            return go
        return [(EVENT_AT, "reload: b0 removed", reload([1, 2])),
                (CHURN_ADD_AT, "reload: b3 added", reload([1, 2, 3]))]
    return []


class _Timeline(threading.Thread):
    def __init__(self, t0: float, events: list[tuple[float, str, Callable[[], None]]]) -> None:
        super().__init__(daemon=True)
        self.t0, self.events, self.stop = t0, events, threading.Event()
        self.done: list[tuple[float, str]] = []
        self.error: str | None = None

    def run(self) -> None:
        for at, what, fn in self.events:
            if self.stop.wait(max(0.0, self.t0 + at - time.monotonic())):
                return
            try:
                fn()
                self.done.append((round(time.monotonic() - self.t0, 3), what))
            except Exception as e:  # reported with the run
                self.error = "%s: %s" % (what, e)
                return


class _Emulator(threading.Thread):
    """Capacity by feedback (as routing_live): latency mean (n + 1) / mu from requests in progress."""

    def __init__(self, tb: Any, mu: Sequence[float]) -> None:
        super().__init__(daemon=True)
        self.tb, self.mu, self.stop = tb, tuple(mu), threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            try:
                for i, s in enumerate(self.tb.stats_all()):
                    n = max(int(s["requests"]) - sum(s["responses"].values())
                            - int(s.get("closed_mid_request", 0)), 0)
                    self.tb.set(i, latency={"dist": "exponential", "mean": (n + 1) / self.mu[i]})
            except Exception:  # server closing
                return


class _Sampler(threading.Thread):
    """The test backends' own counters once a second: answered requests and open connections per backend."""

    def __init__(self, tb: Any, t0: float) -> None:
        super().__init__(daemon=True)
        self.tb, self.t0, self.stop = tb, t0, threading.Event()
        self.rows: list[tuple[float, list[int], list[int]]] = []

    def sample(self) -> None:
        st = self.tb.stats_all()
        self.rows.append((round(time.monotonic() - self.t0, 3), [sum(s["responses"].values()) for s in st],
                          [int(s["active_connections"]) for s in st]))

    def run(self) -> None:
        k = 0
        while True:
            try:
                self.sample()
            except Exception:  # server closing
                return
            k += 1
            if self.stop.wait(max(0.0, self.t0 + k - time.monotonic())):
                return

    def at(self, t: float) -> tuple[list[int], list[int]] | None:
        """The sample nearest to t."""
        if not self.rows:
            return None
        r = min(self.rows, key=lambda x: abs(x[0] - t))
        return r[1], r[2]


# --- processes -----------------------------------------------------------------------

def _stop(p: subprocess.Popen[Any], name: str) -> None:
    from .datapath import stop_process
    stop_process(p, name)


def _agent_yaml(run: PoolRun, svc: str, frontend: str, addrs: list[str], members: list[int]) -> str:
    reb = {"idle": "  mode: idle\n", "off": "  mode: \"off\"\n",
           "max-age": "  mode: idle\n  max_connection_age: %gs\n" % MAX_AGE}[run.mode]
    return ("tick: 0.5s\npolicy: %s\nrebalance:\n%sservices:\n  - name: %s\n    frontend: %s\n    backends:\n%s"
            % (run.policy, reb, svc, frontend,
               "".join("      - address: %s\n        weight: 1\n" % addrs[i] for i in members)))


def _config_writer(path: Path, run: PoolRun, svc: str, frontend: str,
                   addrs: list[str]) -> Callable[[list[int]], None]:
    """Writes the agent's config with these backends, atomically (a reload reads it whole)."""
    def write(members: list[int]) -> None:
        tmpf = path.with_name(path.name + ".new")
        tmpf.write_text(_agent_yaml(run, svc, frontend, addrs, members))
        os.replace(tmpf, path)
    return write


def _start_agent(res: Any, cfg: Path, cg: str, pin: str, log: Path) -> subprocess.Popen[Any]:
    return start_agent(res, cfg, cg, pin, log, PoolsError)


def _agent_events(log: Path) -> dict[str, Any]:
    """Closes by reason from the agent's `connections_rebalanced` events; reloads; errors."""
    closes = {"excess": 0, "drain": 0, "max_age": 0}
    walks_with_closes = reloads = 0
    problems: list[str] = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        name = ev.get("event")
        if name == "connections_rebalanced":
            walks_with_closes += 1
            for k in closes:
                closes[k] += int(ev.get(k, 0))
        elif name == "config_reloaded":
            reloads += 1
        elif name in ("config_refused", "tick_failed", "rebalance_unavailable", "rebalance_netns_denied"):
            problems.append("%s: %s" % (name, ev.get("error") or ev.get("reason") or ""))
    return {"closes": closes, "closes_total": sum(closes.values()), "ticks_with_closes": walks_with_closes,
            "reloads": reloads, "problems": problems[:5]}


def _ctl_backends(svc: str, pin: str) -> list[dict[str, Any]] | None:
    r = subprocess.run([sys.executable, "-m", "equilibriumd.cli.ctl", "backends", svc, "-o", "json",
                        "--pin-dir", pin], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        common.progress("equilibriumctl backends %s: %s" % (svc, r.stderr.strip()[-300:]))
        return None
    return [{k: b.get(k) for k in ("address", "state", "share", "active_connections", "rebalanced")}
            for b in json.loads(r.stdout)["backends"]]


def _haproxy(res: Any, tmp: str, listen: str, backends: list[str]) -> subprocess.Popen[Any]:
    """HAProxy balancing per request over its own keep-alive server connections."""
    from .datapath import _wait_listening
    servers = "\n".join("    server b%d %s" % (i, a) for i, a in enumerate(backends))
    cfg = Path(tmp) / "haproxy-pools.cfg"
    cfg.write_text("global\n    maxconn 4096\n\ndefaults\n    mode http\n    timeout connect 5s\n"
                   "    timeout client 60s\n    timeout server 30s\n    timeout http-keep-alive 60s\n"
                   "    option http-keep-alive\n    http-reuse safe\n\nfrontend live\n    bind %s\n"
                   "    default_backend live\n\nbackend live\n    balance leastconn\n%s\n" % (listen, servers))
    log = Path(tmp) / "haproxy-pools.log"
    with open(log, "w") as lf:
        p = subprocess.Popen(["/usr/sbin/haproxy", "-f", str(cfg), "-db"], stdout=lf, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL)
    res.defer("stop haproxy %d" % p.pid, lambda: _stop(p, "haproxy"))
    _wait_listening(listen, p, log)
    return p


def _start_pools(res: Any, cg: str, url: str, secs: float, think: float) -> list[subprocess.Popen[str]]:
    ps: list[subprocess.Popen[str]] = []
    for _ in range(POOLS):
        p = subprocess.Popen([sys.executable, "-c", POOL_CLIENT, cg, url, str(secs), str(POOL_CONNECTIONS),
                              str(think)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        res.defer("stop pool client %d" % p.pid, lambda p=p: _stop(p, "pool client"))
        ps.append(p)
    for p in ps:
        assert p.stdout is not None
        if not select.select([p.stdout], [], [], 60)[0]:
            raise PoolsError("pool client %d not ready after 60 s" % p.pid)
        line = p.stdout.readline().strip()
        if line != "ready":
            err = p.stderr.read() if p.stderr is not None and p.poll() is not None else ""
            raise PoolsError("pool client said %r: %s" % (line, err.strip()[-1000:]))
    return ps


def _go_pools(ps: list[subprocess.Popen[str]]) -> None:
    for p in ps:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()


def _collect_pools(ps: list[subprocess.Popen[str]], secs: float) -> list[dict[str, Any]]:
    out = []
    for p in ps:
        try:
            so, se = p.communicate(timeout=secs + 60)
        except subprocess.TimeoutExpired:
            _stop(p, "pool client")
            raise PoolsError("pool client %d did not finish" % p.pid) from None
        if p.returncode != 0:
            raise PoolsError("pool client failed (%d): %s" % (p.returncode, se.strip()[-1000:]))
        out.append(json.loads(so.strip().splitlines()[-1]))
    return out


def _start_wrk(res: Any, cg: str, url: str, secs: float, log: Path) -> subprocess.Popen[Any]:
    # the shell joins the client cgroup and execs wrk (same PID), so wrk's first socket is steered
    cmd = ["/bin/sh", "-c", 'echo $$ > "$1/cgroup.procs" && exec "$2" -t"$3" -c"$4" -d"$5" --latency "$6"',
           "sh", cg, WRK, str(WRK_THREADS), str(WRK_CONNECTIONS), "%ds" % int(secs), url]
    with open(log, "w") as lf:
        p = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    res.defer("stop wrk %d" % p.pid, lambda: _stop(p, "wrk"))
    return p


_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _dur(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError("wrk duration %r" % text)
    return float(m.group(1)) * _UNIT[m.group(2)]


def parse_wrk(text: str) -> dict[str, Any]:
    """wrk's summary: requests, req/s, latency percentiles, socket errors, non-2xx/3xx."""
    out: dict[str, Any] = {"socket_errors": {"connect": 0, "read": 0, "write": 0, "timeout": 0}, "non_2xx": 0}
    for k in ("50", "75", "90", "99"):
        m = re.search(r"^\s*%s(?:\.0+)?%%\s+(\S+)" % k, text, re.M)
        out["p%s" % k] = _dur(m.group(1)) if m else None
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text)
    out["requests"] = int(m.group(1)) if m else None
    out["duration"] = float(m.group(2)) * _UNIT[m.group(3)] if m else None
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    out["rps"] = float(m.group(1)) if m else None
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        out["socket_errors"] = dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups())))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        out["non_2xx"] = int(m.group(1))
    return out


# --- one run -------------------------------------------------------------------------

def _share(counts: Sequence[int], i: int) -> float | None:
    tot = sum(counts)
    return counts[i] / tot if tot else None


def _window(sampler: _Sampler, t_from: float, t_to: float | None = None) -> list[int] | None:
    """Answers per backend between two samples (server side)."""
    a = sampler.at(t_from)
    b = sampler.at(t_to) if t_to is not None else (sampler.rows[-1][1], sampler.rows[-1][2]) if sampler.rows else None
    if a is None or b is None:
        return None
    return [y - x for x, y in zip(a[0], b[0])]


def _pool_metrics(results: list[dict[str, Any]], n: int, secs: float) -> dict[str, Any]:
    rows = [r for res in results for r in res["log"]]
    t = np.array([r[0] for r in rows], dtype=float)
    lat = np.array([r[1] for r in rows], dtype=float)
    status = np.array([r[2] for r in rows], dtype=int)
    be = [r[3] for r in rows]
    names = ["b%d" % i for i in range(n)]
    ok = (status > 0) & (status < 500)
    late = t >= MEASURE_FROM
    per = [int(sum(1 for j in np.flatnonzero(ok & late) if be[j] == nm)) for nm in names]

    def per_from(t0: float) -> list[int]:
        sel = np.flatnonzero(ok & (t >= t0))
        return [int(sum(1 for j in sel if be[j] == nm)) for nm in names]

    failures: dict[str, int] = {}
    for res in results:
        for k, v in res["failures"].items():
            failures[k] = failures.get(k, 0) + int(v)
    fail_at = sorted(x for res in results for x in res.get("failed_at", []))
    lat_late = lat[ok & late]
    lat_all = lat[ok]

    def q(a: np.ndarray, p: float) -> float | None:
        return round(float(np.quantile(a, p)), 6) if a.size else None

    return {"requests": int(ok.sum()), "requests_from_15s": int((ok & late).sum()),
            "rps": round(float(ok.sum()) / secs, 1),
            "failures": int((~ok).sum()), "failures_by_kind": failures,
            "responses_5xx": int(((status >= 500)).sum()), "failed_at": fail_at[:20],
            "failures_from_15s": int((~ok & late).sum()),
            "per_backend_from_15s": per, "b0_share_from_15s": _share(per, 0),
            "per_backend_from_23s": per_from(CHURN_ADD_MEASURE),
            "p50_from_15s": q(lat_late, 0.5), "p99_from_15s": q(lat_late, 0.99),
            "p50": q(lat_all, 0.5), "p99": q(lat_all, 0.99),
            "connections_opened": int(sum(int(r.get("connections_opened", 0)) for r in results))}


def _wrk_metrics(w: dict[str, Any], sampler: _Sampler) -> dict[str, Any]:
    per = _window(sampler, MEASURE_FROM)
    se = w["socket_errors"]
    fails = int(sum(se.values())) + int(w["non_2xx"])
    return {"requests": w["requests"], "rps": w["rps"], "failures": fails, "socket_errors": se,
            "non_2xx": w["non_2xx"], "per_backend_from_15s": per,
            "b0_share_from_15s": _share(per, 0) if per else None,
            "per_backend_from_23s": _window(sampler, CHURN_ADD_MEASURE),
            "p50": w["p50"], "p90": w["p90"], "p99": w["p99"],
            "latency_note": "wrk's whole-run distribution (it reports no other)"}


def run_one(res: Any, run: PoolRun, k: int, tmp: str, cg: str, cg_plain: str, pin: str,
            secs: float) -> dict[str, Any]:
    from equilibriumd.lab.testbed import TestBackends
    n = _n_backends(run.scenario)
    names = ["b%d" % i for i in range(n)]
    think = HET_THINK if run.scenario == "heterogeneous" else THINK
    with TestBackends(n, behaviour={"latency": BASE}, names=names, seed=100 + k) as tb:
        agent: subprocess.Popen[Any] | None = None
        hp: subprocess.Popen[Any] | None = None
        cfg: Path | None = None
        log = Path(tmp) / ("agent-pools-%d.log" % k)
        svc = "pools%d" % k
        addrs = list(tb.addrs)
        wc: Callable[[list[int]], None] | None = None
        if run.policy == HAPROXY:
            addr = "127.77.64.%d:%d" % (k, 8100 + k)
            hp = _haproxy(res, tmp, addr, addrs)
            ccg = cg_plain
        else:
            addr = "127.77.63.%d:80" % k
            cfg = Path(tmp) / ("pools-%d.yaml" % k)
            wc = _config_writer(cfg, run, svc, addr, addrs)
            wc(_configured(run.scenario))
            agent = _start_agent(res, cfg, cg, pin, log)
            ccg = cg
        url = "http://%s/" % addr
        common.progress("pools %s (%s, %s, rebalance %s): %g s via %s"
                        % (run.scenario, run.clients, run.policy, run.mode, secs, addr))
        ctx = _Ctx(tb, cfg, agent, wc)
        pools: list[subprocess.Popen[str]] = []
        wrk: subprocess.Popen[Any] | None = None
        wlog = Path(tmp) / ("wrk-%d.log" % k)
        if run.clients == "pools":
            pools = _start_pools(res, ccg, url, secs, think)
        t0 = time.monotonic()
        if run.clients == "pools":
            _go_pools(pools)
        else:
            wrk = _start_wrk(res, ccg, url, secs, wlog)
        timeline = _Timeline(t0, _events(run, ctx))
        sampler = _Sampler(tb, t0)
        threads: list[Any] = [timeline, sampler]
        if run.scenario == "heterogeneous":
            threads.append(_Emulator(tb, MU))
        for th in threads:
            th.start()
        try:
            if run.clients == "pools":
                results = _collect_pools(pools, secs)
            else:
                assert wrk is not None
                try:
                    wrk.wait(timeout=secs + 60)
                except subprocess.TimeoutExpired:
                    raise PoolsError("wrk did not finish") from None
                if wrk.returncode != 0:
                    raise PoolsError("wrk failed (%d): %s" % (wrk.returncode, wlog.read_text()[-1000:]))
        finally:
            for th in threads:
                th.stop.set()
            for th in threads:
                th.join(timeout=5)
        try:
            sampler.sample()
        except Exception:
            pass
        ctl = _ctl_backends(svc, pin) if agent is not None else None
        if agent is not None:
            _stop(agent, "agent")
        if hp is not None:
            _stop(hp, "haproxy")
        if run.clients == "pools":
            m = _pool_metrics(results, n, secs)
        else:
            w = parse_wrk(wlog.read_text())
            m = _wrk_metrics(w, sampler)
            m["wrk"] = {"threads": WRK_THREADS, "connections": WRK_CONNECTIONS, "raw": wlog.read_text()[-1500:]}
    m.update(asdict(run))
    m["key"] = run.key
    if run.clients == "pools":
        m["client_settings"] = {"processes": POOLS, "connections": POOL_CONNECTIONS,
                                "workers": POOL_CONNECTIONS, "think_seconds": think}
    m["rebalance"] = ({"idle": {"mode": "idle"}, "off": {"mode": "off"},
                       "max-age": {"mode": "idle", "max_connection_age_seconds": MAX_AGE}}.get(run.mode)
                      if run.policy != HAPROXY else None)
    m["agent"] = _agent_events(log) if agent is not None else None
    m["closes"] = m["agent"]["closes"] if m["agent"] else None
    m["backends_at_end"] = ctl
    m["b0_table_share_at_end"] = next((b["share"] for b in ctl or [] if b["address"] == addrs[0]), None)
    m["events"] = timeline.done
    if timeline.error:
        m["event_error"] = timeline.error
    conns = {"%g" % t: (sampler.at(t) or ([], []))[1] for t in (EVENT_AT - 1, MEASURE_FROM, secs - 1)}
    m["open_connections"] = conns
    m["b0_open_connections"] = {t: (v[0] if v else None) for t, v in conns.items()}
    m["series"] = [(t, c, a) for t, c, a in sampler.rows]
    # seconds from the event until backend 0 held at most one open connection (None: never)
    m["b0_at_most_1_after_s"] = next((round(t - EVENT_AT, 1) for t, _, a in sampler.rows
                                      if EVENT_AT <= t <= secs - 0.5 and a and a[0] <= 1), None)
    if run.scenario == "heterogeneous":
        m["capacity_share"] = [round(x / sum(MU), 4) for x in MU]
    if run.scenario == "churn":
        late = m.get("per_backend_from_23s")
        m["b3_share_from_23s"] = _share(late, 3) if late else None
    # the issue's bar (<= 5 % on backend 0 from t=15 s, no failure), where backend 0 is the one to leave
    m["meets_share_and_zero_failures"] = (None if run.scenario == "heterogeneous" else
                                          m["b0_share_from_15s"] is not None
                                          and m["b0_share_from_15s"] <= SHARE_TARGET and m["failures"] == 0)
    m["seconds"] = secs
    return m


# --- all runs ------------------------------------------------------------------------

def targets(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's target for pools, and what wrk saw (no target: reported)."""
    def find(key: str) -> dict[str, Any] | None:
        return next((r for r in runs if r.get("key") == key), None)

    out: dict[str, Any] = {}
    r = find("slow-backend/pools/equilibrium/idle")
    if r is not None:
        share, fails = r["b0_share_from_15s"], r["failures"]
        out["pools_slow_backend"] = {
            "goal": "pools (%d x %d connections, think %g s), backend 0 +%.0f ms at t=%g s: from t=%g s "
                    "backend 0 serves <= %.0f %% of the requests; zero failed requests"
                    % (POOLS, POOL_CONNECTIONS, THINK, SLOW_EXTRA * 1e3, EVENT_AT, MEASURE_FROM, SHARE_TARGET * 100),
            "b0_share_from_15s": share, "failures": fails, "p99_from_15s": r["p99_from_15s"],
            "before": {k: (find("slow-backend/pools/equilibrium/off") or {}).get(k)
                       for k in ("b0_share_from_15s", "failures", "p99_from_15s")},
            "verdict": "met" if r["meets_share_and_zero_failures"] else "missed"}
    churn = {key: find("churn/%s" % key) for key in ("pools/equilibrium/idle", "pools/equilibrium/off",
                                                     "wrk/equilibrium/idle", "wrk/equilibrium/max-age")}
    if any(churn.values()):
        out["churn"] = {
            "goal": "report: b0 removed at t=%g s (share from t=%g s), b3 added at t=%g s (share from t=%g s; "
                    "an even share is 1/3)" % (EVENT_AT, MEASURE_FROM, CHURN_ADD_AT, CHURN_ADD_MEASURE),
            **{key: None if c is None else {k: c.get(k) for k in ("b0_share_from_15s", "b3_share_from_23s",
                                                                  "failures", "closes")}
               for key, c in churn.items()},
            "verdict": "reported"}
    wrk = {mode: find("slow-backend/wrk/equilibrium/%s" % mode) for mode in ("idle", "max-age", "off")}
    if any(wrk.values()):
        out["wrk_slow_backend"] = {
            "goal": "report backend 0's share and wrk's socket errors, default mode and with max_connection_age",
            "max_connection_age_seconds": MAX_AGE,
            **{mode: None if w is None else {k: w.get(k) for k in ("b0_share_from_15s", "failures", "socket_errors",
                                                                      "non_2xx", "rps", "p99", "closes")}
               for mode, w in wrk.items()},
            "verdict": "reported"}
    return out


def run_pools(runs: Sequence[PoolRun] = RUNS, seconds: float | None = None) -> dict[str, Any]:
    """Run the pool scenarios; returns {"runs": [metrics...], "targets": {...}, "note": ...}."""
    if os.geteuid() != 0:
        raise PoolsError("the live pool scenarios need root")
    from equilibriumd.cgroups import cgroup2_root

    from .datapath import Resources, make_cgroup

    secs = seconds or RUN_SECONDS
    if secs < CHURN_ADD_MEASURE + 3:
        raise PoolsError("runs of %g s are too short: events at %g and %g s" % (secs, EVENT_AT, CHURN_ADD_AT))
    skipped = []
    todo = []
    for r in runs:
        if r.policy == HAPROXY and not os.path.exists("/usr/sbin/haproxy"):
            skipped.append("%s: haproxy not installed" % r.key)
        elif r.clients == "wrk" and not os.path.exists(WRK):
            skipped.append("%s: wrk not installed (scripts/setup installs it)" % r.key)
        else:
            todo.append(r)
    res = Resources()
    t_start = time.monotonic()
    out: dict[str, Any] = {
        "runs": [], "skipped": skipped, "seconds_per_run": secs,
        "note": "%g s per run, one seed; event at t=%g s, shares and pool latency from t=%g s"
                % (secs, EVENT_AT, MEASURE_FROM),
        "settings": {"pools": POOLS, "pool_connections": POOL_CONNECTIONS, "think_seconds": THINK,
                     "heterogeneous_think_seconds": HET_THINK, "wrk": "-t%d -c%d" % (WRK_THREADS, WRK_CONNECTIONS),
                     "max_connection_age_seconds": MAX_AGE, "slow_extra_seconds": SLOW_EXTRA,
                     "event_at": EVENT_AT, "measure_from": MEASURE_FROM, "churn_add_at": CHURN_ADD_AT,
                     "churn_add_measure_from": CHURN_ADD_MEASURE, "base_latency": BASE, "mu": MU}}
    src = sources()
    out["sources"] = src
    load0 = os.getloadavg()[0]
    tag = secrets.token_hex(3)
    pin = "/sys/fs/bpf/eqpools-%s" % tag
    try:
        tmp = tempfile.mkdtemp(prefix="eqpools-")
        res.defer("remove %s" % tmp, lambda: shutil.rmtree(tmp, ignore_errors=True))
        root = cgroup2_root()
        cg = make_cgroup(res, root, "eqpools-%s-agent" % tag)
        cg_plain = make_cgroup(res, root, "eqpools-%s-plain" % tag)

        def teardown() -> None:
            if not os.path.exists(pin):
                return
            r = subprocess.run([sys.executable, "-m", "equilibriumd", "teardown", "--pin-dir", pin],
                               capture_output=True, text=True)
            if r.returncode != 0:
                common.progress("teardown %s failed: %s" % (pin, r.stderr.strip()[-500:]))
        res.defer("teardown %s" % pin, teardown)
        for k, run in enumerate(todo, start=1):
            m = run_one(res, run, k, tmp, cg, cg_plain, pin, secs)
            out["runs"].append(m)
            common.progress("  b0 share from %gs %s, failures %d, p99 %s ms, %s req/s, closes %s"
                            % (MEASURE_FROM, common.num(m["b0_share_from_15s"], 3), m["failures"],
                               common.ms(m.get("p99_from_15s", m.get("p99"))), m["rps"],
                               m["closes"]))
    finally:
        res.close()
    now = sources()
    changed = sorted(k for k, v in now.items() if k != "commit" and src.get(k) != v)
    if changed:
        out["warning"] = ("sources changed during the run (%s): the runs measured different code"
                          % ", ".join(changed))
        common.progress(out["warning"])
    if now["commit"] != src["commit"]:
        out["sources_commit_at_end"] = now["commit"]   # a commit alone changes no measured file
    out["loadavg_1min"] = {"start": load0, "end": os.getloadavg()[0]}
    out["targets"] = targets(out["runs"])
    out["wall_seconds"] = round(time.monotonic() - t_start, 1)
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else "%.1f" % (100 * x)


def table(pools: dict[str, Any]) -> str:
    """One row per run, then the target verdicts."""
    if "error" in pools:
        return "pool scenarios failed: %s" % pools["error"]
    headers = ["scenario", "clients", "policy", "rebalance", "requests", "req/s", "b0 % from 15s", "failures",
               "p50 ms", "p99 ms", "closes ex/dr/age",
               "b0 conns %g/%g/%gs" % (EVENT_AT - 1, MEASURE_FROM, pools.get("seconds_per_run", RUN_SECONDS) - 1),
               "other"]
    rows = []
    for m in pools.get("runs", []):
        wrk = m["clients"] == "wrk"
        c = m.get("closes")
        closes = "-" if not c else "%d/%d/%d" % (c["excess"], c["drain"], c["max_age"])
        bc = m.get("b0_open_connections", {})
        conns = "/".join("-" if v is None else str(v) for v in bc.values())
        other = ""
        if m["scenario"] == "heterogeneous" and m.get("per_backend_from_15s"):
            per = m["per_backend_from_15s"]
            other = "shares %s (capacity %s)" % (
                "/".join(_pct(_share(per, i)) for i in range(len(per))),
                "/".join("%.1f" % (100 * x) for x in m.get("capacity_share", [])))
        elif m["scenario"] == "churn":
            other = "b3 %% from 23s %s" % _pct(m.get("b3_share_from_23s"))
        if m["scenario"] != "heterogeneous" and m.get("b0_at_most_1_after_s") is not None:
            other = ("%s; " % other if other else "") + "b0 <= 1 conn %gs after the event" % m["b0_at_most_1_after_s"]
        if wrk:
            se = m["socket_errors"]
            other = ("%s; " % other if other else "") + "sock err c/r/w/t %d/%d/%d/%d, non-2xx %d" % (
                se["connect"], se["read"], se["write"], se["timeout"], m["non_2xx"])
        mode = m["mode"] if m["mode"] != "max-age" else "max-age %gs" % MAX_AGE
        rows.append([m["scenario"], m["clients"], m["policy"], mode, str(m["requests"]),
                     common.num(m["rps"], 0), _pct(m["b0_share_from_15s"]), str(m["failures"]),
                     common.ms(m["p50"] if wrk else m["p50_from_15s"]),
                     common.ms(m["p99"] if wrk else m["p99_from_15s"]), closes, conns, other])
    out = ["Pool scenarios (%s; pools: %d x %d connections; p50/p99: pools from t=%g s, wrk whole run):"
           % (pools.get("note", ""), POOLS, POOL_CONNECTIONS, MEASURE_FROM),
           common.table(headers, rows, right=[False] * 4 + [True] * 8 + [False])]
    for name, t in pools.get("targets", {}).items():
        if name == "pools_slow_backend":
            b = t["before"]
            out.append("target %s: %s -> b0 %s %%, %d failures, p99 %s ms: %s (rebalance off: b0 %s %%, "
                       "%s failures, p99 %s ms)"
                       % (name, t["goal"], _pct(t["b0_share_from_15s"]), t["failures"], common.ms(t["p99_from_15s"]),
                          t["verdict"].upper(), _pct(b.get("b0_share_from_15s")), b.get("failures"),
                          common.ms(b.get("p99_from_15s"))))
        elif name == "churn":
            out.append("churn (b0 removed at t=%g s, b3 added at t=%g s): %s" % (EVENT_AT, CHURN_ADD_AT, "; ".join(
                "%s: b0 %s %% from %gs, b3 %s %% from %gs, %d failures"
                % (key.replace("/equilibrium", ""), _pct(c["b0_share_from_15s"]), MEASURE_FROM,
                   _pct(c["b3_share_from_23s"]), CHURN_ADD_MEASURE, c["failures"])
                for key, c in t.items() if isinstance(c, dict))))
        else:
            parts = []
            for mode in ("idle", "max-age", "off"):
                w = t.get(mode)
                if w:
                    parts.append("%s: b0 %s %%, socket errors %d, %s req/s, p99 %s ms"
                                 % (mode, _pct(w["b0_share_from_15s"]), sum(w["socket_errors"].values()),
                                    common.num(w["rps"], 0), common.ms(w["p99"])))
            out.append("%s (max_connection_age %gs): %s" % (name, t["max_connection_age_seconds"], "; ".join(parts)))
    if pools.get("warning"):
        out.append("WARNING: " + pools["warning"])
    if pools.get("skipped"):
        out.append("skipped: " + "; ".join(pools["skipped"]))
    return "\n".join(out)


def select_runs(spec: str | None) -> tuple[PoolRun, ...]:
    """Runs whose key contains any of the comma-separated substrings (all when empty)."""
    if not spec:
        return RUNS
    subs = [s for s in spec.split(",") if s]
    got = tuple(r for r in RUNS if any(s in r.key for s in subs))
    if not got:
        raise PoolsError("no pool run matches %r (keys: %s)" % (spec, ", ".join(r.key for r in RUNS)))
    return got
