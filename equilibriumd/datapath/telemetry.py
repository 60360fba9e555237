"""Per-tick telemetry deltas from the per-CPU maps, as numpy arrays by backend id.

The kernel only ever adds to per-CPU counters. Each tick the agent reads the
counters of eq_tel_be (as far as its highest backend id, a chunk per batch
syscall), sums them over CPUs and subtracts the previous sums in the
counters' own width, so a wrapped counter still gives the right delta. The
latency histograms live in eq_tel_hist, read only for display (`totals`).
When a backend id is handed to a new backend its counters are zeroed and its
epoch bumped (see agent.reconcile); the reader then starts that id from zero
instead of producing a huge negative delta.
"""

from __future__ import annotations

import ctypes as ct
import time
from dataclasses import dataclass

import numpy as np

from . import constants, libbpf
from .structs import BE_TEL_COUNTERS, HIST_BUCKETS, BeHist, BeTel

_NC = len(BE_TEL_COUNTERS)
COUNTER = {name: i for i, name in enumerate(BE_TEL_COUNTERS)}

#: A tried request or connect that failed: a 5xx, a request closed before any
#: answer, a refused or timed-out connect. The one definition of "failed"; the
#: policy, the views and the metrics all count with `total(..., FAILED)`.
FAILED = ("resp_5xx", "req_errors", "refused", "timed_out")
#: A request that left the backend's queue: answered (any status) or given up.
ANSWERED = ("resp_1xx", "resp_2xx", "resp_3xx", "resp_4xx", "resp_5xx", "req_errors")
#: What was tried at request level: requests sent, and connects that never carried one.
TRIED = ("requests", "refused", "timed_out")
#: Responses: each one's time to first byte is in req_ns_sum (the mean's denominator).
RESPONSES = ("resp_1xx", "resp_2xx", "resp_3xx", "resp_4xx", "resp_5xx")
#: Connection-level failures (non-HTTP TCP): refused, reset, timed out.
CONNECT_FAILED = ("refused", "reset", "timed_out")


