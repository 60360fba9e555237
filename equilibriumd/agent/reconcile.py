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
with nothing applied. A write that fails part-way (a batch that stops at
entry i, a single update refused) leaves this object's view stale: which
half is live may have flipped for some services. The failure marks it
stale, and the next `apply` or `write_weights` first re-reads from the maps
what is live (each service's generation and live table) before it writes,
so it only ever writes the standby half, in full.

Two paths write: `apply` brings the maps to a new configuration (rare; per
service), and `write_weights` runs every tick for every service at once:
slot counts for all rows in one vectorized apportionment, and only the
tables whose counts changed are written, in one batch syscall per map
(the idle halves, each one 4 KB map value whose slots carry the backend id
and its share; then the generation flips), so a node with thousands of
services costs two syscalls a tick.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import numpy as np

from ..config import Config, ServiceConfig
from ..datapath import constants
from ..datapath.maps import Datapath
from ..datapath.slots import apportion, apportion_rows, build_table, slot_values
from ..datapath.structs import Svc
from ..types import Addr
from .routing import Layout

STATE = {"active": constants.BE_ACTIVE, "draining": constants.BE_DRAINING,
         "quarantined": constants.BE_QUARANTINED}


class CapacityError(RuntimeError):
    """The change needs more service or backend ids than the maps hold."""


#: one row per backend of an applied service, in its config order
BACKEND_ROW = np.dtype([("id", np.int32), ("state", np.uint8), ("weight", np.uint32), ("held", np.uint16)])


class _Pairs(Mapping[Any, int]):
    """A read-only mapping over two aligned sequences (keys are looked up through a
    dict built at the first lookup: views are made when asked and dropped)."""

    __slots__ = ("_keys", "_values", "_index")

    def __init__(self, keys: Any, values: Any) -> None:
        self._keys, self._values = keys, values
        self._index: dict[Any, int] | None = None

    def _pos(self) -> dict[Any, int]:
        if self._index is None:
            keys = self._keys.tolist() if isinstance(self._keys, np.ndarray) else self._keys
            self._index = {k: i for i, k in enumerate(keys)}
        return self._index

    def __getitem__(self, key: Any) -> int:
        return int(self._values[self._pos()[key]])

    def __iter__(self) -> Iterator[Any]:
        return iter(self._keys.tolist() if isinstance(self._keys, np.ndarray) else self._keys)

    def __len__(self) -> int:
        return len(self._keys)


@dataclass(eq=False)
class AppliedService:
    """What the maps hold for one service. Its backends are one numpy row each
    (BACKEND_ROW, config order) beside the config's own address objects: at
    16,384 backends, four dicts per service took ~4 MB of the agent."""

    id: int
    name: str
    frontend: Addr
    protocol: str
    gen: int
    addrs: tuple[Addr, ...] = ()            #: backend addresses, config order
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=BACKEND_ROW))
    n_backends: int = 0                    #: as written to eq_lb_svc (kept: no map read per tick)
    flags: int = 0                         #: as written to eq_lb_svc (constants.SVC_*)

    @property
    def backends(self) -> Mapping[Addr, int]:
        """address -> backend id"""
        return _Pairs(self.addrs, self.rows["id"])

    @property
    def ids(self) -> np.ndarray:
        return self.rows["id"]

    @property
    def states(self) -> Mapping[int, int]:
        """backend id -> state (constants.BE_*)"""
        return _Pairs(self.rows["id"], self.rows["state"])

    @property
    def weights(self) -> Mapping[int, int]:
        """backend id -> configured milli-weight"""
        return _Pairs(self.rows["id"], self.rows["weight"])

    @property
    def held(self) -> Mapping[int, int]:
        """backend id -> slots it holds in the live half (> 0 only)"""
        h = self.rows["held"] > 0
        return _Pairs(self.rows["id"][h], self.rows["held"][h])


