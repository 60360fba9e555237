"""Reconciling eq_lb_active (the open-connection counts `balance: p2c` compares)
with the sockets it counts.

The kernel adds one at connect and takes it back at close or release; a count
that drifts (a lost decrement: an eq_tel_sock entry the LRU evicted while its
socket lived, a bug) would make p2c avoid a backend for good. The truth is in
eq_tel_sock: an entry flagged EQ_SK_COUNTED whose generation is its id's current
one is exactly one unit of its backend's count. An audit reads the counts, walks
eq_tel_sock (batch reads, bounded buffers), reads the counts again, and takes
as drift `count - sockets` for ids whose count did not move during the walk. A
drift is corrected only when the next audit finds the same one (a connect or
close racing the walk does not look the same twice), by writing `count - drift`
(a connect landing between that read and write is lost: the next audit sees it).

Cost: one pass over eq_tel_sock (96 B an entry, 4,096 a syscall): run it every
few seconds or minutes, not every tick.
"""

from __future__ import annotations

import ctypes as ct
from dataclasses import dataclass, field

import numpy as np

from . import libbpf
from .maps import Datapath
from .structs import Backend, Sock

SK_COUNTED = 8   #: EQ_SK_COUNTED in bpf/lib/types.h


@dataclass
class AuditReport:
    counted: int = 0          #: sum of eq_lb_active over the ids audited
    sockets: int = 0          #: counted sockets found in eq_tel_sock
    drift: int = 0            #: sum of |count - sockets| over ids whose count held still
    corrected: dict[int, int] = field(default_factory=dict)   #: id -> drift taken away


def active_raw(dp: Datapath, n: int) -> np.ndarray:
    """eq_lb_active for ids [0, n), signed and unclamped."""
    return np.frombuffer(libbpf.array_read(dp.fd["eq_lb_active"], 8, n), dtype=np.int64).copy()


def counted_sockets(dp: Datapath, n: int) -> np.ndarray:
    """Sockets counted in eq_lb_active per backend id [0, n), from eq_tel_sock."""
    gens = np.frombuffer(memoryview(dp.backends_raw(0, n)).cast("B"), dtype=np.dtype(Backend))["gen"]
    out = np.zeros(n, dtype=np.int64)
    for _, values, k in libbpf.hash_batches(dp.fd["eq_tel_sock"], 8, ct.sizeof(Sock)):
        v = np.frombuffer(values, dtype=np.dtype(Sock), count=k)
        bid = v["backend"].astype(np.int64)
        ok = ((v["flags"] & SK_COUNTED) != 0) & (bid < n)
        ok[ok] &= v["be_gen"][ok] == gens[bid[ok]]
        np.add.at(out, bid[ok], 1)
    return out


class ActiveAudit:
    """Run `run(n)` now and then (the agent: every few seconds); it corrects a drift
    it has seen twice in a row."""

    def __init__(self, dp: Datapath) -> None:
        self.dp = dp
        self._last: np.ndarray | None = None
        self.corrected_total = 0   #: count units taken away (or added back) so far

    def run(self, n: int) -> AuditReport:
        if n <= 0:
            return AuditReport()
        before = active_raw(self.dp, n)
        socks = counted_sockets(self.dp, n)
        after = active_raw(self.dp, n)
        drift = np.where(before == after, after - socks, 0)
        rep = AuditReport(counted=int(after.sum()), sockets=int(socks.sum()), drift=int(np.abs(drift).sum()))
        last = self._last
        self._last = drift
        if last is None or last.shape != drift.shape:
            return rep
        fd = self.dp.fd["eq_lb_active"]
        for i in np.nonzero((drift != 0) & (drift == last))[0].tolist():
            cur = ct.c_int64()
            libbpf.map_lookup(fd, ct.c_uint32(i), cur)
            libbpf.map_update(fd, ct.c_uint32(i), ct.c_int64(cur.value - int(drift[i])))
            rep.corrected[i] = int(drift[i])
            self.corrected_total += abs(int(drift[i]))
        self._last = np.where(drift == last, 0, drift)   # corrected: start over for those ids
        return rep
