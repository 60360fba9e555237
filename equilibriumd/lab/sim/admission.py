"""Callers, per-caller admission and an adaptive attacker in the simulator (issue 15, items 2-3).

Scenarios with callers (scenarios.CALLERS) mark each request with its caller
(`scenarios.caller_labels`). In front of routing, an `Admission` does what
the kernel's eq_lb_budget does: a caller with a budget (a GCRA rate, bursts
of `BURST` seconds) has its connects over it refused at once (the request
fails fast, it is never queued); everyone else is admitted. Every period
(the scenario's tick) the controller gets the period's telemetry (answers
and their latency per backend, offered connects per caller, refused ones
included), as the agent would, and sets the budgets by its mode:

* `shed+defence` (policy `equilibrium`): `policy.shedding` (max-min fair
  shares of the capacity estimated by `game.capacity.ServiceCapacity`) and
  `policy.defence` (the zero-sum flood defence; a level drawn from its mixed
  strategy each period); a caller with both budgets gets the smaller.
* `cooperation` (policy `equilibrium@cooperation`): the agent's repeated game,
  `policy.cooperation.Cooperation`, itself, fed through a stand-in for the
  evidence map (each caller's rate in one slot) with `enforce: throttle`.
* `none` (every other policy, `equilibrium@no-admission` included): no budgets.

Scenarios with an `Attack`: one caller's requests are drawn at its top rate
and thinned to the rate its attacker picks each period, the best response to
the defence it faces, which it knows (worst case): none -> its top rate;
cooperation -> just below cooperation's deterministic trigger (1.5x its fair
share of the capacity cooperation has seen); zero-sum -> `defence.best_response`
to the defender's minimax mixed strategy (the game at the defender's capacity
estimate and the true load; its top rate while the defender has no estimate),
and while held, its allowance until it is forgiven.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ...game.capacity import ServiceCapacity
from ...game.feasible import max_min_fair
from ...policy import defence, shedding
from .scenarios import CALLERS, Scenario, caller_labels

#: seconds of its budget a caller may use at once (CoopParams.burst)
BURST = 0.5
#: policy -> admission mode (absent: none)
MODES = {"equilibrium": "shed+defence", "equilibrium@cooperation": "cooperation"}
ADMITTED, REFUSED, ABSENT = 0, 1, 2


class Admission:
    def __init__(self, sc: Scenario, policy: str, seed: int, n: int, backends: int) -> None:
        self.demands = CALLERS[sc.stream]
        self.caller = caller_labels(n, self.demands, seed)
        self.k = len(self.demands)
        self.mode = MODES.get(policy, "none")
        self.period_s = sc.tick
        self.next = sc.tick
        self.capacity = ServiceCapacity(backends)
        self.meter = shedding.DemandMeter()
        self.defence = defence.Defence()
        self.draws = np.random.default_rng([seed, 15, 3]).random(int(sc.duration / sc.tick) + 2).tolist()
        self.periods = 0
        self.budget: dict[int, list[float]] = {}        # caller -> [rate, tat]
        self.offered = [0.0] * self.k
        self.refused_n = [0.0] * self.k
        self.refused_total = [0] * self.k               # cumulative (the budget's counter)
        self.served = np.zeros(backends)
        self.latsum = np.zeros(backends)
        self.inflight = np.zeros(backends)
        self.failed = 0.0
        self.atk = sc.attack
        # the attacker's own stream: thinning marks of its requests
        self.thin = np.random.default_rng([seed, 15, 4]).random(n).tolist()
        self.rate = 0.0                                 # the attacker's current rate
        self.true_capacity = sum(b.capacity for b in sc.backends)
        self.log: list[dict[str, Any]] = []
        self.coop: Any = None
        self._game: defence.Game | None = None
        self._game_key = 0
        if self.mode == "cooperation":
            from ...policy.cooperation import Cooperation
            self.coop = Cooperation()

    # --- per request ---------------------------------------------------------------------
    def admit(self, i: int, t: float) -> int:
        while t >= self.next:
            self._period(self.next)
            self.next += self.period_s
        c = int(self.caller[i])
        a = self.atk
        if a is not None and c == a.caller and (a.silent or t < a.start or self.thin[i] * a.top >= self.rate):
            return ABSENT
        self.offered[c] += 1
        b = self.budget.get(c)
        if b is not None:
            tat = max(b[1], t)
            if tat - t > BURST:
                self.refused_n[c] += 1
                self.refused_total[c] += 1
                return REFUSED
            b[1] = tat + 1.0 / b[0]
        return ADMITTED

    def sent(self, b: int) -> None:
        self.inflight[b] += 1

    def answered(self, b: int, latency: float, bad: bool) -> None:
        self.inflight[b] -= 1
        self.served[b] += 1
        self.latsum[b] += latency
        if bad:
            self.failed += 1

    # --- per period ----------------------------------------------------------------------
    def _period(self, now: float) -> None:
        dt = self.period_s
        with np.errstate(invalid="ignore", divide="ignore"):
            lat = np.where(self.served > 0, self.latsum / np.maximum(self.served, 1), np.nan)
        self.capacity.update(self.served, lat, dt, self.inflight)
        demand = self.meter.update({c: x for c, x in enumerate(self.offered)}, dt)
        cap = self.capacity.total()
        budgets: dict[int, float] = {}
        info: dict[str, Any] = {"t": now, "capacity": cap}
        if self.mode == "shed+defence":
            sh = shedding.shed(demand, cap)
            step = self.defence.period(demand, cap, self.draws[min(self.periods, len(self.draws) - 1)])
            budgets = dict(sh.budgets)
            for c, r in step.budgets.items():
                budgets[c] = min(r, budgets.get(c, math.inf))
            info["game"] = None if step.game is None else (step.game.x.tolist(), step.game.value)
        elif self.mode == "cooperation":
            budgets = self._cooperation(now, demand, lat)
        for c in list(self.budget):
            if c not in budgets:
                del self.budget[c]
        for c, r in budgets.items():
            if c in self.budget:
                self.budget[c][0] = r
            else:
                self.budget[c] = [r, now]
        info["budgets"] = dict(budgets)
        self._attacker(now, demand)
        info["attack_rate"] = self.rate
        self.log.append(info)
        self.periods += 1
        self.offered = [0.0] * self.k
        self.refused_n = [0.0] * self.k
        self.served[:] = 0
        self.latsum[:] = 0
        self.failed = 0.0

    def _attacker(self, now: float, demand: dict[int, float]) -> None:
        a = self.atk
        if a is None:
            return
        if self.mode == "shed+defence":
            others = sum(x for c, x in enumerate(self.demands) if c != a.caller)
            p = self.defence.p
            if a.caller in self.defence.held:     # held: wait it out within its allowance, then come back
                cap = self.capacity.total()
                self.rate = 0.9 * defence.allowance(others, cap if math.isfinite(cap) else self.true_capacity, p.eps)
                return
            cap = self.capacity.total()
            if not math.isfinite(cap):            # the defender does not know the capacity: no defence yet
                self.rate = a.top
                return
            key = round(cap)                      # the game the defender plays at its estimate
            if self._game is None or self._game_key != key:
                sigma = defence.allowance(others, cap, p.eps)
                self._game, self._game_key = defence.solve_game(a.caller, sigma, others, cap, p, a.top), key
            self.rate = defence.best_response(self._game, p, a.top)
        elif self.mode == "cooperation":
            p = self.coop.p
            cap = float(self.coop._cap[0]) if len(self.coop._cap) else 0.0
            rest = [x for c, x in enumerate(self.demands) if c != a.caller]
            if cap <= 0:
                self.rate = a.top
                return
            share = float(max_min_fair(np.array(rest + [a.top]), cap)[-1])
            self.rate = min(a.top, 0.9 * max(p.defect_margin * share, p.min_rate))
        else:
            self.rate = a.top

    def _cooperation(self, now: float, demand: dict[int, float], lat: np.ndarray) -> dict[int, float]:
        """One period of the agent's cooperation game on this service, through stand-ins."""
        from ...datapath import constants
        from ...datapath.evidence import CB, Evidence
        from ...datapath.structs import CB_COUNTERS, Budget
        from ...policy.cooperation import WINDOW_SECONDS, ServiceRows
        nb = self.served.size
        words = np.zeros((max(nb, (self.k + constants.CB_SLOTS - 1) // constants.CB_SLOTS), constants.CB_SLOTS,
                          2 + len(CB_COUNTERS)), dtype=np.uint64)
        for c, r in demand.items():
            row, slot = divmod(c, constants.CB_SLOTS)
            words[row, slot, 0] = c + 1                   # cgroup ids from 1 (0: a free slot)
            words[row, slot, 2 + CB["attempts"]] = int(round(r * WINDOW_SECONDS))

        class _Ev:
            def read(self, n: int) -> Evidence:
                return Evidence(words[:n], np.ones(words.shape[:2], dtype=np.float32)[:n])

            def read_ids(self, ids: np.ndarray) -> Evidence:
                return Evidence(words[: ids.size], np.ones((ids.size, words.shape[1]), dtype=np.float32))

        served = self.served.sum()
        with np.errstate(invalid="ignore"):
            mean_lat = float(np.nansum(lat * self.served) / served) if served > 0 else math.nan
        rows = ServiceRows(names=["sim"], sids=np.array([1]), ids=np.arange(words.shape[0])[None, :],
                           enforce=["throttle"], latency=np.array([mean_lat]),
                           tried=np.array([float(sum(self.offered))]), failed=np.array([self.failed]),
                           served=np.array([served / self.period_s]), http=np.array([False]))
        kb = {(c + 1, 1): Budget(throttled=self.refused_total[c]) for c in self.budget}
        dec = self.coop.period(self.period_s, rows, _Ev(), kb)
        out = {c: b[0] for c, b in self.budget.items()}
        for cg, _sid in dec.clear:
            out.pop(cg - 1, None)
        for cg, _sid, bud in dec.set:
            out[cg - 1] = 1e9 / bud.interval_ns
        return out
