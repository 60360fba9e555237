"""Zero-sum defence of a service against a flooding caller: randomized admission budgets.

Issue 15, item 3. Once per period (a tick) the agent calls `Defence.period`
with each caller's offered rate (refused connects included) and the service's
capacity (`game.capacity.ServiceCapacity`); it returns per-caller budgets
(connects / s) for eq_lb_budget, the only thing the kernel can enforce.

**Who floods.** The *suspect* is the largest caller without which the service
would be calm (the others' demand ``H`` at most ``calm x capacity``:
``calm = 0.5`` is where an M/M/1 queue's latency doubles, cooperation's
stress test) and whose demand is over its *allowance*
``sigma = (mu - H) x eps / (1 + eps)``: the most it can add before the
others' latency ``W0 / (1 - x / mu)`` (the law `game.capacity` fits) grows by
more than ``eps``. Every other caller is within its share and never gets a
budget here; a legitimate overload (no single caller to blame) is `shedding`'s.

**The game** (zero-sum, `game.zero_sum.solve`; the defender minimizes the
loss, the attacker maximizes it). Defender's pure actions: budget levels
``b = m x sigma`` for ``m`` in `levels` (``inf``: no budget). Columns: a
flooder at rate ``r`` (a grid of rates around the levels: it adapts, e.g.
sitting just below a level) and honest heavy callers at ``h x sigma``
(`honest`, they do not adapt). With ``D(a) = a / (mu - H - a)`` the others'
relative latency increase (capped at `damage_cap`):

* not caught (``rate <= b``): loss ``D(rate)`` for a flooder, 0 for an honest
  caller (its traffic is what the service is for);
* caught (``rate > b``): the kernel refuses the excess, and the caller is then
  held at ``p x sigma`` for ``L`` periods (a trigger strategy, as in
  `cooperation`): a flooder's loss is the cycle's mean damage
  ``(D(b) + L D(p sigma)) / (L + 1)``; an honest caller's adds the false
  positive ``kappa x (refused share of its demand over the cycle)``.

A tight level catches floods but punishes honest heavy callers; a loose one
lets a flood just below it through: so the minimax strategy ``x`` is in
general mixed. Each period a level is drawn from ``x`` (randomized admission:
the attacker cannot sit just below a known threshold, which is how it beats
a deterministic one) and written as the suspect's budget. A caller seen over
its budget by `catch_margin` is punished for ``L`` periods (restarted while
it stays over its allowance).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..game import zero_sum


@dataclass(frozen=True)
class DefenceParams:
    eps: float = 0.2                 #: the others' latency may grow by this fraction (the p99 target's 1.2x)
    calm: float = 0.5                #: without the suspect the load is at most this x capacity
    levels: tuple[float, ...] = (1.0, 1.25, 1.5, 2.0, 3.0, math.inf)   #: budget levels, in allowances
    honest: tuple[float, ...] = (1.25, 1.5, 2.0)   #: honest heavy callers' demands, in allowances
    kappa: float = 0.5               #: weight of refusing an honest caller (per unit of its demand)
    punish_level: float = 0.02       #: a caught caller's budget, in allowances
    punish_periods: int = 10         #: periods a caught caller is held (L)
    catch_margin: float = 1.1        #: demand over this x its budget: caught (Poisson noise below it)
    damage_cap: float = 10.0         #: loss when the service saturates (D unbounded)
    min_budget: float = 1.0          #: connects / s


def damage(admitted: float, others: float, capacity: float, cap: float = 10.0) -> float:
    """The others' relative latency increase when `admitted` is added to their load `others`
    (M/M/1: W = W0 / (1 - x / mu)), capped at `cap` once the service saturates."""
    spare = capacity - others
    if admitted <= 0:
        return 0.0
    if spare <= admitted:
        return cap
    return min(admitted / (spare - admitted), cap)


def allowance(others: float, capacity: float, eps: float) -> float:
    """Most a caller may add to the others' load before their latency grows by `eps`."""
    return max(capacity - others, 0.0) * eps / (1.0 + eps)


@dataclass
class Game:
    """One period's defence game for one suspect."""

    suspect: int
    sigma: float                     #: its allowance (connects / s)
    others: float                    #: the other callers' demand
    capacity: float
    budgets: np.ndarray              #: (rows,) budget per defender action (inf: none)
    rates: np.ndarray                #: (cols,) each column's rate
    honest: np.ndarray               #: (cols,) bool: an honest heavy caller (else a flooder)
    loss: np.ndarray                 #: (rows, cols)
    x: np.ndarray                    #: the defender's minimax mixed strategy
    value: float                     #: its guaranteed worst-case loss


def flood_columns(sigma: float, levels: tuple[float, ...], top: float) -> np.ndarray:
    """A flooder's rates worth considering: just below and just above each finite level,
    at its allowance, and its top rate."""
    fin = [m for m in levels if math.isfinite(m)]
    r = {sigma, top} | {m * sigma * 0.97 for m in fin} | {m * sigma * 1.03 for m in fin}
    return np.array(sorted(x for x in r if x >= sigma))


