"""The agent's main loop: load config, make sure the datapath is pinned,
adopt it, apply weights every tick, reload on SIGHUP, exit on SIGTERM/SIGINT
leaving the datapath in place (a restart or upgrade drops no traffic)."""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any

from .. import config as cfg
from .. import logs
from ..datapath import lifecycle
from ..datapath.maps import Datapath
from ..datapath.telemetry import TelemetryDelta, TelemetryReader
from .admin import AdminServer
from .lock import AgentLock
from .routing import Router
from .reconcile import CapacityError, Reconciler


#: a routing probability moving by this much in one tick is logged
WEIGHT_EVENT_THRESHOLD = 0.1


@dataclass
class AgentOptions:
    config_path: str
    cgroup: str
    pin_dir: str
    reload_datapath: bool = False
    telemetry: bool = True
    metrics_addr: str = "127.0.0.1:9500"  #: /metrics "host:port"; "" or "off" disables
    kubernetes: bool = False  #: services from the cluster (equilibriumd.discovery) instead of the file
    node_name: str = ""       #: this node, with kubernetes (pods on it name the callers)


class Agent:
    def __init__(self, opts: AgentOptions) -> None:
        self.opts = opts
        self.log = logs.get("agent")
        self.stop_event = threading.Event()
        self.reload_requested = False
        self.config: cfg.Config | None = None
        self.dp: Datapath | None = None
        self.rec: Reconciler | None = None
        self.telemetry: TelemetryReader | None = None
        self.router = Router()
        self.last: TelemetryDelta | None = None  #: the latest tick's telemetry, per backend id
        self.ticks = 0
        self.lock = AgentLock(opts.pin_dir)
        self.started = time.time()
        self.last_tick_duration = 0.0
        self.last_success = 0.0
        self.map_errors = 0
        self.snapshot: dict[str, Any] = {"agent": {}, "services": []}
        self.admin: AdminServer | None = None
        self.kube: Any = None  #: discovery.KubernetesSource with --kubernetes
        self.pods: Any = None  #: discovery.PodIdentity: caller cgroup id -> "namespace/pod"
        self.metrics: Any = None  #: metrics.MetricsServer when /metrics is on

    # --- signals ------------------------------------------------------------
    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stop_event.set()

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self.reload_requested = True
        self.stop_event.set()  # wake the loop; it clears this for a reload

    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)

    # --- weights --------------------------------------------------------------
    def backend_ids(self, config: cfg.Config) -> dict[str, list[int]]:
        """Backend ids per service in config order (empty until first applied)."""
        assert self.rec is not None
        out = {}
        for s in config.services:
            a = self.rec.services.get(s.name)
            if a is not None and all(b.address in a.backends for b in s.backends):
                out[s.name] = [a.backends[b.address] for b in s.backends]
        return out

    def apply(self, config: cfg.Config, delta: TelemetryDelta | None = None) -> None:
        assert self.rec is not None
        self.router.set_params(config.equilibrium)
        weights = self.router.weights(config, self.backend_ids(config), delta)
        rep = self.rec.apply(config, weights)
        if rep.added or rep.removed:
            self.log.info("config_applied", file=config.source, services=len(config.services),
                          added=rep.added, removed=rep.removed, tables=rep.tables_written)
        elif rep.tables_written:
            self.log.debug("tables_written", services=rep.tables_written)

    # --- lifecycle --------------------------------------------------------------
    def start(self) -> None:
        """Everything up to the first applied config; raises on any failure."""
        # refuse a bad file before touching the kernel; with Kubernetes the file is
        # optional and only sets tick, policy and the equilibrium constants
        base = cfg.load(self.opts.config_path) if self.opts.config_path else cfg.parse("services: []\n", "<kubernetes>")
        self.lock.acquire()
        if self.opts.kubernetes:
            from ..discovery import KubernetesSource, PodIdentity  # only here: kubernetes is heavy

            self.kube = KubernetesSource(self.opts.node_name, lambda _c: self._on_hup(0, None), base=base)
            self.kube.start()
            self.pods = PodIdentity(self.opts.node_name, self.kube.api)
            self.pods.start()
            base = self.kube.wait_for_first(timeout=120)  # TimeoutError is an OSError: start_failed
        self.config = base
        t0 = time.perf_counter()
        res = lifecycle.ensure_loaded(self.opts.pin_dir, self.opts.cgroup, force=self.opts.reload_datapath,
                                      telemetry=self.opts.telemetry)
        self.log.info("datapath_ready", pin_dir=self.opts.pin_dir, cgroup=self.opts.cgroup, loaded=res.ran_loader,
                      reason=res.reason, seconds=round(time.perf_counter() - t0, 3),
                      compile_seconds=res.details.get("compile_seconds"))
        self.dp = Datapath(self.opts.pin_dir)
        self.rec = Reconciler(self.dp)
        self.telemetry = self.dp.telemetry()
        n = self.rec.adopt()
        if n:
            self.log.info("adopted", services=n)
        self.apply(self.config)
        self.publish()
        self.admin = AdminServer(self.opts.pin_dir, self.answer)
        if self.opts.metrics_addr not in ("", "off"):
            from .. import metrics  # only when serving: prometheus_client costs ~4 MB of RSS

            self.metrics = metrics.start_metrics_server(self, self.opts.metrics_addr)  # OSError names the address
        if self.metrics is not None:
            self.log.info("metrics_listening", addr=self.metrics.addr)

    def reload(self) -> bool:
        """SIGHUP: apply the file only if it is entirely valid."""
        try:
            if self.kube is not None:  # a cluster change, or SIGHUP for the file's settings
                if self.opts.config_path:
                    self.kube.set_base(cfg.load(self.opts.config_path))
                new = self.kube.latest()
                if new is None or new == self.config:
                    return True
            else:
                new = cfg.load(self.opts.config_path)
            self.apply(new)
        except (cfg.ConfigError, CapacityError) as e:
            self.log.error("config_refused", file=self.opts.config_path, error=str(e))
            return False
        self.config = new
        self.log.info("config_reloaded", file=self.opts.config_path, services=len(new.services))
        return True

    def tick(self) -> None:
        assert self.config is not None and self.telemetry is not None and self.rec is not None
        t0 = time.perf_counter()
        self.last = self.telemetry.tick(self.rec.epochs, self.rec.id_span())
        self.apply(self.config, self.last)
        self.ticks += 1
        self.last_tick_duration = time.perf_counter() - t0
        self.last_success = time.time()
        self.publish()

    # --- what operators see ------------------------------------------------------
    def publish(self) -> None:
        """Build the snapshot the admin socket and /metrics read, and log transitions."""
        snap = build_snapshot(self)
        prev = {s["name"]: s for s in self.snapshot.get("services", [])}
        for svc in snap["services"]:
            old = prev.get(svc["name"])
            if old is None:
                continue
            if old["status"] != svc["status"] and "converged" in (old["status"], svc["status"]):
                self.log.info("equilibrium_reached" if svc["status"] == "converged" else "equilibrium_lost",
                              service=svc["name"], distance=svc["distance"])
            for ob, nb in zip(old["backends"], svc["backends"]):
                if ob["address"] != nb["address"]:
                    continue
                if not ob["quarantined"] and nb["quarantined"]:
                    self.log.warning("backend_quarantined", service=svc["name"], backend=nb["address"],
                                     p_failing=nb["p_failing"])
                elif ob["quarantined"] and not nb["quarantined"]:
                    self.log.info("backend_restored", service=svc["name"], backend=nb["address"])
            moved = [abs((nb["probability"] or 0) - (ob["probability"] or 0))
                     for ob, nb in zip(old["backends"], svc["backends"]) if ob["address"] == nb["address"]]
            if moved and max(moved) >= WEIGHT_EVENT_THRESHOLD:
                self.log.info("weights_changed", service=svc["name"],
                              weights={b["address"]: round(b["probability"] or 0, 3) for b in svc["backends"]})
        self.snapshot = snap

    def answer(self, req: dict[str, Any]) -> dict[str, Any]:
        """Admin socket requests (runs on the admin thread; reads the snapshot only)."""
        snap = self.snapshot
        cmd = req.get("cmd")
        if cmd == "status":
            return {"ok": True, **snap}
        if cmd == "explain":
            name = req.get("service")
            for svc in snap.get("services", []):
                if svc["name"] == name:
                    return {"ok": True, "agent": snap["agent"], "explain": svc}
            return {"ok": False, "error": "no service %r (known: %s)" % (
                name, ", ".join(s["name"] for s in snap.get("services", [])) or "none")}
        if cmd == "callers":  # pod names for per-caller counts (only with --kubernetes)
            names = self.pods.names() if self.pods is not None else {}
            return {"ok": True, "pods": {str(k): v for k, v in names.items()}}
        return {"ok": False, "error": "unknown command %r (status, explain, callers)" % (cmd,)}

    def run(self) -> None:
        self.start()
        assert self.config is not None
        self.log.info("running", tick_seconds=self.config.tick, policy=self.config.policy)
        while True:
            self.stop_event.wait(self.config.tick)
            if self.reload_requested:
                self.reload_requested = False
                self.stop_event.clear()
                self.reload()
                continue
            if self.stop_event.is_set():
                break
            try:
                self.tick()
            except OSError as e:  # a map write failed: keep the last weights, say so, retry next tick
                self.map_errors += 1
                self.log.error("tick_failed", error=str(e))
        self.log.info("stopped", note="datapath left in place; 'equilibriumd teardown' removes it")

    def close(self) -> None:
        for src in (self.kube, self.pods):
            if src is not None:
                src.stop()
        if self.metrics is not None:  # before dp.close(): a scrape reads the maps
            self.metrics.close()
            self.metrics = None
        if self.admin is not None:
            self.admin.close()
        if self.dp is not None:
            self.dp.close()
        self.lock.release()


