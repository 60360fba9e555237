"""Cooperation between the callers of a service, as a repeated game: fair shares
of what an overloaded service can serve, reputation, and folk-theorem punishment
of callers that flood it, enforced in the kernel (eq_lb_budget).

Each period (a second or so) the agent:

1. **Stress.** A service is overloaded when its latency this period is above
   STRESS times its baseline (a slow average taken while it is not), or more
   than FAIL_STRESS of its tries fail (for STRESS_PERIODS periods in a row).
   Only then is anyone's share limited: a service that serves everyone is a
   feasible point, and nobody is held back.
2. **Feasible payoffs.** Its capacity is the most it served per second (a
   slowly fading peak; an overloaded service serves what it can); its
   callers' demands (requests per second for HTTP services, else connects,
   from the evidence windows of `datapath.evidence`, plus what a punished
   caller was refused) are shared max-min fairly
   (`game.feasible.max_min_fair`). The callers over DEFECT_MARGIN times their
   share (less slack with a poor reputation) and over MIN_RATE per second
   **defect**, largest excess first, only as many as it takes for the rest
   to fit the capacity: the capacity seen in the first overloaded second is
   an underestimate, and a caller at its usual rate must not pay for it. A service's only caller never
   defects: holding it back would protect nobody (its overload is its own,
   or a slow backend's, which routing handles).
3. **Trigger strategy.** A defection (re)starts L periods of punishment, then
   the caller is forgiven (`game.folk.TriggerStrategy`). L is the shortest
   punishment that makes flooding unprofitable (`folk.punishment_length`)
   for a caller patient at DELTA per period, in units of its fair share:
   reward R = 1 when it cooperates, temptation T = demand / share (at most
   MAX_TEMPTATION) when it floods, punishment P = PUNISH_LEVEL while held to
   its budget; capped at MAX_PUNISH. `folk.min_discount_factor(T, R, P)` is
   reported: below it, no finite punishment would deter that flood.
   Punishment is individually rational for the others (their shares never
   shrink for it) and P is the level the service can hold the caller to (its
   minmax: the budget), so the trigger is subgame perfect when L is finite.
4. **Budgets.** A punished caller of a service with `enforce: observe` or
   `throttle` gets a budget of PUNISH_LEVEL times its share in eq_lb_budget
   (the kernel then counts, or refuses with ECONNREFUSED, its connects over
   it); a forgiven one loses it. A caller within its share never has one.
5. **Reputation** (`game.reputation.Reputation`, per caller and service):
   good for a period within its share, bad for a defection, and bad for
   evidence the other callers did not corroborate (`policy.evidence`).
   It sets the caller's slack (2.) and weighs its evidence: the judge scales
   a distrusted caller's failures by its score.

Only overloaded services and punished callers are looked at, so a node with
thousands of healthy services pays for nothing but the stress check.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..datapath import constants
from ..datapath.evidence import Evidence, EvidenceSource
from ..datapath.structs import Budget
from ..game import folk
from ..game.feasible import max_min_fair
from ..game.reputation import Reputation


@dataclass(frozen=True)
class CoopParams:
    stress: float = 2.0            #: overloaded: latency above this x baseline ...
    fail_stress: float = 0.2       #: ... or this share of tries failing
    stress_periods: int = 1        #: shares bind once it has been overloaded this many periods in a
                                   #: row (1: at once; the defectors are only as many as it takes for
                                   #: the rest to fit, so an early underestimate cuts no incumbent)
    baseline_half_life: float = 30.0   #: seconds: how slowly the baseline latency follows
    capacity_half_life: float = 300.0  #: seconds: how slowly the capacity peak fades
    defect_margin: float = 1.5     #: demand above this x its fair share defects (full reputation)
    min_rate: float = 20.0         #: connects / s: below it nobody defects
    punish_level: float = 0.02     #: a punished caller's budget: this x its fair share, its minmax
                                   #: level (the others can hold it to nothing) but for a trickle:
                                   #: whatever it still gets through adds to the others' queue
    delta: float = 0.98            #: callers' patience per period (folk theorem's discount factor)
    max_temptation: float = 20.0   #: flooding payoff cap, in fair shares
    max_punish: int = 30           #: periods: the longest punishment (forgiven within ~30 s of stopping;
                                   #: a flood above ~15 shares needs longer to be deterred at delta,
                                   #: but a caller that keeps flooding is punished again each period)
    burst: float = 0.5             #: seconds of its budget a punished caller may use at once
    reputation_half_life: float = 120.0   #: seconds
    distrust_below: float = 0.5    #: reputation below which a caller's evidence is scaled down


#: the caller's effective window in the evidence slots: counts halve every
#: 2**CB_HALF_SHIFT ns, so a steady rate r holds r x (half-life / ln 2) in a slot
WINDOW_SECONDS = (1 << constants.CB_HALF_SHIFT) * 1e-9 / np.log(2)


@dataclass
class Standing:
    """One caller of one service, as `equilibriumctl callers` shows it."""

    cgroup: int
    service: str
    demand: float                  #: connects / s this period
    share: float | None            #: its fair share (None: the service is not overloaded)
    state: str                     #: cooperating | punished | forgiven
    reputation: float
    punish_left: int               #: periods
    budget_rate: float | None      #: connects / s allowed while punished
    throttled: int = 0             #: connects refused (throttle) or counted over budget (observe)
    reason: str | None = None      #: why it has a budget now (punished | defended | shed; agent.enforce)
    reasons: tuple[str, ...] = ()  #: every source that wants it budgeted (the smallest binds)


@dataclass
class Decision:
    set: list[tuple[int, int, Budget]] = field(default_factory=list)     #: (cgroup, svc id, budget)
    clear: list[tuple[int, int]] = field(default_factory=list)          #: (cgroup, svc id)
    punished: list[Standing] = field(default_factory=list)              #: newly punished (for the log)
    forgiven: list[Standing] = field(default_factory=list)


@dataclass
class ServiceRows:
    """What the period needs of every service, in layout order."""

    names: list[str]
    sids: np.ndarray               #: service id per row
    ids: np.ndarray                #: (S, B) backend ids (-1: none)
    enforce: list[str]             #: config `enforce:` per row
    latency: np.ndarray            #: (S,) served-weighted mean latency this period (NaN: none)
    tried: np.ndarray              #: (S,) tries this period
    failed: np.ndarray             #: (S,) failures this period
    served: np.ndarray             #: (S,) answered (or established) per second this period
    http: np.ndarray               #: (S,) bool: demand and capacity in requests, else in connects


class Cooperation:
    """The repeated game's state across periods, for every (caller, service) pair in it."""

    def __init__(self, params: CoopParams = CoopParams()) -> None:
        self.p = params
        self.pairs: dict[tuple[int, str], int] = {}          # (cgroup, service name) -> index
        self.trigger = folk.TriggerStrategy(0, params.max_punish)
        self.reputation = Reputation(0, half_life=params.reputation_half_life)
        # per service (rows of the last ServiceRows): baseline latency (s, NaN: none yet) and
        # capacity (served / s), kept as arrays so the stress check is vectorized
        self._names: list[str] = []
        self._base = np.zeros(0)
        self._cap = np.zeros(0)
        self._streak = np.zeros(0, dtype=np.int64)   # periods overloaded in a row
        self.budgets: dict[tuple[int, str], tuple[int, float, float]] = {}   # pair -> (svc id, rate, share)
        self.standings: dict[tuple[int, str], Standing] = {}
        #: per punished pair, folk.min_discount_factor of its flood: the patience below
        #: which no finite punishment would have deterred it (reported)
        self.min_delta: dict[tuple[int, str], float] = {}
        self._refused: dict[tuple[int, str], int] = {}       # budget counters seen last period
        self._distrust = (np.zeros(0, dtype=np.uint64), np.zeros(0))
        #: per service row of the last period: overloaded (what agent.enforce watches for admission)
        self.stressed = np.zeros(0, dtype=bool)

    # --- the period --------------------------------------------------------------------
    def period(self, seconds: float, rows: ServiceRows, evidence: EvidenceSource,
               budgets: dict[tuple[int, int], Budget]) -> Decision:
        """One period: who defects, who is punished or forgiven, which budgets change."""
        p, out = self.p, Decision()
        row_of = {name: r for r, name in enumerate(rows.names)}
        stressed = self.stressed = self._stress(seconds, rows)
        watched = set(np.flatnonzero(stressed).tolist()) | {row_of[k[1]] for k in self.budgets if k[1] in row_of}
        demand: dict[tuple[int, str], float] = {}
        for r in sorted(watched):
            for cg, rate in self._demands(rows.ids[r], evidence, bool(rows.http[r])).items():
                demand[(cg, rows.names[r])] = rate
        by_sid = {int(sid): r for r, sid in enumerate(rows.sids)} if budgets else {}
        seen_keys: set[tuple[int, str]] = set()
        for (cg, sid), b in budgets.items():   # what the kernel refused (or counted over) a punished caller
            r = by_sid.get(sid)
            if r is None:
                continue
            key = (cg, rows.names[r])
            seen_keys.add(key)
            seen = int(b.throttled) + int(b.observed)
            refused = max(seen - self._refused.get(key, seen), 0)
            self._refused[key] = seen
            demand[key] = demand.get(key, 0.0) + refused / max(seconds, 1e-9)
        for key in [k for k in self._refused if k not in seen_keys and k not in self.budgets]:
            del self._refused[key]   # a budget (of another source: agent.enforce) that is gone
        for key in list(self.budgets) + list(demand):
            self._index(key)

        # fair shares: max-min fair of an overloaded service's capacity; a punished
        # caller of a service that recovered keeps the share it was punished at
        shares: dict[tuple[int, str], float] = {k: b[2] for k, b in self.budgets.items()}
        n = len(self.pairs)
        rep = self.reputation.score()
        defect, good = np.zeros(n, dtype=bool), np.zeros(n)
        length = np.zeros(n, dtype=np.int64)

        def over(k: tuple[int, str], share: float) -> bool:
            slack = 1.0 + (p.defect_margin - 1.0) * float(rep[self.pairs[k]])   # less slack, poorer reputation
            return demand.get(k, 0.0) > max(slack * share, p.min_rate)

        for k in self.budgets:                 # punished: still over the share it was punished at?
            if over(k, shares[k]):
                defect[self.pairs[k]] = True
        for r in np.flatnonzero(stressed):
            name, cap = rows.names[r], float(self._cap[r])
            keys = [k for k in demand if k[1] == name and demand[k] > 0 and k not in self.budgets]
            if len(keys) < 2:    # a sole caller protects nobody by holding back: no share binds it
                continue
            fair = dict(zip(keys, max_min_fair([demand[k] for k in keys], cap).tolist()))
            shares.update(fair)
            # the defectors: those over their share, largest excess first, only as many as it
            # takes for the rest to fit the capacity (the first overloaded period's capacity is
            # an underestimate: a caller at its usual rate is not cut for it)
            rest = sum(demand[k] for k in keys)
            for k in sorted((k for k in keys if over(k, fair[k])), key=lambda k: fair[k] - demand[k]):
                if rest <= cap:
                    break
                defect[self.pairs[k]] = True
                rest -= demand[k]
        for k, share in shares.items():
            i = self.pairs[k]
            if defect[i]:
                length[i] = self.punishment_length(demand.get(k, 0.0) / max(share, 1e-9))
            elif demand.get(k, 0.0) > 0:
                good[i] = 1.0
        punished = self.trigger.step(defect, length)
        self.reputation.update(good, defect.astype(np.float64), dt=seconds)
        rep = self.reputation.score()

        for key, i in self.pairs.items():
            r = row_of.get(key[1])
            if punished[i] and key not in self.budgets and r is not None and rows.enforce[r] != "off":
                share = shares.get(key, 0.0)
                rate = max(p.punish_level * share, 1.0)
                sid = int(rows.sids[r])
                out.set.append((key[0], sid, _budget(rate, p.burst, rows.enforce[r])))
                self.budgets[key] = (sid, rate, share)
                kb = budgets.get((key[0], sid))   # a budget of another source keeps its counters
                self._refused[key] = int(kb.throttled) + int(kb.observed) if kb is not None else 0
                t = min(demand.get(key, 0.0) / max(share, 1e-9), p.max_temptation)
                self.min_delta[key] = folk.min_discount_factor(t, 1.0, p.punish_level) if t > 1.0 else 0.0
                out.punished.append(self._standing(key, i, demand, shares, "punished", rep, budgets))
            elif key in self.budgets and (not punished[i] or r is None):
                sid = self.budgets.pop(key)[0]
                out.clear.append((key[0], sid))
                self._refused.pop(key, None)
                self.min_delta.pop(key, None)
                out.forgiven.append(self._standing(key, i, demand, shares, "forgiven", rep, budgets))
        self.standings = {k: self._standing(k, i, demand, shares,
                                            "punished" if k in self.budgets else "cooperating", rep, budgets)
                          for k, i in self.pairs.items() if k in demand or k in self.budgets}
        self._distrust_from(rep)
        self._forget(demand)
        return out

    def punishment_length(self, temptation: float) -> int:
        """Periods of punishment that deter a flood of `temptation` fair shares (capped)."""
        p = self.p
        n = folk.punishment_length(min(temptation, p.max_temptation) - 1.0, 1.0, p.punish_level, p.delta)
        return p.max_punish if n is None else min(n, p.max_punish)

    # --- evidence weights ----------------------------------------------------------------
    def trust(self, cgroups: np.ndarray) -> np.ndarray:
        """Weight of each caller's evidence (1, or its reputation when that is below
        distrust_below in some service): what the judge scales its failures by."""
        keys, w = self._distrust
        out = np.ones(cgroups.shape)
        if keys.size:
            at = np.minimum(np.searchsorted(keys, cgroups), keys.size - 1)
            hit = keys[at] == cgroups
            out[hit] = w[at[hit]]
        return out

    def note_uncorroborated(self, cgroups: np.ndarray, services: list[str], amount: np.ndarray) -> None:
        """Evidence the other callers did not corroborate: bad for the caller's reputation."""
        hits = [(self._index((int(cg), name)), a)
                for cg, name, a in zip(cgroups.tolist(), services, amount.tolist()) if a > 0]
        bad = np.zeros(len(self.pairs))
        for i, a in hits:
            bad[i] += a
        if bad.any():
            self.reputation.update(np.zeros(len(self.pairs)), bad, dt=0.0)

    # --- internals ---------------------------------------------------------------------
    def _stress(self, seconds: float, rows: ServiceRows) -> np.ndarray:
        """Which services are overloaded this period; updates baselines and capacities
        (vectorized: a node's thousands of healthy services cost a few array ops)."""
        p = self.p
        if rows.names != self._names:   # a new layout: carry each service's by name
            base, cap = dict(zip(self._names, self._base)), dict(zip(self._names, self._cap))
            self._names = list(rows.names)
            streak = dict(zip(self._names, self._streak))
            self._base = np.array([base.get(n, np.nan) for n in self._names], dtype=np.float64)
            self._cap = np.array([cap.get(n, 0.0) for n in self._names], dtype=np.float64)
            self._streak = np.array([streak.get(n, 0) for n in self._names], dtype=np.int64)
        lat, served = rows.latency, rows.served
        fail = np.divide(rows.failed, rows.tried, out=np.zeros_like(rows.failed), where=rows.tried > 0)
        with np.errstate(invalid="ignore"):
            hot = (np.isfinite(self._base) & np.isfinite(lat) & (lat > p.stress * self._base)) | (fail > p.fail_stress)
        k_base = 0.5 ** (seconds / p.baseline_half_life)
        k_cap = 0.5 ** (seconds / p.capacity_half_life)
        calm_lat = ~hot & np.isfinite(lat)
        self._base = np.where(calm_lat, np.where(np.isfinite(self._base), k_base * self._base + (1 - k_base) * lat,
                                                 lat), self._base)
        # calm: a slowly fading peak of what it served; overloaded: it serves what it can
        self._cap = np.where(hot, np.maximum(served, self._cap), np.maximum(served, k_cap * self._cap))
        self._streak = np.where(hot, self._streak + 1, 0)
        return hot & (self._streak >= p.stress_periods)

    def _demands(self, ids: np.ndarray, evidence: EvidenceSource, http: bool) -> dict[int, float]:
        """Requests (or connects) per second of each caller of one service's backends,
        from the evidence windows."""
        ids = ids[ids >= 0]
        if ids.size == 0:
            return {}
        e: Evidence = evidence.read_ids(ids)
        att = e.total(("requests",) if http else ("attempts",))
        cg = e.cgroups
        live = att > 0
        out: dict[int, float] = {}
        for c, a in zip(cg[live].tolist(), att[live].tolist()):
            out[int(c)] = out.get(int(c), 0.0) + a / WINDOW_SECONDS
        return out

    def _index(self, key: tuple[int, str]) -> int:
        i = self.pairs.get(key)
        if i is None:
            i = self.pairs[key] = len(self.pairs)
            self.trigger.resize(i + 1)
            self.reputation.resize(i + 1)
        return i

    def _standing(self, key: tuple[int, str], i: int, demand: dict[tuple[int, str], float],
                  shares: dict[tuple[int, str], float], state: str, rep: np.ndarray,
                  budgets: dict[tuple[int, int], Budget]) -> Standing:
        b = self.budgets.get(key)
        kb = budgets.get((key[0], b[0])) if b is not None else None
        return Standing(cgroup=key[0], service=key[1], demand=demand.get(key, 0.0), share=shares.get(key),
                        state=state, reputation=float(rep[i]), punish_left=int(self.trigger.remaining[i]),
                        budget_rate=b[1] if b is not None else None,
                        throttled=int(kb.throttled) + int(kb.observed) if kb is not None else 0)

    def _distrust_from(self, rep: np.ndarray) -> None:
        low: dict[int, float] = {}
        for (cg, _), i in self.pairs.items():
            if rep[i] < self.p.distrust_below:
                low[cg] = min(low.get(cg, 1.0), float(rep[i]))
        keys = np.array(sorted(low), dtype=np.uint64)
        self._distrust = (keys, np.array([low[int(k)] for k in keys]))

    def _forget(self, demand: dict[tuple[int, str], float]) -> None:
        """Drop pairs with no traffic, no punishment and a reputation back at the prior."""
        rep = self.reputation.score()
        prior = self.reputation.prior[0] / sum(self.reputation.prior)
        left = self.trigger.remaining
        keep = [(k, i) for k, i in self.pairs.items()
                if k in demand or k in self.budgets or left[i] > 0 or abs(rep[i] - prior) > 0.02]
        if len(keep) == len(self.pairs):
            return
        index = [i for _, i in keep]
        self.trigger.take(index)
        self.reputation.take(index)
        self.pairs = {k: j for j, (k, _) in enumerate(keep)}


def _budget(rate: float, burst_seconds: float, enforce: str) -> Budget:
    interval = int(1e9 / rate)
    return Budget(tat=0, interval_ns=interval, burst_ns=int(burst_seconds * 1e9),
                  mode=constants.ENFORCE_MODES.get(enforce, constants.ENFORCE_OBSERVE))