def total(counters: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    """Sum of the named counters along the last axis (rows of eq_tel_be counters)."""
    c = np.asarray(counters)
    return c[..., [COUNTER[n] for n in names]].sum(axis=-1)


def in_flight(counters: np.ndarray) -> np.ndarray:
    """Sockets with a request outstanding now, from cumulative counters (rows of
    eq_tel_be summed over CPUs): each socket enters that state at a request and
    leaves it at the answer or at its close, so a request the parser never sees
    answered (pipelining, retransmits, a protocol that only looks like HTTP)
    cannot pile up: closing its socket ends it."""
    c = np.asarray(counters)
    return np.maximum(c[..., COUNTER["req_open"]].astype(np.int64) - c[..., COUNTER["req_done"]].astype(np.int64), 0)


def hist_quantile(hist: np.ndarray, q: float) -> np.ndarray:
    """Quantile (seconds) from log2-µs histograms along the last axis.

    Bucket i holds [2^i, 2^(i+1)) µs (bucket 0 holds [0, 2)); the quantile is
    interpolated linearly inside its bucket, so it is exact to within one
    bucket. NaN where a histogram is empty.
    """
    h = np.asarray(hist, dtype=np.float64)
    total = h.sum(axis=-1)
    cum = np.cumsum(h, axis=-1)
    target = q * total
    b = np.argmax(cum >= target[..., None], axis=-1)
    inb = np.take_along_axis(h, b[..., None], axis=-1)[..., 0]
    before = np.take_along_axis(cum, b[..., None], axis=-1)[..., 0] - inb
    lo = np.where(b == 0, 0.0, np.exp2(b.astype(np.float64)))
    hi = np.exp2(b.astype(np.float64) + 1)
    frac = np.divide(target - before, inb, out=np.ones_like(inb), where=inb > 0)
    us = lo + np.clip(frac, 0.0, 1.0) * (hi - lo)
    return np.where(total > 0, us * 1e-6, np.nan)


def bucket_bounds(i: int) -> tuple[float, float]:
    """[low, high) of histogram bucket i, in seconds."""
    return (0.0 if i == 0 else 2.0 ** i * 1e-6, 2.0 ** (i + 1) * 1e-6)


@dataclass
class TelemetryDelta:
    """What happened since the previous tick, per backend id (index = id)."""

    seconds: float                 #: time covered by this delta
    counters: np.ndarray           #: (MAX_BACKENDS, len(BE_TEL_COUNTERS)) uint64
    open_connections: np.ndarray   #: (MAX_BACKENDS,) gauge: established minus closed, cumulative
    inflight: np.ndarray           #: (MAX_BACKENDS,) gauge: open sockets with a request unanswered

    def __getitem__(self, name: str) -> np.ndarray:
        return self.counters[:, COUNTER[name]]

    @property
    def connect_errors(self) -> np.ndarray:
        return total(self.counters, CONNECT_FAILED)

    @property
    def errors(self) -> np.ndarray:
        """Failed requests and connections (`FAILED`)."""
        return total(self.counters, FAILED)

    def rtt_seconds(self) -> np.ndarray:
        n = self["rtt_samples"].astype(np.float64)
        return np.divide(self["rtt_sum_us"].astype(np.float64) * 1e-6, n, out=np.full_like(n, np.nan), where=n > 0)

    def mean_latency_seconds(self) -> np.ndarray:
        """Exact mean request latency this tick (sum / count); NaN without responses."""
        n = self.req_timed.astype(np.float64)
        return np.divide(self["req_ns_sum"].astype(np.float64) * 1e-9, n, out=np.full_like(n, np.nan), where=n > 0)

    @property
    def req_timed(self) -> np.ndarray:
        """Responses this tick: each one's time to first byte is in req_ns_sum."""
        return total(self.counters, RESPONSES)

    @property
    def conn_timed(self) -> np.ndarray:
        """Connects established this tick: each one's latency is in conn_ns_sum."""
        return self["established"]

    def mean_connect_seconds(self) -> np.ndarray:
        n = self["established"].astype(np.float64)
        return np.divide(self["conn_ns_sum"].astype(np.float64) * 1e-9, n, out=np.full_like(n, np.nan), where=n > 0)


#: backends per batch read of the (shared) histograms: 1,024 x 256 B, 256 KB.
CHUNK = 1024
G = constants.TEL_GROUP
#: bytes one batch read of the per-CPU counters may copy (all CPUs' values of its
#: keys): the read buffer's size, whatever the node's CPU count and map size. A key
#: (TEL_GROUP backends) is 2,816 B per CPU: 2 keys a read at 128 CPUs, 186 at 2.
READ_BUDGET = 1 << 20
_WORDS = {"counters": ct.sizeof(BeTel) * G // 4, "hist": ct.sizeof(BeHist) // 4}


def group_chunk(ncpu: int, budget: int = READ_BUDGET) -> int:
    """Keys of eq_tel_be per batch read so that one read copies at most `budget`
    bytes (at least one key: 2,816 B per CPU)."""
    return max(budget // (ncpu * _WORDS["counters"] * 4), 1)


class TelemetryReader:
    """Reads eq_tel_be every tick and returns deltas; one per consumer (it keeps
    state and a read buffer: the agent's tick and a /metrics scrape each have their own).

    The tick reads the counters only (eq_tel_be, 176 bytes per backend and CPU);
    the latency histograms (eq_tel_hist) are read for display (`totals`). Only
    sums over CPUs are kept between ticks (176 bytes per backend id): modular
    arithmetic makes the delta of the u64 sums equal to the sum of the per-CPU
    deltas, so a wrapped counter still gives the right delta.
    """

    def __init__(self, map_fd: int, ncpu: int, hist_fd: int = -1, budget: int = READ_BUDGET) -> None:
        self.fd = map_fd
        self.hist_fd = hist_fd
        self.ncpu = ncpu
        self._prev: np.ndarray | None = None   # counters summed over CPUs, by id
        self._prev_t = 0.0
        self._epochs = np.zeros(constants.MAX_BACKENDS, dtype=np.int64)
        assert ct.sizeof(BeTel) == 8 * _NC and ct.sizeof(BeHist) == 8 * HIST_BUCKETS
        self.group_chunk = group_chunk(ncpu, budget)   #: eq_tel_be keys per batch read
        self._buf = np.empty((self.group_chunk, ncpu, _WORDS["counters"]), dtype=np.uint32)   # reused every tick
        self._keys = np.empty(max(CHUNK, self.group_chunk), dtype=np.uint32)   # the most keys a read takes

    def _read_chunk(self, which: str, k: int, start: int) -> np.ndarray:
        """Keys [start, start + k) of eq_tel_be ("counters": a key holds TEL_GROUP
        backends, per CPU) or eq_tel_hist ("hist": a key per backend, one shared
        value), as u32 words: (k, ncpu or 1, words)."""
        if which == "counters":
            buf = self._buf[:k]
            fd = self.fd
        else:   # eq_tel_hist is shared (atomic adds), not per CPU
            buf = np.empty((k, 1, _WORDS[which]), dtype=np.uint32)
            fd = self.hist_fd
        libbpf.array_read_into(fd, self._keys.ctypes.data_as(ct.c_void_p), buf.ctypes.data_as(ct.c_void_p),
                               k, start)
        return buf

    def _counters(self, n: int) -> np.ndarray:
        """Counters of backend ids [0, n) summed over CPUs (u64, wrapping), read
        `group_chunk` keys at a time and summed per chunk: the peak is the result
        (176 B per id) plus one read buffer (READ_BUDGET), whatever the CPU count.
        Ids are handed out lowest first, so readers read only as far as the highest
        in use."""
        groups = -(-n // G)
        c = np.empty((groups * G, _NC), dtype=np.uint64)
        for start in range(0, groups, self.group_chunk):
            k = min(self.group_chunk, groups - start)
            words = self._read_chunk("counters", k, start).view(np.uint64)   # (k, ncpu, G * _NC)
            c[start * G:(start + k) * G] = words.sum(axis=1, dtype=np.uint64).reshape(k * G, _NC)
        return c[:n]

    def totals(self, n: int = constants.MAX_BACKENDS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cumulative (counters, conn_hist, req_hist) summed over CPUs, for display
        (histogram buckets summed in u64: exact)."""
        return (self._counters(n), *self.hists(n))

    def hists(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Cumulative (conn_hist, req_hist) of ids [0, n): eq_tel_hist is shared, not
        per CPU (256 B an id), read CHUNK ids at a time."""
        h = np.empty((n, 2 * HIST_BUCKETS), dtype=np.uint64)
        for start in range(0, n, CHUNK):
            k = min(CHUNK, n - start)
            h[start:start + k] = self._read_chunk("hist", k, start).sum(axis=1, dtype=np.uint64)
        return h[:, :HIST_BUCKETS], h[:, HIST_BUCKETS:]

    def last_counters(self, n: int) -> np.ndarray | None:
        """The cumulative counters of ids [0, n) as the last `tick` read them (ids it
        did not read are zero), without reading the kernel: what a /metrics scrape
        exports, so a scrape costs no per-CPU copy. None before the first tick."""
        cur = self._prev
        if cur is None:
            return None
        if cur.shape[0] >= n:
            return cur[:n]
        out = np.zeros((n, _NC), dtype=np.uint64)
        out[:cur.shape[0]] = cur
        return out

    def tick(self, epochs: np.ndarray | None = None, n_ids: int = constants.MAX_BACKENDS) -> TelemetryDelta:
        """Deltas for backend ids [0, n_ids); arrays are indexed by backend id."""
        now = time.monotonic()
        cur = self._counters(n_ids)
        prev = cur if self._prev is None else self._prev
        if prev.shape[0] != n_ids:  # the id range grew or shrank: keep what overlaps
            k = min(n_ids, prev.shape[0])
            grown = np.zeros_like(cur)
            grown[:k] = prev[:k]
            prev = grown
        if epochs is not None:
            changed = np.nonzero(epochs[:n_ids] != self._epochs[:n_ids])[0]
            if changed.size and self._prev is not None:  # zeroed with the new epoch: start those ids from zero
                prev = prev.copy()
                prev[changed] = 0
            if changed.size:   # (the first tick is the baseline for every id: a zero delta over 0 s)
                self._epochs = epochs.copy()
        delta = cur - prev                # u64 wrap-around: exact
        # A counter cannot advance 2^63 in a tick: a "delta" that large is one that
        # went back (zeroed without an epoch bump): count it from zero, not as ~2^64
        # (and as 0 if even that is impossible).
        half = np.uint64(1 << 63)
        back = delta >= half
        if back.any():
            delta[back] = np.where(cur[back] < half, cur[back], np.uint64(0))
        est = cur[:, COUNTER["established"]].astype(np.int64)
        closed = cur[:, COUNTER["closed"]].astype(np.int64)
        inflight = in_flight(cur)
        seconds = now - self._prev_t if self._prev is not None else 0.0
        self._prev, self._prev_t = cur, now
        return TelemetryDelta(seconds, delta, np.maximum(est - closed, 0), inflight)
