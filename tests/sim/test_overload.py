"""The overload scenario (issue 15 item 2): 1.3x capacity from unequal callers, per-caller metrics."""

from __future__ import annotations

import numpy as np
import pytest

from equilibriumd.game.capacity import fair_admission
from equilibriumd.lab.sim.engine import simulate
from equilibriumd.lab.sim.metrics import aggregate, caller_labels, caller_metrics, run_metrics
from equilibriumd.lab.sim.scenarios import CALLERS, NAMES, SCENARIOS

SC = SCENARIOS["overload"]
DEMANDS = CALLERS["overload"]
SHORT = SC.scaled(0.25)         # 15 s, steady window 5-15 s


def test_offered_load_is_1_3x_capacity_from_unequal_callers() -> None:
    capacity = sum(b.capacity for b in SC.backends)
    assert SC.rate_at(0.0) == SC.rate_at(SC.duration) == pytest.approx(sum(DEMANDS))
    assert sum(DEMANDS) / capacity == pytest.approx(1.3)
    fair = fair_admission(np.asarray(DEMANDS), capacity)
    within = np.asarray(DEMANDS) <= fair + 1e-9
    assert 0 < within.sum() < len(DEMANDS)          # some callers within their fair share, some above
    assert max(DEMANDS) > 1.5 * fair.max()          # ... some far above
    assert "overload" not in NAMES                  # asked for by name: the default set is unchanged


def test_caller_labels_follow_demands_and_the_seed() -> None:
    a, b = caller_labels(200_000, DEMANDS, 3), caller_labels(200_000, DEMANDS, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, caller_labels(200_000, DEMANDS, 4))
    share = np.bincount(a, minlength=len(DEMANDS)) / a.size
    assert share == pytest.approx(np.asarray(DEMANDS) / sum(DEMANDS), abs=0.005)


@pytest.mark.parametrize("policy", ["round-robin", "equilibrium"])
def test_per_caller_metrics_deterministic_and_in_range(policy: str) -> None:
    runs = [simulate(SHORT, policy, 1) for _ in range(2)]
    mets = [caller_metrics(r, SHORT, DEMANDS, 1) for r in runs]
    assert mets[0] == mets[1]
    m = mets[0]
    k = len(DEMANDS)
    assert len(m["caller_success"]) == len(m["caller_throughput"]) == len(m["caller_fair_share"]) == k
    for x in m["caller_success"] + [m["success_steady"], m["success_within_fair_share"], m["success_above_fair_share"]]:
        assert x is not None and 0.0 <= x <= 1.0
    assert m["jain_index"] is None or 0.0 <= m["jain_index"] <= 1.0
    # a caller's successes per second cannot exceed its demand (up to Poisson noise)
    assert all(t <= 1.3 * d for t, d in zip(m["caller_throughput"], DEMANDS))
    agg = aggregate([{**run_metrics(runs[0], SHORT), **m}])
    assert agg["caller_success"] == pytest.approx(m["caller_success"])
    assert agg["success_within_fair_share"] == pytest.approx(m["success_within_fair_share"])


def test_round_robin_overloads_the_small_backends() -> None:
    # equal quarters of 832 req/s: 208 req/s each, above the 80/80/160 req/s of backends 0-2 and
    # below backend 3's 320, so about a quarter of the steady window succeeds, for every caller alike
    m = caller_metrics(simulate(SHORT, "round-robin", 0), SHORT, DEMANDS, 0)
    assert m["success_within_fair_share"] == pytest.approx(0.25, abs=0.03)
    assert m["success_above_fair_share"] == pytest.approx(0.25, abs=0.03)
    # throughput proportional to demand, not to fair share: short of perfectly fair
    assert m["jain_index"] is not None and m["jain_index"] < 0.97


def test_equilibrium_sheds_fairly_at_admission() -> None:
    # the caller-aware admission layer in front of routing (sim.admission: policy.shedding on the
    # capacity game.capacity.ServiceCapacity estimates from telemetry): the callers within their fair
    # share keep their success, the ones above it are refused their excess at once (never queued)
    mets = []
    for seed in (0, 1, 2):
        r = simulate(SC, "equilibrium", seed)
        m = caller_metrics(r, SC, DEMANDS, seed)
        mets.append(m)
        assert r.refused is not None and r.caller is not None
        lo, hi = SC.steady
        steady = (r.arrival >= lo) & (r.arrival < hi)
        refused = np.bincount(r.caller[steady & r.refused], minlength=len(DEMANDS))
        assert refused[:4].sum() == 0                         # the smallest callers are never refused
        assert refused[5:].min() > 0                          # the ones above their share are
        assert r.latency[r.refused].max() == 0.0              # refused at once
        # the capacity estimate from telemetry is within 10 % of the backends' 640 req/s
        assert r.admission is not None
        assert r.admission.capacity.total() == pytest.approx(640.0, rel=0.1)
    assert float(np.median([m["success_within_fair_share"] for m in mets])) >= 0.99
    assert min(m["jain_index"] for m in mets) >= 0.95


def test_without_admission_equilibrium_fails_every_caller() -> None:
    m = caller_metrics(simulate(SHORT, "equilibrium@no-admission", 0), SHORT, DEMANDS, 0)
    assert m["success_within_fair_share"] < 0.25
    r = simulate(SHORT, "round-robin", 0)
    assert r.refused is not None and not r.refused.any()    # no policy but equilibrium has an admission layer
