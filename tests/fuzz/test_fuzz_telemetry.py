"""Fuzz the telemetry delta reader (datapath.telemetry.TelemetryReader.tick)
over a MemoryDatapath's per-CPU counters: random sequences of increments,
wraps past 2^64, counters going backwards (a reset the reader was not told
of), id reuse (an epoch bump with zeroed counters) and a growing or shrinking
id range. Deltas are never "negative" (a wrapped-around huge u64), never NaN,
and exact where only increments happened; tick never raises. No root."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import example, given
from hypothesis import strategies as st

from equilibriumd.datapath import constants
from equilibriumd.datapath.memory import MemoryDatapath
from equilibriumd.datapath.telemetry import COUNTER

from . import fuzz_settings

FUZZ = fuzz_settings(150)
U64 = 1 << 64
HALF = 1 << 63
IDS = 6
NAMES = sorted(COUNTER)

step = st.one_of(
    st.tuples(st.just("add"), st.integers(0, IDS - 1), st.integers(0, 1), st.sampled_from(NAMES),
              st.integers(0, 1 << 40) | st.sampled_from([1, 1 << 58])),   # < 2^63 a tick in all
    st.tuples(st.just("set"), st.integers(0, IDS - 1), st.integers(0, 1), st.sampled_from(NAMES),
              st.integers(0, U64 - 1) | st.sampled_from([0, U64 - 1, HALF, HALF - 1, HALF + 1])),
    st.tuples(st.just("epoch"), st.integers(0, IDS - 1)),
    st.tuples(st.just("ids"), st.integers(0, IDS)),
    st.tuples(st.just("tick")),
)


def _set(dp: MemoryDatapath, bid: int, cpu: int, name: str, value: int) -> None:
    arr = dp._array("eq_tel_be")
    arr.grow(bid)
    cell = arr.data[bid, cpu]
    cell["c"][COUNTER[name]] = value % U64
    arr.data[bid, cpu] = cell


def _get(dp: MemoryDatapath, bid: int, cpu: int, name: str) -> int:
    arr = dp._array("eq_tel_be")
    return int(arr.data[bid, cpu]["c"][COUNTER[name]]) if bid < arr.data.shape[0] else 0


def run(steps: list[tuple[Any, ...]]) -> None:
    dp = MemoryDatapath(ncpu=2)
    reader = dp.telemetry()
    epochs = np.zeros(constants.MAX_BACKENDS, dtype=np.int64)
    n_ids = IDS
    first = True
    expected = np.zeros((IDS, len(NAMES)), dtype=object)   # increments since the last tick
    known = np.ones((IDS, len(NAMES)), dtype=bool)         # only increments since the last tick
    for s in steps + [("tick",)]:
        if s[0] == "add":
            _, bid, cpu, name, v = s
            dp.add_telemetry(bid, cpu=cpu, **{name: v})
            expected[bid, COUNTER[name]] += v
        elif s[0] == "set":   # the counter jumps anywhere, backwards included
            _, bid, cpu, name, v = s
            _set(dp, bid, cpu, name, v)
            known[bid, COUNTER[name]] = False
        elif s[0] == "epoch":   # the id goes to a new backend: zeroed, epoch bumped (agent.reconcile)
            bid = s[1]
            for cpu in range(2):
                for name in NAMES:
                    _set(dp, bid, cpu, name, 0)
            epochs[bid] += 1
            known[bid] = False
        elif s[0] == "ids":
            n_ids = s[1]
            known[:] = False   # ids coming back into range start from their cumulative value
        else:
            d = reader.tick(epochs, n_ids)
            assert d.counters.shape == (n_ids, len(NAMES)) and d.counters.dtype == np.uint64
            assert (d.counters < HALF).all(), "a delta wrapped below zero: %s" % d.counters.max()
            assert d.open_connections.shape == (n_ids,) and (d.open_connections >= 0).all()
            assert (d.inflight >= 0).all() and d.seconds >= 0
            for arr in (d.rtt_seconds(), d.mean_latency_seconds(), d.mean_connect_seconds()):
                ok = arr[~np.isnan(arr)]
                assert (ok >= 0).all() and np.isfinite(ok).all()
            if first:   # the first tick is the baseline: what was counted before is history
                assert (d.counters == 0).all()
                known[:] = False
            first = False
            for bid in range(min(n_ids, IDS)):
                for j in range(len(NAMES)):
                    if known[bid, j]:
                        assert int(d.counters[bid, j]) == expected[bid, j] % U64, (bid, NAMES[j])
            expected[:] = 0
            known[:] = True


@FUZZ
@given(st.lists(step, max_size=30))
@example([("tick",), ("add", 0, 0, "requests", 10), ("tick",), ("set", 0, 0, "requests", 3)])   # a reset: ~2^64
@example([("set", 0, 0, "requests", U64 - 5), ("set", 0, 1, "requests", U64 - 5), ("tick",), ("tick",),
          ("add", 0, 0, "requests", 7), ("add", 0, 1, "requests", 9)])                # a true wrap: exact
@example([("set", 1, 0, "established", U64 - 1), ("tick",), ("epoch", 1), ("add", 1, 0, "established", 2)])
@example([("tick",), ("set", 0, 0, "attempts", HALF)])   # a jump of 2^63: impossible, counted as 0
@example([("add", 0, 0, "requests", 5), ("epoch", 0)])   # first tick after an id's reuse: history over 0 s
def test_deltas_are_never_negative_and_exact_for_increments(steps: list[tuple[Any, ...]]) -> None:
    run(steps)


def test_found_a_counter_going_backwards_gives_a_delta_from_zero() -> None:
    """A counter that went back (a reset the reader was not told of) used to give
    a delta of ~2^64 - 7 (the tick's u64 subtraction); it counts from zero."""
    dp = MemoryDatapath(ncpu=2)
    reader = dp.telemetry()
    dp.add_telemetry(0, requests=10)
    reader.tick(None, 4)
    _set(dp, 0, 0, "requests", 3)
    d = reader.tick(None, 4)
    assert int(d["requests"][0]) == 3


def test_found_the_first_tick_is_a_zero_baseline_also_for_reused_ids() -> None:
    """The first tick with an id's epoch already bumped (ids reused before this
    reader started) returned that id's cumulative counts as one tick's delta,
    over 0 seconds; the first tick is the baseline for every id."""
    dp = MemoryDatapath(ncpu=2)
    reader = dp.telemetry()
    dp.add_telemetry(2, requests=1000, resp_2xx=1000)
    epochs = np.zeros(constants.MAX_BACKENDS, dtype=np.int64)
    epochs[2] = 3
    d = reader.tick(epochs, 4)
    assert d.seconds == 0 and int(d["requests"][2]) == 0
    dp.add_telemetry(2, requests=5)
    assert int(reader.tick(epochs, 4)["requests"][2]) == 5
