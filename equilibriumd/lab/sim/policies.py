"""The load balancers compared, in the two ways each can run.

*Proxy* (per request, the way its own proxy runs it, with that proxy's local
information: its own in-flight counts and its own response times, instantly):

* `random` — uniform per request.
* `round-robin` — strict rotation (each node starts at a random offset).
* `least-connections` — fewest in-flight requests, ties at random
  (HAProxy `leastconn`, NGINX `least_conn`).
* `p2c-least-request` — Envoy's default LEAST_REQUEST: two hosts drawn at
  random (with replacement, `choice_count` 2), the one with fewer active
  requests wins (the first on a tie).
* `p2c-ewma` — Linkerd: two *distinct* endpoints at random, the lower
  PeakEWMA cost wins, cost = RTT estimate x (pending + 1); the estimate starts
  at 30 ms, a sample above it replaces it (peak), otherwise it decays toward
  the sample — and toward 0 when the load is queried — with
  w = exp(-elapsed / 10 s), as tower's `PeakEwma` does. Every response is a
  sample, 5xx included (which is why a fast-failing endpoint attracts traffic).

*Kernel* (`NAME@kernel`, and `equilibrium`, `equilibrium-tolls`, and
`equilibrium@weighted`: the equilibrium policy with `balance: weighted`, to
show what the kernel's two-choice draw adds to the weights): the agent's
`Router` (equilibriumd.agent.routing) — the very code the agent runs —
gets a `TelemetryDelta` built from the node's simulated counters every tick
and returns weights; `datapath.slots.build_table` turns them into the
1,024-slot table and every connection takes a uniformly random slot, or,
where the policy's default `balance` is `p2c` (config.balance_of: all but
random and round-robin), two slots and the less loaded per slot, as the
kernel does (see engine).
`p2c-least-request@kernel` is not an agent policy: it is the P2C choice
distribution over the tick's in-flight counts (`baselines.p2c_probabilities`
on `routing.signals(...).inflight`) as weights, drawn once, for comparison.

`equilibrium@no-rebalance` (pooled scenarios only: elsewhere it is
`equilibrium`): the equilibrium policy with rebalancing off, to show what
closing idle connections adds when clients keep their connections.

Scenarios with callers (`overload`, `flood`; sim.admission): `equilibrium`
also sheds (policy.shedding) and defends (policy.defence) at admission;
`equilibrium@no-admission` is the same agent without that layer and
`equilibrium@cooperation` has the agent's cooperation game as its only one
(`ADMISSION`, asked for by name). No other policy has an admission layer.

The strongest published peers (issue 16: `prequal`, `c3` (and `c3-ranking`, its ranking
alone), `envoy-least-request`, `envoy-least-request-weighted`, `grpc-wrr`,
`linkerd-penalty-ewma`, `jsq-stale`;
`PEERS`, asked for by name) are per-request policies in sim.peers, with a read-only
view of the servers' state (engine.simulate gives it to them). Their `@kernel` forms
where they run on weights (`PEERS_KERNEL`: grpc-wrr, envoy-least-request-weighted,
jsq-stale, linkerd-penalty-ewma) are sim-only adapters in sim.peers_kernel.

`oracle` (join the backend with the earliest expected completion, with full
and instant knowledge of every queue, every backend's state and every node's
traffic) is in the engine, which owns the queues.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np

PROXY = ("random", "round-robin", "least-connections", "p2c-least-request", "p2c-ewma")
KERNEL = tuple(p + "@kernel" for p in PROXY) + ("equilibrium", "equilibrium-tolls", "equilibrium@weighted")
ALL = PROXY + KERNEL + ("oracle",)
#: kernel variants that only make a difference with pools (the benchmark runs them in pooled scenarios only)
POOL_ONLY = ("equilibrium@no-rebalance",)
#: the equilibrium agents following a simulated correlated-equilibrium coordinator (sim.coordinated);
#: not in ALL, so the benchmark's default set is unchanged
COORDINATED = ("equilibrium-coordinated",)
#: the equilibrium policy without per-caller admission, and with the agent's cooperation game as its
#: only admission (scenarios with callers, sim.admission: `equilibrium` sheds and defends there);
#: not in ALL, asked for by name
ADMISSION = ("equilibrium@no-admission", "equilibrium@cooperation")
#: the strongest published peers (issue 16; sim.peers): per-request policies with server-side views,
#: not in ALL, asked for by name. `c3-ranking` is C3 without its rate control: the stronger of the two
#: in these scenarios (few clients, each with a large share of a server), so it is compared too
PEERS = ("envoy-least-request", "envoy-least-request-weighted", "linkerd-penalty-ewma", "jsq-stale",
         "prequal", "c3", "c3-ranking", "grpc-wrr")
#: the peers' @kernel forms (issue 16; sim.peers_kernel): sim-only adapters computing weights per tick,
#: not agent policies; not in ALL, asked for by name (and by the routing benchmark's --suite peers)
PEERS_KERNEL = ("grpc-wrr@kernel", "envoy-least-request-weighted@kernel", "jsq-stale@kernel",
                "linkerd-penalty-ewma@kernel")
#: PEERS_KERNEL name -> a factory of its adapter; sim.peers_kernel registers them when imported (the engine
#: imports it): this module cannot import it, which imports this one
ADAPTERS: dict[str, Any] = {}
#: kernel variants whose agent never closes pooled connections (rebalance: off)
NO_REBALANCE = frozenset(POOL_ONLY)

#: kernel variants -> the agent's policy name (None: our own adapter)
AGENT_POLICY = {"random@kernel": "random", "round-robin@kernel": "round-robin",
                "least-connections@kernel": "least-connections", "p2c-ewma@kernel": "p2c-ewma",
                "p2c-least-request@kernel": None, "equilibrium": "equilibrium",
                "equilibrium-tolls": "equilibrium-tolls", "equilibrium@weighted": "equilibrium",
                "equilibrium@no-rebalance": "equilibrium", "equilibrium-coordinated": "equilibrium",
                "equilibrium@no-admission": "equilibrium", "equilibrium@cooperation": "equilibrium"}
#: kernel variants run with a balance other than their policy's default
BALANCE = {"equilibrium@weighted": "weighted"}
# the peers' @kernel forms: linkerd's runs the agent's p2c-ewma (and its two-choice draw); the others are
# adapters, drawn weighted (gRPC, JSQ: no second choice) or two-choice (Envoy's least request)
AGENT_POLICY.update({"grpc-wrr@kernel": None, "envoy-least-request-weighted@kernel": None,
                     "jsq-stale@kernel": None, "linkerd-penalty-ewma@kernel": "p2c-ewma"})
BALANCE.update({"grpc-wrr@kernel": "weighted", "envoy-least-request-weighted@kernel": "p2c",
                "jsq-stale@kernel": "weighted"})

LINKERD_DEFAULT_RTT = 0.030
LINKERD_DECAY = 10.0


def kind(policy: str) -> str:
    if policy == "oracle":
        return "oracle"
    if policy in PROXY or policy in PEERS:
        return "request"
    if policy in KERNEL or policy in POOL_ONLY or policy in COORDINATED or policy in ADMISSION \
            or policy in PEERS_KERNEL:
        return "kernel"
    raise ValueError("unknown policy %r; known: %s"
                     % (policy, ", ".join(ALL + POOL_ONLY + COORDINATED + ADMISSION + PEERS + PEERS_KERNEL)))


class Proxy:
    """Per-request decisions with per-node local state."""

    def __init__(self, policy: str, n: int, nodes: int, rng: np.random.Generator) -> None:
        self.policy = policy
        self.ptr = [int(x) for x in rng.integers(0, 1 << 30, size=nodes)]
        self.rtt = [[LINKERD_DEFAULT_RTT] * n for _ in range(nodes)]
        self.upd = [[0.0] * n for _ in range(nodes)]
        self.choose = {"random": self._random, "round-robin": self._rr, "least-connections": self._lc,
                       "p2c-least-request": self._p2c_lr, "p2c-ewma": self._p2c_ewma}[policy]

    # each: (node, t, candidates, node's in-flight per backend, two uniforms) -> backend
    def _random(self, node: int, t: float, cand: list[int], infl: list[int], r1: float, r2: float) -> int:
        return cand[int(r1 * len(cand))]

    def _rr(self, node: int, t: float, cand: list[int], infl: list[int], r1: float, r2: float) -> int:
        self.ptr[node] += 1
        return cand[self.ptr[node] % len(cand)]

    def _lc(self, node: int, t: float, cand: list[int], infl: list[int], r1: float, r2: float) -> int:
        low = min(infl[b] for b in cand)
        best = [b for b in cand if infl[b] == low]
        return best[int(r1 * len(best))]

    def _p2c_lr(self, node: int, t: float, cand: list[int], infl: list[int], r1: float, r2: float) -> int:
        n = len(cand)
        a, b = cand[int(r1 * n)], cand[int(r2 * n)]
        return b if infl[b] < infl[a] else a

    def _load(self, node: int, b: int, t: float, infl: list[int]) -> float:
        rtt, upd = self.rtt[node], self.upd[node]
        el = t - upd[b]
        if el > 0:  # tower: the estimate decays toward 0 whenever the load is read
            rtt[b] *= math.exp(-el / LINKERD_DECAY)
            upd[b] = t
        return rtt[b] * (infl[b] + 1)

    def _p2c_ewma(self, node: int, t: float, cand: list[int], infl: list[int], r1: float, r2: float) -> int:
        n = len(cand)
        if n == 1:
            return cand[0]
        i = int(r1 * n)
        j = int(r2 * (n - 1))
        if j >= i:
            j += 1
        a, b = cand[i], cand[j]
        return a if self._load(node, a, t, infl) <= self._load(node, b, t, infl) else b

    def done(self, node: int, b: int, t: float, latency: float, error: bool = False) -> None:
        """A response reached this node's proxy (only PeakEWMA learns from it; 5xx or not)."""
        if self.policy != "p2c-ewma":
            return
        rtt, upd = self.rtt[node], self.upd[node]
        if latency > rtt[b]:
            rtt[b] = latency
        else:
            w = math.exp(-max(t - upd[b], 0.0) / LINKERD_DECAY)
            rtt[b] = rtt[b] * w + latency * (1.0 - w)
        upd[b] = t

    def joined(self, node: int, b: int, t: float) -> None:
        """A new endpoint: fresh estimate (30 ms default)."""
        self.rtt[node][b] = LINKERD_DEFAULT_RTT
        self.upd[node][b] = t


