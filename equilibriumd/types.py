"""Types and limits every layer shares: the bottom of the import graph.

Nothing here imports another module of the project. The configuration
(`config`), the datapath, the game engine, discovery and the lab all take
their endpoint type, node limits and engine constants from here, so each is
defined once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

# --- node limits ----------------------------------------------------------------
# The datapath's maps are sized from these (datapath.constants hands them to the
# compiler); the config and discovery refuse anything over them. Kernel memory
# they cost is derived in datapath.constants.map_memory() and in the README.

#: Services per node (frontend maps, slot tables, per-service counters). Cilium's
#: default service map holds 65,536 frontends; 4,096 services with 16 backends each
#: is a node of a large cluster that sees every Service it routes to.
MAX_SERVICES = 4096
#: Backends per node, over all services (backend ids are node-global).
MAX_BACKENDS = 65536
#: Backends one service may have. A 1,024-slot table represents a weight split
#: to within 0.1 %; more backends than this would starve small weights.
MAX_BACKENDS_PER_SERVICE = 256
#: Slots per service table; a power of two so the kernel masks, not divides.
SLOTS = 1024

#: How the kernel picks from a service's table (config `balance:`): two slots and
#: the less loaded per slot, or one slot (the weighted split exactly).
BALANCE_P2C, BALANCE_WEIGHTED = "p2c", "weighted"
BALANCES = (BALANCE_P2C, BALANCE_WEIGHTED)


@dataclass(frozen=True, order=True, slots=True)
class Addr:
    """An IP endpoint; `family` is 4 or 6. Printed as ip:port or [ip]:port."""

    family: int
    ip: str
    port: int

    def __str__(self) -> str:
        return "%s:%d" % (self.ip if self.family == 4 else "[%s]" % self.ip, self.port)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_addr, (self.family, self.ip, self.port))


#: equal numbers met while unpickling a configuration, shared (see `shared`)
_SHARED: dict[tuple[type, Any], Any] = {}


def shared(v: Any) -> Any:
    """`v`, or an equal value of its type seen before (while `_SHARED` is filled:
    config.load_apart's unpickling). Pickle writes numbers inline, so the
    16,384 ports and weights of a node's config would each come back as an
    object of their own (~50 bytes a backend); most are the same few values."""
    return _SHARED.setdefault((type(v), v), v)


def _addr(family: int, ip: str, port: int) -> "Addr":
    return Addr(family, ip, shared(port))


@dataclass(frozen=True)
class EquilibriumParams:
    """Constants of the equilibrium policy (config: `equilibrium:` section)."""

    latency_smoothing: float = 0.3    #: EWMA weight (in log space) of the newest tick's latency (0-1]
    regime_change: float = 4.0        #: a tick this many times off the estimate is weighted `jump`
    jump: float = 0.6                 #: EWMA weight for such a tick: big changes are followed fast
    latency_floor: float = 0.005      #: seconds added to latencies in payoffs: sub-ms jitter is not a signal
    error_penalty: float = 2.0        #: seconds a failed request costs in the effective latency
    deadband: float = 0.25            #: payoff differences below this (≈ 28 % latency) count as equal
    discount: float = 0.6             #: γ: regret kept from one tick to the next
    prior_regret: float = 2.0         #: c: regret a backend as good as the best gets
    prior_span: float = 1.0           #: the prior fades linearly to 0 at this payoff (≈ 2.7x slower)
    inertia: float = 0.3              #: fraction of the way to the target moved per tick
    escape_inertia: float = 0.6       #: the same, away from a backend whose payoff collapsed
    escape_payoff: float = 1.0        #: payoff below which a backend counts as collapsed (≈ 2.7x slower)
    max_step: float = 0.1             #: largest rise of a weight in one tick
    escape_step: float = 0.5          #: largest fall of a weight in one tick
    #: when more than this share of a service's backends look collapsed they are not left past
    #: the others' rise caps: the odd one out is the outlier (starved while the rest were
    #: overloaded, its queue drained), not a refuge; unchecked, it took all of the traffic in one
    #: tick and its queue exploded (issue 16, prequal-ramp)
    escape_max_share: float = 0.5
    little_min_inflight: float = 3.0  #: in-flight requests from which Little's law (in-flight / rate) counts
    rise_headroom: float = 0.1        #: a weight may rise to (1 + this) x the share the backend answered...
    rise_floor: float = 0.05          #: ... plus this, per tick: no herding past what a backend can take
    floor: float = 0.005              #: exploration share per available backend
    #: a backend collapsed (payoff under -escape_payoff) for `patience` ticks in a row explores with
    #: floor x (L_best + L0) / (L + L0),
    #: down to this fraction of `floor`: each backend's exploration then costs about what the best
    #: one's does, and a 16x slower backend stops adding 16x the latency per probe (issue 16,
    #: fast-and-slow and linkerd-2016). Not when most backends look collapsed (overload: see
    #: escape_max_share). 1 keeps the floor fixed. 0.2 x 0.005 x 1,024 slots is about one slot, the
    #: least the kernel's table can give: lower, a slow backend would get no slot and no probe at all.
    floor_min_ratio: float = 0.2
    quarantine_enter: float = 0.9     #: P(failing) that quarantines a backend
    quarantine_exit: float = 0.3      #: P(failing) below which it is restored
    trickle: float = 0.01             #: share a quarantined backend keeps, to re-probe it
    slow_start: float = 10.0          #: seconds over which a new/restored backend ramps up
    converged_enter: float = 0.15     #: distance below which a service counts as converged
    converged_exit: float = 0.3       #: distance above which it is converging again
    patience: int = 4                 #: ticks a status change must persist
    tolls: bool = False               #: potential-game variant: route on marginal cost
    #: Envoy's healthy_panic_threshold as a fraction: when fewer than this share of a
    #: service's backends are healthy (not quarantined), spread over all of them evenly
    #: rather than overload the few healthy ones. 0 (the default) disables it.
    panic_threshold: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("tolls", "patience"):
                continue
            if f.name == "regime_change" and v < 1:
                raise ValueError("equilibrium.regime_change must be >= 1, got %r" % v)
            if not math.isfinite(v) or v < 0:
                raise ValueError("equilibrium.%s must be a finite number >= 0, got %r" % (f.name, v))
        for name in ("latency_smoothing", "jump", "discount", "inertia", "escape_inertia", "max_step", "escape_step",
                     "escape_max_share", "quarantine_enter", "quarantine_exit", "trickle", "floor", "floor_min_ratio",
                     "panic_threshold"):
            if getattr(self, name) > 1:
                raise ValueError("equilibrium.%s must be <= 1" % name)
        if self.quarantine_exit >= self.quarantine_enter:
            raise ValueError("equilibrium.quarantine_exit must be below quarantine_enter")
        if self.patience < 1:
            raise ValueError("equilibrium.patience must be >= 1")
