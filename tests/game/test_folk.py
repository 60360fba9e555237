"""Folk theorem: discount thresholds, credible punishment length, minmax, IR, triggers."""

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from equilibriumd.game import folk

# No deadline (LP times vary on a loaded CI machine), few examples, reproducible.
PROPERTY = settings(deadline=None, max_examples=40, derandomize=True)

T, R, P, S = 5.0, 3.0, 1.0, 0.0
PD = [np.array([[R, S], [T, P]]), np.array([[R, T], [S, P]])]


def _grim_deviation_pays(delta: float) -> bool:
    # Discounted totals from now on: cooperate forever vs deviate once, then P forever.
    cooperate = R / (1 - delta)
    deviate = T + delta * P / (1 - delta)
    return deviate > cooperate + 1e-12


def test_min_discount_factor_published_value() -> None:
    assert folk.min_discount_factor(T, R, P) == pytest.approx((T - R) / (T - P))
    assert folk.min_discount_factor(T, R, P) == pytest.approx(0.5)


@pytest.mark.parametrize("delta", np.linspace(0.0, 0.99, 100))
def test_grim_trigger_sustainable_iff_threshold(delta: float) -> None:
    threshold = (T - R) / (T - P)
    assert folk.grim_trigger_sustainable(T, R, P, delta) == (delta >= threshold)
    if abs(delta - threshold) > 1e-9:
        assert folk.grim_trigger_sustainable(T, R, P, delta) == (not _grim_deviation_pays(delta))


@PROPERTY
@given(st.floats(0.01, 10), st.floats(0.01, 10), st.floats(0.01, 10), st.floats(0.0, 0.999))
def test_punishment_length_is_the_shortest_deterrent(
    gain: float, loss: float, p: float, delta: float
) -> None:
    reward, punishment = p + loss, p
    length = folk.punishment_length(gain, reward, punishment, delta)

    def deviation_value(n: int) -> float:
        # Gain now, lose (reward - punishment) for n ticks, then back to cooperation.
        return gain - loss * sum(delta**k for k in range(1, n + 1))

    if length is None:
        # Even grim trigger does not deter.
        assert delta < gain / (gain + loss) + 1e-9
        return
    assume(length < 5000)
    assert deviation_value(length) <= 1e-9 * max(1.0, gain)
    if length > 1:
        assert deviation_value(length - 1) > -1e-9 * max(1.0, gain)


def test_punishment_length_examples() -> None:
    # Gain 2, loss 2 per tick, delta 0.9: 0.9 < 1, 0.9 + 0.81 >= 1 -> 2 ticks.
    assert folk.punishment_length(2.0, 3.0, 1.0, 0.9) == 2
    assert folk.punishment_length(2.0, 3.0, 1.0, 0.4) is None
    assert folk.punishment_length(0.0, 3.0, 1.0, 0.4) == 0


def test_minmax_and_individual_rationality() -> None:
    value, punisher = folk.minmax_value(PD, 0)
    assert value == pytest.approx(P)
    np.testing.assert_allclose(punisher, [0.0, 1.0], atol=1e-9)
    assert folk.is_individually_rational([R, R], [P, P])
    assert not folk.is_individually_rational([S, T], [P, P])
    # Matching pennies: minmax 0, held by a 50/50 punisher.
    value, punisher = folk.minmax_value(
        [np.array([[1.0, -1], [-1, 1]]), np.array([[-1.0, 1], [1, -1]])], 1
    )
    assert value == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_allclose(punisher, [0.5, 0.5], atol=1e-9)


def test_three_player_minmax_with_correlated_punishers() -> None:
    # Player 0 gets 1 unless it matches the parity of the others' actions.
    u = np.zeros((2, 2, 2))
    for a, b, c in np.ndindex(2, 2, 2):
        u[a, b, c] = 1.0 if a != (b ^ c) else 0.0
    value, joint = folk.minmax_value([u, -u, -u], 0)
    assert value == pytest.approx(0.5)
    assert joint.shape == (2, 2) and joint.sum() == pytest.approx(1.0)


def test_trigger_strategy_punishes_then_forgives() -> None:
    trig = folk.TriggerStrategy(2, length=3)
    seq = [
        [True, False],
        [False, False],
        [False, True],
        [False, False],
        [False, False],
        [False, False],
    ]
    out = [trig.step(np.array(d)).tolist() for d in seq]
    assert [o[0] for o in out] == [True, True, True, False, False, False]
    assert [o[1] for o in out] == [False, False, True, True, True, False]
    assert (trig.remaining == 0).all()
