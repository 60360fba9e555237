"""The `@kernel` forms of issue 16's peers that can run on per-tick weights (sim-only adapters).

The per-request peers (sim.peers) decide per request. These run the way Equilibrium does:
every tick each node computes weights from what it could know at tick time, the engine
writes them as the node's 1,024-slot table, and each connection is drawn by the kernel's
rule (datapath.pick): one weighted draw, or the two-choice draw (SVC_P2C) where the
policy's per-request form is a least-request choice. Like `p2c-least-request@kernel`
they are adapters the simulator's `KernelAgent` calls in place of the agent's Router, not
agent policies (equilibriumd.policy / equilibriumd.agent are untouched):

* `grpc-wrr@kernel` — gRFC A58's weights, qps / (utilization + eps / qps x penalty), with
  the blackout period, the expiration and the mean weight for endpoints without one,
  computed once per tick from the same per-backend ORCA reports the per-request
  `grpc-wrr` reads (`OrcaServers`: each backend's qps, eps and utilization over its last
  complete 1 s window). The node takes a backend's current report when it got responses
  from it during the tick (per-request ORCA: a report rides on every response). Drawn
  weighted: the table's draw replaces A58's EDF scheduler, and gRPC has no second choice.
  The weights are recomputed every tick (0.5 s) instead of A58's weight_update_period (1 s).
* `envoy-least-request-weighted@kernel` — Envoy's weighted least request,
  static weight / (active + 1)^bias, with active = the node's requests in flight per
  backend at tick time (the telemetry's in-flight gauge) and the static weight the
  backend's nominal capacity (peers.capacity_weights, as the per-request form). Drawn
  with the kernel's two-choice draw (as the agent does for least-request policies),
  which also reads the node's in-flight counts at connect time. With equal static
  weights Envoy takes its P2C path instead (and so does the per-request form): then the
  table is even and the two-choice draw on live in-flight counts is the whole policy
  (weights 1 / (active + 1) frozen for a tick herd: at 90 % load on 24 single-server
  backends, `homogeneous-cpu`, they gave a p99 of 980 ms against 53 ms this way).
* `jsq-stale@kernel` — all the weight on the backends with the fewest requests in flight
  (from every node: the servers' own count) in the snapshot taken at the node's tick,
  ties split equally; drawn weighted. On a table, JSQ's herding is plain: a whole tick's
  traffic goes to the backends that were shortest at its start.
* `linkerd-penalty-ewma@kernel` — the agent's own `p2c-ewma` policy (its Router) fed a
  delta in which every 5xx response's latency counts as the penalty (5 s): the tick's
  latency sum gets 5 s more per 5xx (the kernel's counters hold one sum per backend, so a
  failure's own latency, 1 ms in the simulator, stays in it too). PeakEWMA then sees a
  tick's mean latency, not every response: one 5xx in a tick of a hundred responses
  raises the mean by 50 ms, not to 5 s. Drawn with the kernel's two-choice draw, as
  `p2c-ewma@kernel`.

No weights form: `prequal` chooses per request among probes of requests in flight and
latency taken within the last second, its pool consumed by use (a probe serves at most
b_reuse queries), so a tick-old table of its choice would be one stale probe for a
whole tick's traffic, the very herding its pool and reuse limit exist to prevent; `c3`
ranks each request by per-response feedback (queue size and service time piggybacked on
every response, corrected by the client's own outstanding requests at send time) and
its cubic rate control throttles sends per server within a tick, neither of which a
weight per backend per tick can carry.

The engine gives each adapter the scenario and its server view (`attach`), and for
`grpc-wrr@kernel` feeds the shared servers' recorder every arrival and response.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import peers, policies
from .peers import OrcaServers
from .scenarios import Scenario

PEERS_KERNEL = policies.PEERS_KERNEL

# --- Envoy weighted least request: the per-request form's parameter (peers.ENVOY_ACTIVE_REQUEST_BIAS:
# envoy docs, LeastRequest.active_request_bias, default 1.0) ---------------------------------------------
ENVOY_ACTIVE_REQUEST_BIAS = peers.ENVOY_ACTIVE_REQUEST_BIAS

# --- gRPC weighted round robin (gRFC A58): the per-request form's parameters, same defaults -----------------
#: error_utilization_penalty (A58 default 1.0)
WRR_ERROR_PENALTY = peers.WRR_ERROR_PENALTY
#: blackout_period (A58 default 10 s)
WRR_BLACKOUT = peers.WRR_BLACKOUT
#: weight_expiration_period (A58 default 3 min)
WRR_EXPIRATION = peers.WRR_EXPIRATION

# --- Linkerd Load Biaser: the penalty latency of a failed response (linkerd.io docs "Handling
# Rate-Limited Endpoints", 2026: default 5 s; peers.LINKERD_PENALTY) --------------------------------------
LINKERD_PENALTY = peers.LINKERD_PENALTY


def envoy_weights(static: list[float], active: list[float], bias: float = ENVOY_ACTIVE_REQUEST_BIAS) -> list[float]:
    """Envoy's effective weights: static / (active + 1)^bias (active clamped at 0)."""
    return [w / (max(a, 0.0) + 1.0) ** bias for w, a in zip(static, active)]


