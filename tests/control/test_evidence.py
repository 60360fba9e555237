"""Callers' evidence weighed against each other (policy.evidence, datapath.evidence):
one caller cannot make a backend look worse than the others see it; a backend bad
for everyone is judged bad at once; a single caller is judged alone; the agent's
tick uses the verdict (no kernel, no root: the real judge on the in-memory
datapath's slots, which claim and decay as the kernel's eq_cb does)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from equilibriumd.agent.routing import gather_signals
from equilibriumd.datapath import constants
from equilibriumd.datapath.evidence import CB, decayed
from equilibriumd.datapath.memory import MemoryDatapath
from equilibriumd.datapath.telemetry import COUNTER, TelemetryDelta
from equilibriumd.policy.evidence import Verdict, credibility, judge

from .support import config, service_yaml
from .test_metrics_memory import memory_agent

HONEST, ATTACKER, OTHER = 101, 202, 303
HALF = 1 << constants.CB_HALF_SHIFT


def ok(n: int, ms: float = 3.0) -> dict[str, int]:
    return {"requests": n, "responses": n, "req_ns_sum": int(n * ms * 1e6), "attempts": n, "established": n}


def abandoned(n: int) -> dict[str, int]:
    """`GET ` and hang up: a request left unanswered."""
    return {"requests": n, "req_errors": n, "attempts": n, "established": n}


def recording_judge(dp: MemoryDatapath) -> tuple[list[list[int]], Callable[[np.ndarray], Verdict]]:
    """A judge over `dp`'s evidence that records which backend ids it was asked about."""
    asked: list[list[int]] = []

    def judge_ids(which: np.ndarray) -> Verdict:
        asked.append(which.tolist())
        return judge(dp.evidence().read_ids(which))

    return asked, judge_ids


def fixed_clock(dp: MemoryDatapath, t: list[int]) -> None:
    dp.clock_ns = lambda: t[0]


