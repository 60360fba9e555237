"""Per-tick telemetry deltas from the per-CPU maps, as numpy arrays by backend id.

The kernel only ever adds to per-CPU counters. Each tick the agent reads the
whole eq_tel_be map in one batch syscall and subtracts the previous read per
CPU, in the counters' own width, so a wrapped counter still gives the right
delta (u64 counters, and u32 histogram buckets that do wrap on a busy node).
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
from .structs import BE_TEL_COUNTERS, HIST_BUCKETS, BeTel

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
#: Connection-level failures (non-HTTP TCP): refused, reset, timed out.
CONNECT_FAILED = ("refused", "reset", "timed_out")


def total(counters: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    """Sum of the named counters along the last axis (rows of eq_tel_be counters)."""
    c = np.asarray(counters)
    return c[..., [COUNTER[n] for n in names]].sum(axis=-1)


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
    conn_timed: np.ndarray         #: (MAX_BACKENDS,) connects timed this tick (what conn_ns_sum sums)
    req_timed: np.ndarray          #: (MAX_BACKENDS,) responses timed this tick (what req_ns_sum sums)
    open_connections: np.ndarray   #: (MAX_BACKENDS,) gauge: established minus closed, cumulative
    inflight: np.ndarray           #: (MAX_BACKENDS,) gauge: requests seen minus answered or failed

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

    def mean_connect_seconds(self) -> np.ndarray:
        n = self["established"].astype(np.float64)
        return np.divide(self["conn_ns_sum"].astype(np.float64) * 1e-9, n, out=np.full_like(n, np.nan), where=n > 0)


#: backend ids per batch read: bounds the per-CPU read buffer to CHUNK x 416 B x CPUs
#: (416 KB per CPU), whatever the node's size; sums over CPUs are kept, not copies.
CHUNK = 1024


class TelemetryReader:
    """Reads eq_tel_be every tick and returns deltas; one per agent.

    Only sums over CPUs are kept between ticks (168 bytes per backend id: the
    counters, and each histogram's total):
    modular arithmetic makes the delta of the sums, in each counter's own
    width (u64 counters, u32 histogram buckets), equal to the sum of the
    per-CPU deltas, so a wrapped counter still gives the right delta.
    """

    def __init__(self, map_fd: int, ncpu: int) -> None:
        self.fd = map_fd
        self.ncpu = ncpu
        self._prev: tuple[np.ndarray, np.ndarray] | None = None   # (counters u64, histograms u32) by id
        self._prev_t = 0.0
        self._epochs = np.zeros(constants.MAX_BACKENDS, dtype=np.int64)
        self._dtype = np.dtype([("c", np.uint64, (_NC,)), ("h", np.uint32, (2 * HIST_BUCKETS,))])
        assert self._dtype.itemsize == ct.sizeof(BeTel)
        self._buf = np.empty((CHUNK, ncpu), dtype=self._dtype)   # one chunk, reused every read
        self._keys = np.empty(CHUNK, dtype=np.uint32)

    def read_raw(self, n: int = constants.MAX_BACKENDS, start: int = 0) -> np.ndarray:
        """Backend ids [start, start + n), per CPU."""
        raw = libbpf.array_read(self.fd, ct.sizeof(BeTel) * self.ncpu, n, start)
        return np.frombuffer(raw, dtype=self._dtype).reshape(n, self.ncpu)

    def read_sums(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Counters (u64, wrapping) and histogram buckets (u64, exact) of backend ids
        [0, n) summed over CPUs, read CHUNK ids at a time into one reused buffer
        (for display: views and /metrics). Ids are handed out lowest first, so
        readers read only as far as the highest id in use."""
        c = np.empty((n, _NC), dtype=np.uint64)
        h = np.empty((n, 2 * HIST_BUCKETS), dtype=np.uint64)
        words = ct.sizeof(BeTel) // 4
        for start in range(0, n, CHUNK):
            k = min(CHUNK, n - start)
            # plain u64 / u32 views of the records: contiguous rows, no structured-field copies
            raw = self._read_chunk(k, start).view(np.uint32).reshape(k, self.ncpu, words)
            c64 = raw[:, :, :2 * _NC].view(np.uint64)
            h32 = raw[:, :, 2 * _NC:]
            cs, hs = c[start:start + k], h[start:start + k]
            cs[:] = c64[:, 0]
            hs[:] = h32[:, 0]
            for cpu in range(1, self.ncpu):   # elementwise adds wrap like the kernel's counters
                cs += c64[:, cpu]
                hs += h32[:, cpu]
        return c, h

    def _read_chunk(self, k: int, start: int) -> np.ndarray:
        buf = self._buf[:k]
        libbpf.array_read_into(self.fd, self._keys.ctypes.data_as(ct.c_void_p), buf.ctypes.data_as(ct.c_void_p),
                               k, start)
        return buf

    def totals(self, n: int = constants.MAX_BACKENDS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cumulative (counters, conn_hist, req_hist) summed over CPUs, for display."""
        c, h = self.read_sums(n)
        return c, h[:, :HIST_BUCKETS], h[:, HIST_BUCKETS:]

    def _read_tick(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Counters and, per id, the sum of each histogram's buckets (connect, request),
        summed over CPUs: all the tick needs. The bucket sums are kept mod 2^32, the
        buckets' own width, so their per-tick differences are exact counts."""
        c = np.empty((n, _NC), dtype=np.uint64)
        timed = np.empty((n, 2), dtype=np.uint32)
        words = ct.sizeof(BeTel) // 4
        for start in range(0, n, CHUNK):
            k = min(CHUNK, n - start)
            raw = self._read_chunk(k, start).view(np.uint32).reshape(k, self.ncpu, words)
            c64 = raw[:, :, :2 * _NC].view(np.uint64)
            h32 = raw[:, :, 2 * _NC:].reshape(k, self.ncpu, 2, HIST_BUCKETS)
            c[start:start + k] = c64.sum(axis=1, dtype=np.uint64)
            timed[start:start + k] = h32.sum(axis=(1, 3), dtype=np.uint32)
        return c, timed

    def tick(self, epochs: np.ndarray | None = None, n_ids: int = constants.MAX_BACKENDS) -> TelemetryDelta:
        """Deltas for backend ids [0, n_ids); arrays are indexed by backend id."""
        now = time.monotonic()
        cur_c, cur_h = self._read_tick(n_ids)
        if self._prev is None:
            prev_c, prev_h = cur_c, cur_h
        else:
            prev_c, prev_h = self._prev
            if prev_c.shape[0] != n_ids:  # the id range grew or shrank: keep what overlaps
                k = min(n_ids, prev_c.shape[0])
                pc, ph = np.zeros_like(cur_c), np.zeros_like(cur_h)
                pc[:k], ph[:k] = prev_c[:k], prev_h[:k]
                prev_c, prev_h = pc, ph
        if epochs is not None:
            changed = np.nonzero(epochs[:n_ids] != self._epochs[:n_ids])[0]
            if changed.size:  # counters were zeroed with the new epoch: start those ids from zero
                prev_c, prev_h = prev_c.copy(), prev_h.copy()
                prev_c[changed] = 0
                prev_h[changed] = 0
                self._epochs = epochs.copy()
        dc = cur_c - prev_c               # u64 wrap-around: exact
        dh = cur_h - prev_h               # u32 sums: exact per tick
        est = cur_c[:, COUNTER["established"]].astype(np.int64)
        closed = cur_c[:, COUNTER["closed"]].astype(np.int64)
        answered = total(cur_c, ANSWERED).astype(np.int64)
        inflight = np.maximum(cur_c[:, COUNTER["requests"]].astype(np.int64) - answered, 0)
        seconds = now - self._prev_t if self._prev is not None else 0.0
        self._prev, self._prev_t = (cur_c, cur_h), now
        return TelemetryDelta(seconds, dc, dh[:, 0], dh[:, 1], np.maximum(est - closed, 0), inflight)
