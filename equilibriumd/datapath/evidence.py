"""Reads eq_tel_cb: what each caller cgroup saw of each backend, lately.

The kernel counts every observation the policy uses (connects and their
failures by kind, requests, responses, 5xx, requests left unanswered, latency
sums) per backend (eq_tel_be) and, in eq_tel_cb, per (caller cgroup, backend):
each backend has CB_SLOTS caller slots, and a slot's counts halve every
2**CB_HALF_SHIFT ns, so a slot holds its caller's last second or so. The map is
mmapable: the agent reads it in place, with no syscall and no copy, whatever
the node's size; `Evidence` applies the halvings still pending for slots that
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
    """eq_tel_cb mapped read-only into the agent, as far as the backend ids in use
    (a mapping of a BPF array is populated whole, so it is sized to what is read;
    its pages are the map's, counted in VmRSS as shared memory, not allocated)."""

    #: the mapping grows in steps of this many backend ids
    STEP = 1024

    def __init__(self, map_fd: int) -> None:
        self.fd = map_fd
        self._mm: mmap.mmap | None = None
        self._rows = 0
        self._words = np.zeros((0, constants.CB_SLOTS, _WORDS), dtype=np.uint64)

    def _map(self, n: int) -> None:
        rows = min(-(-max(n, 1) // self.STEP) * self.STEP, constants.MAX_BACKENDS)
        mm = mmap.mmap(self.fd, rows * ct.sizeof(Cb), mmap.MAP_SHARED, mmap.PROT_READ)
        self.close()
        self._mm, self._rows = mm, rows
        self._words = np.frombuffer(mm, dtype=np.uint64).reshape(rows, constants.CB_SLOTS, _WORDS)

    def read(self, n: int) -> Evidence:
        """Backend ids [0, n), as of now (CLOCK_MONOTONIC: the kernel's bpf_ktime_get_ns)."""
        if n > self._rows or self._mm is None:
            self._map(n)
        return decayed(self._words[:n], time.monotonic_ns())

    def read_ids(self, ids: np.ndarray) -> Evidence:
        """The given backend ids (a copy of their rows: a few per tick), as of now."""
        top = int(ids.max()) + 1 if ids.size else 0
        if top > self._rows or self._mm is None:
            self._map(top)
        return decayed(self._words[ids], time.monotonic_ns())

    def close(self) -> None:
        self._words = np.zeros((0, constants.CB_SLOTS, _WORDS), dtype=np.uint64)
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:   # a caller still holds last tick's view: unmapped when it goes
                pass
            self._mm = None
