"""Beliefs over backend types."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from equilibriumd.game.bayesian import DEGRADED, FAILING, HEALTHY, BackendBelief, SignalModel

# No deadline (LP times vary on a loaded CI machine), few examples, reproducible.
PROPERTY = settings(deadline=None, max_examples=40, derandomize=True)


def test_errors_move_belief_to_failing_and_back() -> None:
    belief = BackendBelief((2,))
    for _ in range(5):
        belief.update(requests=[100, 100], errors=[50, 0], latency=[0.5, 0.05], reference=0.1)
    assert belief.probability(FAILING)[0] > 0.99
    assert belief.probability(HEALTHY)[1] > 0.99
    assert belief.expected_payoff()[1] > belief.expected_payoff()[0]
    # Recovery: the Markov transition lets a failed backend be believed healthy again.
    for _ in range(10):
        belief.update(
            requests=[100, 100], errors=[0, 0], latency=[0.1, 0.1], reference=0.1, health=[1, 1]
        )
    assert belief.probability(HEALTHY)[0] > 0.9


def test_latency_signal_alone_detects_degradation() -> None:
    belief = BackendBelief(())
    for _ in range(5):
        belief.update(latency=0.3, reference=0.1)
    assert int(np.argmax(belief.posterior)) == DEGRADED


def test_matches_hand_computed_bayes() -> None:
    model = SignalModel(transition=np.eye(3))
    belief = BackendBelief((), model)
    belief.update(requests=10, errors=2, health=0)
    e, h = model.error_rate, model.health_pass
    unnorm = model.prior * e**2 * (1 - e) ** 8 * (1 - h)
    np.testing.assert_allclose(belief.posterior, unnorm / unnorm.sum())


@PROPERTY
@given(
    st.lists(
        st.tuples(st.integers(0, 50), st.integers(0, 50), st.integers(-1, 1)),
        min_size=1,
        max_size=6,
    )
)
def test_sequential_equals_batch_with_identity_transition(obs: list[tuple[int, int, int]]) -> None:
    model = SignalModel(transition=np.eye(3))
    seq, once = BackendBelief((), model), BackendBelief((), model)
    total_req = total_err = 0
    for req_extra, err, _health in obs:
        req = err + req_extra
        seq.update(requests=req, errors=err)
        total_req += req
        total_err += err
        post = seq.posterior
        assert (post >= 0).all() and post.sum() == pytest.approx(1.0)
    once.update(requests=total_req, errors=total_err)
    np.testing.assert_allclose(seq.posterior, once.posterior, rtol=1e-9, atol=1e-12)


def test_no_underflow_on_overwhelming_evidence() -> None:
    belief = BackendBelief((3,))
    belief.update(requests=[1e6, 1e6, 0], errors=[1e6, 0, 0])
    post = belief.posterior
    assert np.isfinite(post).all()
    np.testing.assert_allclose(post.sum(axis=-1), 1.0)
    assert post[0, FAILING] == pytest.approx(1.0) and post[1, HEALTHY] == pytest.approx(1.0)
    belief.reset([True, False, False])
    np.testing.assert_allclose(belief.posterior[0], belief.model.prior)
    with pytest.raises(ValueError):
        belief.update(requests=[1, 1, 1], errors=[2, 0, 0])


def test_log_ndtr_matches_scipy() -> None:
    # the engine avoids scipy at run time (agent memory); its own log Φ must agree
    from scipy.special import log_ndtr

    from equilibriumd.game.bayesian import _log_ndtr

    x = np.array([-60.0, -37.5, -36.0, -5.0, -1.57, 0.0, 1.0, 8.0])
    np.testing.assert_allclose(_log_ndtr(x), log_ndtr(x), rtol=1e-7, atol=1e-12)
