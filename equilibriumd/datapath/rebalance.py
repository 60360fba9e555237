"""The agent's handle on the rebalancer (bpf/rebalance.bpf.c): its pinned
iterator link and maps.

Per walk the agent writes each service's budget and limits (eq_rb_svc) and
each backend's quota (eq_rb_quota), then reads the iterator: the kernel walks
the TCP sockets of the reading thread's network namespace and closes what the
budgets allow, one output line per close.
"""

from __future__ import annotations

import ctypes as ct
import os
from dataclasses import dataclass, field

import numpy as np

from . import constants, libbpf, pins
from .maps import update_arrays
from .structs import RbSvc

#: struct eq_rb_svc as a numpy record (the batch write's values)
RB_SVC = np.dtype([("budget", "<i8"), ("min_age_ns", "<u8"), ("min_idle_ns", "<u8"), ("max_age_ns", "<u8"),
                   ("flags", "<u8")])
#: eq_rb_svc.flags, as in bpf/lib/types.h
RB_IDLE = 1
assert RB_SVC.itemsize == ct.sizeof(RbSvc)


class RebalancerMissing(RuntimeError):
    """The rebalancer is not loaded in this pin directory (the loader said why)."""


def available(pin_dir: str) -> bool:
    return os.path.exists(pins.link_pin(pin_dir, constants.REBALANCE_PROG)) and all(
        os.path.exists(pins.map_pin(pin_dir, m)) for m in constants.REBALANCE_MAPS)


class Rebalancer:
    def __init__(self, pin_dir: str) -> None:
        if not available(pin_dir):
            raise RebalancerMissing("no rebalancer pinned in %s" % pin_dir)
        self.fd: dict[str, int] = {}
        self.links: list[int] = []   # TCP first, then UDP
        try:
            for m in constants.REBALANCE_MAPS:
                self.fd[m] = libbpf.obj_get(pins.map_pin(pin_dir, m))
            self.links = [libbpf.obj_get(pins.link_pin(pin_dir, p)) for p in constants.REBALANCE_PROGS
                          if os.path.exists(pins.link_pin(pin_dir, p))]
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        for fd in list(self.fd.values()) + self.links:
            os.close(fd)
        self.fd = {}
        self.links = []

    def write_services(self, svc_ids: np.ndarray, rows: np.ndarray) -> None:
        """eq_rb_svc[svc_ids[i]] = rows[i] (RB_SVC records), one syscall."""
        update_arrays(self.fd["eq_rb_svc"], svc_ids, np.asarray(rows, dtype=RB_SVC))

    def write_quotas(self, ids: np.ndarray, quotas: np.ndarray) -> None:
        """eq_rb_quota[ids[i]] = quotas[i], one syscall."""
        update_arrays(self.fd["eq_rb_quota"], ids, np.asarray(quotas, dtype=np.int64))

    def walk(self) -> "Walk":
        """Run the iterators (TCP, then connected UDP) in the calling thread's network
        namespace: the connections they closed and how many were wanted but busy."""
        chunks = []
        for link in self.links:
            fd = libbpf.iter_create(link)
            try:
                while True:
                    b = os.read(fd, 65536)
                    if not b:
                        break
                    chunks.append(b)
            finally:
                os.close(fd)
        w = Walk()
        for line in b"".join(chunks).splitlines():
            if line == b"busy":
                w.busy += 1
                continue
            if line == b"young":
                w.young += 1
                continue
            s, i, r = line.split()
            w.closed.append((int(s), int(i), int(r)))
        return w


@dataclass
class Walk:
    """What one walk of one namespace did."""

    closed: list[tuple[int, int, int]] = field(default_factory=list)   #: (service id, backend id, reason)
    busy: int = 0   #: connections it would have closed had they been idle
    young: int = 0  #: ... had they been older than min_age