def loss_matrix(sigma: float, others: float, capacity: float, p: DefenceParams,
                top: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(budgets (rows), rates (cols), honest (cols), loss (rows, cols)) of the game above."""
    budgets = np.array([m * sigma for m in p.levels])
    flood = flood_columns(sigma, p.levels, max(top, sigma))
    hon = np.array([h * sigma for h in p.honest])
    rates = np.concatenate([flood, hon])
    is_h = np.concatenate([np.zeros(flood.size, dtype=bool), np.ones(hon.size, dtype=bool)])
    L, low = p.punish_periods, p.punish_level * sigma

    def d(a: float) -> float:
        return damage(a, others, capacity, p.damage_cap)

    loss = np.zeros((budgets.size, rates.size))
    for i, b in enumerate(budgets):
        for j, r in enumerate(rates):
            if r <= b:
                loss[i, j] = 0.0 if is_h[j] else d(r)     # an honest caller's traffic is no attack
            else:
                loss[i, j] = (d(b) + L * d(low)) / (L + 1)
                if is_h[j]:      # refused: its excess now, all but the trickle while held
                    refused = ((r - b) + L * (r - low)) / ((L + 1) * r)
                    loss[i, j] += p.kappa * refused
    return budgets, rates, is_h, loss


def solve_game(suspect: int, sigma: float, others: float, capacity: float, p: DefenceParams,
               top: float) -> Game:
    budgets, rates, is_h, loss = loss_matrix(sigma, others, capacity, p, top)
    x, v = minimax(loss)
    return Game(suspect, sigma, others, capacity, budgets, rates, is_h, loss, x, v)


def minimax(loss: np.ndarray) -> tuple[np.ndarray, float]:
    """The defender's (row player's) mixed strategy minimizing its worst-case expected loss, and
    that loss: the row player of `zero_sum.solve` maximizes, so it plays -loss."""
    x, _, v = zero_sum.solve(-np.asarray(loss, dtype=np.float64))
    return x, -v


def expected_damage(game: Game, rate: float, p: DefenceParams) -> float:
    """A flooder's expected damage at `rate` against the game's mixed strategy (what an
    adaptive attacker maximizes; within its allowance it is never a suspect)."""
    def d(a: float) -> float:
        return damage(a, game.others, game.capacity, p.damage_cap)
    if rate <= game.sigma:
        return d(rate)
    L, low = p.punish_periods, p.punish_level * game.sigma
    caught = np.array([(d(b) + L * d(low)) / (L + 1) for b in game.budgets])
    free = np.array([d(rate)] * game.budgets.size)
    return float(game.x @ np.where(rate <= game.budgets, free, caught))


def best_response(game: Game, p: DefenceParams, top: float, safety: float = 0.9) -> float:
    """The adaptive attacker's rate against the defender's last mixed strategy: the most
    damaging of just below (x `safety`, for the noise of the defender's measure) its allowance
    and each level, and its top rate."""
    cands = [game.sigma * safety, top] + [b * safety for b in game.budgets if math.isfinite(b)]
    cands = [min(c, top) for c in cands]
    return max(cands, key=lambda r: (expected_damage(game, r, p), -r))


def suspect_of(demand: dict[int, float], capacity: float, p: DefenceParams) -> tuple[int, float, float] | None:
    """(caller, others' demand, allowance) of the flooder, or None."""
    if not math.isfinite(capacity) or capacity <= 0 or not demand:
        return None
    total = sum(demand.values())
    for c in sorted(demand, key=lambda c: -demand[c]):
        others = total - demand[c]
        if others > p.calm * capacity:
            continue                    # the others alone stress it: an overload, not a flood
        sigma = allowance(others, capacity, p.eps)
        if demand[c] > sigma:
            return c, others, sigma
        return None                     # the largest calm-making caller is within its allowance
    return None


@dataclass
class Step:
    budgets: dict[int, float] = field(default_factory=dict)   #: caller -> connects / s
    game: Game | None = None
    caught: list[int] = field(default_factory=list)


class Defence:
    """The defence's state across periods: who is held (punished) and at what budget."""

    def __init__(self, params: DefenceParams = DefenceParams()) -> None:
        self.p = params
        self.held: dict[int, tuple[int, float]] = {}     # caller -> (periods left, budget)
        self.last: dict[int, float] = {}                 # budgets written last period
        self.game: Game | None = None

    def period(self, demand: dict[int, float], capacity: float, draw: float) -> Step:
        """Budgets for the next period; `draw` in [0, 1) picks the level from the mixed strategy."""
        p, out = self.p, Step()
        sus = suspect_of(demand, capacity, p)
        # caught over last period's budget: held at the trickle for L periods
        for c, b in self.last.items():
            if c not in self.held and demand.get(c, 0.0) > p.catch_margin * b:
                sigma = sus[2] if sus is not None and sus[0] == c else b
                self.held[c] = (p.punish_periods, max(p.punish_level * sigma, p.min_budget))
                out.caught.append(c)
        for c, (left, b) in list(self.held.items()):
            still = sus is not None and sus[0] == c     # still flooding: the punishment restarts
            if c not in out.caught:                     # held L periods from the one it was caught in
                left = p.punish_periods if still else left - 1
            if left <= 0:
                del self.held[c]
            else:
                self.held[c] = (left, b)
                out.budgets[c] = b
        self.game = None
        if sus is not None and sus[0] not in self.held:
            c, others, sigma = sus
            g = solve_game(c, sigma, others, capacity, p, top=demand[c])
            k = min(int(np.searchsorted(np.cumsum(g.x), draw, side="right")), g.x.size - 1)
            if math.isfinite(g.budgets[k]):
                out.budgets[c] = max(float(g.budgets[k]), p.min_budget)
            self.game = out.game = g
        self.last = dict(out.budgets)
        return out
