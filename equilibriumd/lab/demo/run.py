"""scripts/demo: orchestration (cgroup, backends, agent, load, timeline, figures, clean-up)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ...agent import admin
from ...cgroups import cgroup2_root
from ..testbed import TestBackends, TestBackendsError
from . import analysis, topology, view

PY = sys.executable
SLOWED_SERVICE = "bus"
SLOWED_INDEX = 0
ADDED_LATENCY = 0.5
FULL_DURATION = 80.0
FULL_SLOW_AT, FULL_RESTORE_AT = 20.0, 60.0
#: Scenario 3: from FULL_FLOOD_AT for FULL_FLOOD_SECONDS the `ticket` pods (a child
#: cgroup of the demo's) flood `trajet`, whose backends serve TRAJET_CAPACITY
#: requests/s each (a FIFO queue); trajet runs `enforce: throttle`
FLOOD_SERVICE, FLOODER = "trajet", "ticket"
FULL_FLOOD_AT, FULL_FLOOD_SECONDS = 30.0, 20.0
FLOOD_RATE, TRAJET_CAPACITY = 300.0, 60.0
#: after containment, the backlog the flood's first seconds left is served before
#: the honest callers' p99 is compared with before the flood
FLOOD_SETTLE = 8.0
TARGETS = {  # name: (goal text, test)
    "shift_seconds": ("<= 5 s", lambda v: v is not None and v <= 5.0),
    "recovery_seconds": ("<= 30 s", lambda v: v is not None and v <= 30.0),
    "oscillation": ("<= 0.05", lambda v: v is not None and v <= 0.05),
    "agent_rss_bytes": ("<= 64 MiB", lambda v: v is not None and v <= 64 * 2 ** 20),
    "agent_tick_seconds_median": ("<= 10 ms", lambda v: v is not None and v <= 0.010),
    "agent_tick_seconds_max": ("<= 10 ms", lambda v: v is not None and v <= 0.010),
    "bus_connections_per_second": (">= 200", lambda v: v is not None and v >= 200.0),
    "flood_contained_seconds": ("<= 5 s", lambda v: v is not None and v <= 5.0),
    "forgiven_seconds": ("<= 30 s", lambda v: v is not None and v <= 30.0),
    "honest_p99_ratio_during_flood": ("<= 1.2", lambda v: v is not None and v <= 1.2),
}
#: --clients pooled: the offered load is requests, not connections (a pooled request opens none)
RATE_TARGET = {"new": "bus_connections_per_second", "pooled": "bus_requests_per_second"}
#: the rebalancer's close reasons (datapath.constants.RB_REASONS, as its log events name them)
RB_REASONS = ("excess", "drain", "max_age")
#: the load generator's per-target figures of --clients pooled, copied into summary.load
POOL_KEYS = ("pools", "pool_size", "connections_opened", "requests_reused", "dead_replaced",
             "dead_replaced_by_backend", "waited", "wait_max_seconds", "pool_peak")


def targets_for(clients: str) -> dict[str, tuple[str, Any]]:
    """TARGETS, with the load-rate target named for what the clients send."""
    return {(RATE_TARGET[clients] if k == RATE_TARGET["new"] else k): v for k, v in TARGETS.items()}


class DemoError(RuntimeError):
    pass


def timeline_for(duration: float) -> dict[str, Any]:
    if duration >= FULL_DURATION:
        return {"slow_at": FULL_SLOW_AT, "restore_at": FULL_RESTORE_AT, "flood_at": FULL_FLOOD_AT,
                "flood_seconds": FULL_FLOOD_SECONDS, "end": duration, "scaled": False,
                "note": "events at fixed times: bus slowed 20-60 s, ticket floods trajet 30-50 s"}
    k = duration / FULL_DURATION
    return {"slow_at": round(0.25 * duration, 3), "restore_at": round(0.75 * duration, 3),
            "flood_at": round(FULL_FLOOD_AT * k, 3), "flood_seconds": round(FULL_FLOOD_SECONDS * k, 3),
            "end": duration, "scaled": True,
            "note": "duration < %gs: events scaled to the run's length" % FULL_DURATION}


class Records:
    """Reads the load generator's output as it grows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.f: Any = None
        self.partial = ""
        self.start: float | None = None
        self.summary: dict[str, Any] | None = None
        self.by_service: dict[str, list[dict[str, Any]]] = {}

    def poll(self) -> int:
        if self.f is None:
            if not self.path.exists():
                return 0
            self.f = open(self.path)
        data = self.f.read()
        if not data:
            return 0
        data = self.partial + data
        lines = data.split("\n")
        self.partial = lines.pop()
        n = 0
        for line in lines:
            if not line:
                continue
            r = json.loads(line)
            if "s" in r:
                self.by_service.setdefault(r["s"], []).append(r)
                n += 1
            elif "start" in r:
                self.start = r["start"]
            elif "summary" in r:
                self.summary = r["summary"]
        return n

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


