"""Make the pinned maps say what the configuration and the policy want.

The reconciler owns id allocation and write ordering, the two things that
keep the kernel's view consistent at every instant:

* ids are stable: a service keeps its id across reloads and restarts (matched
  by name, then by frontend), a backend keeps its id while its service keeps
  its address, so a restarted agent adopts the pinned state without a gap;
* writes go in an order the kernel tolerates: backend entries before the
  table that points at them; the idle half of the table before the
  generation flip; state changes (draining) after the table stopped
  pointing at the backend; a frontend key only after its table exists, and
  deleted first when a service goes.

Capacity is checked before the first write, so an impossible change fails
with nothing applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..config import Config, ServiceConfig
from ..datapath import constants
from ..datapath.maps import Addr, Datapath
from ..datapath.slots import build_table
from ..datapath.structs import Svc

STATE = {"active": constants.BE_ACTIVE, "draining": constants.BE_DRAINING,
         "quarantined": constants.BE_QUARANTINED}


class CapacityError(RuntimeError):
    """The change needs more service or backend ids than the maps hold."""


@dataclass
class AppliedService:
    id: int
    name: str
    frontend: Addr
    protocol: str
    gen: int
    table: np.ndarray                      #: the live half of the slot table
    backends: dict[Addr, int] = field(default_factory=dict)   #: address -> backend id
    states: dict[int, int] = field(default_factory=dict)      #: backend id -> state
    weights: dict[int, int] = field(default_factory=dict)     #: backend id -> milli-weight
    n_backends: int = 0                    #: as written to eq_lb_svc (kept: no map read per tick)
    flags: int = 0                         #: as written to eq_lb_svc (constants.SVC_*)


@dataclass
class ApplyReport:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    tables_written: list[str] = field(default_factory=list)


def milli(w: float) -> int:
    """Weights are kept in the maps as u32 thousandths (informational)."""
    return min(int(round(w * 1000)), 0xFFFFFFFF)


class Reconciler:
    def __init__(self, dp: Datapath) -> None:
        self.dp = dp
        self.services: dict[str, AppliedService] = {}
        self._stray_backends: set[int] = set()
        #: bumped whenever a backend id's counters are zeroed for a new backend,
        #: so telemetry readers restart that id from zero (datapath.telemetry)
        self.epochs = np.zeros(constants.MAX_BACKENDS, dtype=np.int64)

    def id_span(self) -> int:
        """One past the highest backend id in use (ids are allocated lowest first)."""
        ids = [bid for a in self.services.values() for bid in a.backends.values()]
        return max(ids) + 1 if ids else 0

    # --- adoption ---------------------------------------------------------
    def adopt(self) -> int:
        """Read what is pinned (after an agent restart). Returns services adopted."""
        self.services.clear()
        by_svc: dict[int, list] = {}
        for b in self.dp.backends():
            by_svc.setdefault(b.svc, []).append(b)
        known = set()
        for ps in self.dp.services():
            known.add(ps.id)
            a = AppliedService(ps.id, ps.name or "svc-%d" % ps.id, ps.frontend, ps.protocol, ps.gen,
                               self.dp.read_slots(ps.id, ps.gen), n_backends=ps.n_backends, flags=ps.flags)
            for b in by_svc.get(ps.id, []):
                a.backends[b.address] = b.id
                a.states[b.id] = b.state
                a.weights[b.id] = b.weight
            self.services[a.name] = a
        # Backends or services with no frontend are leftovers of an interrupted
        # change: cleared by the next apply.
        self._stray_backends = {b.id for s, bl in by_svc.items() if s not in known for b in bl}
        return len(self.services)

    # --- planning (no writes) ---------------------------------------------
    def _allocate(self, config: Config) -> tuple[dict[str, int], dict[tuple[str, Addr], int]]:
        used_svc = {a.id for a in self.services.values()}
        used_be = {bid for a in self.services.values() for bid in a.backends.values()} | self._stray_backends
        by_frontend = {(a.frontend, a.protocol): a for a in self.services.values()}
        wanted = {s.name for s in config.services}
        svc_ids: dict[str, int] = {}
        be_ids: dict[tuple[str, Addr], int] = {}
        free_svc = (i for i in range(constants.MAX_SERVICES) if i not in used_svc)
        free_be = (i for i in range(constants.MAX_BACKENDS) if i not in used_be)
        for s in config.services:
            old = self.services.get(s.name)
            if old is None:  # a renamed service keeps its id if its frontend stayed
                cand = by_frontend.get((s.frontend, s.protocol))
                if cand is not None and cand.name not in wanted:
                    old = cand
            try:
                svc_ids[s.name] = old.id if old is not None else next(free_svc)
            except StopIteration:
                raise CapacityError("no free service id: the datapath holds %d services" % constants.MAX_SERVICES) from None
            for b in s.backends:
                bid = old.backends.get(b.address) if old is not None else None
                try:
                    be_ids[(s.name, b.address)] = bid if bid is not None else next(free_be)
                except StopIteration:
                    raise CapacityError("no free backend id: the datapath holds %d backends"
                                        % constants.MAX_BACKENDS) from None
        return svc_ids, be_ids

    # --- applying ------------------------------------------------------------
    def apply(self, config: Config, weights: dict[str, list[float]]) -> ApplyReport:
        """Bring the maps to `config` with `weights[name]` (one per backend)."""
        for s in config.services:
            if len(weights.get(s.name, ())) != len(s.backends):
                raise ValueError("weights for %s: expected %d values" % (s.name, len(s.backends)))
        svc_ids, be_ids = self._allocate(config)  # may raise: nothing written yet
        report = ApplyReport()
        old_by_id = {a.id: a for a in self.services.values()}
        new_services: dict[str, AppliedService] = {}

        for s in config.services:
            sid = svc_ids[s.name]
            old = old_by_id.get(sid)
            a = self._apply_service(s, sid, old, be_ids, weights[s.name], config.balance_of(s), report)
            new_services[s.name] = a

        # Services that went away: frontend first, so no connect reaches a cleared table.
        kept = {a.id for a in new_services.values()}
        for a in self.services.values():
            if a.id not in kept:
                self.dp.delete_frontend(a.frontend, a.protocol)
                report.removed.append(a.name)
        for a in self.services.values():
            if a.id not in kept:
                self.dp.set_service(a.id, _svc(0, 0, 0))
                self.dp.set_name(a.id, "")
                for bid in a.backends.values():
                    self.dp.clear_backend(bid)
        for bid in self._stray_backends - set(be_ids.values()):
            self.dp.clear_backend(bid)
        self._stray_backends.clear()
        self.services = new_services
        return report

    def _apply_service(self, s: ServiceConfig, sid: int, old: AppliedService | None,
                       be_ids: dict[tuple[str, Addr], int], w: list[float], balance: str,
                       report: ApplyReport) -> AppliedService:
        dp = self.dp
        is_new = old is None or (old.frontend, old.protocol) != (s.frontend, s.protocol)
        a = AppliedService(sid, s.name, s.frontend, s.protocol, old.gen if old else 0,
                           old.table if old is not None else np.full(constants.SLOTS, constants.NO_BACKEND, np.uint32))
        ids = [be_ids[(s.name, b.address)] for b in s.backends]
        states = [STATE[b.state] for b in s.backends]
        old_ids = set(old.backends.values()) if old else set()

        # 1. new backends: entries exist before any table points at them.
        for b, bid, st, wt in zip(s.backends, ids, states, w):
            a.backends[b.address] = bid
            a.weights[bid] = milli(wt)
            if bid not in old_ids:
                dp.reset_backend_stats(bid)
                self.epochs[bid] += 1
                dp.set_backend(bid, sid, b.address, st, milli(wt))
                a.states[bid] = st
            elif st == constants.BE_ACTIVE and old is not None and old.states.get(bid) != st:
                dp.set_backend(bid, sid, b.address, st, milli(wt))  # re-activated: before its slots
                a.states[bid] = st
            else:
                a.states[bid] = old.states.get(bid, st) if old else st

        # 2. the table: idle half, then flip.
        active_w = [wt if st == constants.BE_ACTIVE else 0.0 for st, wt in zip(states, w)]
        table = build_table(ids, active_w)
        n_avail = int(sum(1 for x in active_w if x > 0))
        flags = constants.SVC_P2C if balance == constants.BALANCE_P2C else 0
        if is_new or old is None or not np.array_equal(table, old.table):
            gen = (a.gen ^ 1) if old is not None else 0
            dp.write_slots(sid, gen, table)
            dp.write_shares(gen, table, ids)
            dp.set_service(sid, _svc(gen, n_avail, len(ids), flags))
            a.gen, a.table = gen, table
            report.tables_written.append(s.name)
        elif old is not None and (old.n_backends, old.flags) != (len(ids), flags):
            dp.set_service(sid, _svc(a.gen, n_avail, len(ids), flags))
        a.n_backends, a.flags = len(ids), flags

        # 3. states and weights of kept backends, now that the table agrees.
        for b, bid, st, wt in zip(s.backends, ids, states, w):
            if bid in old_ids and old is not None and (a.states[bid] != st or old.weights.get(bid) != milli(wt)):
                dp.set_backend(bid, sid, b.address, st, milli(wt))
                a.states[bid] = st

        # 4. backends dropped from this service: unreachable now, then cleared.
        for addr, bid in (old.backends.items() if old else []):
            if bid not in ids:
                dp.clear_backend(bid)

        # 5. name and frontend last: a connect only sees a service once it is whole.
        if is_new:
            dp.reset_service_errors(sid)
            dp.set_name(sid, s.name)
            if old is not None:
                dp.delete_frontend(old.frontend, old.protocol)
            dp.set_frontend(s.frontend, s.protocol, sid)
            report.added.append(s.name)
        elif old is not None and old.name != s.name:
            dp.set_name(sid, s.name)
        return a


def _svc(gen: int, n_avail: int, n_backends: int, flags: int = 0) -> Svc:
    return Svc(gen=gen, n_avail=n_avail, n_backends=n_backends, flags=flags)
