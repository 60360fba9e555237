"""Admission on live traffic: fair shedding and the zero-sum flood defence for the
services that need them, and the merge of every source of per-caller budgets.

Issue 15, items 2-3. `policy.shedding` (max-min fair budgets when the offered
load is infeasible) and `policy.defence` (randomized budgets against a flooding
caller) are per service and need a capacity estimate
(`game.capacity.ServiceCapacity`, fed per period with each backend's answers,
latency and requests in flight). Keeping one for each of a node's thousands of
services would cost a Theil-Sen fit per service per period, so only *watched*
services have one: a service is watched from the period cooperation's stress
test finds it overloaded (`Cooperation.stressed`), for as long as it stays
stressed, holds budgets here, or has been calm for fewer than `release`
periods (its estimate outlives a short lull; a backend seen backlogged gives
it a capacity within two periods, `ServiceCapacity.sat`). Every other service
costs nothing here. The defence's game is played only while its service is
stressed and has at least two callers (someone to protect): its suspect test
alone (the M/M/1 law) would call a calm service's largest caller a flood;
otherwise it only follows the callers it holds (one that keeps flooding, its
refused connects included, is held on).

Budgets are connects per second per (caller, service), from three sources:
cooperation's punishment (`punished`), shedding (`shed`) and the defence
(`defended`). `merge` keeps the smallest per pair, with the reason that binds
(and every reason that wants one): the kernel has a single budget per pair;
in an overload nobody alone causes, shedding's fair share replaces a punishment
of the same caller (see `merge`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..game.capacity import ServiceCapacity
from ..game.feasible import max_min_fair
from .defence import Defence, DefenceParams, Game
from .shedding import DemandMeter, ShedParams, shed

#: the sources of a budget, in the order a tie is attributed
REASONS = ("punished", "defended", "shed")


@dataclass(frozen=True)
class AdmissionParams:
    shed: ShedParams = ShedParams()
    defence: DefenceParams = DefenceParams()
    release: int = 10        #: periods calm, without budgets, before a service stops being watched
    whole_margin: float = 1.1   #: shed only a caller also over this x its max-min share of the whole
                                #: capacity (shedding's shares are of 0.9 x it: with a measured rate's
                                #: noise, a caller within its share of the whole would be cut; found live)
    noise_sds: float = 4.0      #: ... and over that share by this many sd of a Poisson caller's smoothed
                                #: rate at it (`DemandMeter.sd`): at tens of connects / s the margin
                                #: alone is ~2 sd (a 70/s caller at its share was cut once in four live runs)
    demand_half_life: float = 2.0   #: seconds: callers' rates smoothed over periods (DemandMeter)


@dataclass
class Watched:
    """One watched service's admission state."""

    capacity: ServiceCapacity
    defence: Defence
    backends: int
    meter: DemandMeter = field(default_factory=DemandMeter)
    calm: int = 0                        #: periods in a row neither stressed nor budgeted
    infeasible: bool = False             #: the offered load was over what it can serve, last period
    game: Game | None = None             #: the defence's game, last period (None: no suspect)


@dataclass
class Verdict:
    """One watched service's budgets for the next period: caller -> connects / s, by source."""

    shed: dict[int, float] = field(default_factory=dict)
    defended: dict[int, float] = field(default_factory=dict)
    infeasible: bool = False
    capacity: float = math.nan
    game: Game | None = None
    #: shed callers of an overload nobody alone causes (the others without them are not calm, and
    #: alone they could not fill what is admitted):
    #: their fair share replaces a punishment (`merge`)
    fair: set[int] = field(default_factory=set)