def _f(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if v == v and v not in (float("inf"), float("-inf")) else None


def build_snapshot(agent: Agent) -> dict[str, Any]:
    """A JSON-ready picture of the agent and every service, after a tick."""
    config, rec = agent.config, agent.rec
    assert config is not None and rec is not None
    ids = agent.backend_ids(config)
    services = []
    for s in config.services:
        bids = ids.get(s.name, [])
        ex = agent.router.explain(s, config, bids) if bids else {"policy": config.policy_of(s)}
        info = agent.router.info.get(s.name)
        sig = info.signals if info else None
        def col(key: str, i: int) -> Any:
            v = ex.get(key)
            return v[i] if isinstance(v, list) and i < len(v) else None

        backends = []
        for i, b in enumerate(s.backends):
            quarantined = bool(col("quarantined", i))
            backends.append({
                "address": str(b.address), "id": bids[i] if bids else None,
                "state": "quarantined" if quarantined else b.state,
                "configured_weight": b.weight,
                "probability": _f(info.weights[i]) if info and i < len(info.weights) else None,
                "latency_seconds": _at(sig.latency if sig else None, i),
                "requests": _at(sig.requests if sig else None, i),
                "errors": _at(sig.errors if sig else None, i),
                "payoff": _f(col("payoff", i)), "regret": _f(col("regret", i)),
                "effective_latency_seconds": _f(col("effective_latency_seconds", i)),
                "p_failing": _f(col("p_failing", i)), "quarantined": quarantined,
                "toll_seconds": _f(col("tolls_seconds", i)),
            })
        services.append({
            "name": s.name, "frontend": str(s.frontend), "protocol": s.protocol, "policy": config.policy_of(s),
            "balance": config.balance_of(s), "status": ex.get("status", "n/a"), "distance": _f(ex.get("distance")),
            "wardrop_gap_seconds": _f(ex.get("wardrop_gap_seconds")),
            "regret_potential": _f(ex.get("regret_potential")),
            "backends": backends, "changes": ex.get("changes", []),
        })
    return {
        "agent": {
            "pid": os.getpid(), "started_unix": agent.started, "ticks": agent.ticks,
            "tick_seconds": config.tick, "last_tick_duration_seconds": agent.last_tick_duration,
            "last_success_unix": agent.last_success, "map_errors_total": agent.map_errors,
            "config_file": agent.opts.config_path, "pin_dir": agent.opts.pin_dir, "cgroup": agent.opts.cgroup,
            "policy": config.policy, "services": len(config.services),
            "rss_bytes": _rss_bytes(),
        },
        "services": services,
    }


def _at(a: Any, i: int) -> float | None:
    return _f(a[i]) if a is not None and i < len(a) else None


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
