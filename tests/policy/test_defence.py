"""The zero-sum flood defence (policy.defence) and fair shedding (policy.shedding): hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from equilibriumd.policy import defence, shedding
from equilibriumd.policy.defence import Defence, DefenceParams


def test_damage_and_allowance_by_hand() -> None:
    # M/M/1: W = W0 / (1 - x / mu); 240 of 640 served, 100 more: W grows by 100 / (400 - 100) = 1/3
    assert defence.damage(100.0, 240.0, 640.0) == pytest.approx(1 / 3)
    assert defence.damage(0.0, 240.0, 640.0) == 0.0
    assert defence.damage(400.0, 240.0, 640.0, cap=7.0) == 7.0            # saturated: capped
    # the most a caller may add for a 20 % increase: 400 x 0.2 / 1.2
    sigma = defence.allowance(240.0, 640.0, 0.2)
    assert sigma == pytest.approx(200 / 3)
    assert defence.damage(sigma, 240.0, 640.0) == pytest.approx(0.2)


def test_minimax_of_a_2x2_by_hand() -> None:
    # rows: a tight budget, a loose one; columns: a flood just below the loose level, an honest heavy caller.
    # Tight catches the flood (0.02) but refuses the honest caller (0.45); loose lets the flood in (0.5)
    # and the honest caller through (0). x = (p, 1-p) equalizes the columns:
    # 0.02 p + 0.5 (1 - p) = 0.45 p  ->  p = 0.5 / 0.93, value = 0.45 p = 0.225 / 0.93
    loss = np.array([[0.02, 0.45], [0.5, 0.0]])
    x, v = defence.minimax(loss)
    assert x == pytest.approx([0.5 / 0.93, 0.43 / 0.93], abs=1e-7)
    assert v == pytest.approx(0.225 / 0.93, abs=1e-7)
    assert (x @ loss).max() == pytest.approx(v, abs=1e-7)     # secures v against both columns
    # a dominated row is never played: always-tight beats a row worse in both columns
    x2, v2 = defence.minimax(np.array([[0.1, 0.2], [0.3, 0.4]]))
    assert x2 == pytest.approx([1.0, 0.0], abs=1e-9) and v2 == pytest.approx(0.2)


def test_loss_matrix_entries_by_hand() -> None:
    # capacity 100, nobody else, eps 0.25: allowance 20, D(a) = a / (100 - a); levels 20 and 40;
    # caught: held at 0 for L = 4 periods
    p = DefenceParams(eps=0.25, levels=(1.0, 2.0), honest=(1.5,), kappa=1.0, punish_level=0.0, punish_periods=4)
    sigma = defence.allowance(0.0, 100.0, p.eps)
    assert sigma == pytest.approx(20.0)
    budgets, rates, honest, loss = defence.loss_matrix(sigma, 0.0, 100.0, p, top=90.0)
    assert budgets.tolist() == [20.0, 40.0]
    col = {(round(float(r), 3), bool(h)): j for j, (r, h) in enumerate(zip(rates, honest))}
    h30, f388, f20 = col[(30.0, True)], col[(38.8, False)], col[(20.0, False)]
    # an honest caller at 30 caught by the 20 budget: the cycle's damage (D(20) + 4 D(0)) / 5 = 0.05, plus
    # its refused share: (30 - 20 now + 4 x 30 while held) / (5 x 30) = 130 / 150
    assert loss[0, h30] == pytest.approx(0.05 + 130 / 150)
    assert loss[1, h30] == 0.0                                  # admitted: an honest caller's traffic is no attack
    assert loss[0, f388] == pytest.approx(0.05)                 # a flood at 38.8 caught by the tight level
    assert loss[1, f388] == pytest.approx(38.8 / 61.2)          # ... let in by the loose one
    assert loss[0, f20] == loss[1, f20] == pytest.approx(0.25)  # at its allowance: in under every level
    g = defence.solve_game(6, sigma, 0.0, 100.0, p, top=90.0)
    assert 0.0 < g.x[0] < 1.0                                   # mixed: neither level is safe against both
    assert g.value == pytest.approx(float((g.x @ g.loss).max()), abs=1e-7)


def test_the_suspect_is_the_flooder_not_an_overload() -> None:
    p = DefenceParams()
    flood = {c: 40.0 for c in range(6)} | {6: 1280.0}
    sus = defence.suspect_of(flood, 640.0, p)
    assert sus is not None and sus[:2] == (6, 240.0) and sus[2] == pytest.approx(200 / 3)
    # within its allowance: nobody is a suspect
    assert defence.suspect_of({c: 40.0 for c in range(6)} | {6: 60.0}, 640.0, p) is None
    # a legitimate overload: the others alone stress the service (no single caller to blame)
    overload = dict(enumerate([20.0, 40.0, 60.0, 80.0, 100.0, 132.0, 200.0, 200.0]))
    assert defence.suspect_of(overload, 640.0, p) is None
    assert defence.suspect_of(flood, math.nan, p) is None       # unknown capacity: no defence on a guess


def test_defence_never_budgets_a_caller_within_its_share() -> None:
    rng = np.random.default_rng(0)
    d = Defence()
    for _ in range(300):
        honest = {c: float(rng.uniform(10, 50)) for c in range(6)}      # 6 x 50 <= 320: each within its share
        flood = float(rng.choice([0.0, 60.0, 120.0, 500.0, 1280.0]))
        step = d.period(honest | {6: flood}, 640.0, float(rng.random()))
        assert set(step.budgets) <= {6}
        if step.game is not None:
            assert step.game.suspect == 6
            assert (step.game.budgets >= step.game.sigma - 1e-9).all()  # no level below its allowance
    # an overload without a flooder: the defence budgets nobody (shedding's job)
    d2 = Defence()
    overload = dict(enumerate([20.0, 40.0, 60.0, 80.0, 100.0, 132.0, 200.0, 200.0]))
    assert all(not d2.period(overload, 640.0, 0.5).budgets for _ in range(20))


def test_the_level_is_drawn_from_the_mixed_strategy_and_a_caught_flooder_is_held() -> None:
    p = DefenceParams()
    demand = {c: 40.0 for c in range(6)} | {6: 1280.0}
    g = defence.solve_game(6, 200 / 3, 240.0, 640.0, p, top=1280.0)
    cum = np.cumsum(g.x)
    for draw in (0.0, 0.3, 0.6, 0.99):
        d = Defence(p)
        step = d.period(demand, 640.0, draw)
        k = min(int(np.searchsorted(cum, draw, side="right")), g.x.size - 1)
        want = g.budgets[k]
        assert step.budgets.get(6, math.inf) == pytest.approx(want)
        assert step.game is not None and step.game.x == pytest.approx(g.x)
    # over its budget next period: caught, held at 2 % of its allowance for L periods, then released
    d = Defence(p)
    d.period(demand, 640.0, 0.0)                       # level 0: its allowance
    step = d.period(demand, 640.0, 0.0)
    assert step.caught == [6]
    assert step.budgets[6] == pytest.approx(max(p.punish_level * 200 / 3, p.min_budget))
    quiet = {c: 40.0 for c in range(6)} | {6: 30.0}    # it stops: forgiven after L periods
    held = [6 in d.period(quiet, 640.0, 0.0).budgets for _ in range(p.punish_periods)]
    assert held[: p.punish_periods - 1] == [True] * (p.punish_periods - 1) and held[-1] is False


def test_attacker_best_response_against_the_mixed_strategy() -> None:
    p = DefenceParams()
    g = defence.solve_game(6, 200 / 3, 240.0, 640.0, p, top=1280.0)
    r = defence.best_response(g, p, top=1280.0)
    # its damage is at most the game's value (the minimax guarantee), and flooding at the top rate
    # (caught under every finite level) is worse for it
    assert defence.expected_damage(g, r, p) <= g.value + 1e-9
    assert defence.expected_damage(g, 1280.0, p) < defence.expected_damage(g, r, p)


def test_shedding_fair_shares_by_hand() -> None:
    demand = dict(enumerate([20.0, 40.0, 60.0, 80.0, 100.0, 132.0, 200.0, 200.0]))
    s = shedding.shed(demand, 640.0, shedding.ShedParams(utilization=1.0, margin=1.0))
    # water-filling 640: 20+40+60+80+100 = 300, the other three share 340: 113.33 each
    assert not s.feasible
    assert [s.shares[c] for c in range(8)] == pytest.approx([20, 40, 60, 80, 100, 340 / 3, 340 / 3, 340 / 3])
    assert set(s.budgets) == {5, 6, 7} and s.budgets[5] == pytest.approx(340 / 3)
    # default: 90 % of 640 = 576: 20+40+60+80 = 200, the other four share 376: level 94; the 100 req/s
    # caller is over it but within 1.15 x 94, so it is not held back
    s2 = shedding.shed(demand, 640.0)
    assert s2.admit == pytest.approx(576.0) and s2.shares[4] == pytest.approx(94.0)
    assert set(s2.budgets) == {5, 6, 7} and s2.budgets[6] == pytest.approx(94.0)
    # feasible or unknown capacity: no budgets
    assert shedding.shed(demand, 1000.0).budgets == {} and shedding.shed(demand, math.nan).feasible


def test_shedding_never_budgets_a_caller_within_its_share() -> None:
    rng = np.random.default_rng(1)
    for _ in range(200):
        demand = {c: float(x) for c, x in enumerate(rng.exponential(100.0, size=int(rng.integers(2, 12))))}
        cap = float(rng.uniform(50.0, 1500.0))
        s = shedding.shed(demand, cap)
        for c, r in s.budgets.items():
            assert demand[c] > s.shares[c]                      # only callers over their share
            assert r == pytest.approx(max(s.shares[c], 1.0))    # held to it, not below
        if not s.feasible:
            assert sum(s.shares.values()) == pytest.approx(min(sum(demand.values()), s.admit))


def test_demand_meter_smooths() -> None:
    m = shedding.DemandMeter(half_life=1.0)
    assert m.update({0: 50.0}, 0.5) == {0: 100.0}           # first period: as measured
    r = m.update({0: 0.0}, 1.0)                              # one half-life of nothing: half
    assert r[0] == pytest.approx(50.0)


def test_demand_meter_sd_is_a_poisson_callers_spread() -> None:
    """`sd` (the noise margin admission keeps before shedding a caller near its share) against
    the spread of a meter fed Poisson counts of a 70/s caller every 0.5 s (the live tests' case)."""
    m = shedding.DemandMeter(half_life=2.0)
    rng = np.random.default_rng(4)
    xs = [m.update({0: float(rng.poisson(35.0))}, 0.5)[0] for _ in range(20000)][100:]
    assert m.sd(70.0, 0.5) == pytest.approx(float(np.std(xs)), rel=0.05)
    assert 3.0 < m.sd(70.0, 0.5) < 4.0
    assert m.sd(0.0, 0.5) == 0.0 and m.sd(70.0, 0.0) == 0.0


def test_service_capacity_from_backlogged_ticks_only() -> None:
    from equilibriumd.game.capacity import ServiceCapacity
    sc = ServiceCapacity(2)
    rng = np.random.default_rng(2)
    # calm first (base latencies 25 ms), then backend 0 backlogged (50 in flight, 2 s answers) serving
    # its 80 / s; backend 1 stays calm at 40 / s and is never seen backlogged
    for _ in range(10):
        sc.update([20.0, 20.0], [0.025, 0.025], 0.5, [1.0, 1.0])
    assert math.isnan(sc.total())                   # no backlog, no fit: unknown, no shedding on a guess
    for _ in range(40):
        sc.update([float(rng.poisson(40)), 20.0], [2.0, 0.025], 0.5, [50.0, 1.0])
    assert sc.sat[0] == pytest.approx(80.0, rel=0.1)
    assert math.isnan(sc.sat[1])
    # once shedding holds backend 0 under its capacity (calm, not backlogged), the estimate stays
    before = float(sc.sat[0])
    for _ in range(40):
        sc.update([30.0, 20.0], [0.03, 0.025], 0.5, [2.0, 1.0])
    assert sc.sat[0] == before
