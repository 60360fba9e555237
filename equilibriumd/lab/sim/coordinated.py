"""`equilibrium-coordinated`: the equilibrium agents plus a simulated coordinator.

Every node's agent runs the equilibrium policy exactly as `equilibrium` does
(its Router keeps learning every tick, so falling back is seamless), and
besides publishes a `NodeSummary` of its last tick (offered load per backend,
and its latency per backend smoothed over ticks, since a node sees ~10
responses a tick). A `SimCoordinator` computes recommendations with
`policy.coordination.recommend` at most once per `period` (lazily, at the
first agent tick after the period elapsed: the agents tick at staggered
phases) and hands each node its latest one. The agent writes the
recommended weights while `should_follow` says so, and its own otherwise,
eased in over a few ticks (HANDOVER) after it stops following.

A scenario with `coordinator_stops` set: from that time the coordinator
computes nothing; the recommendations already out expire `ttl` after they
were issued and each agent, at its next tick (within one tick of expiry),
stops following.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...policy import coordination as co
from . import policies
from .scenarios import Scenario

#: a recommendation lives this many coordinator periods (so one lost round does not unfollow)
TTL_PERIODS = 2.0
#: smoothing of a node's own latency estimates per tick (weight of the newest tick)
LATENCY_EWMA = 0.3
#: after it stops following, an agent eases from the last followed weights to its own: the
#: weight of the former falls by this factor per tick (see CoordinatedAgent)
HANDOVER = 0.93
SERVICE = "sim"


@dataclass
class SimCoordinator:
    period: float
    ttl: float
    stops: float | None = None
    summaries: dict[str, co.NodeSummary] = field(default_factory=dict)
    recs: dict[str, co.Recommendation] = field(default_factory=dict)
    last: dict[str, co.Recommendation] = field(default_factory=dict)   #: service -> last round's
    last_round: float = -math.inf
    rounds: int = 0

    def alive(self, now: float) -> bool:
        return self.stops is None or now < self.stops

    def publish(self, s: co.NodeSummary) -> None:
        self.summaries[s.node] = s

    def recommendation(self, node: str, now: float) -> co.Recommendation | None:
        if self.alive(now) and now - self.last_round >= self.period - 1e-9:
            self.last_round = now
            self.rounds += 1
            new = co.recommend(list(self.summaries.values()), now, self.ttl, coordinator="sim", epoch=1,
                               previous=self.last)
            self.recs.update({r.node: r for r in new})
            self.last.update({r.service: r for r in new})
        return self.recs.get(node)


class CoordinatedAgent(policies.KernelAgent):
    """An equilibrium agent that follows the coordinator while `should_follow` allows."""

    def __init__(self, policy: str, tick: float, node: str, coordinator: SimCoordinator) -> None:
        super().__init__(policy, tick)
        self.node = node
        self.coordinator = coordinator
        self.latency: dict[int, float] = {}
        self.following = False
        self.followed: tuple[tuple[int, ...], list[float]] | None = None   #: last weights followed
        self.ease = 0.0
        #: (tick time, following, reason) for every tick
        self.history: list[tuple[float, bool, str]] = []

    def weights(self, present: tuple[int, ...], delta: Any, now: float) -> list[float]:
        own_w = super().weights(present, delta, now)   # independent learning never stops
        if delta is None or delta.seconds <= 0:
            return own_w
        idx = list(present)
        sent = delta["requests"][idx].astype(np.float64)
        lat = delta.mean_latency_seconds()[idx]
        for b, x in zip(present, lat):
            if math.isfinite(x):
                old = self.latency.get(b)
                self.latency[b] = x if old is None else old + LATENCY_EWMA * (x - old)
        own = co.ServiceSummary(tuple("b%d" % b for b in present),
                                tuple(float(x) for x in sent / delta.seconds),
                                tuple(self.latency.get(b, math.nan) for b in present))
        self.coordinator.publish(co.NodeSummary(self.node, now, {SERVICE: own}))
        rec = self.coordinator.recommendation(self.node, now)
        self.following, why = co.should_follow(rec, own, now)
        self.history.append((now, self.following, why))
        if self.following and rec is not None:
            self.followed, self.ease = (present, list(rec.weights)), 1.0
            return list(rec.weights)
        # Its Router learned all along, but from traffic the recommendation steered: its weights
        # are off-policy, and 20 agents switching to them in one tick herd (p99 x2 for a few
        # seconds in many-nodes-coordinator-fails). Ease over a few ticks instead.
        if self.followed is None or self.followed[0] != present:
            return own_w
        self.ease *= HANDOVER
        if self.ease < 0.05:
            self.followed = None
            return own_w
        last = self.followed[1]
        return [self.ease * a + (1.0 - self.ease) * b for a, b in zip(last, own_w)]


def agents(sc: Scenario, policy: str, nodes: int) -> tuple[list[policies.KernelAgent], SimCoordinator]:
    c = SimCoordinator(sc.tick, TTL_PERIODS * sc.tick, sc.coordinator_stops)
    return [CoordinatedAgent(policy, sc.tick, "node-%02d" % k, c) for k in range(nodes)], c
