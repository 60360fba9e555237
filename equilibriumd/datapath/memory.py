"""An in-memory datapath that records every write: the control plane's unit
tests run against it without root or a kernel (after Cilium's LBMockMap).

`MemoryDatapath` has the public methods of `maps.Datapath`, with the same
signatures, and holds what the pinned maps would hold: array maps read as
zero until written, a write past an array's end fails with E2BIG (as the
kernel's does), a batch write is one record, a per-CPU value is summed over
`ncpu` CPUs the way the real reads sum it, and the per-backend telemetry is
read by the real `TelemetryReader` (only its map read is replaced), so
deltas, wrap-around and id epochs behave as on a node. Every call that would
be a map write or delete on a node (one syscall) appends a `Write` to
`writes`, in call order, so a test can assert the order the reconciler
writes in. The `set_*`/`add_*` helpers stand in for what the kernel's
programs do (count connects, telemetry, translation failures); they are not
recorded.

What it does not model: the verifier and the programs themselves (the
kernel's pick is `datapath.pick`), per-CPU concurrency (a write is atomic
here; on a node another CPU may read between two of the agent's writes,
which is why their order matters), LRU eviction, map pinning and file
descriptors, and partial failure of a map other than a key out of range.
Storage grows to the highest id written, so a test that uses ids 0..n
costs O(n) memory, whatever MAX_BACKENDS is.

`DatapathLike` is the interface both classes satisfy (mypy checks it below).
"""

from __future__ import annotations

import ctypes as ct
import errno
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Collection, Mapping, Protocol, Sequence

import numpy as np

from ..types import Addr
from . import constants, slots
from .evidence import Evidence, EvidenceSource, decayed
from .libbpf import BpfError
from .maps import PROTO_NAME, Datapath, PinnedBackend, PinnedService, table_values
from .structs import (
    BE_TEL_COUNTERS,
    CB_COUNTERS,
    HIST_BUCKETS,
    Backend,
    BeHist,
    BeStats,
    BeTel,
    Budget,
    FE4Key,
    FE6Key,
    Meta,
    Svc,
    SvcErrs,
    SvcName,
    backend_addr,
    backend_entry,
    ip4_from_net,
    ip6_from_net,
    port_from_net,
)
from .telemetry import COUNTER, TelemetryReader

#: one record of eq_tel_be (counters) and of eq_tel_hist (histograms) for one CPU
TEL_DTYPE = np.dtype([("c", np.uint64, (len(BE_TEL_COUNTERS),))])
HIST_DTYPE = np.dtype([("h", np.uint32, (2 * HIST_BUCKETS,))])
U64, U32 = 1 << 64, 1 << 32


