"""Reads eq_tel_cb: what each caller cgroup saw of each backend, lately.

The kernel counts every observation the policy uses (connects and their
failures by kind, requests, responses, 5xx, requests left unanswered, latency
sums) per backend (eq_tel_be) and, in eq_tel_cb, per (caller cgroup, backend):
each backend has CB_SLOTS caller slots, and a slot's counts halve every
2**CB_HALF_SHIFT ns, so a slot holds its caller's last second or so. The map is
mmapable: the agent maps the pages of the rows it reads, for the read, and
copies those rows (a few per tick); `Evidence` applies the halvings still pending for slots that
saw no traffic since (the kernel applies them at a slot's next update).
`policy.evidence` weighs the callers of each backend against each other.
"""

from __future__ import annotations

import ctypes as ct
import mmap
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from . import constants
from .structs import CB_COUNTERS, Cb, CbSlot

#: column of each counter in Evidence.counts
CB = {name: i for i, name in enumerate(CB_COUNTERS)}
#: the words of one slot: cgroup, last_ns, then the counters
_WORDS = ct.sizeof(CbSlot) // 8
assert _WORDS == 2 + len(CB_COUNTERS) and ct.sizeof(Cb) == constants.CB_SLOTS * ct.sizeof(CbSlot)


@dataclass
class Evidence:
    """Backend ids [0, n) as the map holds them, read in place: (n, CB_SLOTS) caller
    cgroups (0: a free slot) and each slot's pending decay (0: free or idle);
    `total` sums counters."""

    words: np.ndarray      #: (n, CB_SLOTS, 2 + len(CB_COUNTERS)) uint64: cgroup, last_ns, counters
    scale: np.ndarray      #: (n, CB_SLOTS) float32: the halvings still due, as a factor

    @property
    def cgroups(self) -> np.ndarray:
        return self.words[..., 0]

    @property
    def live(self) -> np.ndarray:
        """Slots of callers active in the last ~2 s."""
        return self.scale > 0

    def total(self, names: tuple[str, ...], out: np.ndarray | None = None) -> np.ndarray:
        """The named counters summed per slot, decayed to now: (n, CB_SLOTS) float32
        (into `out` if given: a reader of every tick reuses its buffers)."""
        if out is None:
            out = np.empty(self.scale.shape, dtype=np.float32)
        out[...] = 0
        for name in names:
            np.add(out, self.words[..., 2 + CB[name]], out=out, casting="unsafe")
        out *= self.scale
        return out

    def __getitem__(self, name: str) -> np.ndarray:
        return self.total((name,))


#: a slot whose counts are older than this many half-lives (~2 s) is idle: scale 0
IDLE_HALVINGS = 4


def decayed(words: np.ndarray, now_ns: int) -> Evidence:
    """`words`: (n, CB_SLOTS, _WORDS) uint64 as the map holds them. Free and idle
    slots get scale 0: they count for nothing."""
    last = np.minimum(words[..., 1], np.uint64(now_ns))
    pending = ((np.uint64(now_ns) - last) >> np.uint64(constants.CB_HALF_SHIFT)).astype(np.float32)
    live = (words[..., 0] != 0) & (pending < IDLE_HALVINGS)
    return Evidence(words, np.where(live, np.exp2(-pending), np.float32(0)).astype(np.float32))


class EvidenceSource(Protocol):
    def read(self, n: int) -> Evidence: ...
    def read_ids(self, ids: np.ndarray) -> Evidence: ...


class EvidenceReader:
    """eq_tel_cb read in place: the pages holding the asked-for backend ids are
    mapped read-only for the read and unmapped after it (a mapping of a BPF array
    is populated whole, and the pages it holds would count in the agent's VmRSS
    although the map, not the agent, owns them: 6.6 MB at 16,384 backends)."""

    #: ids whose rows lie within this many bytes of each other share one mapping
    GAP = 64 * mmap.PAGESIZE

    def __init__(self, map_fd: int) -> None:
        self.fd = map_fd

    def read(self, n: int) -> Evidence:
        """Backend ids [0, n), as of now (CLOCK_MONOTONIC: the kernel's bpf_ktime_get_ns)."""
        return self.read_ids(np.arange(n))

    def read_ids(self, ids: np.ndarray) -> Evidence:
        """The given backend ids (a copy of their rows), as of now."""
        ids = np.asarray(ids, dtype=np.intp).reshape(-1)
        out = np.empty((ids.size, constants.CB_SLOTS, _WORDS), dtype=np.uint64)
        if ids.size:
            if int(ids.min()) < 0 or int(ids.max()) >= constants.MAX_BACKENDS:
                raise IndexError("backend ids must be in [0, %d)" % constants.MAX_BACKENDS)
            size = ct.sizeof(Cb)
            order = np.argsort(ids, kind="stable")
            first = ids[order] * size
            # one mapping per run of rows that lie close together (a few per tick)
            cuts = np.nonzero(np.diff(first) > self.GAP)[0] + 1
            for run in np.split(np.arange(ids.size), cuts):
                lo, hi = int(first[run[0]]), int(first[run[-1]]) + size
                start = lo - lo % mmap.PAGESIZE
                mm = mmap.mmap(self.fd, hi - start, mmap.MAP_SHARED, mmap.PROT_READ, offset=start)
                try:
                    words = np.frombuffer(mm, dtype=np.uint64)
                    rows = (first[run] - start) // 8
                    out[order[run]] = words[rows[:, None] + np.arange(constants.CB_SLOTS * _WORDS)].reshape(
                        run.size, constants.CB_SLOTS, _WORDS)
                    del words
                finally:
                    mm.close()
        return decayed(out, time.monotonic_ns())

    def close(self) -> None:
        """Nothing stays mapped between reads."""