@lru_cache(maxsize=64)
def agent_config(policy: str, present: tuple[int, ...], tick: float) -> Any:
    """The standalone config an agent would run for one service with these backends."""
    from ...config import parse
    bes = "".join("      - address: 127.0.%d.%d:8080\n" % (1 + b // 200, 10 + b % 200) for b in present)
    text = ("tick: %gs\npolicy: %s\nservices:\n  - name: sim\n    frontend: 127.77.0.1:80\n"
            "    backends:\n%s" % (tick, policy, bes))
    return parse(text, "<sim>")


class _P2cLeastRequestKernel:
    """Weights = the P2C choice distribution over last tick's in-flight counts."""

    def weights(self, config: Any, ids: dict[str, list[int]], delta: Any, now: float) -> dict[str, list[float]]:
        from ...agent.routing import signals
        from ...policy import baselines
        sig = signals(delta, ids["sim"])
        return {"sim": [float(x) for x in baselines.p2c_probabilities(sig.inflight)]}


class KernelAgent:
    """One node's agent: telemetry delta -> Router (the agent's code) -> slot table."""

    def __init__(self, policy: str, tick: float) -> None:
        from ...agent.routing import Router
        self.policy = policy
        self.agent_policy = AGENT_POLICY[policy]
        self.tick_s = tick
        if policy in PEERS_KERNEL:          # the peers' @kernel forms: sim-only adapters (sim.peers_kernel)
            if policy not in ADAPTERS:
                raise RuntimeError("%s: import equilibriumd.lab.sim.peers_kernel first (the engine does)" % policy)
            self.router: Any = ADAPTERS[policy]()
        else:
            self.router = Router() if self.agent_policy is not None else _P2cLeastRequestKernel()
        #: how the kernel picks from this policy's weights (the config's default for it)
        cfg = agent_config(self.agent_policy or "round-robin", (0,), tick)
        self.balance: str = BALANCE.get(policy) or cfg.balance_of(cfg.services[0])
        #: whether the kernel's first draw sweeps the table (SVC_SWEEP; all but `random`)
        self.sweep: bool = cfg.sweep_of(cfg.services[0])

    def weights(self, present: tuple[int, ...], delta: Any, now: float) -> list[float]:
        cfg = agent_config(self.agent_policy or "round-robin", present, self.tick_s)
        out = self.router.weights(cfg, {"sim": list(present)}, delta, now=now)
        return out["sim"]


def make_delta(seconds: float, sent: list[float], answered: list[float], errors5xx: list[float],
               lat_sum: list[float], inflight: list[int], open_conns: list[int] | None = None,
               connects: list[float] | None = None) -> Any:
    """A TelemetryDelta as the kernel would report it: requests sent this tick,
    responses (2xx / 5xx) and their summed time to first byte this tick, and
    the in-flight gauge (requests seen minus answered). Without pools one
    request per connection, so connects = requests and open connections = in
    flight; with pools, `connects` (this tick) and `open_conns` (now) are the
    pools' own."""
    from ...datapath.structs import BE_TEL_COUNTERS
    from ...datapath.telemetry import COUNTER, TelemetryDelta
    n = len(sent)
    c = np.zeros((n, len(BE_TEL_COUNTERS)), dtype=np.uint64)
    ans = np.asarray(answered, dtype=np.float64)
    e5 = np.asarray(errors5xx, dtype=np.float64)
    c[:, COUNTER["requests"]] = np.asarray(sent, dtype=np.float64).astype(np.uint64)
    c[:, COUNTER["resp_5xx"]] = e5.astype(np.uint64)
    c[:, COUNTER["resp_2xx"]] = (ans - e5).astype(np.uint64)
    conn = c[:, COUNTER["requests"]] if connects is None else np.asarray(connects, dtype=np.float64).astype(np.uint64)
    c[:, COUNTER["attempts"]] = conn
    c[:, COUNTER["established"]] = conn
    c[:, COUNTER["req_ns_sum"]] = np.round(np.asarray(lat_sum) * 1e9).astype(np.uint64)
    infl = np.asarray(inflight, dtype=np.int64)   # every answer's time to first byte is in req_ns_sum
    open_ = infl.copy() if open_conns is None else np.asarray(open_conns, dtype=np.int64)
    return TelemetryDelta(seconds, c, open_, infl)
