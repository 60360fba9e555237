"""The agent's and equilibriumctl's view of the pinned maps (libbpf, no bcc).

`Datapath` opens every pinned map once and offers typed reads and writes.
It knows the layout, not the policy: what to write, and in which order, is
decided by equilibriumd.agent.reconcile.
"""

from __future__ import annotations

import ctypes as ct
import os
from dataclasses import dataclass
from typing import Collection

import numpy as np

from ..types import Addr
from . import constants, libbpf, pins, slots
from .evidence import EvidenceReader
from .structs import (
    Backend,
    BeHist,
    BeStats,
    BeTel,
    Budget,
    CallerKey,
    CallerVal,
    Cb,
    FE4Key,
    FE6Key,
    Meta,
    RbClosed,
    RevStat,
    Svc,
    SvcErrs,
    SvcName,
    Table,
    TelGroup,
    backend_addr,
    backend_entry,
    ip4_from_net,
    ip4_to_net,
    ip6_from_net,
    ip6_to_net,
    port_from_net,
    port_to_net,
)
from .telemetry import READ_BUDGET, TelemetryReader

PROTO_NUM = {"tcp": 6, "udp": 17}
PROTO_NAME = {v: k for k, v in PROTO_NUM.items()}


@dataclass(frozen=True)
class PinnedService:
    id: int
    name: str
    frontend: Addr
    protocol: str
    gen: int
    n_avail: int
    n_backends: int
    flags: int = 0   #: EQ_SVC_* (constants.SVC_P2C)


@dataclass(frozen=True)
class PinnedBackend:
    id: int
    svc: int
    address: Addr
    state: int
    weight: int


def table_values(halves: np.ndarray, packed: np.ndarray) -> np.ndarray:
    """Packed table halves (slots.pack) as the eq_lb_slots values for `halves`:
    (n, SLOTS) uint32, one per half."""
    t = np.asarray(packed, dtype=np.uint32).reshape(-1, constants.SLOTS)
    if len(halves) != t.shape[0]:
        raise ValueError("one table per half")
    return t


def update_arrays(fd: int, keys: np.ndarray, values: np.ndarray) -> None:
    """Map entries keys[i] (u32) = values[i] (one value per row of `values`), one syscall."""
    k = np.ascontiguousarray(keys, dtype=np.uint32)
    v = np.ascontiguousarray(values)
    if k.size:
        libbpf.map_update_batch(fd, k.ctypes.data_as(ct.c_void_p), v.ctypes.data_as(ct.c_void_p), int(k.size))


class DatapathMissing(RuntimeError):
    """No (complete) datapath is pinned at the given directory."""


