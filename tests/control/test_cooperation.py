"""The cooperation game (policy.cooperation) on the in-memory datapath's evidence
slots: a caller that floods an overloaded service beyond its max-min fair share is
punished with a budget, keeps being punished while it floods, and is forgiven
periods after it stops; a caller within its share is never held back; a healthy
service holds nobody back. (No kernel: the budgets the kernel enforces are tested
in tests/datapath/test_enforce.py.)"""

from __future__ import annotations

import numpy as np

from equilibriumd.datapath import constants
from equilibriumd.datapath.memory import MemoryDatapath
from equilibriumd.datapath.structs import Budget
from equilibriumd.game import folk
from equilibriumd.game.feasible import max_min_fair
from equilibriumd.policy.cooperation import WINDOW_SECONDS, Cooperation, CoopParams, ServiceRows

HONEST, FLOOD = 101, 202
IDS = np.array([[0, 1, 2]])


class World:
    """One service (id 7, backends 0-2), its callers' request rates, its latency."""

    def __init__(self, enforce: str = "throttle") -> None:
        self.dp = MemoryDatapath()
        self.t = [10 ** 12]
        self.dp.clock_ns = lambda: self.t[0]
        self.coop = Cooperation()
        self.enforce = enforce
        self.budgets: dict[tuple[int, int], Budget] = {}

    def period(self, rates: dict[int, float], latency: float, served: float) -> tuple[list, list]:
        self.t[0] += 10 ** 9
        for cg, rate in rates.items():       # a steady rate fills each slot's window to rate x window / 3
            for b in range(3):
                self.dp.add_evidence(cg, b, requests=0)
                slot = [i for i in range(constants.CB_SLOTS) if self.dp._evidence[b, i, 0] == cg][0]
                self.dp._evidence[b, slot, 1] = self.t[0]
                self.dp._evidence[b, slot, 2 + 5] = int(rate * WINDOW_SECONDS / 3)   # requests
        rows = ServiceRows(["trajet"], np.array([7]), IDS, [self.enforce], np.array([latency]), np.array([100.0]),
                           np.array([0.0]), np.array([served]), np.array([True]))
        d = self.coop.period(1.0, rows, self.dp.evidence(), self.budgets)
        for cg, sid, b in d.set:
            self.budgets[(cg, sid)] = b
        for cg, sid in d.clear:
            self.budgets.pop((cg, sid))
        return [s.cgroup for s in d.punished], [s.cgroup for s in d.forgiven]

    def refuse(self, cg: int, n: int) -> None:
        """The kernel refused `n` of `cg`'s connects this period (its budget's counter)."""
        b = self.budgets[(cg, 7)]
        b.throttled += n


def test_max_min_fair_shares():
    assert max_min_fair([1000, 100], 300).tolist() == [200, 100]
    assert max_min_fair([10, 20, 30], 100).tolist() == [10, 20, 30]     # feasible: everyone served
    assert max_min_fair([50, 50, 400], 200).tolist() == [50, 50, 100]


def test_a_healthy_service_holds_nobody_back():
    w = World()
    for _ in range(30):
        assert w.period({HONEST: 50, FLOOD: 2000}, latency=0.01, served=2050) == ([], [])
    assert w.budgets == {}


def test_a_flood_is_punished_then_forgiven_after_it_stops():
    w = World()
    for _ in range(20):                                   # calm: baseline 10 ms, 50 requests/s served
        w.period({HONEST: 50, FLOOD: 5}, latency=0.01, served=55)
    punished, _ = w.period({HONEST: 50, FLOOD: 2000}, latency=0.2, served=200)
    assert punished == [FLOOD] and (FLOOD, 7) in w.budgets and (HONEST, 7) not in w.budgets
    b = w.budgets[(FLOOD, 7)]
    assert b.mode == constants.ENFORCE_THROTTLE
    assert abs(1e9 / b.interval_ns - 0.02 * 150) < 0.05 * 3   # 2 % of its max-min share (200 - 50)
    for _ in range(10):                                   # throttled, it keeps trying: still punished
        w.refuse(FLOOD, 1900)
        assert w.period({HONEST: 50, FLOOD: 3}, latency=0.01, served=53) == ([], [])
    assert (FLOOD, 7) in w.budgets
    length = w.coop.punishment_length(1900 / 150)
    assert 0 < length <= 30                               # forgiven within 30 s of stopping
    forgiven_at = None
    for k in range(length + 2):                           # it stops
        _, forgiven = w.period({HONEST: 50, FLOOD: 5}, latency=0.01, served=55)
        if forgiven:
            forgiven_at = k + 1
            break
    assert forgiven_at is not None and forgiven_at <= length + 1
    assert w.budgets == {}
    s = w.coop.standings
    assert s[(HONEST, "trajet")].state == "cooperating" and s[(HONEST, "trajet")].reputation > 0.5


