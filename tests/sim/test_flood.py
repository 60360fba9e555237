"""The flood scenario (issue 15 item 3): an adaptive flooder against no defence, cooperation's
deterministic trigger and the zero-sum randomized defence (sim.admission, policy.defence)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest

from equilibriumd.lab.sim.engine import Run, simulate
from equilibriumd.lab.sim.metrics import aggregate, caller_metrics, flood_metrics, honest_p99, run_metrics
from equilibriumd.lab.sim.scenarios import CALLERS, NAMES, SCENARIOS

SC, CALM = SCENARIOS["flood"], SCENARIOS["flood-calm"]


@lru_cache(maxsize=None)
def run(policy: str, seed: int = 0, calm: bool = False) -> Run:
    return simulate(CALM if calm else SC, policy, seed)


def test_scenario_honest_callers_at_normal_load_and_a_flooder() -> None:
    capacity = sum(b.capacity for b in SC.backends)
    assert SC.attack is not None and CALM.attack is not None and CALM.attack.silent
    honest = sum(d for c, d in enumerate(CALLERS["flood"]) if c != SC.attack.caller)
    assert honest / capacity == pytest.approx(0.375)
    assert SC.attack.top == CALLERS["flood"][SC.attack.caller] == 2 * capacity
    assert SC.rate_at(0.0) == pytest.approx(sum(CALLERS["flood"]))
    assert CALM.twin == "flood" and "flood" not in NAMES and "flood-calm" not in NAMES


def test_the_calm_twin_has_the_same_honest_requests() -> None:
    a, b = run("round-robin"), run("round-robin", calm=True)
    assert a.caller is not None and b.caller is not None
    ha, hb = a.caller != 6, b.caller != 6
    assert np.array_equal(a.arrival[ha], b.arrival[hb])
    assert not (b.caller == 6).any()                         # silent: the flooder sends nothing
    assert ((a.caller == 6) & (a.arrival < SC.attack.start)).sum() == 0   # type: ignore[union-attr]


def test_without_defence_the_flood_takes_the_service() -> None:
    for policy in ("round-robin", "equilibrium@no-admission"):
        f = flood_metrics(run(policy), SC, 0)
        assert f["flooder_offered_per_second"] == pytest.approx(1280.0, rel=0.03)   # its best response: all it has
        assert f["flooder_admitted_per_second"] == f["flooder_offered_per_second"]
        assert f["honest_p99_ratio_no_flood"] > 10 and f["honest_success"] < 0.1


def test_cooperation_alone_is_beaten_below_its_trigger() -> None:
    r = run("equilibrium@cooperation")
    f = flood_metrics(r, SC, 0)
    # the attacker sits just under 1.5x its fair share of the capacity: never punished, the service saturated
    assert r.refused is not None and not r.refused.any()
    assert 400 < f["flooder_admitted_per_second"] < 700
    assert f["honest_p99_ratio_no_flood"] > 2


def test_zero_sum_defence_keeps_honest_p99_within_1_2x_of_no_flood() -> None:
    r = run("equilibrium")
    f = flood_metrics(r, SC, 0)
    assert f["honest_p99_ratio_no_flood"] <= 1.2
    assert f["honest_success"] >= 0.99 and f["honest_success_no_flood"] >= 0.99
    assert f["flooder_admitted_per_second"] < 100            # about its allowance, or held
    assert r.admission is not None and r.refused is not None and r.caller is not None
    # only the flooder is ever budgeted or refused
    assert all(set(p["budgets"]) <= {6} for p in r.admission.log)
    assert not (r.refused & (r.caller != 6)).any()
    games = [p["game"] for p in r.admission.log if p.get("game")]
    assert games and any(0.0 < x < 1.0 for g in games for x in g[0])   # a mixed strategy was played
    # the calm twin: nobody is refused (the honest load is feasible, and nobody floods)
    calm = run("equilibrium", calm=True)
    assert calm.refused is not None and not calm.refused.any()


def test_flood_metrics_deterministic_and_aggregated() -> None:
    r = run("equilibrium", 1)
    a = {**run_metrics(r, SC), **caller_metrics(r, SC, CALLERS["flood"], 1)}
    b = {**run_metrics(simulate(SC, "equilibrium", 1), SC), **caller_metrics(r, SC, CALLERS["flood"], 1)}
    assert a == b
    assert a["honest_p99_seconds"] == honest_p99(r, SC)[0]
    agg = aggregate([a])
    assert agg["honest_p99_ratio_no_flood"] == pytest.approx(a["honest_p99_ratio_no_flood"])
    assert agg["median"]["honest_p99_ratio_no_flood"] == pytest.approx(a["honest_p99_ratio_no_flood"])
