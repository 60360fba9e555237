"""Decaying beta reputation."""

import numpy as np
import pytest

from equilibriumd.game.reputation import Reputation


def test_scores_monotone_and_decay_to_prior() -> None:
    rep = Reputation(3, half_life=10.0)
    s = rep.update([10, 0, 0], [0, 10, 0])
    assert s[0] > 0.5 > s[1] and s[2] == pytest.approx(0.5)
    assert rep.trusted(0.6).tolist() == [True, False, False]
    before = rep.score()
    after = rep.update(0, 0, dt=10.0)  # one half-life, no evidence
    assert (np.abs(after - 0.5) < np.abs(before - 0.5) + 1e-12).all()
    good, bad = rep.evidence()
    assert good[0] == pytest.approx(5.0) and bad[1] == pytest.approx(5.0)
    rep.update(0, 0, dt=1000.0)
    np.testing.assert_allclose(rep.score(), 0.5, atol=1e-6)


def test_resize_and_validation() -> None:
    rep = Reputation(1, prior=(3.0, 1.0))
    rep.update([4], [0])
    rep.resize(2)
    assert len(rep) == 2 and rep.score()[1] == pytest.approx(0.75)
    assert rep.score()[0] > 0.75
    with pytest.raises(ValueError):
        rep.update([-1, 0], [0, 0])
