"""The agent's main loop: load config, make sure the datapath is pinned,
adopt it, resume what was learned from the state file (`persist`), apply
weights every tick, save the learned state every few seconds, reload on
SIGHUP, exit on SIGTERM/SIGINT leaving the datapath in place (a restart or
upgrade drops no traffic, and resumes the weights it had).

The tick keeps a fixed period: ticks start on a fixed grid of the period, a
tick that overruns is logged and counted (`tick_overrun`), and the next one
starts on the next grid point rather than silently stretching the period.
The tick itself only reads telemetry, runs the engine and writes changed
tables; what operators see (the snapshot behind the admin socket and
/metrics) is built when asked, at most once per tick."""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import os
import signal
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from types import FrameType
from typing import Any

import numpy as np

from .. import config as cfg
from .. import logs
from ..datapath import constants, lifecycle
from ..datapath.audit import ActiveAudit
from ..datapath.evidence import EvidenceSource
from ..datapath.maps import Datapath
from ..datapath.telemetry import TelemetryReader
from ..game.convergence import CONVERGED
from ..policy.evidence import Judge, Verdict, by_caller
from . import persist
from .admin import AdminServer
from .enforce import Enforcer
from .follow import Follower
from .lock import AgentLock
from .rebalance import ConnectionRebalancer
from .reconcile import CapacityError, Reconciler
from .routing import Router, build_layout

#: tick durations kept for the status's median / p95 / max
TICK_HISTORY = 1200
#: allocations from this size on are mmapped (and unmapped when freed): see _tune_malloc
MMAP_THRESHOLD = 1 << 20
#: every this many ticks the agent hands free heap pages back (malloc_trim): glibc
#: only trims the top of the heap by itself, and a tick's temporaries (~10 MB at
#: 1,024 x 16) sit below the state it keeps, so without a trim they stay resident.
#: Every tick: RSS at 1,024 x 16 fell from 77.7 MB (median; every 20 ticks) to
#: 70.5 MB, for ~2.5 ms of tick time (page faults when the next tick reuses them).
TRIM_EVERY = 1
#: how often the agent checks eq_lb_active against the open sockets (one pass over eq_tel_sock)
AUDIT_SECONDS = 30.0
#: a config log line names at most this many services (a node has thousands)
NAMES_LOGGED = 20


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
    metrics_backends: int = 128           #: backends with series of their own (metrics.DEFAULT_MAX_BACKENDS)
    kubernetes: bool = False  #: services from the cluster (equilibriumd.discovery) instead of the file
    node_name: str = ""       #: this node, with kubernetes (pods on it name the callers)
    #: the learned state's file (agent.persist); None: next to the lock
    #: (persist.default_path), "" or "off": neither saved nor resumed
    state_file: str | None = None
    state_every: float = persist.SAVE_EVERY   #: seconds between saves (and at a clean exit)
    #: the cross-node coordinator's channel: "off", "kubernetes" (ConfigMaps in $POD_NAMESPACE)
    #: or "dir:PATH" (a local directory, standalone); agent.follow
    coordinator: str = "off"
    coordination_period: float = 10.0   #: seconds between summaries published / recommendations read