def _rows(ids: Any, states: Any, weights: Any, held: Any) -> np.ndarray:
    r = np.zeros(len(ids), dtype=BACKEND_ROW)
    r["id"], r["state"], r["weight"], r["held"] = ids, states, weights, held
    return r


@dataclass
class ApplyReport:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    tables_written: list[str] = field(default_factory=list)


def milli(w: float) -> int:
    """Configured weights are kept in the maps as u32 thousandths (informational:
    the kernel routes by the slot table, which `equilibriumctl` shows as the share)."""
    return min(int(round(w * 1000)), 0xFFFFFFFF)


@dataclass
class _Rows:
    """What the per-tick path needs, per layout row (the layout's service order)."""

    sid: np.ndarray        #: (S,) service ids
    ids: np.ndarray        #: (S, B) backend ids, -1 where none
    present: np.ndarray    #: (S, B)
    routable: np.ndarray   #: (S, B) active backends
    gen: np.ndarray        #: (S,) live table half
    counts: np.ndarray     #: (S, B) slots each backend holds in the live half
    meta: np.ndarray       #: (S, 2) n_backends, flags as written to eq_lb_svc


class Reconciler:
    def __init__(self, dp: Datapath) -> None:
        self.dp = dp
        self.services: dict[str, AppliedService] = {}
        self._stray_backends: set[int] = set()
        #: frontend keys no adopted service owns (an agent died in a frontend swap)
        self._stray_frontends: set[tuple[Addr, str]] = set()
        #: bumped whenever a backend id's counters are zeroed for a new backend,
        #: so telemetry readers restart that id from zero (datapath.telemetry)
        self.epochs = np.zeros(constants.MAX_BACKENDS, dtype=np.int64)
        self.rows: _Rows | None = None
        self._names: list[str] = []
        self._dirty: set[int] = set()      # rows the tick path rewrote since the last apply
        self._id_span = 0
        #: a write failed part-way: what this object believes is live may be wrong
        self.stale = False

    def id_span(self) -> int:
        """One past the highest backend id in use (ids are allocated lowest first)."""
        return self._id_span

    def _update_span(self) -> None:
        self._id_span = max((int(a.ids.max()) + 1 for a in self.services.values() if len(a.ids)), default=0)

    # --- the per-tick path ---------------------------------------------------
    def set_layout(self, layout: Layout) -> None:
        """Take the router's layout (after `apply`): the rows `write_weights` writes."""
        self._sync()
        s, b = layout.shape
        sid = np.zeros(s, dtype=np.int64)
        gen = np.zeros(s, dtype=np.int64)
        counts = np.zeros((s, b), dtype=np.int64)
        meta = np.zeros((s, 2), dtype=np.int64)
        for r, name in enumerate(layout.names):
            a = self.services[name]
            sid[r], gen[r], meta[r] = a.id, a.gen, (a.n_backends, a.flags)
            n = int(layout.present[r].sum())
            if n == len(a.rows) and (a.rows["id"] == layout.ids[r, :n]).all():
                counts[r, :n] = a.rows["held"]
            else:
                held = a.held
                counts[r, :n] = [held.get(int(i), 0) for i in layout.ids[r, :n]]
        self.rows = _Rows(sid, layout.ids.copy(), layout.present.copy(), layout.routable.copy(), gen, counts, meta)
        self._names = list(layout.names)

    def write_weights(self, weights: np.ndarray) -> int:
        """Every service's table from a (S, B) weights matrix in layout order; writes
        only the tables whose slot counts changed. Returns how many were written."""
        rows = self.rows
        assert rows is not None
        if self.stale:
            self._reread_live(rows)
        w = np.where(rows.routable, np.nan_to_num(np.maximum(weights, 0.0)), 0.0)
        counts = apportion_rows(w, constants.SLOTS)
        changed = np.nonzero((counts != rows.counts).any(axis=1))[0]
        if changed.size == 0:
            return 0
        k = changed.size
        gen = rows.gen[changed] ^ 1
        sid = rows.sid[changed]
        ids, c = rows.ids[changed], counts[changed]
        # each table half: every backend's slot value (its id and, above ID_BITS, its
        # count: slots.pack) repeated by its count (contiguous runs, as build_table),
        # NO_BACKEND filling a table with nothing routable
        fill = constants.SLOTS - c.sum(axis=1)
        vals = slot_values(np.where(ids >= 0, ids, 0), c)
        vals_x = np.concatenate([vals, np.full((k, 1), constants.NO_BACKEND, dtype=np.uint32)], axis=1)
        c_x = np.concatenate([c, fill[:, None]], axis=1)
        tables = np.repeat(vals_x.ravel(), c_x.ravel()).reshape(k, constants.SLOTS)
        svcs = np.stack([gen, (w[changed] > 0).sum(axis=1), rows.meta[changed, 0], rows.meta[changed, 1]], axis=1)
        try:
            self.dp.write_tables(sid * 2 + gen, tables)   # 1. the idle halves, ids and shares
            self.dp.set_services_batch(sid, svcs)        # 2. flip
        except BaseException:
            self.stale = True   # some may have flipped: re-read before the next write
            raise
        rows.counts[changed] = c
        rows.gen[changed] = gen
        self._dirty.update(changed.tolist())
        return k

    def _reread_live(self, rows: _Rows) -> None:
        """After a failed write: each row's live half and what it holds, from the maps."""
        for r in range(len(rows.sid)):
            sid = int(rows.sid[r])
            gen = self.dp.service(sid).gen & 1
            table = self.dp.read_slots(sid, gen)
            held = _held(*np.unique(table[table != constants.NO_BACKEND], return_counts=True))
            rows.gen[r] = gen
            rows.counts[r] = [held.get(int(i), 0) if i >= 0 else 0 for i in rows.ids[r]]
        self._dirty.update(range(len(rows.sid)))
        self.stale = False

    def _sync(self) -> None:
        """Bring the per-service records up to what the tick path wrote."""
        rows = self.rows
        if rows is None or not self._dirty:
            return
        for r in self._dirty:
            a = self.services.get(self._names[r])
            if a is None or a.id != rows.sid[r]:
                continue
            n = int(rows.present[r].sum())
            a.gen = int(rows.gen[r])
            if n == len(a.rows) and (a.rows["id"] == rows.ids[r, :n]).all():
                a.rows["held"] = rows.counts[r, :n]
        self._dirty.clear()

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
            table = self.dp.read_slots(ps.id, ps.gen)
            held = _held(*np.unique(table[table != constants.NO_BACKEND], return_counts=True))
            bs = by_svc.get(ps.id, [])
            rows = _rows([b.id for b in bs], [b.state for b in bs], [b.weight for b in bs],
                         [held.get(b.id, 0) for b in bs])
            self.services[ps.name or "svc-%d" % ps.id] = AppliedService(
                ps.id, ps.name or "svc-%d" % ps.id, ps.frontend, ps.protocol, ps.gen, tuple(b.address for b in bs),
                rows, n_backends=ps.n_backends, flags=ps.flags)
        # Backends or services with no frontend are leftovers of an interrupted
        # change: cleared by the next apply.
        self._stray_backends = {b.id for s, bl in by_svc.items() if s not in known for b in bl}
        # A swap points both frontends at one service for a moment: a key beyond the
        # one adopted would route to that id whoever gets it next. Deleted by the next apply.
        owned = {(a.frontend, a.protocol) for a in self.services.values()}
        self._stray_frontends = {(fe, proto) for fe, proto, _ in self.dp.frontend_keys()} - owned
        self._update_span()
        return len(self.services)

    # --- planning (no writes) ---------------------------------------------
    def _allocate(self, config: Config) -> tuple[dict[str, int], dict[tuple[str, Addr], int]]:
        used_svc = {a.id for a in self.services.values()}
        used_be = {bid for a in self.services.values() for bid in a.ids.tolist()} | self._stray_backends
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
                raise CapacityError("no free service id: the datapath holds %d services"
                                    % constants.MAX_SERVICES) from None
            known = dict(zip(old.addrs, old.ids.tolist())) if old is not None else {}
            for b in s.backends:
                bid = known.get(b.address)
                try:
                    be_ids[(s.name, b.address)] = bid if bid is not None else next(free_be)
                except StopIteration:
                    raise CapacityError("no free backend id: the datapath holds %d backends"
                                        % constants.MAX_BACKENDS) from None
        return svc_ids, be_ids

    def check(self, config: Config) -> None:
        """Raise CapacityError if `config` cannot be applied; writes nothing."""
        self._allocate(config)

    # --- applying ------------------------------------------------------------
    def apply(self, config: Config, weights: dict[str, list[float]]) -> ApplyReport:
        """Bring the maps to `config` with `weights[name]` (one per backend)."""
        if self.stale:   # a failed write: take what the maps hold, as after a restart
            self._dirty.clear()
            self.adopt()
            self.stale = False
        self._sync()
        for s in config.services:
            if len(weights.get(s.name, ())) != len(s.backends):
                raise ValueError("weights for %s: expected %d values" % (s.name, len(s.backends)))
        svc_ids, be_ids = self._allocate(config)  # may raise: nothing written yet
        try:
            return self._apply(config, weights, svc_ids, be_ids)
        except BaseException:
            self.stale = True   # part of it is written: re-read before the next write
            raise

    def _apply(self, config: Config, weights: dict[str, list[float]], svc_ids: dict[str, int],
               be_ids: dict[tuple[str, Addr], int]) -> ApplyReport:
        report = ApplyReport()
        old_by_id = {a.id: a for a in self.services.values()}
        new_services: dict[str, AppliedService] = {}

        # A frontend key another service of this config takes over (a swap, or a new
        # service on a removed one's address) is overwritten by its new owner, never deleted.
        claimed = {(s.frontend, s.protocol) for s in config.services}
        # Ids that change hands (a service gone, or an id given to a new frontend): the
        # per-caller budgets and counters of the old service go first, so a caller
        # punished there is not held back on the new one (one pass, before any frontend
        # of this config points at them).
        fresh = {svc_ids[s.name] for s in config.services
                 if (o := old_by_id.get(svc_ids[s.name])) is None
                 or (o.frontend, o.protocol) != (s.frontend, s.protocol)}
        self.dp.forget_services(fresh | (set(old_by_id) - set(svc_ids.values())))
        for fe, proto in self._stray_frontends - claimed:   # a claimed one is overwritten by its owner
            self.dp.delete_frontend(fe, proto)
        self._stray_frontends.clear()
        for s in config.services:
            sid = svc_ids[s.name]
            old = old_by_id.get(sid)
            a = self._apply_service(s, sid, old, be_ids, weights[s.name], config.balance_of(s), report, claimed,
                                    sweep=config.sweep_of(s))
            new_services[s.name] = a

        # Services that went away: frontend first, so no connect reaches a cleared table.
        kept = {a.id for a in new_services.values()}
        for a in self.services.values():
            if a.id not in kept and (a.frontend, a.protocol) not in claimed:
                self.dp.delete_frontend(a.frontend, a.protocol)
                report.removed.append(a.name)
        for a in self.services.values():
            if a.id not in kept:
                self.dp.set_service(a.id, _svc(0, 0, 0))
                self.dp.set_name(a.id, "")
                for bid in a.ids.tolist():
                    self.dp.clear_backend(bid)
        for bid in self._stray_backends - set(be_ids.values()):
            self.dp.clear_backend(bid)
        self._stray_backends.clear()
        self.services = new_services
        self.rows = None   # the caller hands the new layout (set_layout)
        self._update_span()
        return report

    def _apply_service(self, s: ServiceConfig, sid: int, old: AppliedService | None,
                       be_ids: dict[tuple[str, Addr], int], w: list[float], balance: str,
                       report: ApplyReport, claimed: set[tuple[Addr, str]], sweep: bool = True) -> AppliedService:
        dp = self.dp
        is_new = old is None or (old.frontend, old.protocol) != (s.frontend, s.protocol)
        ids = [be_ids[(s.name, b.address)] for b in s.backends]
        states = [STATE[b.state] for b in s.backends]
        weights = [milli(b.weight) for b in s.backends]
        old_states = dict(zip(old.ids.tolist(), old.rows["state"].tolist())) if old is not None else {}
        old_weights = dict(zip(old.ids.tolist(), old.rows["weight"].tolist())) if old is not None else {}
        kept_states = []   # what each backend's map entry says once step 1 is done

        # 1. new backends: entries exist before any table points at them.
        for b, bid, st, mw in zip(s.backends, ids, states, weights):
            if bid not in old_states:
                dp.reset_backend_stats(bid)
                self.epochs[bid] += 1
                dp.set_backend(bid, sid, b.address, st, mw)
                kept_states.append(st)
            elif st == constants.BE_ACTIVE and old_states[bid] != st:
                dp.set_backend(bid, sid, b.address, st, mw)  # re-activated: before its slots
                kept_states.append(st)
            else:
                kept_states.append(old_states[bid])

        # 2. the table: idle half, then flip.
        active_w = [wt if st == constants.BE_ACTIVE else 0.0 for st, wt in zip(states, w)]
        counts = apportion(active_w)
        held = _held(np.asarray(ids), counts)
        n_avail = int(sum(1 for x in active_w if x > 0))
        flags = (constants.SVC_P2C if balance == constants.BALANCE_P2C else 0) | (constants.SVC_SWEEP if sweep else 0)
        gen = old.gen if old is not None else 0
        if is_new or old is None or held != dict(old.held):
            table = build_table(ids, active_w)
            gen = (gen ^ 1) if old is not None else 0
            dp.write_slots(sid, gen, table)
            dp.set_service(sid, _svc(gen, n_avail, len(ids), flags))
            report.tables_written.append(s.name)
        else:
            old_held = dict(old.held)
            counts = np.array([old_held.get(i, 0) for i in ids])
            if (old.n_backends, old.flags) != (len(ids), flags):
                dp.set_service(sid, _svc(gen, n_avail, len(ids), flags))

        # 3. states and weights of kept backends, now that the table agrees.
        for k, (b, bid, st, mw) in enumerate(zip(s.backends, ids, states, weights)):
            if bid in old_states and (kept_states[k] != st or old_weights[bid] != mw):
                dp.set_backend(bid, sid, b.address, st, mw)
                kept_states[k] = st
        a = AppliedService(sid, s.name, s.frontend, s.protocol, gen, tuple(b.address for b in s.backends),
                           _rows(ids, kept_states, weights, counts), n_backends=len(ids), flags=flags)

        # 4. backends dropped from this service: unreachable now, then cleared.
        kept = set(ids)
        for bid in (old.ids.tolist() if old is not None else []):
            if bid not in kept:
                dp.clear_backend(bid)

        # 5. name and frontend last: a connect only sees a service once it is whole.
        if is_new:
            dp.reset_service_errors(sid)
            dp.set_name(sid, s.name)
            if old is not None and (old.frontend, old.protocol) not in claimed:
                dp.delete_frontend(old.frontend, old.protocol)
            dp.set_frontend(s.frontend, s.protocol, sid)
            report.added.append(s.name)
        elif old is not None and old.name != s.name:
            dp.set_name(sid, s.name)
        return a


def _held(ids: np.ndarray, counts: np.ndarray) -> dict[int, int]:
    """backend id -> slots, for the ids that hold any (what a table half routes to)."""
    return {int(i): int(c) for i, c in zip(ids, counts) if c > 0}


def _svc(gen: int, n_avail: int, n_backends: int, flags: int = 0) -> Svc:
    return Svc(gen=gen, n_avail=n_avail, n_backends=n_backends, flags=flags)