def jsq_weights(rifs: list[int]) -> list[float]:
    """1 for each backend with the fewest requests in flight, 0 for the others."""
    low = min(rifs)
    return [1.0 if r == low else 0.0 for r in rifs]


class KernelPeer:
    """A per-tick weights adapter: KernelAgent calls `weights` as it calls the agent's Router."""

    def __init__(self) -> None:
        self.sc: Scenario | None = None
        self.view: peers.ServerView | None = None

    def attach(self, sc: Scenario, view: peers.ServerView, servers: OrcaServers | None) -> None:
        self.sc, self.view = sc, view

    def weights(self, config: Any, ids: dict[str, list[int]], delta: Any, now: float) -> dict[str, list[float]]:
        present = ids["sim"]
        if delta is None or self.view is None:      # no telemetry yet (the first table): even
            return {"sim": [1.0] * len(present)}
        return {"sim": [float(x) for x in self.tick(present, delta, now)]}

    def tick(self, present: list[int], delta: Any, now: float) -> list[float]:
        raise NotImplementedError


class EnvoyWeightedKernel(KernelPeer):
    """static (capacity) weight / (the node's in-flight at tick time + 1)^bias; with equal static
    weights, Envoy's P2C path: the static weights, and the kernel's two-choice draw on the node's
    in-flight counts at connect time does the least-request part."""

    def tick(self, present: list[int], delta: Any, now: float) -> list[float]:
        assert self.sc is not None
        static = peers.capacity_weights(self.sc)
        mine = [static[b] for b in present]
        if len(set(mine)) <= 1:             # Envoy: all weights equal -> P2C on active requests
            return mine
        infl = np.asarray(delta.inflight, dtype=np.float64)
        return envoy_weights(mine, [float(infl[b]) for b in present])


class JsqStaleKernel(KernelPeer):
    """All the weight on the shortest global queues in the tick-time snapshot."""

    def tick(self, present: list[int], delta: Any, now: float) -> list[float]:
        assert self.view is not None
        return jsq_weights([self.view(b, now).rif for b in present])