class Demo:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.out = Path(a.out)
        self.pid = os.getpid()
        self.cgroup: str | None = None
        self.flood: subprocess.Popen[bytes] | None = None   # Scenario 3's flood (its own child cgroup)
        self.flood_cgroup: str | None = None
        self.flood_started: float | None = None             # wall clock (the agent's log is)
        self._flood_ino = 0
        self.pin_dir = "/sys/fs/bpf/eqdemo-%d" % self.pid
        self.backends: TestBackends | None = None
        self.agent: subprocess.Popen[bytes] | None = None
        self.loadgen: subprocess.Popen[bytes] | None = None
        self.services: list[topology.Service] = []
        self.samples: list[dict[str, Any]] = []
        self.tick_durations: list[float] = []
        self.last_status: dict[str, Any] | None = None
        self.notes: list[str] = []
        self.live = not a.headless and sys.stdout.isatty()
        self.pinned = False
        self.agent_hwm: int | None = None
        self.kernel: dict[str, Any] | None = None
        self.final_status: dict[str, Any] | None = None   # the agent's status once the load ended
        self.pooled = a.clients == "pooled"
        self.loadavg: tuple[float, float, float] = (0.0, 0.0, 0.0)

    # -- setup --------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        if not self.live:
            print("demo: " + msg, flush=True)

    def setup(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        for stale in ("agent.log", "loadgen.log", "records.jsonl", "agent-timeline.jsonl"):
            (self.out / stale).unlink(missing_ok=True)
        self.services, source = topology.load(self.a.topology)
        self.say("topology %s: %s" % (source, ", ".join("%s %s x%d" % (s.name, s.frontend, len(s.backends))
                                                        for s in self.services)))
        if not any(s.name == SLOWED_SERVICE for s in self.services):
            raise DemoError("the topology has no %r service to slow down" % SLOWED_SERVICE)
        try:
            root = cgroup2_root()
        except FileNotFoundError:
            raise DemoError("no cgroup2 hierarchy mounted (scripts/setup mounts one)") from None
        cg = os.path.join(root, "eqdemo-%d" % self.pid)
        if os.path.realpath(cg) == os.path.realpath(root):
            raise DemoError("refusing to use the root cgroup")
        os.mkdir(cg)
        self.cgroup = cg
        self._start_backends()
        cfg = self.out / "runtime-config.yaml"
        cfg.write_text("# written by scripts/demo from the UrbanMove topology (ports as served)\n"
                       + topology.runtime_config(self.services, tick=self.a.tick,
                                                 enforce={FLOOD_SERVICE: "throttle"}, rebalance=self.a.rebalance))
        metrics = self._metrics_addr()
        self.pinned = True  # from here on, teardown is due
        try:
            self._start_agent(cfg, cg, metrics)
        except DemoError as e:
            if metrics == "off" or "cannot serve /metrics" not in str(e):
                raise
            self.notes.append("%s was taken when the agent started: it runs without /metrics" % metrics)
            self.say(self.notes[-1])
            self._start_agent(cfg, cg, "off")
        assert self.agent is not None
        self.say("agent pid %d running (policy equilibrium, tick %gs), attached to %s, pins in %s"
                 % (self.agent.pid, self.a.tick, cg, self.pin_dir))

    def _start_agent(self, cfg: Path, cg: str, metrics: str) -> None:
        path = self.out / "agent.log"
        start = path.stat().st_size if path.exists() else 0
        log = open(path, "ab")
        self.agent = subprocess.Popen([PY, "-m", "equilibriumd", "run", "--config", str(cfg), "--cgroup", cg,
                                       "--pin-dir", self.pin_dir, "--metrics-addr", metrics],
                                      stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      start_new_session=True)
        log.close()
        self._wait_running(path, start, 240)

    def _metrics_addr(self) -> str:
        """The agent's /metrics address: as asked, or with "auto" the agent's default
        127.0.0.1:9500 if that port is free, else off (another agent may hold it)."""
        if self.a.metrics_addr != "auto":
            return str(self.a.metrics_addr)
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", 9500))
            return "127.0.0.1:9500"
        except OSError:
            self.notes.append("127.0.0.1:9500 is taken: the agent runs without /metrics")
            return "off"
        finally:
            s.close()

    def _start_backends(self) -> None:
        listen, names, behaviours = [], [], []
        for s in self.services:
            listen += s.backends
            names += s.backend_names()
            behaviours += [topology.behaviour(s.base_latency)] * len(s.backends)
        try:
            tb = TestBackends(listen, names=names, behaviours=behaviours, seed=1)
        except TestBackendsError as e:
            first = str(e).strip().splitlines()[-1][:200]
            note = ("the configured backend ports are not free (%s); serving the same IPs on ports the kernel "
                    "picked, written to runtime-config.yaml" % first)
            self.notes.append(note)
            self.say(note)
            tb = TestBackends([a.rsplit(":", 1)[0] + ":0" for a in listen], names=names, behaviours=behaviours,
                              seed=1)
        self.backends = tb
        k = 0
        for s in self.services:
            s.served = tb.addrs[k:k + len(s.backends)]
            k += len(s.backends)
        self.say("%d test backends served by pid %s on %s" % (len(tb.addrs), tb.pid, ", ".join(tb.addrs[:3]) + ", ..."))

    def _wait_running(self, path: Path, start: int, timeout: float) -> None:
        assert self.agent is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if b'"running"' in path.read_bytes()[start:]:
                return
            if self.agent.poll() is not None:
                raise DemoError("the agent exited (rc %s):\n%s" % (
                    self.agent.returncode, path.read_bytes()[start:].decode(errors="replace")[-3000:]))
            time.sleep(0.1)
        raise DemoError("the agent did not start within %ds (log: %s)" % (timeout, path))

    # -- the run ------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        assert self.cgroup is not None and self.backends is not None and self.agent is not None
        d = self.a.duration
        tl = timeline_for(d)
        bus = next(s for s in self.services if s.name == SLOWED_SERVICE)
        slowed_name = bus.backend_names()[SLOWED_INDEX]
        # index of the slowed backend among all the test backends (services in order)
        slowed_global = sum(len(s.backends) for s in self.services[:self.services.index(bus)]) + SLOWED_INDEX
        tl.update(slowed_backend="%s (%s)" % (slowed_name, bus.served[SLOWED_INDEX]), slowed_index=SLOWED_INDEX,
                  added_latency_seconds=ADDED_LATENCY)
        slow_beh = topology.behaviour(bus.base_latency, ADDED_LATENCY)
        base_beh = topology.behaviour(bus.base_latency)
        tb = self.backends
        trajet = next((s for s in self.services if s.name == FLOOD_SERVICE), None)
        if trajet is not None:   # a capacity, so a flood queues (its latency is the topology's as before)
            first = sum(len(s.backends) for s in self.services[:self.services.index(trajet)])
            for i in range(len(trajet.backends)):
                tb.set(first + i, capacity=TRAJET_CAPACITY)
        events: list[list[Any]] = [
            [0.0, "even split", None, False],
            [tl["slow_at"], "%s +%dms" % (slowed_name, ADDED_LATENCY * 1e3),
             lambda: tb.set(slowed_global, **slow_beh), False],
            [tl["restore_at"], "%s restored" % slowed_name, lambda: tb.set(slowed_global, **base_beh), False],
            [d, "end", None, False],
        ]
        if trajet is not None and any(s.name == FLOODER for s in self.services):
            events.insert(2, [tl["flood_at"], "%s floods %s (%g/s for %gs)" % (
                FLOODER, FLOOD_SERVICE, FLOOD_RATE, tl["flood_seconds"]),
                lambda: self._start_flood(trajet, tl["flood_seconds"]), False])
        records_path = self.out / "records.jsonl"
        targets = []
        for s in self.services:
            host, port = s.frontend_addr()
            rate = self.a.bus_rate if s.name == SLOWED_SERVICE else self.a.rate
            targets += ["--target", "%s=%s:%d@%g" % (s.name, host, port, rate)]
        if self.pooled:
            targets += ["--clients", "pooled", "--pools", str(self.a.pools), "--pool-size", str(self.a.pool_size)]
        lg_log = open(self.out / "loadgen.log", "wb")
        self.loadgen = subprocess.Popen(
            [PY, "-m", "equilibriumd.lab.loadgen", "--cgroup", self.cgroup, "--duration", "%g" % d, "--out",
             str(records_path), "--timeout", "2", "--seed", "1"] + targets,
            stdout=lg_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        lg_log.close()
        rec = Records(records_path)
        deadline = time.monotonic() + 30
        while rec.start is None:
            rec.poll()
            if self.loadgen.poll() is not None:
                raise DemoError("the load generator exited (rc %s): %s" % (
                    self.loadgen.returncode, (self.out / "loadgen.log").read_text(errors="replace")[-2000:]))
            if time.monotonic() > deadline:
                raise DemoError("the load generator did not start")
            time.sleep(0.02)
        t0 = rec.start
        how = ("requests from keep-alive pools (%d pools of at most %d connections per service)"
               % (self.a.pools, self.a.pool_size) if self.pooled else "each request a new connection")
        self.say("load: %s %s, Poisson arrivals, from %s"
                 % (", ".join("%s %g/s" % (s.name, self.a.bus_rate if s.name == SLOWED_SERVICE else self.a.rate)
                              for s in self.services), how, self.cgroup))
        timeline_f = open(self.out / "agent-timeline.jsonl", "w")
        next_poll = next_frame = time.monotonic()
        next_line = 10.0
        last_ticks = None
        try:
            while True:
                now = time.monotonic()
                t = now - t0
                for ev in events:
                    if not ev[3] and t >= ev[0]:
                        if ev[2] is not None:
                            ev[2]()
                        ev[3] = True
                        if ev[0] > 0:
                            self.say("t=%5.1fs  %s" % (t, ev[1]))
                if now >= next_poll:
                    next_poll = now + 0.25
                    last_ticks = self._poll_agent(t, last_ticks, timeline_f)
                rec.poll()
                if now >= next_frame:
                    next_frame = now + 1.0
                    if self.live:
                        sys.stdout.write(view.CLEAR + view.render(self._frame(t, d, events, rec)) + "\n")
                        sys.stdout.flush()
                    elif t >= next_line and t < d:
                        next_line += 10.0
                        self.say("t=%5.1fs  %s" % (t, self._line(t, rec)))
                if self.loadgen.poll() is not None:
                    break
                if t > d + 30:
                    raise DemoError("the load generator did not finish")
                time.sleep(0.05)
        finally:
            timeline_f.close()
        self.agent_hwm = self._vm_hwm()
        self.kernel = self._kernel_counters()
        try:
            st = admin.ask(self.pin_dir, {"cmd": "status"}, timeout=5.0)
            self.final_status = st if st.get("ok") else None
        except admin.AgentUnavailable as e:
            self.notes.append("no final agent status: %s" % e)
        self.loadavg = os.getloadavg()
        rec.poll()
        rec.close()
        if self.loadgen.returncode != 0 or rec.summary is None:
            raise DemoError("the load generator failed (rc %s): %s" % (
                self.loadgen.returncode, (self.out / "loadgen.log").read_text(errors="replace")[-2000:]))
        return self._summarize(rec, tl, t0)

    def _start_flood(self, trajet: topology.Service, seconds: float) -> None:
        """Scenario 3: the ticket pods (their own cgroup) send FLOOD_RATE requests/s to trajet.

        A new connection per request also under --clients pooled: `enforce: throttle`
        holds a caller to its budget at connect(), and a pooled flooder would connect
        a few times and then never again (nothing for the throttle to refuse), while
        its pools would cap it at pools x size requests in flight: that is not the
        connect flood Scenario 3 is about. The honest callers are pooled."""
        assert self.cgroup is not None
        self.flood_cgroup = os.path.join(self.cgroup, FLOODER)
        os.mkdir(self.flood_cgroup)
        self._flood_ino = os.stat(self.flood_cgroup).st_ino   # the caller's cgroup id
        host, port = trajet.frontend_addr()
        self.flood_started = time.time()
        log = open(self.out / "flood.log", "wb")
        self.flood = subprocess.Popen(
            [PY, "-m", "equilibriumd.lab.loadgen", "--cgroup", self.flood_cgroup, "--duration", "%g" % seconds,
             "--out", str(self.out / "flood.jsonl"), "--timeout", "2", "--seed", "2",
             "--target", "%s=%s:%d@%g" % (FLOOD_SERVICE, host, port, FLOOD_RATE)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def _flood_figures(self, reqs: dict[str, analysis.Requests], tl: dict[str, Any]) -> dict[str, Any]:
        """Scenario 3's figures from the agent's log (punished / forgiven) and trajet's honest requests."""
        out: dict[str, Any] = {"flood_contained_seconds": None, "forgiven_seconds": None,
                               "honest_p99_ratio_during_flood": None}
        if self.flood_started is None or self.flood_cgroup is None:
            return out
        if self.flood is not None:
            try:
                self.flood.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        ino = self._flood_ino
        end = self.flood_started + tl["flood_seconds"]
        punished: list[float] = []
        forgiven: list[float] = []
        for line in (self.out / "agent.log").read_text(errors="replace").splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if e.get("cgroup") != ino or e.get("event") not in ("caller_punished", "caller_forgiven"):
                continue
            ts = datetime.datetime.fromisoformat(str(e["timestamp"]).replace("Z", "+00:00")).timestamp()
            (punished if e["event"] == "caller_punished" else forgiven).append(ts)
        contained = next((t - self.flood_started for t in punished if t >= self.flood_started - 1), None)
        out["flood_contained_seconds"] = None if contained is None else round(max(contained, 0.0), 3)
        out["forgiven_seconds"] = next((round(t - end, 3) for t in forgiven if t >= end - 1), None)
        r = reqs.get(FLOOD_SERVICE)
        if r is not None and contained is not None:
            before = analysis.percentile(r.latencies(5.0, tl["flood_at"]))
            after = analysis.percentile(r.latencies(tl["flood_at"] + contained + FLOOD_SETTLE,
                                                    tl["flood_at"] + tl["flood_seconds"]))
            out.update(honest_p99_before_flood_seconds=before, honest_p99_contained_seconds=after,
                       honest_p99_whole_flood_seconds=analysis.percentile(
                           r.latencies(tl["flood_at"], tl["flood_at"] + tl["flood_seconds"])))
            if before and after is not None:
                out["honest_p99_ratio_during_flood"] = round(after / before, 3)
        try:
            lines = [json.loads(x) for x in (self.out / "flood.jsonl").read_text().splitlines() if x.strip()]
            summ = lines[-1].get("summary", {}).get("targets", {}).get(FLOOD_SERVICE, {})
            out["flood_load"] = {k: summ.get(k) for k in ("sent", "ok", "errors", "achieved_rate")}
        except (OSError, ValueError, IndexError):
            out["flood_load"] = None
        return out

    def _poll_agent(self, t: float, last_ticks: int | None, timeline_f: Any) -> int | None:
        try:
            st = admin.ask(self.pin_dir, {"cmd": "status"}, timeout=2.0)
        except admin.AgentUnavailable as e:
            assert self.agent is not None
            if self.agent.poll() is not None:
                raise DemoError("the agent exited (rc %s); see %s" % (self.agent.returncode,
                                                                      self.out / "agent.log")) from None
            self.notes.append("status not available at t=%.1f: %s" % (t, e))
            return last_ticks
        if not st.get("ok"):
            return last_ticks
        self.last_status = st
        ticks = st["agent"].get("ticks")
        if ticks == last_ticks:
            return last_ticks
        bus = next((s for s in st["services"] if s["name"] == SLOWED_SERVICE), None)
        dur = st["agent"].get("last_tick_duration_seconds")
        if dur is not None and ticks:
            self.tick_durations.append(float(dur))
        if bus is not None:
            self.samples.append({"t": t, "ticks": ticks, "weights": [b["probability"] for b in bus["backends"]],
                                 "distance": bus.get("distance"), "regret_potential": bus.get("regret_potential"),
                                 "status": bus.get("status"),
                                 "rebalanced": [sum((b.get("rebalanced") or {}).values()) for b in bus["backends"]]})
            timeline_f.write(json.dumps({"t": round(t, 3), "ticks": ticks, "tick_duration_seconds": dur,
                                         "bus": bus}) + "\n")
        return ticks  # type: ignore[no-any-return]

    def _weight_oscillation(self, fig: dict[str, Any]) -> float | None:
        smp = [x for x in self.samples if x.get("weights")]
        v = analysis.weight_oscillation([x["t"] for x in smp], [x["weights"] for x in smp],
                                        list(fig["oscillation_windows"].values()))
        return None if v is None else round(v, 4)

    def _rebalance_figures(self, tl: dict[str, Any]) -> dict[str, Any]:
        """What the agent's rebalancer closed: its `connections_rebalanced` log events, its
        per-backend counters at the end (final status), and when it first closed a
        connection of the slowed backend after the slow-down (the status polled each tick)."""
        by = {r: 0 for r in RB_REASONS}
        events = 0
        problems: list[str] = []
        path = self.out / "agent.log"
        for line in (path.read_text(errors="replace").splitlines() if path.exists() else []):
            try:
                e = json.loads(line)
            except ValueError:
                continue
            name = e.get("event")
            if name == "connections_rebalanced":
                events += 1
                for r in RB_REASONS:
                    by[r] += int(e.get(r, 0) or 0)
            elif name in ("rebalance_unavailable", "rebalance_netns_denied"):
                problems.append("%s: %s" % (name, e.get("reason")))
        fs = self.final_status or {}
        per: dict[str, dict[str, int | None]] = {}
        for s in self.services:
            st = next((x for x in fs.get("services", []) if x.get("name") == s.name), None)
            bl = (st or {}).get("backends") or []
            per[s.name] = {n: (None if i >= len(bl) or bl[i].get("rebalanced") is None
                               else int(sum(bl[i]["rebalanced"].values())))
                           for i, n in enumerate(s.backend_names())}
        bus = next(s for s in self.services if s.name == SLOWED_SERVICE)
        slowed_name = bus.backend_names()[SLOWED_INDEX]
        first = None
        base = None
        for smp in self.samples:
            n = (smp.get("rebalanced") or [None] * (SLOWED_INDEX + 1))[SLOWED_INDEX]
            if n is None:
                continue
            if smp["t"] < tl["slow_at"]:
                base = n
            elif n > (base or 0):
                first = round(smp["t"] - tl["slow_at"], 3)
                break
        agent = fs.get("agent") or {}
        return {"mode": self.a.rebalance or "idle (the agent's default)",
                "available": agent.get("rebalance"), "walks": agent.get("rebalance_walks_total"),
                "events": events, "closed_total": sum(by.values()), "closed_by_reason": by,
                "closed_by_backend": per, "slowed_backend": slowed_name,
                "slowed_backend_closed": per.get(SLOWED_SERVICE, {}).get(slowed_name),
                "slowed_backend_first_close_after_slow_seconds": first, "problems": problems}

    def _pool_figures(self, load: dict[str, Any], errors: int, total: int) -> dict[str, Any]:
        """The pools over every service: connections opened and reused, dead ones replaced."""
        def tot(k: str) -> int:
            return sum(int(x.get(k) or 0) for x in load.values())
        dead: dict[str, int] = {}
        for x in load.values():
            for b, n in (x.get("dead_replaced_by_backend") or {}).items():
                dead[b] = dead.get(b, 0) + int(n)
        reused = tot("requests_reused")
        return {"pools_per_service": self.a.pools, "pool_size": self.a.pool_size,
                "connections_opened": tot("connections_opened"), "requests_reused": reused,
                "reuse_ratio": round(reused / total, 4) if total else None,
                "dead_replaced": tot("dead_replaced"), "dead_replaced_by_backend": dict(sorted(dead.items())),
                "waited": tot("waited"),
                "wait_max_seconds": max((float(x.get("wait_max_seconds") or 0.0) for x in load.values()), default=0.0),
                "failed_requests": errors}

    def _kernel_counters(self) -> dict[str, Any] | None:
        """`equilibriumctl backends bus -o json`: the in-kernel cumulative counters."""
        r = subprocess.run([PY, "-m", "equilibriumd.cli.ctl", "backends", SLOWED_SERVICE, "-o", "json",
                            "--pin-dir", self.pin_dir], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            self.notes.append("equilibriumctl backends %s failed: %s" % (SLOWED_SERVICE, r.stderr.strip()[-300:]))
            return None
        data = json.loads(r.stdout)
        return {b["address"]: {k: b.get(k) for k in ("selections_total", "connections_total", "requests_total",
                                                     "responses_2xx_total", "latency_p50_seconds",
                                                     "latency_p99_seconds", "rebalanced")}
                for b in data["backends"]}

    def _vm_hwm(self) -> int | None:
        assert self.agent is not None
        try:
            with open("/proc/%d/status" % self.agent.pid) as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def _recent(self, rec: Records, name: str, t0: float, t: float) -> list[dict[str, Any]]:
        lo, hi = t0 + t - 2.0, t0 + t - 1.0  # the last second whose requests have (mostly) finished
        out = []
        for r in reversed(rec.by_service.get(name, [])):
            if r["t"] < lo - 3.0:  # records arrive in completion order: allow for slow ones
                break
            if lo <= r["t"] < hi:
                out.append(r)
        return out

    def _frame(self, t: float, d: float, events: list[list[Any]], rec: Records) -> dict[str, Any]:
        assert rec.start is not None
        st = self.last_status or {}
        status = {s["name"]: s for s in st.get("services", [])}
        svcs = []
        for s in self.services:
            recent = self._recent(rec, s.name, rec.start, t)
            names = s.backend_names()
            counts = [sum(1 for r in recent if r.get("b") == n) for n in names]
            tot = sum(counts)
            lat = sorted(r["lat"] for r in recent if r.get("st") == 200)
            p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None
            ss = status.get(s.name, {})
            bl = ss.get("backends", [])
            slowed = s.name == SLOWED_SERVICE
            svcs.append({
                "name": s.name, "status": ss.get("status"), "distance": ss.get("distance"),
                "rate": len(recent), "p99": p99,
                "errors": sum(1 for r in rec.by_service.get(s.name, []) if r.get("st") != 200),
                "backends": [{"name": n, "weight": bl[i]["probability"] if i < len(bl) else None,
                              "share": counts[i] / tot if tot else None,
                              "note": "<- slowed" if slowed and i == SLOWED_INDEX and events[1][3] and not events[2][3]
                              else ""} for i, n in enumerate(names)]})
        return {"t": t, "duration": d, "events": [(e[0], e[1], e[3]) for e in events], "agent": st.get("agent"),
                "services": svcs, "unit": "requests" if self.pooled else "new connections"}

    def _line(self, t: float, rec: Records) -> str:
        assert rec.start is not None
        bus = next(s for s in self.services if s.name == SLOWED_SERVICE)
        recent = self._recent(rec, bus.name, rec.start, t)
        names = bus.backend_names()
        counts = [sum(1 for r in recent if r.get("b") == n) for n in names]
        tot = sum(counts) or 1
        w = self.samples[-1]["weights"] if self.samples else []
        return "bus shares %s  weights %s  (%d req/s)" % (
            " ".join("%.2f" % (c / tot) for c in counts), " ".join("%.2f" % (x or 0) for x in w), len(recent))

    # -- figures -------------------------------------------------------------------------
    def _summarize(self, rec: Records, tl: dict[str, Any], t0: float) -> dict[str, Any]:
        d = tl["end"]
        reqs = {s.name: analysis.Requests.from_records(rec.by_service.get(s.name, []), s.backend_names(), t0)
                for s in self.services}
        bus = reqs[SLOWED_SERVICE]
        fig = analysis.figures(bus, SLOWED_INDEX, tl["slow_at"], tl["restore_at"], d)
        lsum = rec.summary or {}
        load = {}
        for name, x in (lsum.get("targets") or {}).items():
            load[name] = {k: x[k] for k in ("offered_rate", "achieved_rate", "sent", "ok", "errors", "skipped",
                                            "max_inflight", "lag_max_seconds", "lag_mean_seconds")}
            if self.pooled:
                load[name].update({k: x.get(k) for k in POOL_KEYS})
        total = sum(len(r.t) for r in reqs.values())
        errors = sum(int((~r.ok).sum()) for r in reqs.values())
        td = self.tick_durations
        tick = ({"median": statistics.median(td), "p95": sorted(td)[int(0.95 * (len(td) - 1))], "max": max(td),
                 "samples": len(td)} if td else {"median": None, "p95": None, "max": None, "samples": 0})
        rate = load.get(SLOWED_SERVICE, {}).get("achieved_rate")
        flood = self._flood_figures(reqs, tl)
        clients = self.a.clients
        measured = {"shift_seconds": fig["shift_seconds"], "recovery_seconds": fig["recovery_seconds"],
                    "oscillation": fig["oscillation"], "agent_rss_bytes": self.agent_hwm,
                    "agent_tick_seconds_median": tick["median"], "agent_tick_seconds_max": tick["max"],
                    RATE_TARGET[clients]: rate,
                    **{k: flood[k] for k in ("flood_contained_seconds", "forgiven_seconds",
                                             "honest_p99_ratio_during_flood")}}
        targets = {k: {"goal": g, "value": measured[k], "met": bool(test(measured[k]))}
                   for k, (g, test) in targets_for(clients).items()}
        per_service = {}
        for name, r in reqs.items():
            sh = r.shares(0.0, d)
            per_service[name] = {"requests": int(len(r.t)), "errors": int((~r.ok).sum()),
                                 "p99_latency_seconds": analysis.percentile(r.latencies(0.0, d)),
                                 "shares": None if sh is None else [round(float(x), 4) for x in sh],
                                 "backends": dict(zip(r.names, next(s for s in self.services
                                                                    if s.name == name).served))}
        match = None
        if self.kernel:
            served = next(x for x in self.services if x.name == SLOWED_SERVICE).served
            if self.pooled:   # the kernel selected a backend per connection: the requests that opened one
                index = {n: i for i, n in enumerate(bus.names)}
                client = np.zeros(bus.n_backends, dtype=np.int64)
                for x in rec.by_service.get(SLOWED_SERVICE, []):
                    if x.get("reused") is False and x.get("b") in index:
                        client[index[x["b"]]] += 1
            else:
                client = np.bincount(bus.backend[bus.backend >= 0], minlength=bus.n_backends)
            match = all(self.kernel.get(addr, {}).get("selections_total") == int(client[i])
                        for i, addr in enumerate(served))
        agent_shift = None
        for smp in self.samples:
            if smp["t"] >= tl["slow_at"] and smp["weights"] and (smp["weights"][SLOWED_INDEX] or 0) <= 0.05:
                agent_shift = round(smp["t"] - tl["slow_at"], 3)
                break
        unit = "requests" if self.pooled else "new connections"
        rebalance = self._rebalance_figures(tl)
        summary: dict[str, Any] = {
            "demo": "urbanmove", "policy": "equilibrium", "duration_seconds": d,
            "clients": clients,
            "shift_seconds": fig["shift_seconds"],
            "recovery_seconds": fig["recovery_seconds"],
            "oscillation": fig["oscillation"],
            "oscillation_slow_period": fig["oscillation_slow_period"],
            "oscillation_after_recovery": fig["oscillation_after_recovery"],
            "agent_weight_oscillation": self._weight_oscillation(fig),
            "p99_latency_seconds": fig["p99_latency_seconds"],
            "agent_rss_bytes": self.agent_hwm,
            "agent_tick_seconds": tick,
            "flood": flood,
            "flood_contained_seconds": flood["flood_contained_seconds"],
            "forgiven_seconds": flood["forgiven_seconds"],
            "honest_p99_ratio_during_flood": flood["honest_p99_ratio_during_flood"],
            "targets": targets,
            "all_targets_met": all(t["met"] for t in targets.values()),
            "client_errors": errors, "requests_total": total,
            "client_error_ratio": round(errors / total, 6) if total else None,
            "failed_requests": errors,
            "rebalance": rebalance,
            "connections_rebalanced": rebalance["closed_total"],
            **({"pooled": self._pool_figures(load, errors, total)} if self.pooled else {}),
            "agent_weight_shift_seconds": agent_shift,
            "kernel_counters_bus": self.kernel,
            "kernel_selections_match_client": match,
            "host": {"cpus": os.cpu_count(), "loadavg_1_5_15_at_end": [round(x, 2) for x in self.loadavg]},
            "timeline": tl,
            "bus": {k: fig[k] for k in ("slowed_share_settled", "shares_before", "shares_during", "shares_after",
                                         "oscillation_windows", "p99_windows")},
            "load": load,
            "services": per_service,
            "agent": {"pid": self.agent.pid if self.agent else None, "pin_dir": self.pin_dir, "cgroup": self.cgroup,
                      "ticks": (self.last_status or {}).get("agent", {}).get("ticks"),
                      "tick_period_seconds": self.a.tick},
            "definitions": {
                "shift_seconds": "t - t_slow for the first t at which the slowed backend's share of %s "
                                 "started in [t-1, t) is <= 5 %% and stays <= 5 %% (checked every 0.1 s) until t+3"
                                 % unit,
                "shares": "by the X-Backend of each answered request, by its start time; %s"
                          % ("pooled: where requests went, whatever connection carried them (a connection "
                             "carries many)" if self.pooled else "every request is a new connection"),
                "recovery_seconds": "t - t_restore for the first t at which its share in [t-2, t) is within "
                                    "0.05 of 1/3",
                "agent_weight_oscillation": "max over bus backends of the std-dev of the agent's weights (one "
                                            "sample per tick) in the oscillation windows: the agent's own "
                                            "steadiness, beside the shares' (which also carry the clients' noise)",
                "oscillation": "max over bus backends of the std-dev of their shares in 1 s windows, in "
                               "[t_slow+shift+5, t_restore) and [t_restore+recovery+5, end); the larger of both",
                "p99_latency_seconds": "bus requests started in [0, t_slow), [t_slow+5, t_restore), "
                                       "[t_restore+recovery, end); successful requests, connect to last byte",
                "agent_rss_bytes": "VmHWM of the agent process (/proc/PID/status) at the end of the run",
                "agent_tick_seconds": "agent.last_tick_duration_seconds from the admin socket (equilibriumctl "
                                      "status), one sample per tick seen; wall-clock, so it includes time the "
                                      "agent was not scheduled (see host.loadavg)",
                "kernel_counters_bus": "equilibriumctl backends bus -o json at the end of the load: cumulative "
                                       "in-kernel counters (selections include the load's requests and nothing else "
                                       "in the demo cgroup)",
                "kernel_selections_match_client": "every bus backend's in-kernel selections equal the number of "
                                                  "answered requests the load generator saw from it (X-Backend)"
                                                  + ("; pooled: of the requests that opened a new connection "
                                                     "(the kernel selects per connection)" if self.pooled else ""),
                "connections_rebalanced": "connections the agent's rebalancer closed (the sum of its "
                                          "connections_rebalanced log events); rebalance.closed_by_backend: its "
                                          "per-backend counters at the end (equilibriumctl backends: MOVED)",
                "failed_requests": "requests that got no HTTP 200 (timeouts, refused, reset, closed, 5xx)"
                                   + ("; pooled: a pooled connection found closed before reuse is replaced, "
                                      "not a failure (load.*.dead_replaced)" if self.pooled else ""),
                "agent_weight_shift_seconds": "time from t_slow until the agent's weight for the slowed backend "
                                              "is <= 0.05 (status polled every 0.25 s)",
            },
            "files": {"out_dir": str(self.out), "records": str(self.out / "records.jsonl"),
                      "agent_timeline": str(self.out / "agent-timeline.jsonl"),
                      "agent_log": str(self.out / "agent.log"),
                      "runtime_config": str(self.out / "runtime-config.yaml")},
            "notes": self.notes,
        }
        png = self.out / "urbanmove.png"
        try:
            from .plot import plot
            plot(str(png), bus, self.samples, tl, summary)
            summary["plot"] = str(png)
        except ImportError as e:
            summary["plot"] = None
            self.notes.append("no plot: %s (scripts/setup installs the demo extra: pip install -e '.[demo]')" % e)
        return summary

    # -- clean-up ------------------------------------------------------------------------
    def cleanup(self) -> list[str]:
        problems: list[str] = []
        for name, p, wait in (("load generator", self.loadgen, 5), ("flood", self.flood, 5),
                              ("agent", self.agent, 15)):
            if p is None:
                continue
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)  # by PID: only what we started
                try:
                    p.wait(timeout=wait)
                except subprocess.TimeoutExpired:
                    problems.append("%s pid %d ignored SIGTERM; killed" % (name, p.pid))
                    p.kill()
                    p.wait(timeout=5)
        if self.pinned:
            r = subprocess.run([PY, "-m", "equilibriumd", "teardown", "--pin-dir", self.pin_dir],
                               capture_output=True, text=True)
            if r.returncode != 0 or os.path.exists(self.pin_dir):
                problems.append("teardown of %s: rc %d %s"
                                % (self.pin_dir, r.returncode, (r.stderr or r.stdout)[-500:]))
        if self.backends is not None:
            self.backends.close()
        for path in (self.flood_cgroup, self.cgroup):   # the child first
            if path is None:
                continue
            err: OSError | None = None
            for _ in range(50):
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    err = e
                    time.sleep(0.1)
            else:
                problems.append("could not remove %s: %s" % (path, err))
        return problems


def _raise_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def run(a: argparse.Namespace) -> int:
    demo = Demo(a)
    old: dict[signal.Signals, Any] = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        old[sig] = signal.signal(sig, _raise_exit)
    summary = None
    rc = 1
    try:
        demo.setup()
        summary = demo.run()
        rc = 0
    except KeyboardInterrupt:
        print("\ndemo: interrupted; cleaning up", file=sys.stderr)
        rc = 130
    except DemoError as e:
        print("demo: %s" % e, file=sys.stderr)
    finally:
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        problems = demo.cleanup()
        for s, h in old.items():
            signal.signal(s, h)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for p in problems:
            print("demo: clean-up: %s" % p, file=sys.stderr)
    if summary is None:
        return rc
    summary["clean_up"] = {"ok": not problems, "problems": problems}
    text = json.dumps(summary, indent=2)
    (demo.out / "summary.json").write_text(text + "\n")
    if a.summary:
        Path(a.summary).write_text(text + "\n")
    print()
    print(view.summary_table(summary))
    print()
    print("demo: summary %s%s, plot %s" % (demo.out / "summary.json", " and " + a.summary if a.summary else "",
                                          summary.get("plot") or "(none: %s)" % "; ".join(summary["notes"][-1:])))
    if a.check and not summary["all_targets_met"]:
        print("demo: --check: missed %s" % ", ".join(k for k, t in summary["targets"].items() if not t["met"]),
              file=sys.stderr)
        return 3
    return 0


def main(argv: list[str] | None = None, doc: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/demo", description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=FULL_DURATION,
                    help="seconds of load (default 80: slow at 20 s, restore at 60 s; shorter runs scale "
                         "the events to 25 %% and 75 %%)")
    ap.add_argument("--headless", action="store_true", help="no live terminal view (for CI and scripts)")
    ap.add_argument("--summary", help="also write the summary JSON to this file")
    ap.add_argument("--check", action="store_true", help="exit with status 3 if a target is missed")
    ap.add_argument("--out", default="demo-out", help="directory for the plot, summary and logs (default demo-out)")
    ap.add_argument("--clients", choices=("new", "pooled"), default="new",
                    help="new (default): every request a new connection, so every request is a routing decision; "
                         "pooled: the same requests at the same rates from HTTP/1.1 keep-alive pools (--pools per "
                         "service, of at most --pool-size connections; LIFO reuse, a dead idle connection replaced "
                         "without failing its request): the kernel steers the connections the pools open and the "
                         "agent's rebalancer closes idle ones of backends over their share. Shares are measured on "
                         "requests; the summary adds the rebalancer's closes and the failed requests. The flood "
                         "stays a new connection per request")
    ap.add_argument("--pools", type=int, default=8, help="--clients pooled: pools per service (default 8)")
    ap.add_argument("--pool-size", type=int, default=8,
                    help="--clients pooled: most connections a pool holds (default 8)")
    ap.add_argument("--rebalance", choices=("idle", "off"),
                    help="the agent's rebalance.mode (default: not set, the agent's default idle); off shows "
                         "pooled clients without connection rebalancing")
    ap.add_argument("--bus-rate", type=float, default=250.0,
                    help="requests per second to bus (default 250, Poisson; --clients new: each a new connection)")
    ap.add_argument("--rate", type=float, default=50.0, help="requests per second to each other service")
    ap.add_argument("--tick", type=float, default=0.5, help="agent tick in seconds (default 0.5)")
    ap.add_argument("--metrics-addr", default="auto",
                    help="the agent's Prometheus /metrics address (default: 127.0.0.1:9500 if free, else off)")
    ap.add_argument("--topology", help="standalone config to serve (default daemonset/examples/urbanmove/"
                                       "standalone.yaml; needs a 'bus' service)")
    a = ap.parse_args(argv)
    if a.duration < 8:
        ap.error("--duration must be at least 8 seconds")
    if a.pools < 1 or a.pool_size < 1:
        ap.error("--pools and --pool-size must be at least 1")
    if os.geteuid() != 0:
        print("scripts/demo: run as root (it loads BPF programs)", file=sys.stderr)
        return 2
    return run(a)