def test_credibility_is_leave_one_out():
    tried = np.array([[33.0, 1.0, 0.0], [30.0, 30.0, 0.0], [10.0, 0.0, 0.0], [5.0, 5.0, 5.0]])
    bad = np.array([[0.0, 1.0, 0.0], [30.0, 30.0, 0.0], [10.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    k = credibility(tried, bad)
    assert k[0] == 0.0            # one caller's failures, nobody else sees any
    assert k[1] == 1.0            # everyone fails: all of it counts
    assert k[2] == 1.0            # a single caller: nobody to corroborate, counted in full
    assert np.isnan(k[3])         # nothing failed: nothing to judge


def test_one_caller_cannot_outvote_an_honest_one_even_by_flooding():
    for attack in (1, 30, 1000):
        dp = MemoryDatapath()
        dp.add_evidence(HONEST, 0, **ok(33))
        dp.add_evidence(ATTACKER, 0, **abandoned(attack))
        v = judge(dp.evidence().read(1))
        assert v.req_failed[0] == 0.0 and v.callers[0] == 2, attack


def test_a_backend_bad_for_everyone_is_judged_bad_at_once():
    dp = MemoryDatapath()
    dp.add_evidence(HONEST, 0, **ok(30))
    dp.add_evidence(OTHER, 0, **ok(30))
    dp.add_evidence(HONEST, 0, **abandoned(30))
    dp.add_evidence(OTHER, 0, **abandoned(30))
    assert judge(dp.evidence().read(1)).req_failed[0] == 1.0


def test_latency_a_caller_cannot_make_a_backend_look_slower():
    dp = MemoryDatapath()
    dp.add_evidence(HONEST, 0, **ok(30, ms=3))
    dp.add_evidence(ATTACKER, 0, **ok(30, ms=300))
    lam = judge(dp.evidence().read(1)).req_latency[0]
    assert abs(lam - (30 * 3 + 30 * 3) / (30 * 3 + 30 * 300)) < 1e-6   # the slow caller capped at the others' mean


def test_slots_decay_are_taken_over_when_stale_and_run_out():
    t = [10 ** 12]
    dp = MemoryDatapath()
    fixed_clock(dp, t)
    dp.add_evidence(HONEST, 0, requests=64)
    t[0] += 2 * HALF                                    # two half-lives: a quarter left
    e = dp.evidence().read(1)
    assert e["requests"][0, 0] == 16.0 and e.cgroups[0, 0] == HONEST
    for cg in range(1, constants.CB_SLOTS):             # fill every slot
        assert dp.add_evidence(cg, 0, requests=1)
    assert not dp.add_evidence(999, 0, requests=1)      # all active: not attributed
    t[0] += constants.CB_STALE_NS + 1                   # every caller idle: a newcomer takes a slot
    assert dp.add_evidence(999, 0, requests=5)
    e = dp.evidence().read(1)
    assert 999 in e.cgroups[0].tolist() and e["requests"][0][e.cgroups[0] == 999][0] == 5.0


def test_decayed_reads_pending_halvings():
    words = np.zeros((1, constants.CB_SLOTS, 2 + len(CB)), dtype=np.uint64)
    words[0, 0, 0], words[0, 0, 1], words[0, 0, 2 + CB["requests"]] = 7, 0, 100
    assert decayed(words, 3 * HALF)["requests"][0, 0] == 12.5
    assert decayed(words, 0)["requests"][0, 0] == 100.0


def test_gather_signals_scales_failures_and_latency_by_the_verdict():
    c = np.zeros((1, len(COUNTER)), dtype=np.uint64)
    c[0, COUNTER["requests"]], c[0, COUNTER["resp_2xx"]], c[0, COUNTER["req_errors"]] = 34, 33, 1
    c[0, COUNTER["req_ns_sum"]] = int(33 * 3e6)
    d = TelemetryDelta(0.5, c, np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64))
    ids = np.array([[0]])
    assert gather_signals(d, ids).errors[0, 0] == 1
    dp = MemoryDatapath()
    dp.add_evidence(HONEST, 0, **ok(33))
    dp.add_evidence(ATTACKER, 0, **abandoned(1))
    asked, judge_ids = recording_judge(dp)
    s = gather_signals(d, ids, judge_ids)
    assert s.errors[0, 0] == 0 and abs(s.latency[0, 0] - 0.003) < 1e-9
    assert asked == [[0]]                  # it failed this tick: the one backend judged


def test_only_doubtful_backends_are_judged():
    """Backends that neither failed nor were slow against their service's fastest
    are not read at all (the tick reads a few rows of eq_tel_cb, not the node's)."""
    c = np.zeros((3, len(COUNTER)), dtype=np.uint64)
    for b, ms in enumerate((3, 3.2, 30)):
        c[b, COUNTER["requests"]], c[b, COUNTER["resp_2xx"]] = 10, 10
        c[b, COUNTER["req_ns_sum"]] = int(10 * ms * 1e6)
    d = TelemetryDelta(0.5, c, np.zeros(3, dtype=np.int64), np.zeros(3, dtype=np.int64))
    dp = MemoryDatapath()
    dp.add_evidence(HONEST, 2, **ok(10, ms=3))
    dp.add_evidence(ATTACKER, 2, **ok(10, ms=57))
    asked, judge_ids = recording_judge(dp)
    s = gather_signals(d, np.array([[0, 1, 2]]), judge_ids)
    assert asked == [[2]]
    assert s.latency[0, 2] < 0.01          # the slow caller's share capped at the other's mean


def three_backends() -> tuple[MemoryDatapath, Any, list[int]]:
    """The real agent (policy equilibrium) on a memory datapath: one service, three backends."""
    dp = MemoryDatapath()
    a = memory_agent(config(service_yaml("web", "10.96.0.1:80", ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]),
                            top="policy: equilibrium\n"), dp)
    return dp, a, list(a.rec.services["web"].backends.values())


def poison(dp: MemoryDatapath, a: Any, ids: list[int], ticks: int, per_tick: int) -> None:
    """Ticks of an honest caller on every backend (17 requests each) and an attacker
    abandoning `per_tick` requests on the first, as the kernel would count them."""
    for _ in range(ticks):
        for bid in ids:
            dp.add_telemetry(bid, requests=17, resp_2xx=17, req_ns_sum=int(17 * 3e6), attempts=17, established=17,
                             closed=17)
            dp.add_evidence(HONEST, bid, **ok(17))
        dp.add_telemetry(ids[0], requests=per_tick, req_errors=per_tick, attempts=per_tick, established=per_tick,
                         closed=per_tick)
        dp.add_evidence(ATTACKER, ids[0], **abandoned(per_tick))
        a.tick()


def test_the_agent_keeps_an_honest_callers_backend_under_a_poisoning_caller():
    """The attack of issue 12 on the real agent and engine: the per-backend counters
    see backend 0 fail a request every tick; the callers' evidence says who failed it."""
    dp, a, ids = three_backends()
    poison(dp, a, ids, ticks=60, per_tick=1)
    w = a.router.weights_now[a.router.layout.row["web"]][:3]
    assert w[0] >= 0.25, w   # judged by the counters alone, the engine starves it (below 0.05)


def test_the_agent_still_leaves_a_backend_bad_for_everyone():
    dp, a, ids = three_backends()
    for t in range(20):
        for bid in ids:
            bad = bid == ids[0] and t >= 10
            dp.add_telemetry(bid, requests=17, **({"resp_5xx": 17} if bad else {"resp_2xx": 17}),
                             req_ns_sum=int(17 * 3e6), attempts=17, established=17, closed=17)
            for cg in (HONEST, OTHER):
                dp.add_evidence(cg, bid, **ok(8), **({"resp_5xx": 8} if bad else {}))
        a.tick()
    w = a.router.weights_now[a.router.layout.row["web"]][:3]
    assert w[0] < 0.05, w     # left within the ten failing ticks (5 s), as without the judge


def test_explain_says_whose_evidence_moved_a_weight():
    dp, a, ids = three_backends()
    poison(dp, a, ids, ticks=5, per_tick=3)
    ex = a.answer({"cmd": "explain", "service": "web"})["explain"]
    callers = {c["cgroup"]: c for c in ex["backends"][0]["callers"]}
    assert set(callers) == {HONEST, ATTACKER}
    assert callers[ATTACKER]["failures"] > 0 and callers[ATTACKER]["counted_failures"] == 0
    assert callers[HONEST]["failures"] == 0 and callers[HONEST]["requests"] > 0
    assert "callers" not in a.answer({"cmd": "status"})["services"][0]["backends"][0]   # status stays lean