class DatapathLike(Protocol):
    """What the agent, the views and the metrics use of a datapath: the public
    methods of `maps.Datapath`, which `MemoryDatapath` also has."""

    pin_dir: str
    ncpu: int

    def close(self) -> None: ...
    def __enter__(self) -> "DatapathLike": ...
    def __exit__(self, *exc: object) -> None: ...
    def meta(self) -> Meta: ...
    @staticmethod
    def frontend_key(fe: Addr, protocol: str) -> FE4Key | FE6Key: ...
    def frontends(self) -> dict[int, tuple[Addr, str]]: ...
    def frontend_keys(self) -> list[tuple[Addr, str, int]]: ...
    def set_frontend(self, fe: Addr, protocol: str, svc_id: int) -> None: ...
    def delete_frontend(self, fe: Addr, protocol: str) -> None: ...
    def service(self, svc_id: int) -> Svc: ...
    def set_service(self, svc_id: int, svc: Svc) -> None: ...
    def name(self, svc_id: int) -> str: ...
    def set_name(self, svc_id: int, name: str) -> None: ...
    def services(self) -> list[PinnedService]: ...
    def read_table(self, svc_id: int, gen: int) -> tuple[np.ndarray, np.ndarray]: ...
    def read_slots(self, svc_id: int, gen: int) -> np.ndarray: ...
    def write_slots(self, svc_id: int, gen: int, table: np.ndarray) -> None: ...
    def write_tables(self, halves: np.ndarray, packed: np.ndarray) -> None: ...
    def set_services_batch(self, svc_ids: np.ndarray, svcs: np.ndarray) -> None: ...
    def read_shares(self, svc_id: int, gen: int, ids: list[int]) -> list[int]: ...
    def active(self, n: int = constants.MAX_BACKENDS) -> np.ndarray: ...
    def backends_raw(self, start: int = 0, n: int = constants.MAX_BACKENDS) -> "ct.Array[Backend]": ...
    def backends(self) -> list[PinnedBackend]: ...
    def set_backend(self, be_id: int, svc_id: int, addr: Addr, state: int, weight: int) -> None: ...
    def clear_backend(self, be_id: int) -> None: ...
    def percpu_sum(self, mname: str, vtype: type[ct.Structure], n: int) -> np.ndarray: ...
    def selections(self, n: int = constants.MAX_BACKENDS) -> np.ndarray: ...
    def rebalanced(self, n: int = constants.MAX_BACKENDS) -> np.ndarray | None: ...
    def reset_backend_stats(self, be_id: int) -> None: ...
    def telemetry(self) -> TelemetryReader: ...
    def evidence(self) -> EvidenceSource: ...
    def set_budget(self, cgroup: int, svc_id: int, budget: Budget) -> None: ...
    def set_budget_rate(self, cgroup: int, svc_id: int, interval_ns: int, burst_ns: int, mode: int) -> bool: ...
    def delete_budget(self, cgroup: int, svc_id: int) -> bool: ...
    def lift_budgets(self) -> int: ...
    def budgeted(self, svc_id: int) -> int: ...
    def budgets(self) -> dict[tuple[int, int], Budget]: ...
    def callers(self) -> list[tuple[int, int, int, int, int]]: ...
    def open_sockets(self) -> int: ...
    def backend_gen(self, be_id: int) -> int: ...
    def revnat_stats(self) -> dict[str, int]: ...
    def service_errors(self, n: int = constants.MAX_SERVICES) -> np.ndarray: ...
    def reset_service_errors(self, svc_id: int) -> None: ...
    def forget_services(self, svc_ids: Collection[int]) -> int: ...


@dataclass(frozen=True)
class Write:
    """One map write as the agent would issue it (one syscall): `op` is "update",
    "update_batch" or "delete"; `keys` the map keys in order (ints; (Addr,
    protocol) for the frontend maps); `values` what was written, per key:
    eq_lb_svc (gen, n_avail, n_backends, flags), eq_lb_be (svc, Addr, state,
    weight) (svc NO_BACKEND, None, BE_UNUSED, 0 when cleared), eq_lb_slots the
    table half (a copy, packed: slots.pack), eq_svc_name the name,
    the frontend maps the service id, the per-CPU maps () (zeroed)."""

    map: str
    op: str
    keys: tuple[Any, ...]
    values: tuple[Any, ...] = field(default=(), compare=False)


class _Array:
    """One array map's values, zero until written. Grown to the highest key
    written; a read past that returns zeros, a write or read past `entries`
    fails as the kernel's would."""

    def __init__(self, name: str, entries: int, dtype: Any, inner: tuple[int, ...] = ()) -> None:
        self.name, self.entries, self.inner = name, entries, inner
        self.data = np.zeros((0,) + inner, dtype=dtype)

    def check(self, keys: Sequence[int] | np.ndarray) -> None:
        bad = [int(k) for k in np.asarray(keys, dtype=np.int64).reshape(-1) if not 0 <= int(k) < self.entries]
        if bad:
            raise BpfError(errno.E2BIG, "%s: key %d past the map's %d entries" % (self.name, bad[0], self.entries))

    def grow(self, key: int) -> None:
        self.check([key])
        if key >= self.data.shape[0]:
            cap = min(max(64, 1 << int(key).bit_length()), self.entries)
            new = np.zeros((cap,) + self.inner, dtype=self.data.dtype)
            new[:self.data.shape[0]] = self.data
            self.data = new

    def get(self, key: int) -> np.ndarray:
        """The value at `key` (a copy; zeros where never written or out of range,
        as a failed lookup leaves the caller's buffer)."""
        if 0 <= key < self.data.shape[0]:
            return np.array(self.data[key], copy=True)
        return np.zeros(self.inner, dtype=self.data.dtype)

    def read(self, n: int, start: int = 0) -> np.ndarray:
        """Keys [start, start + n) (a copy), as one batch lookup."""
        if start < 0 or n < 0 or start + n > self.entries:
            raise BpfError(errno.EIO, "%s: read %d of %d" % (self.name, max(0, self.entries - start), n))
        out = np.zeros((n,) + self.inner, dtype=self.data.dtype)
        have = self.data[start:start + n]
        out[:have.shape[0]] = have
        return out


