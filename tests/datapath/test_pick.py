"""The Python mirror of the kernel's pick rule (equilibriumd.datapath.pick): pure, no root.

Exact distributions come from enumerating every pair of slots a random u32
can draw (SLOTS^2 values of r), so most checks below are equalities, not
statistics.
"""

from __future__ import annotations

import numpy as np
import pytest

from equilibriumd.datapath import pick
from equilibriumd.datapath.constants import NO_BACKEND, SLOTS, SVC_P2C, SVC_SWEEP
from equilibriumd.datapath.slots import build_table
from equilibriumd.datapath.slots import counts as slot_counts

N_IDS = 8


def _service(weights: list[float], ids: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A table half over `ids` (default 0..n-1) and the shares array by id, as the agent writes them."""
    ids = list(range(len(weights))) if ids is None else ids
    table = build_table(ids, weights)
    shares = np.zeros(N_IDS, dtype=np.uint32)
    shares[ids] = slot_counts(table, ids)
    return table, shares


def _active(by_id: dict[int, int]) -> np.ndarray:
    a = np.zeros(N_IDS, dtype=np.int64)
    for i, n in by_id.items():
        a[i] = n
    return a


ALL_R = pick.compose(np.repeat(np.arange(SLOTS), SLOTS), np.tile(np.arange(SLOTS), SLOTS))


def _exact(table: np.ndarray, shares: np.ndarray, active: np.ndarray, flags: int) -> np.ndarray:
    """P(backend id) over every equally likely pair of draws."""
    ids = pick.pick_once(table, shares, active, flags, ALL_R)
    return np.bincount(ids[ids != NO_BACKEND].astype(np.int64), minlength=N_IDS) / ALL_R.size


def test_bits_of_one_random_u32():
    r = np.array([0x0000_0000, 0x03FF_03FF, 0x1234_5678, 0xFFFF_FFFF], dtype=np.uint32)
    first, second = pick.slots_of(r)
    assert first.tolist() == [0, 1023, 0x278, 1023]
    assert second.tolist() == [0, 1023, 0x234, 1023]
    assert (pick.compose(first, second) == (r & 0x03FF_03FF)).all()


def test_weighted_draw_follows_slot_shares():
    table, shares = _service([5, 3, 2])
    busy = _active({0: 50, 1: 1})                    # counts do not matter without SVC_P2C
    p = _exact(table, shares, busy, 0)
    assert np.allclose(p[:3], shares[:3] / SLOTS)
    rng = np.random.default_rng(1)
    got = pick.pick(table, shares, busy, 0, rng.integers(0, 2 ** 32, size=30_000, dtype=np.uint32))
    seen = np.bincount(got.astype(np.int64), minlength=3)[:3] / got.size
    assert np.abs(seen - shares[:3] / SLOTS).max() < 0.015   # 5 sd of a share near 0.5 at 30,000


def test_p2c_with_nothing_open_is_the_weighted_draw():
    table, shares = _service([5, 3, 2])
    assert np.array_equal(_exact(table, shares, _active({}), SVC_P2C), _exact(table, shares, _active({}), 0))


def test_p2c_prefers_the_less_loaded_per_slot():
    # weights 2:1:1 -> 512/256/256 slots; 8 open on 0 (1/64 per slot), 2 on 1 (1/128), 0 on 2
    table, shares = _service([2, 1, 1])
    p = _exact(table, shares, _active({0: 8, 1: 2}), SVC_P2C)
    q = shares[:3] / SLOTS                            # 1/2, 1/4, 1/4
    # 0 keeps only the pairs whose second draw is 0 too; 1 keeps (1,1) and (1,0), gains (0,1);
    # 2 is idle and keeps every first draw, and wins every second draw
    assert p[0] == pytest.approx(q[0] * q[0])
    assert p[1] == pytest.approx(q[1] * (q[1] + q[0]) + q[0] * q[1])
    assert p[2] == pytest.approx(q[2] + q[0] * q[2] + q[1] * q[2])
    assert p[2] > q[2] and p[0] < q[0]


def test_the_margin_is_one_sixteenth():
    # even split: 342/341/341. Equal counts are within the margin: the draw stays weighted.
    table, shares = _service([1, 1, 1])
    assert list(shares[:3]) == [342, 341, 341]
    even = _exact(table, shares, _active({0: 10, 1: 10, 2: 10}), SVC_P2C)
    assert np.array_equal(even, _exact(table, shares, _active({}), 0))
    # per slot, the second must be below 16/17 of the first: 16 vs 17 open is not enough ...
    table, shares = _service([1, 1])                 # 512/512
    assert pick.second_wins(17, 512, 16, 512) is False
    assert pick.second_wins(18, 512, 16, 512) is True
    p = _exact(table, shares, _active({0: 17, 1: 16}), SVC_P2C)
    assert p[0] == pytest.approx(0.5)
    # ... 16 vs 18 is
    p = _exact(table, shares, _active({0: 18, 1: 16}), SVC_P2C)
    assert p[0] == pytest.approx(0.25) and p[1] == pytest.approx(0.75)


def test_idle_first_draw_skips_the_second():
    table, shares = _service([1, 1])
    # backend 0 idle, 1 loaded: a first draw of 0 stays; 1 moves to 0 when 0 is second
    r = pick.compose(np.array([0, 0, 600, 600]), np.array([0, 600, 0, 600]))
    got = pick.pick_once(table, shares, _active({1: 5}), SVC_P2C, r)
    assert got.tolist() == [0, 0, 0, 1]
    # a second backend without slots in the live half never wins, even idle
    assert pick.second_wins(5, 512, 0, 0) is False
    # a negative count (a late decrement after an id was reused) reads as 0: idle
    assert pick.pick_once(table, shares, _active({0: -3, 1: 5}), SVC_P2C, r).tolist() == [0, 0, 0, 1]


def test_empty_table_fails_and_stale_slots_draw_again():
    empty = np.full(SLOTS, NO_BACKEND, dtype=np.uint32)
    r = np.arange(10, dtype=np.uint32)
    assert (pick.pick(empty, np.zeros(N_IDS), _active({}), SVC_P2C, r) == NO_BACKEND).all()
    table, shares = _service([1, 1], ids=[3, 4])
    usable = np.zeros(N_IDS, dtype=bool)
    usable[4] = True                                  # 3 was drained after the table was written
    slot3, slot4 = 0, SLOTS - 1
    r = np.array([[pick.compose(slot3, 0), pick.compose(slot4, 0), 0],
                  [pick.compose(slot3, 0), pick.compose(slot3, 0), pick.compose(slot4, 0)],
                  [pick.compose(slot3, 0), pick.compose(slot3, 0), pick.compose(slot3, 0)]], dtype=np.uint32)
    got = pick.pick(table, shares, _active({}), 0, r, usable=usable)
    assert got.tolist() == [4, 4, NO_BACKEND]        # three stale draws fail the connect
    with pytest.raises(ValueError):
        pick.pick(table, shares, _active({}), 0, np.zeros((2, 4), dtype=np.uint32))


def test_scalar_and_vectorized_rules_agree():
    """pick_one (the simulator's per-connection call) and pick_once are the same rule."""
    rng = np.random.default_rng(7)
    for _ in range(30):
        n = int(rng.integers(1, N_IDS + 1))
        table, shares = _service(list(rng.integers(0, 5, size=n).astype(float) + rng.random(n)))
        active = rng.integers(-1, 6, size=N_IDS)
        flags = int(rng.integers(0, 2))
        r = rng.integers(0, 2 ** 32, size=500, dtype=np.uint32)
        vec = pick.pick_once(table, shares, active, flags, r)
        tl, sl, al = table.tolist(), shares.tolist(), active.tolist()
        assert vec.tolist() == [pick.pick_one(tl, sl, al, flags, int(x)) for x in r]


def test_sweep_slots_by_hand():
    """eq_sweep_slot: ((k mod n) * SLOTS + (k div n) * 633 mod SLOTS) div n, on u32."""
    assert [pick.sweep_slot(k, 3) for k in range(7)] == [0, 341, 682, 211, 552, 893, 80]
    # (1 * 633) % 1024 = 633: 633 // 3 = 211; k = 6: (2 * 633) % 1024 = 242, // 3 = 80
    assert pick.sweep_slot(0xFFFF_FFFF, 3) == pick.sweep_slot(np.array([0xFFFF_FFFF]), 3)[0] == 271
    assert [pick.sweep_slot(k, 1) for k in range(3)] == [0, 633, 242]
    ks = np.arange(10_000, dtype=np.int64) + 7
    for n in (1, 2, 3, 5, 16, 100, 1024):
        s = pick.sweep_slot(ks, n)
        assert ((s >= 0) & (s < SLOTS)).all()
        assert s[:50].tolist() == [pick.sweep_slot(int(k), n) for k in ks[:50]]


@pytest.mark.parametrize("weights", [[1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1], [6, 3, 1], [1, 2, 5], [100, 1, 1]])
def test_a_sweep_is_round_robin_by_weight(weights):
    """Over any window of whole sweeps each backend is first choice in proportion to its slots,
    within one per sweep; with equal weights exactly once per sweep but for the odd slot of an
    uneven split. A random first slot misses by sqrt(n) per n draws."""
    table, shares = _service(weights)
    n = len(weights)
    for start in (0, 4115 * n, ((1 << 32) // n - 400) * n):    # whole sweeps (the u32's wrap aside)
        k = np.arange(start, start + 300 * n, dtype=np.int64)
        r = pick.compose(pick.sweep_slot(k, n), np.zeros(k.size, dtype=np.int64))
        got = pick.pick_once(table, shares, _active({}), SVC_P2C, r)
        per_sweep = got.reshape(-1, n)
        want = shares[:n] / SLOTS * n
        for b in range(n):
            hits = (per_sweep == b).sum(axis=1)
            assert np.abs(hits - want[b]).max() <= 1.0 + 1e-9, (weights, b, hits.min(), hits.max())
        total = np.bincount(got.astype(np.int64), minlength=n)[:n] / got.size
        assert np.allclose(total, shares[:n] / SLOTS, atol=1.5 / 300), (weights, total)
    if len(set(weights)) == 1:   # equal weights: one each per sweep, all but a sweep in ~1,000
        k = np.arange(1000 * n * n, dtype=np.int64)
        got = pick.pick_once(table, shares, _active({}), 0, pick.compose(pick.sweep_slot(k, n), 0 * k))
        once = (np.sort(got.reshape(-1, n), axis=1) == np.arange(n)).all(axis=1)
        assert once.mean() > 0.99


def test_sweep_draw_keeps_the_random_second_slot():
    r = 0xABCD_0123
    d = pick.sweep_draw(r, 4, 3)
    assert pick.slots_of(np.array([d]))[0][0] == pick.sweep_slot(4, 3)
    assert pick.slots_of(np.array([d]))[1][0] == pick.slots_of(np.array([r]))[1][0]
    assert pick.sweep_draw(r, 4, 0) == r                       # no backend: the kernel fails it first
    assert pick.first_draw(SVC_P2C, r, 4, 3) == r              # no sweep flag: the random draw
    assert pick.first_draw(SVC_P2C | SVC_SWEEP, r, 4, 3) == d