class GrpcWrrKernel(KernelPeer):
    """One node's A58 endpoint weights (non_empty_since, last_updated, weight), updated once per
    tick from the servers' reports, as a table."""

    def __init__(self) -> None:
        super().__init__()
        self.servers: OrcaServers | None = None
        self.nes: dict[int, float] = {}     # backend -> non_empty_since (absent: never, or reset)
        self.upd: dict[int, float] = {}     # backend -> last_updated
        self.wt: dict[int, float] = {}      # backend -> weight
        self.known: set[int] = set()        # the backends present at the last tick

    def attach(self, sc: Scenario, view: peers.ServerView, servers: OrcaServers | None) -> None:
        super().attach(sc, view, servers)
        self.servers = servers

    def usable(self, b: int, t: float) -> float:
        """A58: the weight if past the blackout and not expired, else 0 (expiry resets the blackout)."""
        if b in self.upd and t - self.upd[b] >= WRR_EXPIRATION:
            self.nes.pop(b, None)
            return 0.0
        if b not in self.nes or t - self.nes[b] < WRR_BLACKOUT:
            return 0.0
        return self.wt[b]

    def tick(self, present: list[int], delta: Any, now: float) -> list[float]:
        assert self.servers is not None
        for b in present:
            if b not in self.known:         # a new endpoint (or one back): A58 starts it afresh
                for d in (self.nes, self.upd, self.wt):
                    d.pop(b, None)
        self.known = set(present)
        answered = np.asarray(delta.req_timed)
        for b in present:
            if answered[b] <= 0:            # no response this tick: no report from it
                continue
            rep = self.servers.report(b, now)
            w = 0.0 if rep is None else peers.wrr_weight(rep[0], rep[1], rep[2], WRR_ERROR_PENALTY)
            if w <= 0:                      # A58: a report without qps or utilization is ignored
                continue
            self.nes.setdefault(b, now)
            self.wt[b], self.upd[b] = w, now
        eff = peers.wrr_effective({b: self.usable(b, now) for b in present})
        return [eff[b] for b in present]


def penalized(delta: Any, penalty: float = LINKERD_PENALTY) -> Any:
    """The delta with `penalty` seconds more in the latency sum per 5xx response."""
    from ...datapath.telemetry import COUNTER, TelemetryDelta
    c = delta.counters.copy()
    c[:, COUNTER["req_ns_sum"]] += c[:, COUNTER["resp_5xx"]] * np.uint64(round(penalty * 1e9))
    return TelemetryDelta(delta.seconds, c, delta.open_connections, delta.inflight)


class LinkerdPenaltyKernel:
    """The agent's p2c-ewma (its Router, unchanged) on deltas whose 5xx count as the penalty."""

    def __init__(self) -> None:
        from ...agent.routing import Router
        self.router = Router()

    def attach(self, sc: Scenario, view: peers.ServerView, servers: OrcaServers | None) -> None:
        """Nothing to attach: the node's own telemetry is all it reads."""

    def weights(self, config: Any, ids: dict[str, list[int]], delta: Any, now: float) -> dict[str, list[float]]:
        out: dict[str, list[float]] = self.router.weights(config, ids, None if delta is None else penalized(delta),
                                                          now=now)
        return out


Adapter = KernelPeer | LinkerdPenaltyKernel


def make(policy: str) -> Adapter:
    """The adapter a KernelAgent runs for a PEERS_KERNEL name."""
    if policy == "grpc-wrr@kernel":
        return GrpcWrrKernel()
    if policy == "envoy-least-request-weighted@kernel":
        return EnvoyWeightedKernel()
    if policy == "jsq-stale@kernel":
        return JsqStaleKernel()
    if policy == "linkerd-penalty-ewma@kernel":
        return LinkerdPenaltyKernel()
    raise ValueError("not a peer @kernel form: %r" % policy)


policies.ADAPTERS.update({p: (lambda p=p: make(p)) for p in PEERS_KERNEL})   # KernelAgent builds them


def attach(sc: Scenario, agents: list[Any], view: peers.ServerView) -> OrcaServers | None:
    """Give every node's adapter the scenario and the servers' view; returns the servers' ORCA
    recorder the engine must feed (arrivals, responses) when an adapter reads it, else None."""
    adapters = [a.router for a in agents if isinstance(a.router, (KernelPeer, LinkerdPenaltyKernel))]
    servers = OrcaServers(len(sc.backends), view) if any(isinstance(a, GrpcWrrKernel) for a in adapters) else None
    for a in adapters:
        a.attach(sc, view, servers)
    return servers


__all__ = ["PEERS_KERNEL", "EnvoyWeightedKernel", "GrpcWrrKernel", "JsqStaleKernel", "LinkerdPenaltyKernel",
           "OrcaServers", "attach", "envoy_weights", "jsq_weights", "make", "penalized"]
