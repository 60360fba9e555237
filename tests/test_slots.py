"""Largest-remainder apportionment of weights to slot tables (pure)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from equilibriumd.datapath.constants import NO_BACKEND, SLOTS
from equilibriumd.datapath.slots import apportion, build_table, shares


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1, max_size=256))
def test_apportion_sums_and_stays_within_one_slot(w):
    counts = apportion(w)
    total = sum(w)
    if total == 0:
        assert counts.sum() == 0
        return
    assert counts.sum() == SLOTS
    quota = np.asarray(w) / total * SLOTS
    assert np.all(np.abs(counts - quota) < 1.0 + 1e-9)
    assert np.all(counts[np.asarray(w) == 0] == 0)


def test_split_represented_to_a_tenth_of_a_percent():
    t = build_table([7, 8, 9], [0.6, 0.3, 0.1])
    s = shares(t)
    assert abs(s[7] - 0.6) < 0.001 and abs(s[8] - 0.3) < 0.001 and abs(s[9] - 0.1) < 0.001
    assert t.dtype == np.uint32 and t.shape == (SLOTS,)


def test_all_zero_is_no_backend():
    assert np.all(build_table([1, 2], [0, 0]) == NO_BACKEND)


def test_deterministic_ties_go_to_lower_index():
    assert list(apportion([1, 1, 1], 4)) == [2, 1, 1]


@pytest.mark.parametrize("bad", [[-1, 1], [float("nan"), 1], [float("inf")]])
def test_bad_weights_rejected(bad):
    with pytest.raises(ValueError):
        apportion(bad)


def test_a_slot_packs_its_backend_id_and_that_backends_share():
    from equilibriumd.datapath import constants
    from equilibriumd.datapath.slots import pack, unpack

    t = build_table([7, 65535, 3], [1.0, 2.0, 1.0])
    packed = pack(t[None, :])[0]
    ids, shares = unpack(packed)
    assert np.array_equal(ids, t)
    assert {int(i): int(s) for i, s in zip(ids, shares)} == {7: 256, 65535: 512, 3: 256}
    empty = build_table([1, 2], [0.0, 0.0])
    assert (pack(empty[None, :]) == constants.NO_BACKEND).all()          # never a packed value
    assert unpack(pack(empty[None, :]))[1].max() == 0
