"""Each tick: move pooled connections that the weights no longer want where they are.

The quotas come from policy.rebalance (pure), the closes from the kernel
(bpf/rebalance.bpf.c through datapath.rebalance), in this node's namespaces
(agent.netns). The kernel walks only when there is something to do: a
backend over its share, a draining or removed backend still holding
connections, or a service with a max connection age.

A pooled connection is often busy: a pool hands the connection it got back
last to the next request (LIFO), so a connection to a slow backend is in use
most of the time and idle only for the moment between two requests. One walk
per tick rarely meets that moment; so a walker thread walks again, every
WALK_INTERVAL, the namespaces where wanted connections were busy, until the
tick's budgets are spent or its window ends. The tick itself never waits for
a walk.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from typing import Any

import numpy as np

from ..config import Config
from ..datapath import constants
from ..datapath.rebalance import RB_IDLE, RB_SVC, Rebalancer, RebalancerMissing, Walk
from ..policy.rebalance import confirmed, excess_quota, shares
from .netns import Namespaces

NS = 1_000_000_000
#: A namespace where wanted connections were busy is walked again after this long ...
WALK_INTERVAL = 0.1
#: ... or longer: repeated walks take at most this share of a core (a walk scans the
#: kernel's whole TCP hash table, ~5 ms with 262,144 buckets, whatever the namespace holds)
WALK_CPU = 0.05
#: Walks of a tick end when this share of the tick period has passed (the next tick's
#: quotas and budgets take over).
WALK_WINDOW = 0.9
#: Nice value of the walker thread (a walk is kernel time on whichever CPU it runs).
WALKER_NICE = 10
#: After a walk for removed backends' connections that found none, wait this long.
STRAY_QUIET = 30.0


class ConnectionRebalancer:
    def __init__(self, pin_dir: str, cgroup: str, log: Any) -> None:
        self.log = log
        self.kernel: Rebalancer | None = None
        self.unavailable: str | None = None    #: why there is no rebalancing (None: there is)
        try:
            self.kernel = Rebalancer(pin_dir)
        except RebalancerMissing as e:
            self.unavailable = str(e)
        self.ns = Namespaces(cgroup)
        self._settings = np.zeros(0, dtype=RB_SVC)   # per layout row, budget = max_closes (0: off)
        self._on = np.zeros(0, dtype=bool)
        self._aged = np.zeros(0, dtype=bool)
        self._udp_aged = False
        self._quota_ids = np.zeros(0, dtype=np.int64)   # ids given a quota at the last walk
        self._prev_quota: np.ndarray | None = None      # last tick's quotas, before confirmation
        self._denied_logged = False
        self.walks = 0                          #: namespace walks since the agent started
        self.closed: Counter[str] = Counter()   #: closes by reason since the agent started
        self._lock = threading.Lock()
        self._cv = threading.Condition()
        self._job: tuple[list[str | None], float] | None = None   # (namespaces, until when)
        self._stopping = False
        self._away = False      # the walker thread is in another namespace
        # Removed backends' connections. Their ids leave the layout (and a reused id's
        # gauge restarts at 0), so a removal asks for walks until one finds nothing of
        # theirs left; and since a gauge can stay above 0 after they are gone (a socket
        # the LRU evicted is never counted closed), a walk that found nothing holds the
        # next one for them off for STRAY_QUIET seconds.
        self._removed = False
        self._keys: set[tuple[str, Any]] = set()
        self._stray_only = False
        self._stray_quiet_until = 0.0
        self._thread: threading.Thread | None = None

    def close(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.kernel is not None:
            self.kernel.close()
            self.kernel = None
        self.ns.close()

    def set_layout(self, config: Config) -> None:
        """Per-service settings, in layout (config) order."""
        rb = config.rebalance
        n = len(config.services)
        st = np.zeros(n, dtype=RB_SVC)
        on = np.array([config.rebalance_of(s) == "idle" for s in config.services], dtype=bool)
        age = np.array([config.max_age_of(s) for s in config.services], dtype=np.float64)
        # mode off with a max age: only the age closes (the kernel checks RB_IDLE)
        st["budget"] = np.where(on | (age > 0), rb.max_closes, 0)
        st["min_age_ns"] = int(rb.min_age * NS)
        st["min_idle_ns"] = int(rb.min_idle * NS)
        st["max_age_ns"] = (age * NS).astype(np.uint64)
        st["flags"] = np.where(on, RB_IDLE, 0)
        self._settings, self._on, self._aged = st, on, age > 0
        # connected UDP is not in the telemetry's gauge: a max age on a UDP service walks every tick
        udp = np.array([s.protocol == "udp" for s in config.services], dtype=bool)
        self._udp_aged = bool((self._aged & udp).any())
        keys = {(s.name, b.address) for s in config.services for b in s.backends}
        if self._keys - keys:
            self._removed = True
        self._keys = keys

    def tick(self, open_conns: np.ndarray, sid: np.ndarray, ids: np.ndarray, present: np.ndarray,
             routable: np.ndarray, slots_held: np.ndarray, period: float) -> bool:
        """Quotas for the rows of the reconciler's layout, from this node's open
        connections per backend id (the telemetry's gauge, which the tick has read
        anyway: reading eq_lb_active for 16,384 ids would cost 3.6 ms more); when
        there is work, hand the walker this tick's walks (they run beside the tick,
        until `period` is nearly over). Returns whether there was work."""
        id_span = len(open_conns)
        if self.kernel is None or not (self._on | self._aged).any() or id_span == 0 or len(sid) != len(self._on):
            return False
        active = np.asarray(open_conns)
        act = np.where(present, active[np.clip(ids, 0, id_span - 1)], 0)
        raw = excess_quota(act, shares(slots_held), routable)
        raw[~self._on] = 0
        quota, self._prev_quota = confirmed(raw, self._prev_quota), raw
        held = act.sum(axis=1) > 0
        drain = (present & ~routable & (act > 0)).any(axis=1)
        stray = active > 0
        stray[ids[present & (ids >= 0)]] = False   # open connections to ids no service has now: removed backends
        now = time.monotonic()
        work = quota.any() or (self._on & drain).any() or (self._aged & held).any() or self._udp_aged
        removed = self._removed or (stray.any() and now >= self._stray_quiet_until)
        if not work and not removed:
            return False
        self._stray_only = not work
        qmask = quota > 0
        new_ids = ids[qmask]
        stale = np.setdiff1d(self._quota_ids, new_ids)
        self.kernel.write_quotas(np.concatenate([new_ids, stale]),
                                 np.concatenate([quota[qmask], np.zeros(len(stale), dtype=np.int64)]))
        self._quota_ids = new_ids
        self.kernel.write_services(sid, self._settings)   # this tick's budgets: every walk until the next draws on them
        targets: list[str | None] = [None] + list(self.ns.foreign().values())
        with self._cv:
            self._job = (targets, now + WALK_WINDOW * period)
            self._cv.notify()
        if self._thread is None:
            self._thread = threading.Thread(target=self._walker, name="rebalance-walker", daemon=True)
            self._thread.start()
        return True

    # --- the walker thread ------------------------------------------------------
    def _walker(self) -> None:
        """Runs each tick's walks: every namespace once, then again (at most every
        WALK_INTERVAL, and within WALK_CPU of a core) those where wanted connections
        were busy, until the tick's window closes. It alone changes namespaces."""
        try:   # walks are background work: the tick (and everything else on the node) goes first
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WALKER_NICE)
        except OSError:
            pass
        while True:
            with self._cv:
                while self._job is None and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return
                job, self._job = self._job, None
            assert job is not None
            targets, deadline = job
            closed: list[tuple[int, int, int]] = []
            walks = busy = young = 0
            while targets:
                t0 = time.monotonic()
                left = []
                for path in targets:
                    w = self._walk_in(path)
                    if w is None:
                        continue
                    walks += 1
                    closed += w.closed
                    young += w.young
                    if w.busy:
                        left.append(path)
                busy = len(left)
                targets = left
                pause = max(WALK_INTERVAL, (time.monotonic() - t0) / WALK_CPU)
                if not targets or time.monotonic() + pause > deadline:
                    break
                with self._cv:   # a new tick's job (or a stop) ends this one early
                    if self._cv.wait_for(lambda: self._job is not None or self._stopping, timeout=pause):
                        break
            self._report(closed, walks, busy, young)

    def _walk_in(self, path: str | None) -> Walk | None:
        kernel = self.kernel
        if kernel is None:
            return None
        if path is not None or self._away:
            if path is not None and self.ns.denied:
                return None
            if not self.ns.enter(path):
                if self.ns.denied and not self._denied_logged:
                    self.log.warning("rebalance_netns_denied", reason=self.ns.denied,
                                     hint="grant CAP_SYS_ADMIN (daemonset/daemonset.yaml), "
                                          "or set rebalance.mode: off")
                    self._denied_logged = True
                return None
            self._away = path is not None
        try:
            return kernel.walk()
        except OSError as e:
            self.log.error("rebalance_walk_failed", error=str(e), netns=path or "own")
            return None

    def _report(self, closed: list[tuple[int, int, int]], walks: int, busy: int, young: int) -> None:
        if self._stray_only and not closed and not busy and not young:
            self._removed = False
            self._stray_quiet_until = time.monotonic() + STRAY_QUIET
        with self._lock:
            self.walks += walks
            by = Counter(constants.RB_REASONS[r] for _, _, r in closed)
            self.closed.update(by)
        if closed:
            self.log.info("connections_rebalanced", closed=len(closed), **dict(by),
                          services=len({s for s, _, _ in closed}), walks=walks, busy_namespaces=busy)