class MemoryTelemetryReader(TelemetryReader):
    """The real reader over a MemoryDatapath's eq_tel_be / eq_tel_hist: only the map read differs."""

    def __init__(self, dp: "MemoryDatapath") -> None:
        super().__init__(-1, dp.ncpu, -1)
        self._dp = dp

    def _read_chunk(self, which: str, k: int, start: int) -> np.ndarray:
        if which == "hist":
            data = np.ascontiguousarray(self._dp._array("eq_tel_hist").read(k, start))
            return data.view(np.uint32).reshape(k, 1, -1).copy()
        # eq_tel_be is kept per backend here; the kernel's value holds TEL_GROUP of them
        g = constants.TEL_GROUP
        data = np.ascontiguousarray(self._dp._array("eq_tel_be").read(k * g, start * g))   # (k * g, ncpu)
        words = data.view(np.uint32).reshape(k, g, self.ncpu, -1).transpose(0, 2, 1, 3).reshape(k, self.ncpu, -1)
        buf = self._buf[:k]   # the reused buffer, as the real read fills it
        buf[...] = words
        return buf


class MemoryEvidenceReader:
    """Reads a MemoryDatapath's eq_tel_cb as the real reader reads the mapped map."""

    def __init__(self, dp: "MemoryDatapath") -> None:
        self._dp = dp

    def read(self, n: int) -> Evidence:
        return self.read_ids(np.arange(n))

    def read_ids(self, ids: np.ndarray) -> Evidence:
        have = self._dp._evidence
        words = np.zeros((len(ids), constants.CB_SLOTS, 2 + len(CB_COUNTERS)), dtype=np.uint64)
        inside = np.asarray(ids) < have.shape[0]
        words[inside] = have[np.asarray(ids)[inside]]
        return decayed(words, self._dp.clock_ns())