class Datapath:
    """Open file descriptors on every pinned map of one pin directory."""

    def __init__(self, pin_dir: str = constants.DEFAULT_PIN_DIR) -> None:
        self.pin_dir = pin_dir
        state = pins.pin_state(pin_dir)
        missing = [m for m in constants.MAPS if m not in state.maps_present]
        if missing:
            raise DatapathMissing("no Equilibrium datapath at %s (missing %s); is the agent running?"
                                  % (pin_dir, ", ".join(missing)))
        self.fd: dict[str, int] = {}
        try:
            for m in constants.MAPS:
                self.fd[m] = libbpf.obj_get(pins.map_pin(pin_dir, m))
            for m in constants.REBALANCE_MAPS:   # optional: the loader builds the rebalancer when it can
                if os.path.exists(pins.map_pin(pin_dir, m)):
                    self.fd[m] = libbpf.obj_get(pins.map_pin(pin_dir, m))
        except Exception:
            self.close()
            raise
        self.ncpu = libbpf.possible_cpus()

    def close(self) -> None:
        for fd in self.fd.values():
            os.close(fd)
        self.fd = {}

    def __enter__(self) -> "Datapath":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- meta -------------------------------------------------------------
    def meta(self) -> Meta:
        m = Meta()
        libbpf.map_lookup(self.fd["eq_meta"], ct.c_uint32(0), m)
        return m

    # --- frontends ----------------------------------------------------------
    @staticmethod
    def frontend_key(fe: Addr, protocol: str) -> FE4Key | FE6Key:
        if fe.family == 4:
            return FE4Key(addr=ip4_to_net(fe.ip), port=port_to_net(fe.port), proto=PROTO_NUM[protocol])
        k6 = FE6Key(port=port_to_net(fe.port), proto=PROTO_NUM[protocol])
        k6.addr[:] = ip6_to_net(fe.ip)
        return k6

    def frontends(self) -> dict[int, tuple[Addr, str]]:
        """svc id -> (frontend, protocol), from both frontend maps (one per service:
        `frontend_keys` has every key)."""
        return {sid: (addr, proto) for addr, proto, sid in self.frontend_keys()}

    def frontend_keys(self) -> list[tuple[Addr, str, int]]:
        """Every frontend key, (frontend, protocol, svc id): two keys can name one
        service after an agent died in the middle of a frontend swap."""
        out = []
        for mname, ktype in (("eq_lb4_fe", FE4Key), ("eq_lb6_fe", FE6Key)):
            fd = self.fd[mname]
            for k in libbpf.map_keys(fd, ktype):
                v = ct.c_uint32()
                if not libbpf.map_lookup(fd, k, v):
                    continue  # deleted while we walked
                if isinstance(k, FE4Key):
                    addr = Addr(4, ip4_from_net(k.addr), port_from_net(k.port))
                else:
                    addr = Addr(6, ip6_from_net(k.addr), port_from_net(k.port))
                out.append((addr, PROTO_NAME.get(k.proto, str(k.proto)), int(v.value)))
        return out

    def set_frontend(self, fe: Addr, protocol: str, svc_id: int) -> None:
        m = "eq_lb4_fe" if fe.family == 4 else "eq_lb6_fe"
        libbpf.map_update(self.fd[m], self.frontend_key(fe, protocol), ct.c_uint32(svc_id))

    def delete_frontend(self, fe: Addr, protocol: str) -> None:
        m = "eq_lb4_fe" if fe.family == 4 else "eq_lb6_fe"
        libbpf.map_delete(self.fd[m], self.frontend_key(fe, protocol))

    # --- services -------------------------------------------------------------
    def service(self, svc_id: int) -> Svc:
        s = Svc()
        libbpf.map_lookup(self.fd["eq_lb_svc"], ct.c_uint32(svc_id), s)
        return s

    def set_service(self, svc_id: int, svc: Svc) -> None:
        libbpf.map_update(self.fd["eq_lb_svc"], ct.c_uint32(svc_id), svc)

    def name(self, svc_id: int) -> str:
        n = SvcName()
        libbpf.map_lookup(self.fd["eq_svc_name"], ct.c_uint32(svc_id), n)
        return n.name.decode(errors="replace")

    def set_name(self, svc_id: int, name: str) -> None:
        libbpf.map_update(self.fd["eq_svc_name"], ct.c_uint32(svc_id), SvcName(name=name.encode()))

    def services(self) -> list[PinnedService]:
        out = []
        for sid, (fe, proto) in sorted(self.frontends().items()):
            s = self.service(sid)
            out.append(PinnedService(sid, self.name(sid), fe, proto, s.gen & 1, s.n_avail, s.n_backends, s.flags))
        return out

    # --- slot tables ------------------------------------------------------------
    def read_table(self, svc_id: int, gen: int) -> tuple[np.ndarray, np.ndarray]:
        """(backend id, share) in each slot of one half of a service's table (one
        value of eq_lb_slots, struct eq_table, unpacked)."""
        buf = Table()
        libbpf.map_lookup(self.fd["eq_lb_slots"], ct.c_uint32(svc_id * 2 + (gen & 1)), buf)
        return slots.unpack(np.frombuffer(bytes(buf), dtype=np.uint32))

    def read_slots(self, svc_id: int, gen: int) -> np.ndarray:
        """The backend id in each slot of one half of a service's table."""
        return self.read_table(svc_id, gen)[0]

    def read_shares(self, svc_id: int, gen: int, ids: list[int]) -> list[int]:
        """The share each of `ids` carries in the slots of a table half (what the
        kernel's two-choice comparison reads); 0 for an id that holds none."""
        return slots.carried(*self.read_table(svc_id, gen), ids)

    def write_slots(self, svc_id: int, gen: int, table: np.ndarray) -> None:
        """Write one half of a service's table (one map update)."""
        if table.shape != (constants.SLOTS,):
            raise ValueError("slot table must have %d entries" % constants.SLOTS)
        self.write_tables(np.array([svc_id * 2 + (gen & 1)]), slots.pack(table[None, :]))

    # --- the agent's per-tick writes: one batch syscall per map ----------------------
    def _update_batch(self, mname: str, keys: np.ndarray, values: np.ndarray) -> None:
        update_arrays(self.fd[mname], keys, values)

    def write_tables(self, halves: np.ndarray, packed: np.ndarray) -> None:
        """Table half `halves[i]` (svc_id * 2 + gen) = `packed[i]` (SLOTS packed slots:
        backend id and its share, slots.pack), for any number of services in one
        syscall (a half is one map value)."""
        self._update_batch("eq_lb_slots", halves, table_values(halves, packed))

    def set_services_batch(self, svc_ids: np.ndarray, svcs: np.ndarray) -> None:
        """eq_lb_svc for many services; `svcs` is (n, 4) uint32: gen, n_avail, n_backends, flags
        (struct eq_svc's fields in order)."""
        assert ct.sizeof(Svc) == 16
        self._update_batch("eq_lb_svc", svc_ids, np.asarray(svcs, dtype=np.uint32).reshape(-1, 4))

    def active(self, n: int = constants.MAX_BACKENDS) -> np.ndarray:
        """Open connections this node holds to backend ids 0..n-1 (int64, clamped at 0:
        a count can dip below zero for a moment after an id is reused)."""
        raw = libbpf.array_read(self.fd["eq_lb_active"], 8, n)
        return np.maximum(np.frombuffer(raw, dtype=np.int64), 0)

    # --- backends ---------------------------------------------------------------
    def backends_raw(self, start: int = 0, n: int = constants.MAX_BACKENDS) -> "ct.Array[Backend]":
        """eq_lb_be entries [start, start + n)."""
        raw = libbpf.array_read(self.fd["eq_lb_be"], ct.sizeof(Backend), n, start)
        return (Backend * n).from_buffer_copy(raw)

    def backends(self) -> list[PinnedBackend]:
        """Every backend entry in use, read 4,096 at a time (a node's whole map is 2 MB)."""
        out = []
        step = 4096
        for start in range(0, constants.MAX_BACKENDS, step):
            chunk = self.backends_raw(start, min(step, constants.MAX_BACKENDS - start))
            states = np.frombuffer(memoryview(chunk).cast("B"), dtype=np.dtype(Backend))["state"]
            for j in np.nonzero(states != constants.BE_UNUSED)[0].tolist():
                b = chunk[j]
                out.append(PinnedBackend(start + j, b.svc, backend_addr(b), b.state, b.weight))
        return out

    def backend_gen(self, be_id: int) -> int:
        """The id's generation (eq_backend.gen): how often it was handed to a new backend."""
        b = Backend()
        libbpf.map_lookup(self.fd["eq_lb_be"], ct.c_uint32(be_id), b)
        return int(b.gen)

    def set_backend(self, be_id: int, svc_id: int, addr: Addr, state: int, weight: int) -> None:
        b = backend_entry(svc_id, addr, state, weight)
        b.gen = self.backend_gen(be_id)   # kept: sockets of this backend stay its own
        libbpf.map_update(self.fd["eq_lb_be"], ct.c_uint32(be_id), b)

    def clear_backend(self, be_id: int) -> None:
        libbpf.map_update(self.fd["eq_lb_be"], ct.c_uint32(be_id), Backend(svc=0xFFFFFFFF, gen=self.backend_gen(be_id)))

    # --- per-CPU counters ---------------------------------------------------------
    def percpu_sum(self, mname: str, vtype: type[ct.Structure], n: int) -> np.ndarray:
        """Sum a per-CPU array of u64-only structs over CPUs, keys 0..n-1: shape (n, fields)."""
        nfields = ct.sizeof(vtype) // 8
        per = ct.sizeof(vtype) * self.ncpu
        step = max(READ_BUDGET // per, 1)   # one read copies at most READ_BUDGET bytes, whatever the CPUs
        out = np.empty((n, nfields), dtype=np.uint64)
        for start in range(0, n, step):
            k = min(step, n - start)
            raw = libbpf.array_read(self.fd[mname], per, k, start)
            out[start:start + k] = np.frombuffer(raw, dtype=np.uint64).reshape(k, self.ncpu, nfields).sum(
                axis=1, dtype=np.uint64)
        return out

    def selections(self, n: int = constants.MAX_BACKENDS) -> np.ndarray:
        """Selections so far per backend id 0..n-1 (uint64)."""
        return self.percpu_sum("eq_lb_be_stat", BeStats, n)[:, 0]

    def reset_backend_stats(self, be_id: int) -> None:
        """Zero every counter of a backend id, its open-connection count included,
        before it names a new backend. Its generation is bumped first: the old
        backend's sockets still open then attribute nothing to the id (the kernel
        drops their closes, resets and responses), so nothing they do after the
        zeroing reaches the new backend's counters."""
        b = Backend()
        libbpf.map_lookup(self.fd["eq_lb_be"], ct.c_uint32(be_id), b)
        b.gen = (b.gen + 1) & 0xFFFFFFFF
        libbpf.map_update(self.fd["eq_lb_be"], ct.c_uint32(be_id), b)
        libbpf.map_update(self.fd["eq_lb_active"], ct.c_uint32(be_id), ct.c_int64(0))
        libbpf.map_update(self.fd["eq_lb_be_stat"], ct.c_uint32(be_id), (BeStats * self.ncpu)())
        # eq_tel_be holds TEL_GROUP backends a value: zero this one's slot on every CPU.
        # (Increments its group neighbours make between the read and the write are
        # lost: a few counts, only when an id is handed to a new backend.)
        group = (TelGroup * self.ncpu)()
        key = ct.c_uint32(be_id // constants.TEL_GROUP)
        libbpf.map_lookup(self.fd["eq_tel_be"], key, group)
        for cpu in range(self.ncpu):
            group[cpu].be[be_id % constants.TEL_GROUP] = BeTel()
        libbpf.map_update(self.fd["eq_tel_be"], key, group)
        libbpf.map_update(self.fd["eq_tel_hist"], ct.c_uint32(be_id), BeHist())
        libbpf.map_update(self.fd["eq_tel_cb"], ct.c_uint32(be_id), Cb())   # its callers' evidence too
        if "eq_rb_closed" in self.fd:
            libbpf.map_update(self.fd["eq_rb_closed"], ct.c_uint32(be_id), RbClosed())
            libbpf.map_update(self.fd["eq_rb_quota"], ct.c_uint32(be_id), ct.c_int64(0))

    def rebalanced(self, n: int = constants.MAX_BACKENDS) -> np.ndarray | None:
        """Connections the rebalancer closed per backend id 0..n-1, by reason
        (constants.RB_REASONS): (n, 3) uint64; None when it is not loaded."""
        if "eq_rb_closed" not in self.fd:
            return None
        raw = libbpf.array_read(self.fd["eq_rb_closed"], ct.sizeof(RbClosed), n)
        return np.frombuffer(raw, dtype=np.uint64).reshape(n, 4)[:, :len(constants.RB_REASONS)]

    def telemetry(self) -> TelemetryReader:
        """A reader of the per-backend telemetry map (one per consumer: it keeps state)."""
        return TelemetryReader(self.fd["eq_tel_be"], self.ncpu, self.fd["eq_tel_hist"])

    # --- admission budgets (folk-theorem enforcement) ----------------------------------
    def set_budget(self, cgroup: int, svc_id: int, budget: Budget) -> None:
        """Hold `cgroup`'s connects to `svc_id` to `budget` (a punished caller). The
        service's count of budgets (eq_lb_budgeted) goes up with a new one, after
        it exists: connect looks budgets up only for a service that has any."""
        key = CallerKey(cgroup=cgroup, svc=svc_id)
        new = not libbpf.map_lookup(self.fd["eq_lb_budget"], key, Budget())
        libbpf.map_update(self.fd["eq_lb_budget"], key, budget)
        if new:
            self._add_budgeted(svc_id, 1)

    def set_budget_rate(self, cgroup: int, svc_id: int, interval_ns: int, burst_ns: int, mode: int) -> bool:
        """A budget at this rate (GCRA interval and burst) and mode: a new entry, or an
        existing one rewritten with its GCRA state (tat) and counters (throttled,
        observed, admitted) kept, since cooperation counts a caller's refusals from
        them. (The kernel's increments between this read and the write are lost: a
        few connects' worth, once per rate change.) True when the entry was new."""
        key = CallerKey(cgroup=cgroup, svc=svc_id)
        b = Budget()
        if libbpf.map_lookup(self.fd["eq_lb_budget"], key, b):
            b.interval_ns, b.burst_ns, b.mode = interval_ns, burst_ns, mode
            libbpf.map_update(self.fd["eq_lb_budget"], key, b)
            return False
        self.set_budget(cgroup, svc_id, Budget(interval_ns=interval_ns, burst_ns=burst_ns, mode=mode))
        return True

    def delete_budget(self, cgroup: int, svc_id: int) -> bool:
        """Forgive: no budget, never held back. False if it had none."""
        gone = libbpf.map_delete(self.fd["eq_lb_budget"], CallerKey(cgroup=cgroup, svc=svc_id))
        if gone:
            self._add_budgeted(svc_id, -1)
        return gone

    def lift_budgets(self) -> int:
        """Every budget deleted and every service's count zeroed (a new cooperation
        game: counts a crashed agent left half-written are reset too). Returns how many."""
        keys = list(libbpf.map_keys(self.fd["eq_lb_budget"], CallerKey))
        for k in keys:
            libbpf.map_delete(self.fd["eq_lb_budget"], k)
        zero = np.zeros(constants.MAX_SERVICES, dtype=np.uint32)
        self._update_batch("eq_lb_budgeted", np.arange(constants.MAX_SERVICES, dtype=np.uint32), zero)
        return len(keys)

    def budgeted(self, svc_id: int) -> int:
        """How many budgets `svc_id` has (eq_lb_budgeted: connect's gate before a budget lookup)."""
        v = ct.c_uint32()
        libbpf.map_lookup(self.fd["eq_lb_budgeted"], ct.c_uint32(svc_id), v)
        return int(v.value)

    def forget_services(self, svc_ids: Collection[int]) -> int:
        """Per-caller state keyed by these service ids: admission budgets (and the
        services' eq_lb_budgeted gates) and per-caller counters. For ids whose service
        went away or goes to another service: a punished caller of the old one must
        not be held back on the new one, nor its counts shown there. One pass over
        each map's keys, only when ids change hands. Returns the entries deleted."""
        ids = set(svc_ids)
        if not ids:
            return 0
        n = 0
        for name in ("eq_lb_budget", "eq_tel_caller"):
            fd = self.fd.get(name)
            if fd is None:   # telemetry off: no per-caller map
                continue
            for k in [k for k in libbpf.map_keys(fd, CallerKey) if int(k.svc) in ids]:
                n += libbpf.map_delete(fd, k)
        keys = np.fromiter(sorted(ids), dtype=np.uint32, count=len(ids))
        self._update_batch("eq_lb_budgeted", keys, np.zeros(len(ids), dtype=np.uint32))
        return n

    def _add_budgeted(self, svc_id: int, d: int) -> None:
        v = ct.c_uint32()
        libbpf.map_lookup(self.fd["eq_lb_budgeted"], ct.c_uint32(svc_id), v)
        libbpf.map_update(self.fd["eq_lb_budgeted"], ct.c_uint32(svc_id), ct.c_uint32(max(int(v.value) + d, 0)))

    def budgets(self) -> dict[tuple[int, int], Budget]:
        """Every budget: (cgroup, service id) -> its state and counters (the punished callers: few)."""
        fd, out = self.fd["eq_lb_budget"], {}
        for k in libbpf.map_keys(fd, CallerKey):
            v = Budget()
            if libbpf.map_lookup(fd, k, v):
                out[(int(k.cgroup), int(k.svc))] = v
        return out

    def evidence(self) -> EvidenceReader:
        """The per-(caller, backend) evidence map, mapped read-only (no syscall per read)."""
        return EvidenceReader(self.fd["eq_tel_cb"])

    def callers(self) -> list[tuple[int, int, int, int, int]]:
        """(caller cgroup id, service id, connections, requests, errors), summed over CPUs."""
        fd = self.fd["eq_tel_caller"]
        out = []
        vals = (CallerVal * self.ncpu)()
        for k in libbpf.map_keys(fd, CallerKey):
            if not libbpf.map_lookup(fd, k, vals):
                continue
            out.append((int(k.cgroup), int(k.svc), sum(v.connections for v in vals),
                        sum(v.requests for v in vals), sum(v.errors for v in vals)))
        return out

    def open_sockets(self) -> int:
        """Entries in the per-socket map: live translated sockets (and LRU leftovers)."""
        return sum(1 for _ in libbpf.map_keys(self.fd["eq_tel_sock"], ct.c_uint64))

    def revnat_stats(self) -> dict[str, int]:
        """Unconnected-UDP reverse entries (eq_lb_rev_stat, summed over CPUs): inserted,
        released (their socket closed), evicted (gone before that: a reply shown from
        the backend's address), untracked (left to the LRU), and `live` = inserted -
        released, the tracked entries held now (capacity constants.MAX_REVNAT)."""
        vals = (RevStat * self.ncpu)()
        libbpf.map_lookup(self.fd["eq_lb_rev_stat"], ct.c_uint32(0), vals)
        out = {f[0]: sum(int(getattr(v, f[0])) for v in vals) for f in RevStat._fields_}
        out["live"] = max(out["inserted"] - out["released"], 0)
        return out

    def service_errors(self, n: int = constants.MAX_SERVICES) -> np.ndarray:
        """Translation failures per service id 0..n-1: columns no_backend, stale_slot, rev_update."""
        return self.percpu_sum("eq_lb_svc_err", SvcErrs, n)

    def reset_service_errors(self, svc_id: int) -> None:
        zero = (SvcErrs * self.ncpu)()
        libbpf.map_update(self.fd["eq_lb_svc_err"], ct.c_uint32(svc_id), zero)