class Agent:
    def __init__(self, opts: AgentOptions) -> None:
        self.opts = opts
        self.log = logs.get("agent")
        #: set once a stop is asked for (SIGTERM/SIGINT) and never cleared: a stop that
        #: arrives during a reload or a tick is seen after it (`loop`)
        self.stop_event = threading.Event()
        self.reload_requested = False
        self._wake = threading.Event()   # a stop or reload is waiting: end the loop's sleep
        self._retry_reload = False       # a reload failed part-way: try it again after the next tick
        self.config: cfg.Config | None = None
        self.dp: Datapath | None = None
        self.rec: Reconciler | None = None
        self.telemetry: TelemetryReader | None = None
        #: callers' evidence per backend (eq_tel_cb, mapped), weighed by policy.evidence.judge
        self.evidence: EvidenceSource | None = None
        self.judge = Judge()
        self.enforcer: Enforcer | None = None   #: the cooperation game (agent.enforce)
        self.rebalancer: ConnectionRebalancer | None = None   #: pooled connections (agent.rebalance)
        self.follower: Follower | None = None   #: the cross-node coordinator's side (agent.follow)
        self._evidence_failed = False
        self.router = Router()
        self.ticks = 0
        self.lock = AgentLock(opts.pin_dir)
        self.started = time.time()
        self.last_tick_duration = 0.0
        self.tick_durations: deque[float] = deque(maxlen=TICK_HISTORY)
        self.tick_overruns = 0
        self.last_success = 0.0
        self.map_errors = 0
        self.tick_errors = 0       #: ticks that raised (logged with traceback; the loop went on)
        #: per service: policy steps that raised (routing.Router.failed has the current ones)
        self.service_errors: dict[str, int] = {}
        self._audit: ActiveAudit | None = None   #: eq_lb_active against the open sockets (real datapath)
        self._audit_due = 0.0
        self.tables_written = 0
        self._snapshot: tuple[int, dict[str, Any]] | None = None   # (tick it was built at, snapshot)
        self._metrics_snapshot: tuple[tuple[int, int], dict[str, Any]] | None = None   # ((tick, budget), snapshot)
        self._state_lock = threading.Lock()   # the tick vs. views built on the admin / metrics threads
        self._seen: dict[str, Any] = {}       # last tick's quarantine and status, for transition logs
        self.admin: AdminServer | None = None
        self.kube: Any = None  #: discovery.KubernetesSource with --kubernetes
        self.pods: Any = None  #: discovery.PodIdentity: caller cgroup id -> "namespace/pod"
        self.metrics: Any = None  #: metrics.MetricsServer when /metrics is on
        state = persist.default_path(opts.pin_dir) if opts.state_file is None else opts.state_file
        self.saver = persist.Saver(state, self.log, opts.state_every) if state not in ("", "off") else None
        self._resume: persist.Saved | None = None   # read at start, taken by the first apply

    # --- signals ------------------------------------------------------------
    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.request_stop()

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self.request_reload()

    def request_stop(self) -> None:
        """Stop after the tick or reload under way (latched: nothing clears it)."""
        self.stop_event.set()
        self._wake.set()

    def request_reload(self) -> None:
        """Reload between ticks; requests made before it starts are one reload (it
        reads the latest config), and it never postpones a tick that is due."""
        self.reload_requested = True
        self._wake.set()

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
            if a is None:
                continue
            if a.addrs == tuple(b.address for b in s.backends):   # applied from this config: same order
                out[s.name] = a.ids.tolist()
                continue
            known = a.backends
            if all(b.address in known for b in s.backends):
                out[s.name] = [known[b.address] for b in s.backends]
        return out

    def apply(self, config: cfg.Config) -> None:
        """Bring the datapath to `config` (a start or a reload): ids, states, tables.
        Learned weights follow each (service, backend address) into the new layout."""
        assert self.rec is not None
        try:
            self.rec.check(config)   # CapacityError before anything changes
        except CapacityError:
            if not self._make_room(config):
                raise
        with self._state_lock:
            old_layout = self.router.layout
            self.router.set_params(config.equilibrium)
            self.router.set_layout(build_layout(config, self.backend_ids(config)))
            if self._resume is not None:   # the first apply after a restart: its tables hold what was learned
                self._resume_learning(self._resume)
                self._resume = None
            w = self.router.current()
            lay = self.router.layout
            assert lay is not None
            weights = {name: [float(x) for x in w[r, :len(s.backends)]]
                       for (name, r), s in zip(lay.row.items(), config.services)}
            try:
                rep = self.rec.apply(config, weights)   # CapacityError: nothing applied; OSError: part of it
            except BaseException:
                if old_layout is not None:   # the tick goes on with the rows the reconciler still has
                    self.router.set_layout(old_layout)
                raise
            lay = build_layout(config, self.backend_ids(config))
            self.router.set_layout(lay)
            self._report_failures()
            self.rec.set_layout(lay)
            assert self.rec.rows is not None
            self._enforcer().set_layout(config, lay, self.rec.rows.sid)
            if self.rebalancer is not None:
                self.rebalancer.set_layout(config)
            if self.follower is not None:
                self.follower.set_layout(lay)
            names = set(lay.names)   # counters of services that went away go with them
            self.service_errors = {k: v for k, v in self.service_errors.items() if k in names}
            self._snapshot = self._metrics_snapshot = None
        _trim_heap()   # a reload's parse and old layout leave free heap behind: hand it back
        if rep.added or rep.removed:
            self.log.info("config_applied", file=config.source, services=len(config.services),
                          added=_some(rep.added), n_added=len(rep.added), removed=_some(rep.removed),
                          n_removed=len(rep.removed), tables=len(rep.tables_written))
        elif rep.tables_written:
            self.log.debug("tables_written", services=_some(rep.tables_written), n=len(rep.tables_written))

    def _make_room(self, config: cfg.Config) -> bool:
        """`config` needs more ids than are free while what it drops still holds theirs
        (the maps full, a service or backend leaving as another joins: discovery.admit
        keeps them full). Apply first what frees ids: `config` without its new
        services and new backends (a service all of whose backends are new keeps its
        running ones meanwhile); then check again (CapacityError if it still does not
        fit). False if there is nothing new to hold back (nothing applied)."""
        assert self.rec is not None and self.config is not None
        running = {s.name: s for s in self.config.services}
        first = []
        for s in config.services:
            applied = self.rec.services.get(s.name)
            if applied is None:
                continue
            known = set(applied.addrs)
            kept = tuple(b for b in s.backends if b.address in known)
            if kept:
                first.append(dataclasses.replace(s, backends=kept))
            elif s.name in running:
                first.append(running[s.name])
        step = dataclasses.replace(config, services=tuple(first))
        if step.services == config.services:
            return False
        self.apply(step)
        self.rec.check(config)
        return True

    # --- lifecycle --------------------------------------------------------------
    def start(self) -> None:
        """Everything up to the first applied config; raises on any failure."""
        _tune_malloc()
        # refuse a bad file before touching the kernel; with Kubernetes the file is
        # optional and only sets tick, policy and the equilibrium constants
        base = cfg.load_apart(self.opts.config_path) if self.opts.config_path else \
            cfg.parse("services: []\n", "<kubernetes>")
        self.lock.acquire()
        self.load_state()   # under the lock: the file the last holder wrote
        if self.opts.kubernetes:
            from ..discovery import KubernetesSource, PodIdentity  # only here: kubernetes is heavy

            self.kube = KubernetesSource(self.opts.node_name, lambda _c: self.request_reload(), base=base)
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
        self.evidence = self.dp.evidence()
        self.rebalancer = ConnectionRebalancer(self.opts.pin_dir, self.opts.cgroup, self.log)
        if self.rebalancer.unavailable:
            why = res.details.get("rebalance") or self.rebalancer.unavailable
            self.log.warning("rebalance_unavailable", reason=why,
                             note="pooled connections stay where they were steered when they opened")
        lifted = self._enforcer().start()
        if lifted:
            self.log.info("budgets_lifted", callers=lifted, note="a new agent starts the cooperation game afresh")
        n = self.rec.adopt()
        if n:
            self.log.info("adopted", services=n)
        self.follower = self._follower()
        self.apply(self.config)
        if self.follower is not None:
            self.follower.start()
        self.admin = AdminServer(self.opts.pin_dir, self.answer)
        if self.opts.metrics_addr not in ("", "off"):
            from .. import metrics  # only when serving: prometheus_client (with ssl) costs ~5 MB of RSS

            self.metrics = metrics.start_metrics_server(self, self.opts.metrics_addr,   # OSError names the address
                                                        self.opts.metrics_backends)
        if self.metrics is not None:
            self.log.info("metrics_listening", addr=self.metrics.addr)

    def _follower(self) -> Follower | None:
        """The coordinator's channel from --coordinator (ValueError names a bad value)."""
        how = self.opts.coordinator.strip()
        if how in ("", "off"):
            return None
        node = self.opts.node_name or socket.gethostname()
        period = self.opts.coordination_period
        channel: Any
        if how == "kubernetes":
            from ..discovery.channel import Channel
            from ..discovery.client import api_client_from_env

            api = self.kube.api if self.kube is not None else api_client_from_env()
            channel = Channel(api, os.environ.get("POD_NAMESPACE") or "equilibrium", min_interval=period / 2)
        elif how.startswith("dir:") and len(how) > 4:
            from ..discovery.localchannel import DirChannel

            channel = DirChannel(how[4:], min_interval=period / 2)
        else:
            raise ValueError("--coordinator: expected off, kubernetes or dir:PATH, not %r" % how)
        self.log.info("coordination_on", channel=how, node=node, period_seconds=period)
        return Follower(channel, node, self.log, period=period)

    def load_state(self) -> None:
        """Read the state file (start calls this once, before the first apply, which
        resumes from it); a missing or unusable file leaves nothing to resume."""
        if self.saver is not None:
            self._resume = persist.load(self.saver.path, self.log)

    def _resume_learning(self, saved: persist.Saved) -> None:
        """Take the saved state into the router; a file that does not hold together
        is logged and left, and the agent goes on from even weights."""
        assert self.saver is not None
        try:
            got = self.router.resume(saved.parts)
        except ValueError as e:
            self.log.warning("state_ignored", file=self.saver.path, reason=str(e),
                             hint="learning starts over; the next save replaces it")
            return
        for pol, why in got.skipped.items():
            self.log.warning("state_ignored", file=self.saver.path, policy=pol, reason=why)
        self.log.info("state_restored", file=self.saver.path, services=got.services,
                      dropped=_some(got.dropped), n_dropped=len(got.dropped),
                      age_seconds=round(max(time.time() - saved.saved_unix, 0.0), 3))

    def save_state(self) -> None:
        """Save now, on this thread (a clean exit): after any save in flight."""
        if self.saver is None or self.router.layout is None:
            return
        self.saver.wait()
        with self._state_lock:
            parts = self.router.learned()
        if self.saver.write(parts):
            self.log.info("state_saved", file=self.saver.path, bytes=self.saver.last_bytes,
                          seconds=round(self.saver.last_seconds, 4))

    def reload(self) -> bool:
        """SIGHUP: apply the file only if it is entirely valid."""
        try:
            if self.kube is not None:  # a cluster change, or SIGHUP for the file's settings
                if self.opts.config_path:
                    self.kube.set_base(cfg.load_apart(self.opts.config_path))
                new = self.kube.latest()
                if new is None or new == self.config:
                    return True
            else:
                new = cfg.load_apart(self.opts.config_path)
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
        with self._state_lock:
            delta = self.telemetry.tick(self.rec.epochs, self.rec.id_span())
            dt = delta.seconds if delta.seconds > 0 else self.config.tick
            w = self.router.tick(delta, dt, judge=self._judge_ids)   # keeps the signals it needs
            self._report_failures()
            self._enforcer().tick(self.router.signals, dt)
            if self.follower is not None:   # followed services' rows: the coordinator's split
                w = self.follower.tick(self.router.signals, w, dt)
            self.tables_written += self.rec.write_weights(w)
            self.ticks += 1
            self._snapshot = self._metrics_snapshot = None   # views of the last tick are stale now: let them go
        self._rebalance(delta.open_connections)
        self._audit_active()
        self.log_transitions()
        if self.ticks % TRIM_EVERY == 0:
            _trim_heap(collect=False)   # free heap pages a burst of temporaries left behind
        self.last_tick_duration = time.perf_counter() - t0
        self.tick_durations.append(self.last_tick_duration)
        self.last_success = time.time()

    def _report_failures(self) -> None:
        """Log and count what the router benched in its last computation (a service
        whose policy raised keeps its last tables; the others went on)."""
        for name, e in self.router.errors:
            if name.startswith("policy "):   # no single service explains it: the tick's
                self.log.error("policy_failed", policy=name[len("policy "):], error="%s: %s" % (type(e).__name__, e),
                               exc_info=e, note="its services keep their last tables this tick")
                continue
            self.service_errors[name] = self.service_errors.get(name, 0) + 1
            self.log.error("service_failed", service=name, error="%s: %s" % (type(e).__name__, e), exc_info=e,
                           note="the service keeps its last tables; the next reload tries it again")

    def _rebalance(self, open_conns: np.ndarray) -> None:
        """Close what pooled connections the weights want moved (after the tables are written:
        a reconnect is steered by them)."""
        rows = self.rec.rows if self.rec is not None else None
        if self.rebalancer is None or rows is None:
            return
        period = self.config.tick if self.config is not None else 1.0
        self.rebalancer.tick(open_conns, rows.sid, rows.ids, rows.present, rows.routable, rows.counts, period)

    def _audit_active(self) -> None:
        """Every AUDIT_SECONDS: eq_lb_active against the sockets it counts (datapath.audit);
        a drift found twice in a row is corrected and logged. Never fails the tick."""
        if not isinstance(self.dp, Datapath) or self.rec is None:
            return   # an in-memory datapath (tests) has no sockets to count
        now = time.monotonic()
        if now < self._audit_due:
            return
        self._audit_due = now + AUDIT_SECONDS
        if self._audit is None:
            self._audit = ActiveAudit(self.dp)
        try:
            rep = self._audit.run(self.rec.id_span())
        except OSError as e:
            self.log.warning("active_audit_failed", error=str(e))
            return
        if rep.corrected:
            self.log.warning("active_counts_corrected", backends=len(rep.corrected),
                             drift=sum(rep.corrected.values()), note="eq_lb_active now matches the open sockets")

    def _enforcer(self) -> Enforcer:
        """The cooperation game's driver (made on first use: tests build agents by hand)."""
        if self.enforcer is None:
            assert self.dp is not None
            self.enforcer = Enforcer(self.dp, self.log, self.evidence)
            self.judge.trust = self.enforcer.coop.trust   # a poor reputation weighs its evidence down
        return self.enforcer

    def _judge_ids(self, ids: np.ndarray) -> Verdict:
        """What the callers' evidence says about these backend ids (gather_signals asks
        for the doubtful ones); no verdict (their own counters stand) if the evidence
        map cannot be read."""
        assert self.dp is not None
        try:
            if self.evidence is None:
                self.evidence = self.dp.evidence()
            v = self.judge(self.evidence.read_ids(ids))
            rows, cgroups, amounts = v.disputed
            self._enforcer().note_disputed(ids[rows], cgroups, amounts)   # bad for those callers' reputations
            return v
        except (OSError, KeyError, ValueError) as e:
            if not self._evidence_failed:
                self.log.warning("evidence_unreadable", error=str(e),
                                 hint="backends are judged by their own counters until it reads again")
            self._evidence_failed = True
            return Verdict.none(len(ids))

    # --- what operators see ------------------------------------------------------
    def log_transitions(self) -> None:
        """Log quarantines, restorations, equilibrium reached/lost and big weight moves:
        vectorized over every service, Python only for the rows that changed."""
        lay = self.router.layout
        if lay is None:
            return
        seen: dict[str, Any] = {}
        for pol, part in self.router.parts.items():
            st = part.engine.state if part.engine is not None else None
            if st is None:
                continue
            prev = self._seen.get(pol)
            seen[pol] = (part.rows, st.quarantined, st.status)
            if prev is None or prev[0].shape != part.rows.shape or not np.array_equal(prev[0], part.rows) \
                    or prev[1].shape != st.quarantined.shape:
                continue
            for i, j in zip(*np.nonzero(st.quarantined != prev[1])):
                name, addr = lay.names[part.rows[i]], str(lay.keys[part.rows[i]][j])
                if st.quarantined[i, j]:
                    self.log.warning("backend_quarantined", service=name, backend=addr,
                                     p_failing=float(st.p_failing[i, j]))
                else:
                    self.log.info("backend_restored", service=name, backend=addr)
            was, now = prev[2] == CONVERGED, st.status == CONVERGED
            for i in np.nonzero(was != now)[0]:
                self.log.info("equilibrium_reached" if now[i] else "equilibrium_lost",
                              service=lay.names[part.rows[i]], distance=float(st.distance[i]))
        prev_shares = self._seen.get("_shares")
        self._seen = seen
        shares = self.router.shares
        if prev_shares is not None and prev_shares.shape == shares.shape:
            moved = np.nonzero(np.abs(shares - prev_shares).max(axis=1, initial=0.0) >= WEIGHT_EVENT_THRESHOLD)[0]
            # a line per service, for the first NAMES_LOGGED of a tick; a node where
            # thousands move at once gets one more line that counts them, not thousands
            for r in moved[:NAMES_LOGGED]:
                self.log.info("weights_changed", service=lay.names[r],
                              weights={str(k): round(float(x), 3) for k, x in zip(lay.keys[r], shares[r])})
            if moved.size > NAMES_LOGGED:
                self.log.info("weights_changed_more", services=int(moved.size - NAMES_LOGGED),
                              first=[lay.names[r] for r in moved[NAMES_LOGGED:2 * NAMES_LOGGED]])
        self._seen["_shares"] = shares

    @property
    def snapshot(self) -> dict[str, Any]:
        """The picture the admin socket and /metrics show, built when asked (at most
        once per tick, whoever asks)."""
        got = self._snapshot
        if got is not None and got[0] == self.ticks:
            return got[1]
        if self.config is None or self.rec is None or self.router.layout is None:
            return {"agent": {}, "services": []}
        with self._state_lock:
            ticks = self.ticks
            snap = build_snapshot(self)
        self._snapshot = (ticks, snap)
        return snap

    def metrics_snapshot(self, max_backends: int) -> dict[str, Any]:
        """The snapshot /metrics exports: every service's figures, and the backends
        of the first services in config order, up to `max_backends` backends (at
        most once per tick per budget). agent.backends_without_series counts the rest."""
        got = self._metrics_snapshot
        if got is not None and got[0] == (self.ticks, max_backends):
            return got[1]
        if self.config is None or self.rec is None or self.router.layout is None:
            return {"agent": {}, "services": []}
        detail: set[str] = set()
        used = 0
        for s in self.config.services:
            if used + len(s.backends) > max_backends:
                break
            detail.add(s.name)
            used += len(s.backends)
        with self._state_lock:
            ticks = self.ticks
            snap = build_snapshot(self, detail=detail)
        snap["agent"]["backends_without_series"] = sum(len(s.backends) for s in self.config.services) - used
        self._metrics_snapshot = ((ticks, max_backends), snap)
        return snap

    def tick_stats(self) -> dict[str, float | int | None]:
        d = sorted(self.tick_durations)
        if not d:
            return {"median": None, "p95": None, "max": None, "count": 0}
        return {"median": d[len(d) // 2], "p95": d[min(len(d) - 1, int(0.95 * len(d)))], "max": d[-1],
                "count": len(d)}

    def answer(self, req: dict[str, Any]) -> dict[str, Any]:
        """Admin socket requests (on the admin thread). Only `status` builds the whole
        node's picture; `explain` builds one service's."""
        cmd = req.get("cmd")
        if cmd == "status":
            return {"ok": True, **self.snapshot}
        if cmd == "explain":
            name = req.get("service")
            lay = self.router.layout
            if lay is None or name not in lay.row:
                known = ", ".join(lay.names if lay is not None else []) or "none"
                return {"ok": False, "error": "no service %r (known: %s)" % (name, known)}
            with self._state_lock:
                snap = build_snapshot(self, only=str(name))
            return {"ok": True, "agent": snap["agent"], "explain": snap["services"][0]}
        if cmd == "ticks":  # the recent tick durations (scripts/bench agent)
            return {"ok": True, "ticks": self.ticks, "overruns": self.tick_overruns,
                    "durations_seconds": list(self.tick_durations), "tables_written_total": self.tables_written,
                    "hwm_bytes": _hwm_bytes(), "rss_bytes": _rss_bytes()}
        if cmd == "memory":  # where Python memory goes (PYTHONTRACEMALLOC=1 in the agent's environment)
            import tracemalloc

            if not tracemalloc.is_tracing():
                return {"ok": False, "error": "start the agent with PYTHONTRACEMALLOC=1 to trace its memory"}
            by = req.get("by", "lineno")
            if by not in ("lineno", "filename", "traceback"):
                return {"ok": False, "error": "memory: by must be lineno, filename or traceback, not %r" % (by,)}
            stats = tracemalloc.take_snapshot().statistics(by)[:int(req.get("top", 25))]
            traced, peak = tracemalloc.get_traced_memory()
            if req.get("reset_peak"):  # the next request's peak is the most traced since this one
                tracemalloc.reset_peak()
            top = [str(st) if by != "traceback" else "%s\n%s" % (st, "\n".join(st.traceback.format())) for st in stats]
            return {"ok": True, "top": top, "traced_bytes": traced, "traced_peak_bytes": peak,
                    "rss_bytes": _rss_bytes(), "hwm_bytes": _hwm_bytes()}
        if cmd == "callers":  # pod names (with --kubernetes) and the callers' standings in the game
            names = self.pods.names() if self.pods is not None else {}
            with self._state_lock:
                standings = [dataclasses.asdict(s) for s in self._enforcer().standings()]
            return {"ok": True, "pods": {str(k): v for k, v in names.items()}, "standings": standings}
        return {"ok": False, "error": "unknown command %r (status, explain, callers, ticks, memory)" % (cmd,)}

    def run(self) -> None:
        self.start()
        self.loop()
        self.save_state()   # only after a clean run: a failed start must not replace a good file
        self.log.info("stopped", note="datapath left in place; 'equilibriumd teardown' removes it")

    def loop(self) -> None:
        """Tick on a fixed monotonic grid of the period until a stop is asked for.
        A due tick always goes first; reloads run between ticks, however many are
        asked for (a flapping annotation), and never postpone one. The stop flag is
        checked after every tick and reload."""
        assert self.config is not None
        self.log.info("running", tick_seconds=self.config.tick, policy=self.config.policy)
        next_at = time.monotonic() + self.config.tick
        while not self.stop_event.is_set():
            self._wake.clear()   # before looking: a request made from here on wakes the wait
            now = time.monotonic()
            if now >= next_at:
                period = self.config.tick
                self._run_tick()
                next_at = self._next_at(next_at, period)
                if self._retry_reload:
                    self._retry_reload = False
                    self.reload_requested = True
            elif self.reload_requested:
                self.reload_requested = False
                self._run_reload()
            else:
                self._wake.wait(next_at - now)

    def _run_tick(self) -> None:
        try:
            self.tick()
        except OSError as e:  # a map write failed: keep the last weights, say so, retry next tick
            self.map_errors += 1
            self.tick_errors += 1
            self.log.error("tick_failed", error=str(e))
        except Exception as e:  # noqa: BLE001 - a bug in one tick must not stop routing for good
            self.tick_errors += 1
            self.log.error("tick_failed", error="%s: %s" % (type(e).__name__, e), exc_info=e,
                           note="the tables keep their last weights; the next tick runs on schedule")
        if self.saver is not None and self.saver.due(time.monotonic()):
            self.saver.start(self.router, self._state_lock)   # the copy here, the write on a thread

    def _run_reload(self) -> None:
        try:
            self.reload()
        except Exception as e:  # noqa: BLE001 - a reload that raises keeps the running config
            self._retry_reload = True
            self.log.error("reload_failed", error="%s: %s" % (type(e).__name__, e), exc_info=e,
                           note="the running configuration stays; retried after the next tick")

    def _next_at(self, next_at: float, period: float) -> float:
        """The next grid point: a slow tick is reported and skips grid points, never
        stretches the period."""
        now = time.monotonic()
        next_at += period
        if now > next_at:
            missed = int((now - next_at) // period) + 1
            self.tick_overruns += 1
            self.log.warning("tick_overrun", seconds=round(self.last_tick_duration, 4), period=period,
                             skipped=missed)
            next_at += missed * period
        return next_at

    def close(self) -> None:
        if self.follower is not None:
            self.follower.stop()
        for src in (self.kube, self.pods):
            if src is not None:
                src.stop()
        if self.metrics is not None:  # before dp.close(): a scrape reads the maps
            self.metrics.close()
            self.metrics = None
        if self.admin is not None:
            self.admin.close()
        if self.rebalancer is not None:
            self.rebalancer.close()
        if self.dp is not None:
            self.dp.close()
        self.lock.release()


def _f(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if v == v and v not in (float("inf"), float("-inf")) else None


def _callers_of(agent: Agent, ids: np.ndarray) -> list[list[dict[str, Any]]]:
    """Each backend's callers' evidence lately (for explain); empty lists if unreadable."""
    try:
        if agent.evidence is None or not (ids >= 0).all():
            return [[] for _ in ids]
        return by_caller(agent.evidence.read_ids(ids))
    except (OSError, KeyError, ValueError):
        return [[] for _ in ids]


def _rebalanced(agent: Agent, rows: list[int]) -> np.ndarray | None:
    """Connections the rebalancer closed per backend id up to the highest id of the
    layout `rows` listed, by reason (None: not loaded). Only that far: 32 bytes an id,
    a whole node's would be 512 KB a snapshot."""
    lay = agent.router.layout
    if agent.dp is None or lay is None or not rows:
        return None
    n = int(lay.ids[rows].max()) + 1
    if n <= 0:
        return None
    try:
        return agent.dp.rebalanced(n)
    except OSError:
        return None


def _summary(agent: Agent, name: str, r: int, n: int) -> dict[str, Any]:
    """A service's convergence figures and backend counts, without its backends."""
    lay = agent.router.layout
    assert lay is not None
    available = lay.routable[r, :n].copy()
    out: dict[str, Any] = {"status": "n/a", "distance": None, "wardrop_gap_seconds": None, "regret_potential": None}
    got = agent.router.engine_state(name)
    if got is not None:
        st, er, _ = got
        available &= ~st.quarantined[er, :n]
        out.update({"status": st.status_name(er), "distance": _f(st.distance[er]),
                    "wardrop_gap_seconds": _f(st.wardrop_gap[er]), "regret_potential": _f(st.regret_potential[er])})
    out.update({"backends": [], "n_backends": n, "n_available": int(available.sum())})
    return out


def build_snapshot(agent: Agent, only: str | None = None, detail: set[str] | None = None) -> dict[str, Any]:
    """A JSON-ready picture of the agent and every service, or `only` one (built when
    asked). With `detail`, only those services list their backends; the others
    carry their convergence figures and backend counts (a node-sized /metrics)."""
    config, rec, router = agent.config, agent.rec, agent.router
    lay = router.layout
    assert config is not None and rec is not None and lay is not None
    sig, shares = router.signals, router.shares
    have_sig = sig.latency.shape == lay.shape
    closed = _rebalanced(agent, [r for name, r in lay.row.items()
                                 if (only is None or name == only) and (detail is None or name in detail)])
    services = []
    for s in config.services:
        r = lay.row.get(s.name)
        if r is None or (only is not None and s.name != only):
            continue
        if detail is not None and s.name not in detail:
            services.append({"name": s.name, "policy": config.policy_of(s), "error": router.failed.get(s.name),
                             **_summary(agent, s.name, r, len(s.backends))})
            continue
        ex = router.explain(s.name)

        def col(key: str, i: int, ex: dict[str, Any] = ex) -> Any:
            v = ex.get(key)
            return v[i] if isinstance(v, list) and i < len(v) else None

        backends = []
        callers = _callers_of(agent, lay.ids[r, :len(s.backends)]) if only is not None else None
        for i, b in enumerate(s.backends):
            quarantined = bool(col("quarantined", i))
            bid = int(lay.ids[r, i])
            moved = closed[bid] if closed is not None and 0 <= bid < len(closed) else None
            backends.append({
                "address": str(b.address), "id": bid if bid >= 0 else None,
                "state": "quarantined" if quarantined else b.state,
                "configured_weight": b.weight,
                "probability": _f(shares[r, i]) if shares.shape == lay.shape and shares[r].any() else None,
                "latency_seconds": _f(sig.latency[r, i]) if have_sig else None,
                "requests": _f(sig.requests[r, i]) if have_sig else None,
                "errors": _f(sig.errors[r, i]) if have_sig else None,
                "payoff": _f(col("payoff", i)), "regret": _f(col("regret", i)),
                "effective_latency_seconds": _f(col("effective_latency_seconds", i)),
                "p_failing": _f(col("p_failing", i)), "quarantined": quarantined,
                "toll_seconds": _f(col("tolls_seconds", i)),
                "rebalanced": None if moved is None else dict(zip(constants.RB_REASONS, moved.tolist())),
                **({"callers": callers[i]} if callers is not None else {}),
            })
        services.append({
            "name": s.name, "frontend": str(s.frontend), "protocol": s.protocol, "policy": config.policy_of(s),
            "error": router.failed.get(s.name),
            "balance": config.balance_of(s), "status": ex.get("status", "n/a"), "distance": _f(ex.get("distance")),
            "wardrop_gap_seconds": _f(ex.get("wardrop_gap_seconds")),
            "regret_potential": _f(ex.get("regret_potential")),
            "backends": backends, "changes": ex.get("changes", []), "n_backends": len(backends),
            "n_available": sum(1 for b in backends if b["state"] == "active"),
        })
    ts = agent.tick_stats()
    return {
        "agent": {
            "pid": os.getpid(), "started_unix": agent.started, "ticks": agent.ticks,
            "tick_seconds": config.tick, "last_tick_duration_seconds": agent.last_tick_duration,
            "tick_duration_median_seconds": ts["median"], "tick_duration_p95_seconds": ts["p95"],
            "tick_duration_max_seconds": ts["max"], "tick_overruns_total": agent.tick_overruns,
            "tables_written_total": agent.tables_written,
            "last_success_unix": agent.last_success, "map_errors_total": agent.map_errors,
            "tick_errors_total": agent.tick_errors, "service_errors_total": dict(agent.service_errors),
            "services_failing": dict(agent.router.failed),
            **_admission_view(agent.kube),
            "config_file": agent.opts.config_path, "pin_dir": agent.opts.pin_dir, "cgroup": agent.opts.cgroup,
            "policy": config.policy, "services": len(config.services),
            "rss_bytes": _rss_bytes(), "hwm_bytes": _hwm_bytes(),
            **_rebalance_view(agent.rebalancer),
            "coordination": agent.follower.status() if agent.follower is not None else None,
        },
        "services": services,
    }


def _admission_view(kube: Any) -> dict[str, Any]:
    """With --kubernetes: the discovered services left out for lack of room in the
    maps, and those cut to their fair share of backends (discovery.admit)."""
    if kube is None:
        return {}
    # the API server's health as the reflectors see it: an outage shows as
    # failures counting up while routing goes on over the last listed objects
    refl = [r for r in (getattr(kube, "services", None), getattr(kube, "slices", None)) if r is not None]
    out: dict[str, Any] = {
        "discovery_errors_total": sum(r.stats.errors for r in refl),
        "discovery_failing_for": max((r.stats.failing for r in refl), default=0),
        "discovery_last_error": "; ".join("%s: %s" % (r.kind, r.stats.last_error)
                                          for r in refl if r.stats.failing and r.stats.last_error) or None,
    }
    res = getattr(kube, "last_result", None)
    if res is not None:
        out.update({"services_not_admitted": list(res.left_out),
                    "services_capped": {k: {"kept": a, "offered": b} for k, (a, b) in res.capped.items()}})
    return out


def _rebalance_view(rb: ConnectionRebalancer | None) -> dict[str, Any]:
    if rb is None:
        return {}
    return {"rebalance": "unavailable: " + rb.unavailable if rb.unavailable else "on",
            "rebalance_walks_total": rb.walks, "rebalance_netns": len(rb.ns.foreign()) + 1 if rb.walks else None,
            "rebalanced_total": {r: rb.closed.get(r, 0) for r in constants.RB_REASONS}}


def _some(names: list[str]) -> list[str]:
    """The first NAMES_LOGGED names, and how many more (one log line stays readable)."""
    if len(names) <= NAMES_LOGGED:
        return names
    return names[:NAMES_LOGGED] + ["... %d more" % (len(names) - NAMES_LOGGED)]


def _at(a: Any, i: int) -> float | None:
    return _f(a[i]) if a is not None and i < len(a) else None


def _tune_malloc() -> None:
    """Fix glibc's mmap threshold at 1 MB. Below it, the tick's numpy temporaries
    (a (services x backends) float array is 128 KB at 1,024 x 16, 512 KB at
    4,096 x 16) come from the heap and are reused tick after tick: served by
    mmap instead, each one costs page faults and zeroing, which measured half
    the tick at 4,096 x 16 (101 ms against 52 with a 128 KB threshold). Above
    it, the per-backend-id arrays of a large node (the counters of 16,384
    backends are 2.9 MB, a table batch 4 MB) go back to the kernel when freed
    instead of holding the heap at their peak: at 1,024 x 16, 64 MB of RSS
    against 68 with a 4 MB threshold, for ~1 ms of tick. A fixed threshold also
    stops glibc from raising it after one big free. Two arenas cap the admin
    and metrics threads' share of memory."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
        libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD)
        libc.mallopt(m_trim_threshold, 256 * 1024)
        libc.mallopt(m_arena_max, 2)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _trim_heap(collect: bool = True) -> None:
    if collect:
        gc.collect()   # a parse tree with cycles (nodes know their parents) waits for the collector
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _hwm_bytes() -> int:
    """Peak resident memory (VmHWM)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
