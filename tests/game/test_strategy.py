"""Slot apportionment, exploration floor, sampling."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from equilibriumd.game import strategy

# No deadline (LP times vary on a loaded CI machine), few examples, reproducible.
PROPERTY = settings(deadline=None, max_examples=40, derandomize=True)

WEIGHTS = st.integers(1, 70).flatmap(
    lambda n: st.tuples(
        arrays(np.float64, n, elements=st.floats(0, 1e6)),
        arrays(np.bool_, n),
    )
)


@PROPERTY
@given(WEIGHTS, st.sampled_from([0.0, 0.001, 0.005, 0.01]), st.sampled_from([64, 1024]))
def test_slot_counts_properties(
    wa: tuple[np.ndarray, np.ndarray], floor: float, n_slots: int
) -> None:
    w, av = wa
    reserve = math.ceil(floor * n_slots - 1e-9) if floor > 0 else 0
    if av.sum() * reserve > n_slots:
        with pytest.raises(ValueError):
            strategy.to_slot_counts(w, n_slots, floor, av)
        return
    counts = strategy.to_slot_counts(w, n_slots, floor, av)
    assert counts.dtype.kind == "i"
    if not av.any():
        assert (counts == 0).all()
        return
    assert counts.sum() == n_slots
    assert (counts[~av] == 0).all()
    assert (counts[av] >= reserve).all()
    p = strategy.normalize(w, av)
    quota = reserve * av + p * (n_slots - reserve * av.sum())
    assert np.abs(counts - quota).max() < 1.0 + 1e-9


def test_slot_counts_examples() -> None:
    np.testing.assert_array_equal(strategy.to_slot_counts([1, 1, 1], 10), [4, 3, 3])
    np.testing.assert_array_equal(
        strategy.to_slot_counts([1, 0, 0], 1024, floor=0.01), [1002, 11, 11]
    )
    # Batch rows are independent and equal to the vector form.
    w = np.array([[0.7, 0.2, 0.1], [0.0, 0.0, 0.0]])
    batch = strategy.to_slot_counts(w, 1024, 0.005)
    np.testing.assert_array_equal(batch[0], strategy.to_slot_counts(w[0], 1024, 0.005))
    np.testing.assert_array_equal(batch[1], strategy.to_slot_counts(w[1], 1024, 0.005))
    table = strategy.slot_table(batch[0])
    assert table.size == 1024 and np.bincount(table).tolist() == batch[0].tolist()
    with pytest.raises(ValueError):
        strategy.to_slot_counts([1.0] * 300, 1024, floor=0.005)
    with pytest.raises(ValueError):
        strategy.to_slot_counts([-1.0, 2.0])


@PROPERTY
@given(WEIGHTS, st.floats(0, 0.014))
def test_with_floor(wa: tuple[np.ndarray, np.ndarray], floor: float) -> None:
    w, av = wa
    out = strategy.with_floor(w, floor, av)
    if not av.any():
        assert (out == 0).all()
        return
    assert out.sum() == pytest.approx(1.0)
    assert (out[av] >= floor - 1e-12).all() and (out[~av] == 0).all()
    p = strategy.normalize(w, av)
    assert 0.5 * np.abs(out - p).sum() <= av.sum() * floor + 1e-9


def test_sample_is_seeded_and_follows_strategy() -> None:
    p = np.array([0.1, 0.6, 0.3])
    a = strategy.sample(p, np.random.default_rng(1), size=20000)
    b = strategy.sample(p, np.random.default_rng(1), size=20000)
    assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.bincount(a, minlength=3) / a.size, p, atol=0.015)
    assert strategy.sample(p, np.random.default_rng(1)) in (0, 1, 2)
    with pytest.raises(ValueError):
        strategy.sample([0.5, 0.6], np.random.default_rng(0))
