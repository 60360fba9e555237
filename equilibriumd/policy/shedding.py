"""Fair shedding of an infeasible offered load: per-caller admission budgets.

Issue 15, item 2 (feasible payoffs under overload). Once per period the agent
calls `shed` with each caller's offered rate (connects or requests per second,
what it was refused included: the kernel counts those in eq_lb_budget) and the
service's capacity (`game.capacity.ServiceCapacity`, from telemetry):

1. **Feasible?** With a target utilization ``u`` (default 0.9: near 1 a
   queue grows without bound, and routing on telemetry a tick old cannot keep
   every backend's queue stable: in the simulator's overload scenario
   ``u`` = 0.94 lets some seeds' queues run away), the load is feasible when
   the callers' total is at most ``u x capacity``; then nobody has a budget.
   An unknown capacity (NaN) is feasible: shedding on a guess would refuse
   load that fits.
2. **Fair shares.** Otherwise each caller's max-min fair share of
   ``u x capacity`` (`game.feasible.max_min_fair`): every caller at or below
   the water level gets its whole demand.
3. **Budgets.** A caller over `margin` (1.15) times its share gets a budget
   of its share (a GCRA rate: connects over it are refused at once with
   ECONNREFUSED, never queued); a caller within it gets none (never limited).
   The margin absorbs the noise of a measured rate and the headroom ``u``
   takes: a caller within its share of the whole capacity is not cut for it.

`Shed.budgets` maps caller -> rate (connects / s), what the agent writes to
eq_lb_budget (with `cooperation._budget`), and what the simulator enforces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..game.feasible import max_min_fair


@dataclass(frozen=True)
class ShedParams:
    utilization: float = 0.9    #: admit at most this x capacity (near 1 routing cannot keep every queue stable)
    margin: float = 1.15        #: a caller is budgeted when over this x its share (noise, estimate bias)
    min_budget: float = 1.0     #: connects / s: the smallest budget written


@dataclass
class Shed:
    feasible: bool
    admit: float                                          #: u x capacity (NaN: unknown)
    shares: dict[int, float] = field(default_factory=dict)    #: caller -> max-min fair share
    budgets: dict[int, float] = field(default_factory=dict)   #: caller -> admitted rate (over-share callers)


def shed(demand: dict[int, float], capacity: float, p: ShedParams = ShedParams()) -> Shed:
    """Per-caller budgets for one service in one period (see the module doc)."""
    admit = p.utilization * capacity if math.isfinite(capacity) else math.nan
    total = sum(demand.values())
    if not math.isfinite(admit) or total <= admit or not demand:
        return Shed(True, admit)
    keys = sorted(demand)
    fair = max_min_fair(np.array([max(demand[k], 0.0) for k in keys]), admit)
    shares = dict(zip(keys, fair.tolist()))
    budgets = {k: max(shares[k], p.min_budget) for k in keys if demand[k] > p.margin * shares[k]}
    return Shed(False, admit, shares, budgets)


class DemandMeter:
    """Each caller's offered rate, smoothed over periods (exponential, `half_life` seconds):
    one period's Poisson count is too noisy to tell a caller at its share from one over it."""

    def __init__(self, half_life: float = 1.0) -> None:
        self.half_life = half_life
        self.rate: dict[int, float] = {}

    def update(self, counts: dict[int, float], seconds: float) -> dict[int, float]:
        k = 0.5 ** (seconds / self.half_life)
        for c in set(self.rate) | set(counts):
            now = counts.get(c, 0.0) / seconds
            self.rate[c] = k * self.rate[c] + (1 - k) * now if c in self.rate else now
        return dict(self.rate)

    def sd(self, rate: float, seconds: float) -> float:
        """The standard deviation of the smoothed rate of a Poisson caller at `rate`, updated every
        `seconds`: an EWMA of counts / seconds keeps (1 - k) / (1 + k) of their variance rate / seconds."""
        k = 0.5 ** (seconds / self.half_life)
        return math.sqrt(max(rate, 0.0) * (1 - k) / ((1 + k) * seconds)) if seconds > 0 else 0.0
