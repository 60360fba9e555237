"""Benchmark: the live tick of the real agent at node scale.

For each size (services x backends per service) this runs the real agent
(`equilibriumd run`, policy equilibrium, tick 0.5 s) as a child process
pinned to one core, on a real datapath attached to a child cgroup in which
nothing runs, and feeds it telemetry from a synthetic generator that writes
the kernel's per-CPU telemetry counters (`eq_tel_be`) every 0.5 s, as sockops
and the HTTP parser would: per backend, a Poisson number of requests and
responses, time-to-first-byte sums from a per-backend lognormal latency, a
few 5xx and unanswered requests, a few slow and a few failing backends, and
traffic that comes and goes (a third of the backends idle in any tick). The
agent reads the maps, runs the engine over every service, writes changed
tables: the whole live path, timed by the agent itself (its `ticks` admin
command), after a warm-up. The agent serves /metrics on 127.0.0.1 as the
DaemonSet runs it, scraped every SCRAPE_EVERY seconds as Prometheus would
(`--no-metrics`: not served).

    scripts/bench agent [--sizes 10x3,100x8,1024x4,1024x16,4096x16] [--seconds 30] [--no-metrics] [--json FILE]

Prints a table (median, p95, max tick in ms; tables written per tick; the
agent's RSS: the median and the most of samples taken at random instants about
once a second under traffic, and its peak RSS since start, the config's parse and
one `status` request included) and writes JSON (default bench-results/agent.json).
Targets (issue 11): <= 20 ms median at 1,024x16, <= 100 ms at 4,096x16,
RSS <= 64 MB at 1,024x16, linear growth.

Safety: the datapath is attached only to a child cgroup this script creates
(no process runs in it), the pins live in their own directory, addresses are
in 127.0.0.0/8 and nothing connects to them but the scrapes of /metrics on
127.0.0.1; all of it is removed at the end,
also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import ctypes as ct
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from ...agent import admin
from ...cgroups import cgroup2_root
from ...datapath import constants, libbpf, lifecycle, pins
from ...datapath.structs import CB_COUNTERS, BeTel, Cb, TelGroup
from ...datapath.telemetry import COUNTER
from .common import machine

SIZES = ((10, 3), (100, 8), (1024, 4), (1024, 16), (4096, 16))
TICK = 0.5
#: caller cgroups per backend in the generated evidence (eq_tel_cb entries: backends x CALLERS)
CALLERS = 3
#: seconds between RSS samples; the table shows their median and their most
RSS_EVERY = 1.0
#: seconds between scrapes of /metrics (the agent serves them as the DaemonSet runs it)
SCRAPE_EVERY = 10.0
TARGETS = {"1024x16": {"median_ms": 20.0, "rss_mb": 64.0}, "4096x16": {"median_ms": 100.0}}
REPO = Path(__file__).resolve().parents[3]


def config_text(services: int, backends: int) -> str:
    """A standalone config: service s on 127.2.x.y:80, its backends on 127.1.x.y:8000+b."""
    lines = ["tick: %gs" % TICK, "policy: equilibrium", "services:"]
    for s in range(services):
        hi, lo = divmod(s, 256)
        lines += ["  - name: svc-%d" % s, "    frontend: 127.2.%d.%d:80" % (hi, lo), "    backends:"]
        lines += ["      - address: 127.1.%d.%d:%d" % (hi, lo, 8000 + b) for b in range(backends)]
    return "\n".join(lines) + "\n"


class Generator:
    """Writes cumulative per-CPU telemetry for backend ids [0, n) into eq_tel_be, and
    each tick's traffic split over CALLERS caller cgroups per backend into eq_tel_cb."""

    def __init__(self, pin_dir: str, n: int, seed: int = 0) -> None:
        self.fd = libbpf.obj_get(pins.map_pin(pin_dir, "eq_tel_be"))
        self.cb_fd = libbpf.obj_get(pins.map_pin(pin_dir, "eq_tel_cb"))
        self.ncpu = libbpf.possible_cpus()
        self.n = n
        self.rng = np.random.default_rng(seed)
        dt = np.dtype([("c", np.uint64, (len(COUNTER),))])
        assert dt.itemsize == ct.sizeof(BeTel)
        groups = -(-n // constants.TEL_GROUP)            # eq_tel_be holds TEL_GROUP backends a key
        assert ct.sizeof(TelGroup) == constants.TEL_GROUP * dt.itemsize
        self.vals = np.zeros((groups, self.ncpu, constants.TEL_GROUP), dtype=dt)   # everything counted on CPU 0
        self.keys = np.arange(groups, dtype=np.uint32)
        # per backend: mean latency (most 2-50 ms, 3 % slow, 1 % failing) and load
        self.latency = self.rng.lognormal(np.log(0.01), 0.6, n)
        self.latency[self.rng.random(n) < 0.03] *= 20
        self.error_rate = np.where(self.rng.random(n) < 0.01, 0.5, 0.002)
        self.rate = self.rng.uniform(5, 60, n)          # requests per tick when busy
        # evidence: backend b is called by CALLERS cgroups (ids 1000 + (b + k) % 64), in
        # its first slots; each slot holds its caller's share of this tick's traffic
        assert ct.sizeof(Cb) == constants.CB_SLOTS * 8 * (2 + len(CB_COUNTERS)) and CALLERS <= constants.CB_SLOTS
        self.cb_keys = np.arange(n, dtype=np.uint32)
        self.cb_vals = np.zeros((n, constants.CB_SLOTS, 2 + len(CB_COUNTERS)), dtype=np.uint64)
        self.cb_vals[:, :CALLERS, 0] = 1000 + (np.arange(n)[:, None] + np.arange(CALLERS)) % 64

    def step(self) -> None:
        rng, n = self.rng, self.n
        busy = rng.random(n) > 1 / 3
        req = np.where(busy, rng.poisson(self.rate), 0).astype(np.uint64)
        err5 = rng.binomial(req.astype(np.int64), self.error_rate).astype(np.uint64)
        lost = rng.binomial((req - err5).astype(np.int64), 0.001).astype(np.uint64)
        ok = req - err5 - lost
        answered = ok + err5
        lat = self.latency * rng.lognormal(0.0, 0.3, n)
        c = self.vals["c"][:, 0]                          # (groups, TEL_GROUP, counters): a view
        pad = np.zeros(c.shape[0] * c.shape[1], dtype=np.uint64)
        for name, add in (("attempts", req // 8), ("established", req // 8), ("closed", req // 8),
                          ("requests", req), ("resp_2xx", ok), ("resp_5xx", err5), ("req_errors", lost),
                          ("req_ns_sum", (answered * lat * 1e9).astype(np.uint64)),
                          ("conn_ns_sum", (req // 8) * np.uint64(50_000))):
            pad[:n] = add
            c[..., COUNTER[name]] += pad.reshape(c.shape[:2])
        libbpf.map_update_batch(self.fd, self.keys.ctypes.data_as(ct.c_void_p),
                                self.vals.ctypes.data_as(ct.c_void_p), len(self.keys))
        v = self.cb_vals
        v[:, :CALLERS, 1] = time.monotonic_ns()
        for name, add in (("attempts", req // 8), ("established", req // 8), ("requests", req),
                          ("responses", answered), ("resp_5xx", err5), ("req_errors", lost),
                          ("req_ns_sum", (answered * lat * 1e9).astype(np.uint64))):
            v[:, :CALLERS, 2 + CB_COUNTERS.index(name)] = (add // np.uint64(CALLERS))[:, None]
        libbpf.map_update_batch(self.cb_fd, self.cb_keys.ctypes.data_as(ct.c_void_p),
                                v.ctypes.data_as(ct.c_void_p), len(self.cb_keys))

    def close(self) -> None:
        os.close(self.fd)
        os.close(self.cb_fd)


def _rss(pid: int) -> dict[str, int]:
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon"):
                out[k] = int(v.split()[0]) * 1024
    return out


def _sample_rss(pid: int, end: float, out: list[dict[str, int]]) -> None:
    """RSS samples at random instants (mean RSS_EVERY apart) until `end`: random, so
    they do not lock onto one phase of the agent's tick (in it or between ticks)."""
    rng = np.random.default_rng()
    while True:
        time.sleep(float(rng.uniform(0.5, 1.5)) * RSS_EVERY)
        if time.monotonic() >= end:
            return
        out.append(_rss(pid))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> float:
    """One Prometheus scrape of the agent's /metrics; its seconds."""
    t = time.monotonic()
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=60) as r:
        body = r.read()
    assert b"equilibrium_agent_ticks_total" in body, "the agent's metrics are served"
    return time.monotonic() - t


def measure(services: int, backends: int, seconds: float, warmup: float, cpu: int,
            metrics: bool = True) -> dict[str, Any]:
    tag = "eqbench-agent-%d-%dx%d" % (os.getpid(), services, backends)
    cg = os.path.join(cgroup2_root(), tag)
    pin_dir = "/sys/fs/bpf/" + tag
    work = Path(tempfile.mkdtemp(prefix=tag + "-"))
    proc: subprocess.Popen[bytes] | None = None
    gen: Generator | None = None
    port = _free_port() if metrics else 0
    scrapes: list[float] = []
    try:
        os.mkdir(cg)
        cfg = work / "agent.yaml"
        cfg.write_text(config_text(services, backends))
        log = open(work / "agent.log", "wb")
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "equilibriumd", "run", "--config", str(cfg), "--cgroup", cg, "--pin-dir", pin_dir,
             "--metrics-addr", "127.0.0.1:%d" % port if port else "off", "--log-level", "warning",
             "--state-file", "off"],   # every run starts afresh
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
            preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
        while True:  # up once the admin socket answers
            if proc.poll() is not None:
                raise RuntimeError("agent exited (rc=%s): %s"
                                   % (proc.returncode, (work / "agent.log").read_text()[-2000:]))
            try:
                st = admin.ask(pin_dir, {"cmd": "ticks"}, timeout=2.0)
                if st.get("ok"):
                    break
            except (OSError, admin.AgentUnavailable):
                pass
            if time.monotonic() - t0 > 600:
                raise RuntimeError("agent not up after 600 s")
            time.sleep(0.2)
        startup = time.monotonic() - t0
        gen = Generator(pin_dir, services * backends)
        gen.step()
        end_warm = time.monotonic() + warmup
        while time.monotonic() < end_warm:
            time.sleep(TICK)
            gen.step()
        before = admin.ask(pin_dir, {"cmd": "ticks"})
        end = time.monotonic() + seconds
        samples: list[dict[str, int]] = []
        sampler = threading.Thread(target=_sample_rss, args=(proc.pid, end, samples), daemon=True)
        sampler.start()
        next_scrape = time.monotonic() + SCRAPE_EVERY / 2
        while time.monotonic() < end:
            time.sleep(TICK)
            gen.step()
            if port and time.monotonic() >= next_scrape:   # as Prometheus would, between ticks or not
                scrapes.append(_scrape(port))
                next_scrape += SCRAPE_EVERY
        sampler.join()
        after = admin.ask(pin_dir, {"cmd": "ticks"})
        mem = {k: float(np.median([m.get(k, 0) for m in samples])) for k in ("VmRSS", "RssAnon")}
        rss_max = max(m.get("VmRSS", 0) for m in samples)   # a sample may land inside a tick
        t_status = time.monotonic()
        status = admin.ask(pin_dir, {"cmd": "status"}, timeout=120)   # what `equilibriumctl status` costs
        status_seconds = time.monotonic() - t_status
        assert len(status.get("services", [])) == services, "status lists every service"
        new = after["ticks"] - before["ticks"]
        d = np.array(after["durations_seconds"][-new:] if new > 0 else [], dtype=np.float64) * 1e3
        return {
            "size": "%dx%d" % (services, backends), "services": services, "backends_per_service": backends,
            "backends": services * backends, "ticks": int(new),
            "median_ms": float(np.median(d)) if d.size else None,
            "p95_ms": float(np.percentile(d, 95)) if d.size else None,
            "max_ms": float(d.max()) if d.size else None,
            "overruns": int(after["overruns"]) - int(before["overruns"]),
            "tables_written_per_tick": (after["tables_written_total"] - before["tables_written_total"]) / max(new, 1),
            "rss_mb": mem.get("VmRSS", 0) / 2 ** 20, "rss_max_mb": rss_max / 2 ** 20,
            "hwm_mb": _rss(proc.pid).get("VmHWM", 0) / 2 ** 20,
            "anon_mb": mem.get("RssAnon", 0) / 2 ** 20, "startup_seconds": startup,
            "status_seconds": status_seconds, "metrics_served": bool(port),
            "scrape_seconds_max": max(scrapes) if scrapes else None, "scrapes": len(scrapes),
        }
    finally:
        if gen is not None:
            gen.close()
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if os.path.isdir(pin_dir):
            lifecycle.teardown(pin_dir)
        if os.path.isdir(cg):
            os.rmdir(cg)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench agent", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=",".join("%dx%d" % s for s in SIZES),
                    help="services x backends per service, comma-separated")
    ap.add_argument("--seconds", type=float, default=30.0, help="measured seconds per size (after the warm-up)")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds of traffic before measuring")
    ap.add_argument("--cpu", type=int, default=1, help="the one core the agent runs on")
    ap.add_argument("--metrics", action=argparse.BooleanOptionalAction, default=True,
                    help="serve /metrics (as the DaemonSet does) and scrape it every %gs" % SCRAPE_EVERY)
    ap.add_argument("--json", default="bench-results/agent.json")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("scripts/bench agent: run as root", file=sys.stderr)
        return 2
    try:
        sizes = [tuple(int(x) for x in s.lower().split("x")) for s in args.sizes.split(",") if s]
        assert all(len(s) == 2 and s[0] > 0 and s[1] > 0 for s in sizes)
    except (ValueError, AssertionError):
        print("scripts/bench agent: --sizes takes SxB[,SxB...], e.g. 1024x16", file=sys.stderr)
        return 2
    for s, b in sizes:
        if s > constants.MAX_SERVICES or s * b > constants.MAX_BACKENDS or b > constants.MAX_BACKENDS_PER_SERVICE:
            print("scripts/bench agent: %dx%d is over the node limits" % (s, b), file=sys.stderr)
            return 2
    rows = []
    print("%-9s %6s %8s %8s %8s %6s %8s %8s %8s %8s %8s" % ("size", "ticks", "median", "p95", "max", "over",
                                                            "tables", "rss", "rss max", "peak", "start"))
    print("%-9s %6s %8s %8s %8s %6s %8s %8s %8s %8s %8s" % ("", "", "ms", "ms", "ms", "", "/tick", "MB", "MB", "MB",
                                                            "s"))
    for s, b in sizes:
        print("[bench] %dx%d: starting the agent ..." % (s, b), file=sys.stderr, flush=True)
        r = measure(s, b, args.seconds, args.warmup, args.cpu, args.metrics)
        rows.append(r)
        print("%-9s %6d %8.1f %8.1f %8.1f %6d %8.0f %8.1f %8.1f %8.1f %8.1f" % (
            r["size"], r["ticks"], r["median_ms"] or 0, r["p95_ms"] or 0, r["max_ms"] or 0, r["overruns"],
            r["tables_written_per_tick"], r["rss_mb"], r["rss_max_mb"], r["hwm_mb"], r["startup_seconds"]),
            flush=True)
    by = {r["size"]: r for r in rows}
    verdict: dict[str, Any] = {}
    for size, t in TARGETS.items():
        got = by.get(size)
        if got is None:
            continue
        for k, limit in t.items():
            verdict["%s %s <= %g" % (size, k, limit)] = {"value": got[k], "met": got[k] is not None and got[k] <= limit}
    # linear growth (or better): per backend, the largest size costs no more than 1.5x what the
    # smallest size from 1,000 backends costs (fixed costs make small sizes dearer per backend)
    big = sorted((r for r in rows if r["median_ms"] and r["backends"] >= 1000), key=lambda r: r["backends"])
    if len(big) >= 2:
        ratio = (big[-1]["median_ms"] / big[-1]["backends"]) / (big[0]["median_ms"] / big[0]["backends"])
        verdict["linear growth: ms per backend, largest size / smallest from 1,000 backends <= 1.5"] = {
            "value": ratio, "met": ratio <= 1.5}
    print("\n== targets")
    for k, v in verdict.items():
        print("  %-70s %8.2f  %s" % (k, v["value"] or float("nan"), "met" if v["met"] else "MISSED"))
    settings = {"tick_seconds": TICK, "seconds": args.seconds, "warmup": args.warmup, "cpu": args.cpu,
                "metrics_served": args.metrics, "scrape_every_seconds": SCRAPE_EVERY if args.metrics else None}
    out = {"sizes": rows, "targets": verdict, "settings": settings, "machine": machine()}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print("[bench] wrote %s" % args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
