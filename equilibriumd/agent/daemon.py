"""The agent's main loop: load config, make sure the datapath is pinned,
adopt it, apply weights every tick, reload on SIGHUP, exit on SIGTERM/SIGINT
leaving the datapath in place (a restart or upgrade drops no traffic)."""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from types import FrameType

from .. import config as cfg
from .. import logs
from ..datapath import lifecycle
from ..datapath.maps import Datapath
from ..datapath.telemetry import TelemetryDelta, TelemetryReader
from .lock import AgentLock
from .routing import Router
from .reconcile import CapacityError, Reconciler


@dataclass
class AgentOptions:
    config_path: str
    cgroup: str
    pin_dir: str
    reload_datapath: bool = False
    telemetry: bool = True


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
        if rep.added or rep.removed or rep.tables_written:
            self.log.info("config_applied", file=config.source, services=len(config.services),
                          added=rep.added, removed=rep.removed, tables=rep.tables_written)

    # --- lifecycle --------------------------------------------------------------
    def start(self) -> None:
        """Everything up to the first applied config; raises on any failure."""
        self.config = cfg.load(self.opts.config_path)  # refuse a bad file before touching the kernel
        self.lock.acquire()
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

    def reload(self) -> bool:
        """SIGHUP: apply the file only if it is entirely valid."""
        try:
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
        self.last = self.telemetry.tick(self.rec.epochs, self.rec.id_span())
        self.apply(self.config, self.last)
        self.ticks += 1

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
                self.log.error("tick_failed", error=str(e))
        self.log.info("stopped", note="datapath left in place; 'equilibriumd teardown' removes it")

    def close(self) -> None:
        if self.dp is not None:
            self.dp.close()
        self.lock.release()
