"""Soak benchmark: the real agent for minutes under load and churn (root only).

    scripts/bench soak [--minutes 10] [--json docs/bench-soak.json] [--churn-every 3] [--sample-every 10]

The real agent (`equilibriumd run`, static policy, 0.2 s tick, attached to a
child cgroup made here, its own pin directory) serves three stable services
the whole time: `web` (TCP, a new connection per request, 100 req/s), `pool` (TCP,
keep-alive pools, 100 req/s) and `dns` (UDP, 50 exchanges/s:
half on a socket connected three times in a row, half unconnected `sendto`,
each on a new socket). Every `--churn-every` seconds one change is written
to the config file and the agent reloads it (SIGHUP): a churn service is
added (TCP or UDP, 1-3 backends, and a burst of clients to it for a few
seconds) or removed, or a stable service gains or loses a backend. Clients
run in the child cgroup; backends are test servers on 127.0.0.0/8 and
frontends in 127.77.0.0/16.

Every `--sample-every` seconds: the agent's RSS and the entry count of
every pinned hash map (eq_*), the backend entries in use, the sum of
eq_lb_active and of the telemetry's open-connection gauge. At the end all
clients stop, every churned service and backend is removed (a last
reload), and what is left is reported as leaked: eq_lb_active not zero,
open-connection gauges not zero, socket / reverse-NAT entries remaining,
backend ids still allocated beyond the final config, per-caller entries
(telemetry, budgets) of services that are gone. Client errors
are counted per kind: the stable services' clients should see none, a churn
burst sees its service removed under it. Targets: flat RSS
after the warm-up (the first fifth of the run, at least 30 s when the run
is long enough), zero leaked entries and counts. It measures what the
kernel and the agent do; it hides nothing: a leak shows as a number.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes as ct
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ...cgroups import cgroup2_root
from ...datapath import constants, libbpf, lifecycle, pins
from ...datapath.maps import Datapath
from ..testbed import TestBackends
from . import common
from .agentproc import start_agent
from .datapath import Resources, _raise_exit, make_cgroup, stop_process

#: bpf_map_type values whose entries come and go (hash maps, LRU or not, per-CPU or not)
HASH_TYPES = {1: "hash", 5: "percpu_hash", 9: "lru_hash", 10: "lru_percpu_hash"}
TICK = "0.2s"
SETTLE = 3.0   #: seconds after the clients stop before leaks are counted (closes, ticks)

UDP_SERVER = r'''
import json, selectors, signal, socket, sys
n, base = int(sys.argv[1]), sys.argv[2]
sel, socks = selectors.DefaultSelector(), []
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("%s.%d" % (base, 11 + i), 0)); s.setblocking(False)
    sel.register(s, selectors.EVENT_READ); socks.append(s)
print(json.dumps(["%s:%d" % s.getsockname() for s in socks]), flush=True)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
while True:
    for key, _ in sel.select(1.0):
        try:
            data, peer = key.fileobj.recvfrom(2048)
            key.fileobj.sendto(data, peer)
        except OSError:
            pass
'''

UDP_CLIENT = r'''
import json, os, signal, socket, sys, time
cg, host, port, rate, secs = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
with open(os.path.join(cg, "cgroup.procs"), "w") as f:
    f.write(str(os.getpid()))
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
out = {"sent": 0, "ok": 0, "errors": {}}
end = time.monotonic() + secs if secs > 0 else float("inf")
n = 0
while not stop and time.monotonic() < end:
    n += 1
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1.0)
    try:
        if n % 2:   # connected, three times: each connect is steered (and counted) anew
            for _ in range(3):
                s.connect((host, port))
            s.send(b"x"); s.recv(64)
        else:       # unconnected: steered per datagram, the reply shown from the frontend
            s.sendto(b"x", (host, port)); s.recvfrom(64)
        out["ok"] += 1
    except OSError as e:
        k = type(e).__name__
        out["errors"][k] = out["errors"].get(k, 0) + 1
    finally:
        out["sent"] += 1
        s.close()
    time.sleep(1.0 / rate)
print(json.dumps(out), flush=True)
'''


class SoakError(RuntimeError):
    pass


# --- what the maps hold ------------------------------------------------------------------
def _map_info(fd: int) -> tuple[int, int, int]:
    """(type, key size, max entries) of a map (struct bpf_map_info's first fields)."""
    info = libbpf.obj_info(fd)
    typ, _, key_size, _, max_entries = (int.from_bytes(info[i:i + 4], "little") for i in range(0, 20, 4))
    return typ, key_size, max_entries


def map_counts(pin_dir: str) -> dict[str, int]:
    """Entries in every pinned hash map of the datapath (arrays have a fixed size: left out)."""
    out = {}
    for name in constants.MAPS + constants.REBALANCE_MAPS:
        path = pins.map_pin(pin_dir, name)
        if not os.path.exists(path):
            continue
        fd = libbpf.obj_get(path)
        try:
            typ, key_size, _ = _map_info(fd)
            if typ not in HASH_TYPES:
                continue
            key = type("Key", (ct.Structure,), {"_fields_": [("b", ct.c_uint8 * key_size)]})
            out[name] = sum(1 for _ in libbpf.map_keys(fd, key))
        finally:
            os.close(fd)
    return out


def gauges(dp: Datapath) -> dict[str, Any]:
    """eq_lb_active and the telemetry's open connections, summed over every backend id,
    and the backend entries in use."""
    active = libbpf.array_read(dp.fd["eq_lb_active"], 8, constants.MAX_BACKENDS)
    act = np.frombuffer(active, dtype=np.int64)
    open_conns = dp.telemetry().tick(None, constants.MAX_BACKENDS).open_connections
    used = dp.backends()
    live = set(dp.frontends())
    stale = sum(1 for _, svc, *_ in dp.callers() if svc not in live) + \
        sum(1 for _, svc in dp.budgets() if svc not in live)
    return {"caller_entries_of_gone_services": stale,
            "active_sum": int(act.sum()), "active_nonzero_ids": [int(i) for i in np.nonzero(act)[0][:50]],
            "open_sum": int(np.asarray(open_conns).sum()),
            "open_nonzero_ids": [int(i) for i in np.nonzero(open_conns)[0][:50]],
            "backend_ids_in_use": len(used), "services_in_use": len(dp.frontends())}


def rss_bytes(pid: int) -> int:
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# --- the scenario --------------------------------------------------------------------------
class Soak:
    """The config file, the agent and the clients of one run."""

    def __init__(self, res: Resources, work: Path, seed: int, churn_burst: float) -> None:
        self.res, self.work, self.rng = res, work, random.Random(seed)
        self.burst = churn_burst
        self.cg = make_cgroup(res, cgroup2_root(), "eqsoak-" + secrets.token_hex(4))
        self.pin = "/sys/fs/bpf/eqsoak-" + secrets.token_hex(4)
        res.defer("teardown %s" % self.pin, lambda: _teardown(self.pin))
        self.fe = "127.77.%d" % self.rng.randint(0, 255)
        self.tcp = TestBackends(12, seed=seed)
        res.defer("stop test backends", self.tcp.close)
        self.udp = self._udp_server(6)
        self.stable: dict[str, dict[str, Any]] = {
            "web": self._svc("web", 1, "tcp", self.tcp.addrs[0:3]),
            "pool": self._svc("pool", 2, "tcp", self.tcp.addrs[3:6]),
            "dns": self._svc("dns", 3, "udp", self.udp[0:2]),
        }
        self.initial = {k: list(v["backends"]) for k, v in self.stable.items()}
        self.churn: dict[str, dict[str, Any]] = {}
        self.n_churn = 0
        self.clients: list[tuple[str, subprocess.Popen[bytes], Path | None]] = []
        self.changes: dict[str, int] = {}
        self.cfg = work / "soak.yaml"
        self.write()
        self.log = work / "agent.log"
        self.agent = start_agent(res, self.cfg, self.cg, self.pin, self.log, SoakError)
        self.dp = Datapath(self.pin)
        res.defer("close maps", self.dp.close)

    def _udp_server(self, n: int) -> list[str]:
        p = subprocess.Popen([sys.executable, "-c", UDP_SERVER, str(n), "127.0.%d" % self.rng.randint(1, 250)],
                             stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        self.res.defer("stop udp backends", lambda: stop_process(p, "udp backends"))
        assert p.stdout is not None
        line = p.stdout.readline()
        if not line:
            raise SoakError("the UDP backends did not start")
        return list(json.loads(line))

    def _svc(self, name: str, host: int, proto: str, addrs: list[str]) -> dict[str, Any]:
        return {"name": name, "frontend": "%s.%d:80" % (self.fe, host), "protocol": proto,
                "backends": [{"address": a, "weight": 1} for a in addrs]}

    def write(self) -> None:
        services = list(self.stable.values()) + list(self.churn.values())
        tmp = self.cfg.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump({"tick": TICK, "policy": "static", "services": services}, sort_keys=False))
        os.replace(tmp, self.cfg)

    def reload(self, timeout: float = 30.0) -> None:
        """SIGHUP, and wait until the agent says it reloaded (or refused)."""
        seen = self._events()
        self.agent.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while self._events() == seen:
            if self.agent.poll() is not None:
                raise SoakError("the agent exited (%d): %s" % (self.agent.returncode, self.log.read_text()[-2000:]))
            if time.monotonic() > deadline:
                raise SoakError("no reload within %gs" % timeout)
            time.sleep(0.05)

    def _events(self) -> int:
        text = self.log.read_text(errors="replace")
        return text.count('"config_reloaded"') + text.count('"config_refused"')

    # clients: all in the child cgroup, stopped by PID
    def client(self, kind: str, name: str, addr: str, rate: float, seconds: float) -> None:
        host, port = addr.rsplit(":", 1)
        out: Path | None = None
        if kind.endswith("udp"):
            cmd = [sys.executable, "-c", UDP_CLIENT, self.cg, host, port, str(rate), str(seconds)]
        else:
            out = self.work / ("%s-%d.jsonl" % (name, len(self.clients)))
            cmd = [sys.executable, "-m", "equilibriumd.lab.loadgen", "--cgroup", self.cg, "--target",
                   "%s=%s@%g" % (name, addr, rate), "--duration", str(seconds), "--out", str(out),
                   "--clients", "pooled" if kind.endswith("pooled") else "new", "--timeout", "2"]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        self.res.defer("stop client %d" % p.pid, lambda: stop_process(p, "client"))
        self.clients.append((kind, p, out))

    def churn_step(self) -> str:
        """One change, written and reloaded; returns what it was."""
        r = self.rng.random()
        if r < 0.35 and len(self.churn) < 6:
            self.n_churn += 1
            name = "churn-%d" % self.n_churn
            proto = self.rng.choice(["tcp", "udp"])
            pool = self.tcp.addrs[6:] if proto == "tcp" else self.udp[2:]
            svc = self._svc(name, 10 + self.n_churn % 200, proto, self.rng.sample(pool, self.rng.randint(1, 3)))
            self.churn[name] = svc
            what = "add_service"
        elif r < 0.6 and self.churn:
            name = self.rng.choice(sorted(self.churn))
            del self.churn[name]
            what, svc = "remove_service", {}
        else:
            name = self.rng.choice(["web", "dns"])
            s = self.stable[name]
            pool = self.tcp.addrs[0:3] + self.tcp.addrs[6:9] if name == "web" else self.udp
            have = [b["address"] for b in s["backends"]]
            spare = [a for a in pool if a not in have]
            if len(have) > 1 and (not spare or self.rng.random() < 0.5):
                s["backends"].pop(self.rng.randrange(len(have)))
                what = "remove_backend"
            else:
                s["backends"].append({"address": self.rng.choice(spare), "weight": 1})
                what = "add_backend"
            svc = {}
        self.write()
        self.reload()
        if what == "add_service":   # a burst of traffic while it exists (it may go during the burst)
            kind = "churn-udp" if svc["protocol"] == "udp" else "churn-new"
            self.client(kind, svc["name"], svc["frontend"], 30.0, self.burst)
        self.changes[what] = self.changes.get(what, 0) + 1
        return what

    def sample(self, t: float) -> dict[str, Any]:
        return {"t": round(t, 1), "rss_bytes": rss_bytes(self.agent.pid), "maps": map_counts(self.pin),
                **gauges(self.dp), "clients_running": sum(1 for _, p, _ in self.clients if p.poll() is None)}

    def stop_clients(self) -> dict[str, Any]:
        """Stop every client (SIGTERM: each prints its summary) and add their counts up."""
        tot: dict[str, Any] = {}
        for kind, p, out in self.clients:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
            try:
                stdout, _ = p.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                stdout, _ = p.communicate()
            summ = _summary(stdout, out)
            t = tot.setdefault(kind, {"clients": 0, "sent": 0, "ok": 0, "errors": {}})
            t["clients"] += 1
            t["sent"] += int(summ.get("sent", 0))
            t["ok"] += int(summ.get("ok", 0))
            for k, v in (summ.get("errors") or {}).items():
                t["errors"][k] = t["errors"].get(k, 0) + int(v)
        return tot

    def finish(self) -> None:
        """Every churned service and backend gone: the stable services as they began."""
        self.churn.clear()
        for k, addrs in self.initial.items():
            self.stable[k]["backends"] = list(addrs)
        self.write()
        self.reload()


def _summary(stdout: bytes, out: Path | None) -> dict[str, Any]:
    """A client's summary: the loadgen's last line of its --out file, the UDP client's stdout."""
    try:
        if out is not None:
            last = out.read_text(errors="replace").strip().splitlines()[-1]
            got = json.loads(last).get("summary", {})
            return dict(next(iter(got.get("targets", {}).values()), got)) if "targets" in got else dict(got)
        return dict(json.loads(stdout.decode().strip().splitlines()[-1]))
    except (OSError, ValueError, IndexError, StopIteration):
        return {"errors": {"no summary": 1}}


def _teardown(pin_dir: str) -> None:
    lifecycle.teardown(pin_dir)


# --- the run -----------------------------------------------------------------------------
def run(seconds: float, churn_every: float, sample_every: float, seed: int, rate: float) -> dict[str, Any]:
    res = Resources()
    atexit.register(res.close)
    old = {sig: signal.signal(sig, _raise_exit) for sig in (signal.SIGTERM, signal.SIGHUP)}
    work = Path(tempfile.mkdtemp(prefix="eqsoak-"))
    try:
        common.progress("starting the agent, backends and clients (seed %d)" % seed)
        s = Soak(res, work, seed, churn_burst=max(min(churn_every * 2, 5.0), 1.0))
        s.client("web-new", "web", s.stable["web"]["frontend"], rate, 0)
        s.client("pool-pooled", "pool", s.stable["pool"]["frontend"], rate, 0)
        s.client("dns-udp", "dns", s.stable["dns"]["frontend"], rate / 2, 0)
        t0 = time.monotonic()
        samples = [s.sample(0.0)]
        next_churn, next_sample = t0 + churn_every, t0 + sample_every
        while (now := time.monotonic()) < t0 + seconds:
            if now >= next_churn:
                s.churn_step()
                next_churn += churn_every
            if now >= next_sample:
                samples.append(s.sample(now - t0))
                x = samples[-1]
                common.progress("t=%4.0fs rss %.1f MB, services %d, backend ids %d, active %d, open %d, sock %s, "
                                "rev4 %s, changes %s" % (x["t"], x["rss_bytes"] / 1e6, x["services_in_use"],
                                                         x["backend_ids_in_use"], x["active_sum"], x["open_sum"],
                                                         x["maps"].get("eq_tel_sock"), x["maps"].get("eq_lb4_rev"),
                                                         sum(s.changes.values())))
                next_sample += sample_every
            time.sleep(max(min(next_churn, next_sample) - time.monotonic(), 0.01))
        common.progress("stopping the clients, removing every churned service and backend")
        clients = s.stop_clients()
        s.finish()
        time.sleep(SETTLE)
        end = s.sample(time.monotonic() - t0)
        if s.agent.poll() is not None:
            raise SoakError("the agent exited (%d)" % s.agent.returncode)
        log = s.log.read_text(errors="replace")
        agent_errors = {e: log.count('"%s"' % e) for e in ("tick_failed", "config_refused", "tick_overrun")}
        expected = sum(len(v) for v in s.initial.values())
    finally:
        res.close()
        for sig, h in old.items():
            signal.signal(sig, h)
    return summarise(samples, end, clients, s.changes, expected, agent_errors, seconds, churn_every, seed, rate)


def summarise(samples: list[dict[str, Any]], end: dict[str, Any], clients: dict[str, Any], changes: dict[str, int],
              expected_backends: int, agent_errors: dict[str, int], seconds: float, churn_every: float, seed: int,
              rate: float) -> dict[str, Any]:
    warm = max(seconds / 5, min(30.0, seconds / 2))
    after = [x for x in samples if x["t"] >= warm] or samples[-1:]
    t = np.array([x["t"] for x in after], dtype=float)
    rss = np.array([x["rss_bytes"] for x in after], dtype=float) / 1e6
    slope = float(np.polyfit(t / 60.0, rss, 1)[0]) if len(after) >= 3 else float("nan")
    maps = end["maps"]
    leaks = {
        "active_sum": end["active_sum"], "active_nonzero_ids": end["active_nonzero_ids"],
        "open_connections_sum": end["open_sum"], "open_nonzero_ids": end["open_nonzero_ids"],
        "socket_entries": maps.get("eq_tel_sock", 0),
        "reverse_nat_entries": maps.get("eq_lb4_rev", 0) + maps.get("eq_lb6_rev", 0),
        "reverse_socket_records": maps.get("eq_lb_revsk", 0),
        "backend_ids_beyond_config": end["backend_ids_in_use"] - expected_backends,
        "caller_entries_of_gone_services": end["caller_entries_of_gone_services"],
    }
    total_leaked = sum(abs(v) for v in leaks.values() if isinstance(v, int))
    return {
        "settings": {"seconds": seconds, "churn_every_seconds": churn_every, "tick": TICK, "seed": seed,
                     "rate_per_second": rate, "warmup_seconds": warm},
        "rss": {"warmup_mb": round(float(rss[0]), 2), "end_mb": round(float(samples[-1]["rss_bytes"]) / 1e6, 2),
                "max_mb": round(max(x["rss_bytes"] for x in samples) / 1e6, 2),
                "growth_mb_per_minute": round(slope, 3)},
        "maps_start": samples[0]["maps"], "maps_max": _max_maps(samples), "maps_end": maps,
        "leaks": leaks, "leaked_total": total_leaked,
        "changes": changes, "clients": clients,
        "agent_log": agent_errors, "samples": samples, "machine": common.machine(), "code": _code_state(),
    }


def _max_maps(samples: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in samples:
        for k, v in x["maps"].items():
            out[k] = max(out.get(k, 0), v)
    return out


def _code_state() -> dict[str, Any]:
    """Which code ran: the commit and the files changed since (a soak is only as good as its build)."""
    top = Path(__file__).resolve().parents[3]
    try:
        head = subprocess.run(["git", "-C", str(top), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(top), "status", "--short", "--", "bpf", "equilibriumd"],
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {"commit": head, "changed": [d.strip() for d in dirty if d.strip()]}


def render(r: dict[str, Any]) -> str:
    rows = [["agent RSS after warm-up / end / max", "%.1f / %.1f / %.1f MB" % (
        r["rss"]["warmup_mb"], r["rss"]["end_mb"], r["rss"]["max_mb"]), "flat"],
        ["RSS growth after warm-up", "%.3f MB/min" % r["rss"]["growth_mb_per_minute"], "~0"]]
    for k in sorted(set(r["maps_max"]) | set(r["maps_end"])):
        rows.append(["map %s entries: start / max / end" % k, "%d / %d / %d" % (
            r["maps_start"].get(k, 0), r["maps_max"].get(k, 0), r["maps_end"].get(k, 0)), ""])
    for k, v in r["leaks"].items():
        if isinstance(v, int):
            rows.append(["leaked: %s" % k, str(v), "0"])
    rows.append(["changes (reloads)", ", ".join("%s %d" % kv for kv in sorted(r["changes"].items())), ""])
    for kind, c in sorted(r["clients"].items()):
        rows.append(["clients %s: sent / ok / errors" % kind, "%d / %d / %s" % (c["sent"], c["ok"], c["errors"] or 0),
                     ""])
    rows.append(["agent log", ", ".join("%s %d" % kv for kv in r["agent_log"].items()), ""])
    return common.table(["soak (%.0f s)" % r["settings"]["seconds"], "measured", "target"], rows, [False, True, True])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="how long the load and churn run (default 10)")
    ap.add_argument("--seconds", type=float, help="the same in seconds (overrides --minutes; the CI smoke test)")
    ap.add_argument("--churn-every", type=float, default=3.0, help="seconds between two changes (default 3)")
    ap.add_argument("--sample-every", type=float, default=10.0, help="seconds between two samples (default 10)")
    ap.add_argument("--rate", type=float, default=100.0, help="requests/s of the web and pool clients (UDP: half)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--json", default="bench-results/soak.json")
    a = ap.parse_args(argv)
    seconds = a.seconds if a.seconds is not None else a.minutes * 60
    if seconds <= 0 or a.churn_every <= 0 or a.sample_every <= 0 or a.rate <= 0:
        ap.error("--minutes/--seconds, --churn-every, --sample-every and --rate must be > 0")
    if os.geteuid() != 0:
        print("scripts/bench soak: run as root (it loads BPF programs)", file=sys.stderr)
        return 2
    seed = a.seed if a.seed is not None else random.randrange(1 << 30)
    try:
        result = run(seconds, a.churn_every, a.sample_every, seed, a.rate)
    except SoakError as e:
        print("scripts/bench soak: %s" % e, file=sys.stderr)
        return 1
    result["command"] = " ".join(["scripts/bench", "soak", *(sys.argv[1:] if argv is None else argv)])
    path = common.write_json(a.json, result)
    print(render(result))
    print("\nJSON: %s" % path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