class MemoryDatapath:
    """The pinned maps of one node, in memory, recording every write (see the module docstring)."""

    def __init__(self, ncpu: int = 2, source_hash: int = 0) -> None:
        if ncpu < 1:
            raise ValueError("ncpu must be >= 1")
        self.pin_dir = "<memory>"
        self.ncpu = ncpu
        self.writes: list[Write] = []
        self.closed = False
        mb, ms = constants.MAX_BACKENDS, constants.MAX_SERVICES
        arrays = [
            _Array("eq_lb_svc", ms, np.uint32, (4,)),                   # struct eq_svc: gen, n_avail, n_backends, flags
            _Array("eq_lb_slots", ms * 2, np.uint32, (constants.SLOTS,)),
            _Array("eq_lb_be", mb, np.dtype(Backend)),
            _Array("eq_lb_active", mb, np.int64),
            _Array("eq_svc_name", ms, "S%d" % ct.sizeof(SvcName)),
            _Array("eq_lb_be_stat", mb, np.dtype(BeStats), (ncpu,)),   # per-CPU: one value per CPU
            _Array("eq_lb_svc_err", ms, np.dtype(SvcErrs), (ncpu,)),
            _Array("eq_tel_be", mb, TEL_DTYPE, (ncpu,)),
            _Array("eq_tel_hist", mb, HIST_DTYPE),                     # shared: the kernel adds atomically
        ]
        assert TEL_DTYPE.itemsize == ct.sizeof(BeTel) and np.dtype(Backend).itemsize == ct.sizeof(Backend)
        assert HIST_DTYPE.itemsize == ct.sizeof(BeHist)
        self._arrays: dict[str, _Array] = {a.name: a for a in arrays}
        #: hash maps: the frontends (key bytes -> service id), callers ((cgroup, svc) -> per-CPU counts)
        self._fe: dict[str, dict[bytes, int]] = {"eq_lb4_fe": {}, "eq_lb6_fe": {}}
        self._callers: dict[tuple[int, int], np.ndarray] = {}
        self._budgets: dict[tuple[int, int], Budget] = {}   # eq_lb_budget
        #: eq_tel_cb: (backend id, slot, [cgroup, last_ns, counters...]), grown on demand
        self._evidence = np.zeros((0, constants.CB_SLOTS, 2 + len(CB_COUNTERS)), dtype=np.uint64)
        #: the clock the evidence decays by (tests may set it; default CLOCK_MONOTONIC)
        self.clock_ns: Callable[[], int] = time.monotonic_ns
        self._open_sockets = 0
        self._meta = Meta(source_hash=source_hash, layout=constants.LAYOUT_VERSION)

    def _array(self, name: str) -> _Array:
        if self.closed:
            raise KeyError(name)   # as the real one, whose fds are gone after close()
        return self._arrays[name]

    def _record(self, mname: str, op: str, keys: Sequence[Any], values: Sequence[Any] = ()) -> None:
        self.writes.append(Write(mname, op, tuple(keys), tuple(values)))

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> "MemoryDatapath":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- what tests read back -------------------------------------------------
    def ops(self, since: int = 0) -> list[tuple[str, str, tuple[Any, ...]]]:
        """(map, op, keys) of the writes from index `since` on: easy to compare."""
        return [(w.map, w.op, w.keys) for w in self.writes[since:]]

    # --- meta -------------------------------------------------------------
    def meta(self) -> Meta:
        return Meta.from_buffer_copy(bytes(self._meta))

    # --- frontends ----------------------------------------------------------
    @staticmethod
    def frontend_key(fe: Addr, protocol: str) -> FE4Key | FE6Key:
        return Datapath.frontend_key(fe, protocol)   # the kernel's key bytes: one definition

    @staticmethod
    def _fe_map(fe: Addr) -> str:
        return "eq_lb4_fe" if fe.family == 4 else "eq_lb6_fe"

    def _fe_dict(self, mname: str) -> dict[bytes, int]:
        if self.closed:
            raise KeyError(mname)
        return self._fe[mname]

    def frontends(self) -> dict[int, tuple[Addr, str]]:
        return {sid: (addr, proto) for addr, proto, sid in self.frontend_keys()}

    def frontend_keys(self) -> list[tuple[Addr, str, int]]:
        out: list[tuple[Addr, str, int]] = []
        for mname in ("eq_lb4_fe", "eq_lb6_fe"):
            for raw, sid in self._fe_dict(mname).items():
                if mname == "eq_lb4_fe":
                    k4 = FE4Key.from_buffer_copy(raw)
                    addr, proto = Addr(4, ip4_from_net(k4.addr), port_from_net(k4.port)), k4.proto
                else:
                    k6 = FE6Key.from_buffer_copy(raw)
                    addr, proto = Addr(6, ip6_from_net(k6.addr), port_from_net(k6.port)), k6.proto
                out.append((addr, PROTO_NAME.get(proto, str(proto)), sid))
        return out

    def set_frontend(self, fe: Addr, protocol: str, svc_id: int) -> None:
        mname = self._fe_map(fe)
        d = self._fe_dict(mname)
        key = bytes(self.frontend_key(fe, protocol))
        sid = ct.c_uint32(svc_id).value
        self._record(mname, "update", [(fe, protocol)], [sid])
        if key not in d and len(d) >= constants.MAX_SERVICES:
            raise BpfError(errno.E2BIG, "%s: the hash map is full" % mname)
        d[key] = sid

    def delete_frontend(self, fe: Addr, protocol: str) -> None:
        mname = self._fe_map(fe)
        d = self._fe_dict(mname)
        self._record(mname, "delete", [(fe, protocol)])
        d.pop(bytes(self.frontend_key(fe, protocol)), None)   # ENOENT is not an error (as libbpf.map_delete)

    def frontend_of(self, fe: Addr, protocol: str) -> int | None:
        """The service id a connect to `fe` would be translated for, or None (a test helper)."""
        return self._fe_dict(self._fe_map(fe)).get(bytes(self.frontend_key(fe, protocol)))

    # --- services -------------------------------------------------------------
    def service(self, svc_id: int) -> Svc:
        g = self._array("eq_lb_svc").get(svc_id)
        return Svc(gen=int(g[0]), n_avail=int(g[1]), n_backends=int(g[2]), flags=int(g[3]))

    def set_service(self, svc_id: int, svc: Svc) -> None:
        row = (svc.gen, svc.n_avail, svc.n_backends, svc.flags)
        self._update("eq_lb_svc", "update", [svc_id], [row])

    def name(self, svc_id: int) -> str:
        raw = self._array("eq_svc_name").get(svc_id)
        return SvcName(name=bytes(raw)).name.decode(errors="replace")

    def set_name(self, svc_id: int, name: str) -> None:
        value = SvcName(name=name.encode())   # the real one's check: at most 64 bytes
        self._update("eq_svc_name", "update", [svc_id], [bytes(value.name)], stored=[bytes(value)])

    def services(self) -> list[PinnedService]:
        out = []
        for sid, (fe, proto) in sorted(self.frontends().items()):
            s = self.service(sid)
            out.append(PinnedService(sid, self.name(sid), fe, proto, s.gen & 1, s.n_avail, s.n_backends, s.flags))
        return out

    # --- writes: one record per syscall ------------------------------------------
    def _update(self, mname: str, op: str, keys: Sequence[int] | np.ndarray, values: Sequence[Any],
                stored: Sequence[Any] | None = None) -> None:
        """Write `stored` (default `values`) at `keys` in order, recording `values`.
        A key out of range fails like the kernel: a single update writes nothing,
        a batch stops there (libbpf.map_update_batch raises EIO "wrote i of n")."""
        arr = self._array(mname)
        ks = [int(k) for k in np.asarray(keys, dtype=np.int64).reshape(-1)]
        if len(ks) != len(values):
            raise ValueError("%s: %d keys, %d values" % (mname, len(ks), len(values)))
        self._record(mname, op, ks, values)
        for i, (k, v) in enumerate(zip(ks, stored if stored is not None else values)):
            try:
                arr.grow(k)
            except BpfError as e:
                if op == "update_batch":
                    raise BpfError(errno.EIO, "%s: wrote %d of %d (%s)" % (mname, i, len(ks), e)) from None
                raise
            arr.data[k] = v

    def _update_batch(self, mname: str, keys: np.ndarray, values: np.ndarray) -> None:
        k = np.ascontiguousarray(keys, dtype=np.uint32).reshape(-1)   # as the real one: u32 keys
        v = np.ascontiguousarray(values)
        if k.size:
            if v.shape[0] != k.size:  # the real call would read past the values buffer
                raise ValueError("%s: %d keys, %d values" % (mname, k.size, v.shape[0]))
            self._update(mname, "update_batch", k, [x.copy() if x.ndim else x.item() for x in v])

    # --- slot tables ------------------------------------------------------------
    def read_table(self, svc_id: int, gen: int) -> tuple[np.ndarray, np.ndarray]:
        return slots.unpack(self._array("eq_lb_slots").get(svc_id * 2 + (gen & 1)).astype(np.uint32))

    def read_slots(self, svc_id: int, gen: int) -> np.ndarray:
        return self.read_table(svc_id, gen)[0]

    def write_slots(self, svc_id: int, gen: int, table: np.ndarray) -> None:
        if table.shape != (constants.SLOTS,):
            raise ValueError("slot table must have %d entries" % constants.SLOTS)
        self.write_tables(np.array([svc_id * 2 + (gen & 1)]), slots.pack(table[None, :]))

    def write_tables(self, halves: np.ndarray, packed: np.ndarray) -> None:
        self._update_batch("eq_lb_slots", halves, table_values(halves, packed))

    def set_services_batch(self, svc_ids: np.ndarray, svcs: np.ndarray) -> None:
        v = np.asarray(svcs, dtype=np.uint32).reshape(-1, 4)
        k = np.ascontiguousarray(svc_ids, dtype=np.uint32).reshape(-1)
        if k.size:
            if v.shape[0] != k.size:
                raise ValueError("eq_lb_svc: %d keys, %d values" % (k.size, v.shape[0]))
            self._update("eq_lb_svc", "update_batch", k, [tuple(int(x) for x in row) for row in v])

    def read_shares(self, svc_id: int, gen: int, ids: list[int]) -> list[int]:
        return slots.carried(*self.read_table(svc_id, gen), ids)

    def active(self, n: int = constants.MAX_BACKENDS) -> np.ndarray:
        return np.maximum(self._array("eq_lb_active").read(n), 0)

    # --- backends ---------------------------------------------------------------
    def backends_raw(self, start: int = 0, n: int = constants.MAX_BACKENDS) -> "ct.Array[Backend]":
        raw = self._array("eq_lb_be").read(n, start)
        return (Backend * n).from_buffer_copy(raw.tobytes())

    def backends(self) -> list[PinnedBackend]:
        data = self._array("eq_lb_be").data
        out = []
        for i in np.nonzero(data["state"] != constants.BE_UNUSED)[0]:   # the real one skips these too
            b = Backend.from_buffer_copy(data[i].tobytes())
            out.append(PinnedBackend(int(i), b.svc, backend_addr(b), b.state, b.weight))
        return out

    def set_backend(self, be_id: int, svc_id: int, addr: Addr, state: int, weight: int) -> None:
        b = backend_entry(svc_id, addr, state, weight)
        self._update("eq_lb_be", "update", [be_id], [(b.svc, addr, b.state, b.weight)], stored=[_row(b)])

    def clear_backend(self, be_id: int) -> None:
        b = Backend(svc=0xFFFFFFFF)
        self._update("eq_lb_be", "update", [be_id], [(b.svc, None, constants.BE_UNUSED, 0)], stored=[_row(b)])

    # --- per-CPU counters ---------------------------------------------------------
    def percpu_sum(self, mname: str, vtype: type[ct.Structure], n: int) -> np.ndarray:
        arr = self._array(mname)
        if arr.inner != (self.ncpu,) or arr.data.dtype.itemsize != ct.sizeof(vtype):
            raise BpfError(errno.EINVAL, "%s: not a per-CPU array of %s" % (mname, vtype.__name__))
        nfields = ct.sizeof(vtype) // 8
        raw = arr.read(n).tobytes()
        return np.frombuffer(raw, dtype=np.uint64).reshape(n, self.ncpu, nfields).sum(axis=1, dtype=np.uint64)

    def selections(self, n: int = constants.MAX_BACKENDS) -> np.ndarray:
        return self.percpu_sum("eq_lb_be_stat", BeStats, n)[:, 0]

    def rebalanced(self, n: int = constants.MAX_BACKENDS) -> np.ndarray | None:
        """As Datapath.rebalanced: the rebalancer is not part of this stand-in (its maps
        are libbpf-created, its walk needs real sockets: tests/datapath/test_rebalance.py)."""
        return None

    def reset_backend_stats(self, be_id: int) -> None:
        for mname in ("eq_lb_be_stat", "eq_tel_be", "eq_tel_hist"):
            arr = self._array(mname)
            zero = np.zeros(arr.data.shape[1:], dtype=arr.data.dtype)   # per CPU, or one shared value
            self._update(mname, "update", [be_id], [()], stored=[zero])

    def telemetry(self) -> MemoryTelemetryReader:
        return MemoryTelemetryReader(self)

    def set_budget(self, cgroup: int, svc_id: int, budget: Budget) -> None:
        self._record("eq_lb_budget", "update", [(cgroup, svc_id)], [budget.mode])
        self._budgets[(cgroup, svc_id)] = budget

    def set_budget_rate(self, cgroup: int, svc_id: int, interval_ns: int, burst_ns: int, mode: int) -> bool:
        """As Datapath.set_budget_rate: a new entry, or the rate and mode of an existing one
        with its GCRA state and counters kept. True when it was new."""
        self._record("eq_lb_budget", "update", [(cgroup, svc_id)], [mode])
        b = self._budgets.get((cgroup, svc_id))
        if b is None:
            self._budgets[(cgroup, svc_id)] = Budget(interval_ns=interval_ns, burst_ns=burst_ns, mode=mode)
            return True
        b.interval_ns, b.burst_ns, b.mode = interval_ns, burst_ns, mode
        return False

    def delete_budget(self, cgroup: int, svc_id: int) -> bool:
        self._record("eq_lb_budget", "delete", [(cgroup, svc_id)])
        return self._budgets.pop((cgroup, svc_id), None) is not None

    def lift_budgets(self) -> int:
        n = len(self._budgets)
        for cg, sid in list(self._budgets):
            self.delete_budget(cg, sid)
        return n

    def forget_services(self, svc_ids: Collection[int]) -> int:
        """As Datapath.forget_services: budgets and per-caller counters of these ids
        (a delete recorded for each budget; the counters are the kernel's, not writes)."""
        ids = set(svc_ids)
        n = 0
        for key in [k for k in self._budgets if k[1] in ids]:
            n += self.delete_budget(*key)
        for key in [k for k in self._callers if k[1] in ids]:
            del self._callers[key]
            n += 1
        return n

    def budgeted(self, svc_id: int) -> int:
        """What eq_lb_budgeted would hold for `svc_id` (the kernel's gate before a budget lookup)."""
        return sum(1 for (_, sid) in self._budgets if sid == svc_id)

    def budgets(self) -> dict[tuple[int, int], Budget]:
        return dict(self._budgets)

    def evidence(self) -> "MemoryEvidenceReader":
        return MemoryEvidenceReader(self)

    def callers(self) -> list[tuple[int, int, int, int, int]]:
        if self.closed:
            raise KeyError("eq_tel_caller")
        return [(cg, sid, int(v[:, 0].sum()), int(v[:, 1].sum()), int(v[:, 2].sum()))
                for (cg, sid), v in self._callers.items()]

    def open_sockets(self) -> int:
        if self.closed:
            raise KeyError("eq_tel_sock")
        return self._open_sockets

    def service_errors(self, n: int = constants.MAX_SERVICES) -> np.ndarray:
        return self.percpu_sum("eq_lb_svc_err", SvcErrs, n)

    def backend_gen(self, be_id: int) -> int:
        return int(self._array("eq_lb_be").data[be_id]["gen"])

    def revnat_stats(self) -> dict[str, int]:
        """No unconnected UDP here: nothing inserted, nothing evicted."""
        return {"inserted": 0, "released": 0, "evicted": 0, "untracked": 0, "live": 0}

    def reset_service_errors(self, svc_id: int) -> None:
        arr = self._array("eq_lb_svc_err")
        self._update("eq_lb_svc_err", "update", [svc_id], [()], stored=[np.zeros(self.ncpu, dtype=arr.data.dtype)])

    # --- what the kernel's programs do (test helpers; not recorded) ------------------
    def _cpu(self, cpu: int) -> int:
        if not 0 <= cpu < self.ncpu:
            raise ValueError("cpu %d: the datapath has %d" % (cpu, self.ncpu))
        return cpu

    def set_active(self, backend_id: int, n: int) -> None:
        """eq_lb_active[backend_id] = n (the kernel counts it at connect and close; may be < 0)."""
        arr = self._array("eq_lb_active")
        arr.grow(backend_id)
        arr.data[backend_id] = n

    def add_selections(self, backend_id: int, n: int, cpu: int = 0) -> None:
        arr = self._array("eq_lb_be_stat")
        arr.grow(backend_id)
        cell = arr.data[backend_id, self._cpu(cpu)]
        cell["selections"] = (int(cell["selections"]) + n) % U64

    def add_telemetry(self, backend_id: int, cpu: int = 0, conn_hist: Mapping[int, int] | None = None,
                      req_hist: Mapping[int, int] | None = None, **counters: int) -> None:
        """Add to one CPU's eq_tel_be counters (names of structs.BE_TEL_COUNTERS) and
        histogram buckets ({bucket: count}), wrapping as the kernel's u64 / u32 do."""
        arr = self._array("eq_tel_be")
        arr.grow(backend_id)
        cell = arr.data[backend_id, self._cpu(cpu)]
        c = cell["c"]
        for name, v in counters.items():
            i = COUNTER[name]   # KeyError names an unknown counter
            c[i] = (int(c[i]) + v) % U64
        arr.data[backend_id, cpu] = cell
        harr = self._array("eq_tel_hist")
        harr.grow(backend_id)
        hcell = harr.data[backend_id]
        h = hcell["h"]
        for base, hist in ((0, conn_hist), (HIST_BUCKETS, req_hist)):
            for b, v in (hist or {}).items():
                if not 0 <= b < HIST_BUCKETS:
                    raise ValueError("bucket %d: there are %d" % (b, HIST_BUCKETS))
                h[base + b] = (int(h[base + b]) + v) % U32
        harr.data[backend_id] = hcell

    def add_service_errors(self, svc_id: int, cpu: int = 0, no_backend: int = 0, stale_slot: int = 0,
                           rev_update: int = 0) -> None:
        arr = self._array("eq_lb_svc_err")
        arr.grow(svc_id)
        cell = arr.data[svc_id, self._cpu(cpu)]
        for name, v in (("no_backend", no_backend), ("stale_slot", stale_slot), ("rev_update", rev_update)):
            cell[name] = (int(cell[name]) + v) % U64
        arr.data[svc_id, cpu] = cell

    def add_caller(self, cgroup: int, svc_id: int, connections: int = 0, requests: int = 0, errors: int = 0,
                   cpu: int = 0) -> None:
        v = self._callers.setdefault((cgroup, svc_id), np.zeros((self.ncpu, 3), dtype=np.uint64))
        v[self._cpu(cpu)] += np.array([connections, requests, errors], dtype=np.uint64)

    def add_evidence(self, cgroup: int, backend_id: int, **counters: int) -> bool:
        """What the kernel's eq_cb does for one observation of `cgroup` on `backend_id`
        (names of structs.CB_COUNTERS): take the caller's slot, a free or stale one,
        apply pending halvings, add. False when every slot belongs to an active caller."""
        if backend_id >= self._evidence.shape[0]:
            grown = np.zeros((backend_id + 1,) + self._evidence.shape[1:], dtype=np.uint64)
            grown[:self._evidence.shape[0]] = self._evidence
            self._evidence = grown
        now, slots = self.clock_ns(), self._evidence[backend_id]
        mine = [i for i in range(constants.CB_SLOTS) if slots[i, 0] == cgroup]
        if mine:
            sl = slots[mine[0]]
            k = min((now - int(sl[1])) >> constants.CB_HALF_SHIFT, 63)
            if k > 0:
                sl[2:] >>= np.uint64(k)
                sl[1] += np.uint64(k << constants.CB_HALF_SHIFT)
        else:
            free = [i for i in range(constants.CB_SLOTS)
                    if slots[i, 0] == 0 or now - int(slots[i, 1]) > constants.CB_STALE_NS]
            if not free:
                return False
            sl = slots[free[0]]
            sl[:] = 0
            sl[0], sl[1] = cgroup, now
        for name, n in counters.items():
            sl[2 + CB_COUNTERS.index(name)] += np.uint64(n)   # ValueError names an unknown counter
        return True

    def set_open_sockets(self, n: int) -> None:
        self._open_sockets = n


def _row(b: Backend) -> np.ndarray:
    return np.frombuffer(bytes(b), dtype=np.dtype(Backend))[0]


if TYPE_CHECKING:
    # mypy fails here if either class drifts from DatapathLike
    def _real_satisfies(dp: Datapath) -> DatapathLike:
        return dp

    def _memory_satisfies(dp: MemoryDatapath) -> DatapathLike:
        return dp