class Admission:
    """Shedding and defence state of the watched services (by name)."""

    def __init__(self, params: AdmissionParams = AdmissionParams(), seed: int | None = None) -> None:
        self.p = params
        self.rng = np.random.default_rng(seed)   #: the defence's draws (randomized admission)
        self.watched: dict[str, Watched] = {}

    def watch(self, name: str, backends: int) -> Watched:
        w = self.watched.get(name)
        if w is None or w.backends != backends:   # new, or its backends changed: a fresh estimate
            w = self.watched[name] = Watched(ServiceCapacity(backends), Defence(self.p.defence), backends,
                                             DemandMeter(self.p.demand_half_life))
        return w

    def observe(self, name: str, served: np.ndarray, latency: np.ndarray, seconds: float,
                inflight: np.ndarray) -> None:
        """One period of a watched service's per-backend telemetry: answers, their mean
        latency (NaN: none), requests in flight at its end."""
        w = self.watch(name, int(served.size))
        w.capacity.update(served, latency, seconds, inflight)

    def decide(self, name: str, demand: dict[int, float], stressed: bool, seconds: float = 1.0) -> Verdict:
        """Budgets for a watched service from its callers' offered rates (refused included)."""
        w = self.watched[name]
        now = demand
        demand = w.meter.update({c: x * seconds for c, x in now.items()}, seconds)
        for c in [c for c, x in demand.items() if x < 0.01 and c not in now]:   # gone
            del demand[c], w.meter.rate[c]
        cap = w.capacity.total()
        sh = shed(demand, cap, self.p.shed)
        if sh.budgets:   # not a caller within its share of the whole capacity (noise, headroom)
            keys = sorted(demand)
            whole = dict(zip(keys, max_min_fair(np.array([demand[k] for k in keys]), cap).tolist()))
            sh.budgets = {c: r for c, r in sh.budgets.items()
                          if demand[c] > max(self.p.whole_margin * whole[c],
                                             whole[c] + self.p.noise_sds * w.meter.sd(whole[c], seconds))}
        # the defence plays while the service is overloaded and has callers to protect: its
        # suspect test (M/M/1) alone would call a calm service's largest caller a flood. Else
        # it only follows the callers it holds (one that keeps flooding is held on)
        play = stressed and sum(1 for x in demand.values() if x >= self.p.shed.min_budget) >= 2
        d = demand if play else {c: demand.get(c, 0.0) for c in w.defence.held}
        step = w.defence.period(d, cap, float(self.rng.random()))
        total = sum(demand.values())
        # shed callers of an overload nobody alone causes: without them the others are not calm,
        # and they cannot saturate what is admitted by themselves. One that can (tests/datapath/
        # test_flood: 400/s beside 170/s on 300/s) is a flooder whatever the others' load: shed
        # to its share it would run the service at 0.9 for its own sake (the others' p99 2x,
        # measured), and the others' calm (170 vs 0.5 x an estimate near 340) is a coin toss
        fair = {c for c in sh.budgets if total - demand[c] > self.p.defence.calm * cap and demand[c] < sh.admit}
        out = Verdict(dict(sh.budgets), dict(step.budgets), not sh.feasible, cap, step.game, fair)
        w.infeasible, w.game = out.infeasible, step.game
        w.calm = 0 if stressed or out.shed or out.defended or w.defence.held else w.calm + 1
        return out

    def release(self) -> list[str]:
        """Stop watching the services calm for `release` periods; returns their names."""
        gone = [n for n, w in self.watched.items() if w.calm >= self.p.release]
        for n in gone:
            del self.watched[n]
        return gone


@dataclass(frozen=True)
class Merged:
    rate: float                  #: connects / s: the smallest any source wants
    reason: str                  #: the source that binds
    reasons: tuple[str, ...]     #: every source that wants a budget, in REASONS order


def merge(sources: dict[str, dict[tuple[int, int], float]],
          fair: set[tuple[int, int]] | frozenset[tuple[int, int]] = frozenset()) -> dict[tuple[int, int], Merged]:
    """One budget per (caller, service id): the smallest rate any source (reason ->
    pair -> rate) wants, attributed to it (ties: the first in REASONS), except for the
    `fair` pairs: callers shed in an overload that nobody alone causes (without them the
    service would not be calm), whose fair share replaces cooperation's punishment. Their
    share already takes their excess away, and a 2 % trickle below it would leave capacity
    idle for nobody (the simulator's overload: Jain's index 0.84 punished, 0.99 shed). A
    caller that alone takes a calm service into overload is a flooder: the smallest binds."""
    out: dict[tuple[int, int], Merged] = {}
    keys = {k for d in sources.values() for k in d}
    for key in keys:
        wants = {r: sources[r][key] for r in REASONS if key in sources.get(r, {})}
        rates = dict(wants)
        if key in fair and "shed" in rates and "punished" in rates:
            del rates["punished"]
        reason = min(rates, key=lambda r: (rates[r], REASONS.index(r)))
        out[key] = Merged(rates[reason], reason, tuple(wants))
    return out
