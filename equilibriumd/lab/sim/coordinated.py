"""`equilibrium-coordinated`: the equilibrium agents plus a simulated coordinator.

Every node's agent runs the equilibrium policy exactly as `equilibrium` does
(its Router keeps learning every tick, so falling back is seamless), and
besides publishes a `NodeSummary`: its offered load and latency per backend,
both over the same window of a few ticks (a node sees ~10 responses a tick),
responses weighted by a decay per tick, so a backend it stops sending to fades
out (NaN) instead of keeping a stale latency. Its own obedience check uses a
longer window (OBEY_EWMA: its estimates against the coordinator's pooled
ones). A `SimCoordinator` computes recommendations with
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

#: the coordinator's period, in agent ticks
PERIOD_TICKS = 1
#: a recommendation lives this many coordinator periods (so one lost round does not unfollow)
TTL_PERIODS = 2.0
#: the window of a node's published load and latency: weights decay by (1 - this) per tick
LATENCY_EWMA = 0.3
#: the same, for the node's own obedience check (longer: a node sees ~10 responses a tick)
OBEY_EWMA = 0.1
#: after it stops following, an agent eases from the last followed weights to its own: the
#: weight of the former falls by this factor per tick (see CoordinatedAgent)
HANDOVER = 0.93
#: a node's latency estimate of a backend needs this many (decayed) responses, else NaN
MIN_SAMPLES = 1.0
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
    #: the first round waits for this many nodes' summaries (the run starts every node at t=0;
    #: a coordinator already running would not spend a whole period on one node's summary)
    expect: int = 0

    def alive(self, now: float) -> bool:
        return self.stops is None or now < self.stops

    def publish(self, s: co.NodeSummary) -> None:
        self.summaries[s.node] = s

    def recommendation(self, node: str, now: float) -> co.Recommendation | None:
        if (self.alive(now) and now - self.last_round >= self.period - 1e-9
                and (self.rounds or len(self.summaries) >= self.expect)):
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
        #: backend -> decayed (latency sum, responses): what it publishes, and what it checks obedience with
        self.latency: dict[int, tuple[float, float]] = {}
        self.latency_long: dict[int, tuple[float, float]] = {}
        self.sent = np.zeros(0)       #: decayed requests sent per backend, and decayed seconds
        self.seconds = 0.0
        self.sent_for: tuple[int, ...] = ()
        self.following = False
        self.followed: tuple[tuple[int, ...], list[float]] | None = None   #: last weights followed
        self.ease = 0.0
        #: (tick time, following, reason) for every tick
        self.history: list[tuple[float, bool, str]] = []

    @staticmethod
    def _estimate(acc: dict[int, tuple[float, float]], present: tuple[int, ...], lat: Any, n_ans: Any,
                  weight: float) -> tuple[float, ...]:
        """Per backend, the latency mean over responses with weights decaying by (1 - weight) per tick:
        a backend this node stopped sending to fades out (NaN) instead of keeping a stale value."""
        for b, x, n in zip(present, lat, n_ans):
            s, c = acc.get(b, (0.0, 0.0))
            s, c = (1 - weight) * s, (1 - weight) * c
            if math.isfinite(x) and n > 0:
                s, c = s + x * n, c + n
            acc[b] = (s, c)
        return tuple(s / c if c >= MIN_SAMPLES else math.nan for s, c in (acc[b] for b in present))

    def weights(self, present: tuple[int, ...], delta: Any, now: float) -> list[float]:
        own_w = super().weights(present, delta, now)   # independent learning never stops
        if delta is None or delta.seconds <= 0:
            return own_w
        idx = list(present)
        sent = delta["requests"][idx].astype(np.float64)
        lat = delta.mean_latency_seconds()[idx]
        n_ans = delta.req_timed[idx].astype(np.float64)
        names = tuple("b%d" % b for b in present)
        # the load over the same (decayed) window as the latencies: a new split changes the load
        # at once and the latency mean only over that window; pairing the tick's load with the
        # window's latency would calibrate the old latency against the new load
        if self.sent_for != present:            # another backend set: start the window afresh
            self.sent_for, self.sent, self.seconds = present, np.zeros(len(present)), 0.0
        self.sent = (1 - LATENCY_EWMA) * self.sent + sent
        self.seconds = (1 - LATENCY_EWMA) * self.seconds + delta.seconds
        load = tuple(float(x) for x in self.sent / self.seconds)
        own = co.ServiceSummary(names, load, self._estimate(self.latency, present, lat, n_ans, LATENCY_EWMA))
        mine = co.ServiceSummary(names, load, self._estimate(self.latency_long, present, lat, n_ans, OBEY_EWMA))
        self.coordinator.publish(co.NodeSummary(self.node, now, {SERVICE: own}))
        rec = self.coordinator.recommendation(self.node, now)
        self.following, why = co.should_follow(rec, mine, now)
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
    period = PERIOD_TICKS * sc.tick
    c = SimCoordinator(period, TTL_PERIODS * period, sc.coordinator_stops, expect=nodes)
    return [CoordinatedAgent(policy, sc.tick, "node-%02d" % k, c) for k in range(nodes)], c