def test_incumbents_keep_their_share_when_a_flood_begins():
    """The first overloaded period is half calm: what the service served then
    underestimates its capacity, and max-min shares of it are below an incumbent's
    usual rate. Only the largest excess defects, as far as it takes for the rest to
    fit (found in the demo: the honest caller, at its usual 58/s, was punished with
    a share of 37.7/s of a first-second estimate)."""
    w = World()
    for _ in range(10):
        w.period({HONEST: 58, FLOOD: 0}, latency=0.01, served=58)
    w.period({HONEST: 58, FLOOD: 95}, latency=0.2, served=75)       # the flood's first second
    assert (HONEST, 7) not in w.budgets and (FLOOD, 7) in w.budgets
    w.period({HONEST: 58, FLOOD: 300}, latency=0.3, served=180)
    assert (HONEST, 7) not in w.budgets and (FLOOD, 7) in w.budgets


def test_a_caller_within_its_share_is_never_held_back():
    w = World()
    for _ in range(10):
        w.period({HONEST: 50, FLOOD: 5}, latency=0.01, served=55)
    for _ in range(60):                                   # overloaded for a minute: 90 % of its share
        w.period({HONEST: 45, FLOOD: 3000}, latency=0.3, served=150)
        assert (HONEST, 7) not in w.budgets


def test_observe_counts_and_off_writes_nothing():
    for enforce, want in (("observe", constants.ENFORCE_OBSERVE), ("off", None)):
        w = World(enforce)
        for _ in range(10):
            w.period({HONEST: 50, FLOOD: 5}, latency=0.01, served=55)
        for _ in range(2):
            w.period({HONEST: 50, FLOOD: 2000}, latency=0.2, served=200)
        got = w.budgets.get((FLOOD, 7))
        assert (got.mode if got is not None else None) == want


def test_punishment_length_deters_and_min_discount_factor():
    c = Cooperation(CoopParams(delta=0.98, punish_level=0.02))
    n = c.punishment_length(10.0)
    gain, loss = 9.0, 0.98
    assert gain <= loss * sum(0.98 ** k for k in range(1, n + 1)) + 1e-9       # deters
    assert gain > loss * sum(0.98 ** k for k in range(1, n))                   # one period less would not
    assert folk.min_discount_factor(10.0, 1.0, 0.02) == (10 - 1) / (10 - 0.02)


def test_low_reputation_is_distrusted_in_the_judge():
    c = Cooperation()
    c.note_uncorroborated(np.array([FLOOD], dtype=np.uint64), ["trajet"], np.array([50.0]))
    c._distrust_from(c.reputation.score())
    w = c.trust(np.array([HONEST, FLOOD], dtype=np.uint64))
    assert w[0] == 1.0 and w[1] < 0.1


def test_a_sole_caller_is_never_punished():
    """A slow backend makes the service look overloaded to its only caller's demand;
    holding that caller back would protect nobody (found in the demo: bus-1 slowed)."""
    w = World()
    for _ in range(10):
        w.period({HONEST: 300}, latency=0.01, served=300)
    for _ in range(20):
        w.period({HONEST: 330}, latency=0.3, served=200)
        assert w.budgets == {}


def test_refusals_in_the_first_period_of_a_punishment_keep_it_going():
    """The kernel's counters of a new budget start at 0: a flooder refused all through
    the first period after its punishment defects again (found in the demo: a one-period
    punishment was forgiven at once, and the flood came back through)."""
    w = World()
    for _ in range(10):
        w.period({HONEST: 50, FLOOD: 5}, latency=0.01, served=55)
    for _ in range(2):
        w.period({HONEST: 50, FLOOD: 250}, latency=0.2, served=180)  # a mild flood: a short punishment
    assert (FLOOD, 7) in w.budgets
    for _ in range(5):
        w.refuse(FLOOD, 250)
        w.period({HONEST: 50, FLOOD: 3}, latency=0.01, served=53)
        assert (FLOOD, 7) in w.budgets
