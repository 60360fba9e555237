"""The strongest published load balancers (issue 16), as per-request policies in the simulator.

Each is written from its published description with its published defaults (every
parameter below names its source). They are `request` policies (policies.PEERS), asked
for by name only (not in policies.ALL, the benchmark's default set):

* `envoy-least-request` — Envoy LEAST_REQUEST with equal weights: `choice_count` (2) hosts
  drawn at random with replacement, the fewest active requests wins (the first on a tie).
  The same rule as `p2c-least-request`, under Envoy's name.
* `envoy-least-request-weighted` — Envoy LEAST_REQUEST with unequal weights: an EDF
  (earliest deadline first) schedule whose host weights are recomputed when a host is
  picked and re-added: weight / (active + 1)^active_request_bias, bias 1.0. The static
  weight of a backend is its nominal capacity (servers / mean service time; 1 for an
  unlimited one): what an operator sizing weights by capacity would configure. With equal
  weights Envoy uses the P2C path instead (`choice_count` 2), and so does this policy.
* `linkerd-penalty-ewma` — Linkerd's Load Biaser (`PenaltyPeakEwma`, 2026,
  `balancer.alpha.linkerd.io/penalize-failures`): PeakEWMA exactly as `p2c-ewma` (decay
  10 s, default RTT 30 ms), except that a failed response (5xx, 429) counts with the
  penalty latency (default 5 s) instead of its own when that is lower.
* `jsq-stale` — join the shortest queue (global requests in flight at the backend, over
  all nodes) read from a snapshot refreshed every `JSQ_PERIOD` seconds and shared by all
  nodes, ties at random: the herding calibration beside the instant `oracle`.
* `prequal` — Prequal (Wydrowski, Kleinberg, Rumble, NSDI 2024): asynchronous probes fill
  a per-client pool; hot/cold lexicographic selection on requests in flight (RIF) and
  the server's latency estimate at that RIF.
* `c3` — C3 (Suresh et al., NSDI 2015): replica ranking by the cubic queue-size estimate and
  per-server cubic rate control with a backlog at the client (see `C3`; in pooled scenarios,
  ranking only). `c3-ranking` is the ranking alone: the rate control is built for many
  clients each a small part of a server's load (scenario `c3-paper`), and costs latency
  where a node sends a server hundreds of requests a second.
* `grpc-wrr` — gRPC client-side weighted round robin (gRFC A58) with per-request ORCA
  load reports: weight = qps / (utilization + eps / qps x error_utilization_penalty),
  blackout, expiration, periodic weight updates and an EDF scheduler.

Server-side state. A Proxy only knows its node's own in-flight counts; Prequal's probes,
C3's piggybacked queue sizes, gRPC's ORCA reports and the stale JSQ snapshot read the
backend's state through `Peer.server(b, t)` (engine.simulate installs it: `ServerState`,
read-only, the state at time t).

@kernel forms: sim.peers_kernel (`grpc-wrr@kernel`, `envoy-least-request-weighted@kernel`,
`jsq-stale@kernel`, `linkerd-penalty-ewma@kernel`: weights once per tick, the kernel's draw);
prequal and c3 (c3-ranking) decide per request on per-request state and have no weight form.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from . import policies
from .scenarios import Scenario

# --- Envoy LEAST_REQUEST (docs: "Weighted least request", envoy.extensions.load_balancing_policies.
# least_request.v3.LeastRequest) -------------------------------------------------------------------
#: choice_count: hosts drawn per pick on the equal-weights (P2C) path; Envoy's default 2
ENVOY_CHOICE_COUNT = 2
#: active_request_bias: effective weight = weight / (active + 1)^bias on the weighted (EDF) path;
#: Envoy's default 1.0
ENVOY_ACTIVE_REQUEST_BIAS = 1.0

# --- Linkerd Load Biaser (linkerd.io docs "Handling Rate-Limited Endpoints", 2026;
# linkerd2-proxy PR 4537, linkerd2 PR 15374) -------------------------------------------------------
#: balancer.alpha.linkerd.io/load-biaser-penalty: the latency substituted for a failed response
#: (429, 503, other 5xx) unless its own is higher; documented default 5 s. (The proxy's crate also
#: has a separate penalty-decay EWMA in its review thread; the documented behaviour, a substituted
#: latency in the PeakEWMA, is what is modelled. Retry-After is not modelled: no backend sends it.)
LINKERD_PENALTY = 5.0
#: PeakEWMA's decay and default RTT: the same as `p2c-ewma` (tower PeakEwma, Linkerd defaults)
LINKERD_DECAY = policies.LINKERD_DECAY
LINKERD_DEFAULT_RTT = policies.LINKERD_DEFAULT_RTT

# --- join-the-shortest-queue on stale information -----------------------------------------------------
#: snapshot refresh period: the agent's tick (Scenario.tick, 0.5 s by default), so that JSQ-stale
#: has exactly as old a view as Equilibrium's agents (the herding calibration)
JSQ_PERIOD = 0.5

# --- Prequal (NSDI 2024, sections 3-4) ------------------------------------------------------------------
#: r_probe: probes sent per query (the paper's testbed setting, 3)
PREQUAL_PROBES = 3
#: max pool size m (paper: 16)
PREQUAL_POOL = 16
#: probe age limit: a probe older than this is dropped (paper: 1 s)
PREQUAL_MAX_AGE = 1.0
#: b_reuse: times a probe may be used before it leaves the pool. The paper derives it from the probe
#: rate and the pool size ("a few"); not verified here, 2 chosen: with 3 probes per query the pool is
#: refilled faster than it is used, so the value rarely binds
PREQUAL_REUSE = 2
#: Q_RIF: a probe is hot when its RIF is above this quantile of the pool's RIFs (paper: 0.84)
PREQUAL_Q_RIF = 0.84
#: the server's latency estimate at a RIF: the median of the latencies of its last this-many
#: queries that arrived at that RIF (the paper keeps recent latencies per RIF; window size ours)
PREQUAL_LAT_WINDOW = 16
#: (kept however old: a server that gets no queries keeps its estimate. Expiring samples after 1 s
#: was tried: an expired server then looks unknown (0.0) and draws a burst, p99 x1.3-7 in
#: heterogeneous and slow-backend; keeping them can starve a server, which costs no latency here)

# --- C3 (NSDI 2015, section 3; the authors' simulator `absim` (simulations/client.py) and their Cassandra
# patch `cassandra-c3` (c3/ScoreTracker.java, c3/RateController.java), read for the details the paper
# leaves open) -----------------------------------------------------------------------------------------
#: EWMA of response time R, service time 1/mu and queue size q: x <- a * sample + (1 - a) * x, a = 0.9
#: (the paper's alpha; both of the authors' implementations weigh the new sample by it)
C3_ALPHA = 0.9
#: the cubic exponent b of the queue-size estimate (paper: 3)
C3_EXPONENT = 3
#: delta: the rate interval. Sending rates are tokens per delta; receive rates are counted per delta
#: (absim's experiments: 20 ms)
C3_RATE_INTERVAL = 0.020
#: gamma: the cubic's scaling factor, tokens per delta per ms^3 (absim and cassandra-c3: 4e-6)
C3_GAMMA = 4e-6
#: beta: on a decrease R0 <- srate, srate <- beta x srate; the cubic then starts from (1 - beta) R0
#: (absim and cassandra-c3: 0.2)
C3_BETA = 0.2
#: s_max: the most one increase adds, tokens per delta (absim and cassandra-c3: 10)
C3_SMAX = 10.0
#: hysteresis: no decrease within this many deltas of the last increase (absim: 2; cassandra-c3: 4)
C3_HYSTERESIS = 2
#: the token bucket's depth, and every sending rate's start (R0 too), tokens per delta (absim: 10)
C3_TOKENS = 10.0
#: the receive rate: at each delta boundary rrate <- 0.1 x responses in the interval + 0.9 x rrate,
#: from 0 (absim's ReceiveRate)
C3_RECEIVE_ALPHA = 0.1
#: the floor of a decreased sending rate, tokens per delta (absim: 0.01)
C3_MIN_RATE = 0.01

# --- gRPC weighted round robin (gRFC A58) ----------------------------------------------------------
#: error_utilization_penalty (A58 default 1.0)
WRR_ERROR_PENALTY = 1.0
#: blackout_period: a backend's weight counts only this long after its first non-zero report (10 s)
WRR_BLACKOUT = 10.0
#: weight_expiration_period: a weight not refreshed this long is dropped (3 min)
WRR_EXPIRATION = 180.0
#: weight_update_period: the scheduler is rebuilt with new weights this often (1 s; A58 also rebuilds
#: it when the set of endpoints changes)
WRR_UPDATE = 1.0
#: the server's ORCA metrics window: qps, eps and utilization are averages over the last complete
#: window of this length (the server's metrics recorder; ORCA leaves the window to the server)
WRR_REPORT_WINDOW = 1.0


class ServerState(NamedTuple):
    """A backend's state at time t, as the server itself would report it."""
    rif: int            #: requests in flight at the backend, from every node (queued, in service, in delay)
    waiting: int        #: requests queued for a server (not yet in service)
    busy: float         #: fraction of its servers busy now (0.0 for an unlimited backend)
    service: float      #: its current mean service time (cold factor included), seconds


ServerView = Callable[[int, float], ServerState]

#: choose's answer when no server may be sent to now (C3's rate limits): the request waits at its node
HOLD = -1

PEERS = policies.PEERS


def _no_view(b: int, t: float) -> ServerState:
    raise RuntimeError("server view not attached (engine.simulate attaches it)")


class Peer:
    """A per-request policy with per-node state and, where it needs one, a view of the servers."""

    #: whether choose may return HOLD: the request then waits at its node until `wake` (C3's backlog)
    holds = False

    def __init__(self, nb: int, nodes: int, rng: np.random.Generator) -> None:
        self.nb, self.nodes = nb, nodes
        self.rng = random.Random(int(rng.integers(0, 1 << 62)))
        self.server: ServerView = _no_view

    def attach(self, view: ServerView) -> None:
        self.server = view

    def choose(self, node: int, t: float, cand: list[int], infl: list[int], r1: float, r2: float) -> int:
        raise NotImplementedError

    def wake(self, node: int, t: float, cand: list[int]) -> float:
        """After a HOLD at t: when to ask again (policies that hold only)."""
        raise NotImplementedError

    def done(self, node: int, b: int, t: float, latency: float, error: bool = False) -> None:
        """A response reached `node` at t (latency from the request's send, 5xx or not)."""

    def joined(self, node: int, b: int, t: float) -> None:
        """Backend b joined the service."""


# --- Envoy ----------------------------------------------------------------------------------------------

class EnvoyLeastRequest(Peer):
    """Equal weights: P2C on the node's active requests (with replacement, the first on a tie)."""

    def choose(self, node: int, t: float, cand: list[int], infl: list[int], r1: float, r2: float) -> int:
        n = len(cand)
        a, b = cand[int(r1 * n)], cand[int(r2 * n)]
        return b if infl[b] < infl[a] else a


class EnvoyWeighted(Peer):
    """Unequal weights: EDF over weight / (active + 1)^bias, recomputed for the picked host."""

    def __init__(self, nb: int, nodes: int, rng: np.random.Generator, weights: list[float]) -> None:
        super().__init__(nb, nodes, rng)
        self.w = weights
        self.dl: list[dict[int, float]] = [{} for _ in range(nodes)]   # per node: backend -> deadline
        self.now = [0.0] * nodes                                        # per node: the scheduler's clock

    def _eff(self, b: int, active: int) -> float:
        return self.w[b] / (active + 1) ** ENVOY_ACTIVE_REQUEST_BIAS

    def choose(self, node: int, t: float, cand: list[int], infl: list[int], r1: float, r2: float) -> int:
        if len({self.w[b] for b in cand}) <= 1:     # Envoy: all weights equal -> the P2C path
            n = len(cand)
            a, c = cand[int(r1 * n)], cand[int(r2 * n)]
            return c if infl[c] < infl[a] else a
        dl = self.dl[node]
        for b in list(dl):
            if b not in cand:
                del dl[b]
        for b in cand:                              # a host added to the scheduler: now + 1 / weight
            if b not in dl:
                dl[b] = self.now[node] + 1.0 / self._eff(b, infl[b])
        b = min(cand, key=lambda x: (dl[x], x))     # earliest deadline, then the lower index
        self.now[node] = dl[b]
        dl[b] += 1.0 / self._eff(b, infl[b])        # re-added with its weight at pick time
        return b


# --- Linkerd ----------------------------------------------------------------------------------------------

class LinkerdPenaltyEwma(Peer):
    """p2c-ewma (policies.Proxy, the same code) with failed responses' latency raised to the penalty."""

    def __init__(self, nb: int, nodes: int, rng: np.random.Generator) -> None:
        super().__init__(nb, nodes, rng)
        self.inner = policies.Proxy("p2c-ewma", nb, nodes, rng)

    def choose(self, node: int, t: float, cand: list[int], infl: list[int], r1: float, r2: float) -> int:
        return self.inner.choose(node, t, cand, infl, r1, r2)

    def done(self, node: int, b: int, t: float, latency: float, error: bool = False) -> None:
        self.inner.done(node, b, t, max(latency, LINKERD_PENALTY) if error else latency)

    def joined(self, node: int, b: int, t: float) -> None:
        self.inner.joined(node, b, t)


# --- JSQ on a stale snapshot -------------------------------------------------------------------------------

class JsqStale(Peer):
    """The fewest global in-flight requests in a snapshot taken every `period` (shared by all nodes)."""

    def __init__(self, nb: int, nodes: int, rng: np.random.Generator, period: float = JSQ_PERIOD) -> None:
        super().__init__(nb, nodes, rng)
        self.period = period
        self.snap = [0] * nb
        self.next = 0.0

    def choose(self, node: int, t: float, cand: list[int], infl: list[int], r1: float, r2: float) -> int:
        if t >= self.next:      # refreshed at the first decision of each period (the state then)
            self.snap = [self.server(b, t).rif for b in range(self.nb)]
            self.next = (math.floor(t / self.period) + 1) * self.period
        low = min(self.snap[b] for b in cand)
        best = [b for b in cand if self.snap[b] == low]
        return best[int(r1 * len(best))]


# --- Prequal ----------------------------------------------------------------------------------------------

@dataclass
class Probe:
    backend: int
    rif: int
    latency: float
    at: float
    uses: int = 0


def quantile(xs: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of a non-empty list."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def hcl(pool: list[Probe], thr: float | None = None) -> Probe:
    """Prequal's hot-cold lexicographic rule over a non-empty pool: hot = RIF above `thr`,
    by default the Q_RIF quantile of the pool's RIFs; the cold probe with the lowest
    latency, else (all hot) the lowest RIF; ties: the oldest probe first (pool order).
    With the pool's own quantile the probe of lowest RIF is always cold, so the all-hot
    branch only runs with a threshold given from elsewhere."""
    if thr is None:
        thr = quantile([float(p.rif) for p in pool], PREQUAL_Q_RIF)
    cold = [p for p in pool if p.rif <= thr]
    if cold:
        return min(cold, key=lambda p: p.latency)
    return min(pool, key=lambda p: p.rif)


class Prequal(Peer):
    """Per-node probe pools; per-backend latency-by-RIF estimates kept server-side."""

    def __init__(self, nb: int, nodes: int, rng: np.random.Generator) -> None:
        super().__init__(nb, nodes, rng)
        self.pools: list[list[Probe]] = [[] for _ in range(nodes)]
        #: server side: per backend, RIF at arrival -> its recent latencies
        self.lat: list[dict[int, deque[float]]] = [{} for _ in range(nb)]
        #: requests in flight: (backend, send time in ns) -> RIF at their arrival (FIFO per key)
        self.sent: dict[tuple[int, int], list[int]] = {}

    def estimate(self, b: int, rif: int) -> float:
        """The server's latency estimate at this RIF: the median of its bucket, else of the
        nearest RIF with samples (0.0 when it has none yet: an unknown server is tried)."""
        buckets = self.lat[b]
        if not buckets:
            return 0.0
        if rif not in buckets:
            rif = min(buckets, key=lambda r: (abs(r - rif), r))
        xs = sorted(buckets[rif])
        m = len(xs)
        return xs[m // 2] if m % 2 else 0.5 * (xs[m // 2 - 1] + xs[m // 2])

    def probe(self, b: int, t: float) -> Probe:
        st = self.server(b, t)
        return Probe(b, st.rif, self.estimate(b, st.rif), t)

    def choose(self, node: int, t: float, cand: list[int], infl: list[int], r1: float, r2: float) -> int:
        pool = self.pools[node]
        ok = set(cand)
        pool[:] = [p for p in pool if t - p.at <= PREQUAL_MAX_AGE and p.backend in ok]
        if pool:
            p = hcl(pool)
            b = p.backend
            p.uses += 1
            if p.uses >= PREQUAL_REUSE:
                pool.remove(p)
        else:
            b = cand[int(r1 * len(cand))]   # nothing probed yet: at random
        # this query's probes: asynchronous, they serve later queries (the state at t)
        k = min(PREQUAL_PROBES, len(cand))
        for x in self.rng.sample(cand, k):
            pool.append(self.probe(x, t))
        if len(pool) > PREQUAL_POOL:
            del pool[:len(pool) - PREQUAL_POOL]    # the oldest leave first
        self.sent.setdefault((b, round(t * 1e9)), []).append(self.server(b, t).rif)
        return b

    def done(self, node: int, b: int, t: float, latency: float, error: bool = False) -> None:
        key = (b, round((t - latency) * 1e9))
        rifs = self.sent.get(key)
        if rifs is None:                    # float rounding at the ns boundary
            for d in (-1, 1):
                k2 = (b, key[1] + d)
                if k2 in self.sent:
                    key, rifs = k2, self.sent[k2]
                    break
        if rifs is None:
            return
        rif = rifs.pop(0)
        if not rifs:
            del self.sent[key]
        q = self.lat[b].get(rif)
        if q is None:
            q = self.lat[b][rif] = deque(maxlen=PREQUAL_LAT_WINDOW)
        q.append(latency)


# --- C3 --------------------------------------------------------------------------------------------------

class C3(Peer):
    """Replica ranking and per-server rate control, one client per node.

    Ranking: score = R - 1/mu + q_hat^3 / mu, q_hat = 1 + os * w + q, where R (response time),
    1/mu (service time) and q (queue size) are per-node EWMAs, fed by what the server piggybacks
    on every response (here: its queue and its current mean service time when the response
    leaves); os is the node's own outstanding requests to the server and w the number of clients
    (nodes). A server not heard from yet scores 0 (absim), so it is tried first.

    Rate control (`rate_control`): each node sends to each server through a token bucket whose
    rate (srate, tokens per delta) follows a cubic: while srate is below the server's receive rate
    (responses per delta, smoothed), srate <- gamma (dT - cbrt(beta R0 / gamma))^3 + R0 (dT: ms
    since the last decrease, R0 the rate before it), by at most s_max per step; when srate is above
    it, and the last increase is over the hysteresis old, R0 <- srate and srate <- beta srate. Rates
    change on every response. A request goes to the best-ranked server with a token; when none has
    one, it waits in its node's backlog (`holds`: choose returns HOLD and the engine asks `wake`
    when a token comes) and is sent, in order, when a token comes: the latency counts the wait."""

    def __init__(self, nb: int, nodes: int, rng: np.random.Generator, rate_control: bool = True) -> None:
        super().__init__(nb, nodes, rng)
        self.holds = rate_control
        self.R = [[0.0] * nb for _ in range(nodes)]
        self.S = [[0.0] * nb for _ in range(nodes)]
        self.Q = [[0.0] * nb for _ in range(nodes)]
        self.seen = [[False] * nb for _ in range(nodes)]
        # rate control, per node and server: the bucket, the cubic's state, the receive rate
        self.srate = [[C3_TOKENS] * nb for _ in range(nodes)]
        self.tokens = [[C3_TOKENS] * nb for _ in range(nodes)]
        self.last_sent = [[0.0] * nb for _ in range(nodes)]
        self.r0 = [[C3_TOKENS] * nb for _ in range(nodes)]
        self.t_dec = [[0.0] * nb for _ in range(nodes)]
        self.t_inc = [[0.0] * nb for _ in range(nodes)]
        self.rrate = [[0.0] * nb for _ in range(nodes)]
        self.rcount = [[0] * nb for _ in range(nodes)]
        self.rslot = [[0] * nb for _ in range(nodes)]

    def score(self, node: int, b: int, outstanding: int) -> float:
        if not self.seen[node][b]:
            return 0.0
        R, S, Q = self.R[node][b], self.S[node][b], self.Q[node][b]
        qh = 1.0 + outstanding * self.nodes + Q
        return R - S + qh ** C3_EXPONENT * S

    def tokens_at(self, node: int, b: int, t: float) -> float:
        return min(C3_TOKENS, self.tokens[node][b]
                   + self.srate[node][b] * (t - self.last_sent[node][b]) / C3_RATE_INTERVAL)

    def choose(self, node: int, t: float, cand: list[int], infl: list[int], r1: float, r2: float) -> int:
        sc = [self.score(node, b, infl[b]) for b in cand]
        low = min(sc)
        best = [b for b, s in zip(cand, sc) if s <= low + 1e-12]
        first = best[int(r1 * len(best))]           # ties at random
        if not self.holds:
            return first
        order = [first] + [b for _, b in sorted(zip(sc, cand)) if b != first]
        for b in order:                             # the best-ranked server with a token
            tok = self.tokens_at(node, b, t)
            if tok >= 1.0 - 1e-9:
                self.tokens[node][b], self.last_sent[node][b] = max(0.0, tok - 1.0), t
                return b
        return HOLD

    def wake(self, node: int, t: float, cand: list[int]) -> float:
        """When the first of `cand`'s buckets has a token again (at the current rates)."""
        wait = min((1.0 - self.tokens_at(node, b, t)) * C3_RATE_INTERVAL / self.srate[node][b] for b in cand)
        return t + max(wait, 0.0)

    def receive_rate(self, node: int, b: int, t: float) -> float:
        """The smoothed responses per delta, its intervals closed up to t (delta boundaries from t = 0)."""
        slot = int(t / C3_RATE_INTERVAL)
        gone = slot - self.rslot[node][b]
        if gone > 0:
            a = C3_RECEIVE_ALPHA
            r = a * self.rcount[node][b] + (1 - a) * self.rrate[node][b]
            self.rrate[node][b] = r * (1 - a) ** (gone - 1)     # the intervals since, with no response
            self.rcount[node][b], self.rslot[node][b] = 0, slot
        return self.rrate[node][b]

    def update_rate(self, node: int, b: int, t: float) -> None:
        rr = self.receive_rate(node, b, t)
        self.rcount[node][b] += 1
        s = self.srate[node][b]
        if s < rr:
            dt = (t - self.t_dec[node][b]) * 1000.0         # the cubic's time is in ms
            r0 = self.r0[node][b]
            new = C3_GAMMA * (dt - (r0 * C3_BETA / C3_GAMMA) ** (1.0 / 3.0)) ** 3 + r0
            self.srate[node][b] = s + C3_SMAX if new - s > C3_SMAX else new
            self.t_inc[node][b] = t
        elif rr > 0 and s > rr and t - self.t_inc[node][b] > C3_HYSTERESIS * C3_RATE_INTERVAL:
            self.r0[node][b] = s
            self.srate[node][b] = max(s * C3_BETA, C3_MIN_RATE)
            self.t_dec[node][b] = t

    def done(self, node: int, b: int, t: float, latency: float, error: bool = False) -> None:
        st = self.server(b, t)
        if not self.seen[node][b]:          # the first response sets the averages
            self.R[node][b], self.S[node][b], self.Q[node][b] = latency, st.service, float(st.waiting)
            self.seen[node][b] = True
        else:
            a = C3_ALPHA
            self.R[node][b] = a * latency + (1 - a) * self.R[node][b]
            self.S[node][b] = a * st.service + (1 - a) * self.S[node][b]
            self.Q[node][b] = a * st.waiting + (1 - a) * self.Q[node][b]
        if self.holds:
            self.update_rate(node, b, t)

    def joined(self, node: int, b: int, t: float) -> None:
        self.R[node][b] = self.S[node][b] = self.Q[node][b] = 0.0
        self.seen[node][b] = False
        self.srate[node][b] = self.tokens[node][b] = self.r0[node][b] = C3_TOKENS
        self.last_sent[node][b] = self.t_dec[node][b] = self.t_inc[node][b] = t
        self.rrate[node][b], self.rcount[node][b], self.rslot[node][b] = 0.0, 0, int(t / C3_RATE_INTERVAL)


# --- gRPC weighted round robin ---------------------------------------------------------------------------

def wrr_weight(qps: float, eps: float, utilization: float, penalty: float = WRR_ERROR_PENALTY) -> float:
    """A58: qps / (utilization + eps / qps x penalty); 0 (no weight) without qps or utilization."""
    if qps <= 0 or utilization <= 0:
        return 0.0
    return qps / (utilization + eps / qps * penalty)


def wrr_effective(raw: dict[int, float]) -> dict[int, float]:
    """A58: backends without a usable weight get the mean of the others'; with fewer
    than two usable weights every backend weighs the same (round robin)."""
    pos = [w for w in raw.values() if w > 0]
    if len(pos) < 2:
        return {b: 1.0 for b in raw}
    mean = sum(pos) / len(pos)
    return {b: (w if w > 0 else mean) for b, w in raw.items()}


class OrcaServers:
    """The backends' ORCA metrics recorders, server side (one per simulation, shared by the nodes).

    The per-request `grpc-wrr`'s (GrpcWrr) and `grpc-wrr@kernel`'s: per 1 s window each backend counts its
    responses (qps) and 5xx (eps), and samples its busy fraction at every arrival (Poisson
    arrivals see time averages: the window's utilization); its report is the last complete
    window's (qps, eps, utilization)."""

    def __init__(self, nb: int, view: ServerView) -> None:
        self.nb, self.view = nb, view
        self.win_start = 0.0
        self.n_ans = [0] * nb
        self.n_err = [0] * nb
        self.u_sum = [0.0] * nb
        self.u_n = 0
        self.reports: list[tuple[float, float, float] | None] = [None] * nb

    def roll(self, t: float) -> None:
        """Close the window(s) ending by t (a window without arrivals keeps the last reports)."""
        while t >= self.win_start + WRR_REPORT_WINDOW:
            if self.u_n:
                for b in range(self.nb):
                    self.reports[b] = (self.n_ans[b] / WRR_REPORT_WINDOW, self.n_err[b] / WRR_REPORT_WINDOW,
                                       self.u_sum[b] / self.u_n)
            self.n_ans, self.n_err, self.u_sum, self.u_n = [0] * self.nb, [0] * self.nb, [0.0] * self.nb, 0
            self.win_start += WRR_REPORT_WINDOW

    def arrival(self, t: float) -> None:
        self.roll(t)
        for b in range(self.nb):
            self.u_sum[b] += self.view(b, t).busy
        self.u_n += 1

    def done(self, b: int, t: float, error: bool) -> None:
        self.roll(t)
        self.n_ans[b] += 1
        if error:
            self.n_err[b] += 1

    def report(self, b: int, t: float) -> tuple[float, float, float] | None:
        self.roll(t)
        return self.reports[b]


class GrpcWrr(Peer):
    """Servers report (qps, eps, utilization) over their last complete window with every
    response (per-request ORCA); each node keeps A58's per-backend weight state and
    rebuilds its EDF scheduler every `WRR_UPDATE` seconds."""

    def __init__(self, nb: int, nodes: int, rng: np.random.Generator) -> None:
        super().__init__(nb, nodes, rng)
        #: server side: the backends' metrics windows (made at the first request: they read the
        #: server view engine.simulate attaches)
        self.orca: OrcaServers | None = None
        # per node (A58's per-endpoint state): non_empty_since, last_updated, weight
        self.nes = [[-1.0] * nb for _ in range(nodes)]
        self.upd = [[-1.0] * nb for _ in range(nodes)]
        self.wt = [[0.0] * nb for _ in range(nodes)]
        # per node: the EDF scheduler (backend -> deadline, its weights) and its next rebuild
        self.dl: list[dict[int, float]] = [{} for _ in range(nodes)]
        self.sw: list[dict[int, float]] = [{} for _ in range(nodes)]
        self.rebuild_at = [0.0] * nodes

    def on_report(self, node: int, b: int, t: float) -> None:
        """A58 (UpdateWeight): a report with a non-zero weight updates the endpoint's weight, its
        last update and, for the first one since it was reset, non_empty_since; a zero weight
        (no qps or no utilization) is ignored."""
        rep = self.orca.report(b, t) if self.orca is not None else None
        if rep is None:
            return
        w = wrr_weight(*rep)
        if w <= 0:
            return
        if self.nes[node][b] < 0:
            self.nes[node][b] = t
        self.wt[node][b] = w
        self.upd[node][b] = t

    def usable(self, node: int, b: int, t: float) -> float:
        """A58: the weight if past blackout and not expired, else 0 (expiry resets blackout)."""
        if self.upd[node][b] >= 0 and t - self.upd[node][b] >= WRR_EXPIRATION:
            self.nes[node][b] = -1.0
            return 0.0
        if self.nes[node][b] < 0 or t - self.nes[node][b] < WRR_BLACKOUT:
            return 0.0
        return self.wt[node][b]

    def rebuild(self, node: int, t: float, cand: list[int]) -> None:
        w = wrr_effective({b: self.usable(node, b, t) for b in cand})
        self.sw[node] = w
        # a fresh EDF schedule; A58: each deadline starts at a random point of its period (1 / weight)
        self.dl[node] = {b: self.rng.random() / w[b] for b in cand}
        self.rebuild_at[node] = t + WRR_UPDATE

    def choose(self, node: int, t: float, cand: list[int], infl: list[int], r1: float, r2: float) -> int:
        if self.orca is None:
            self.orca = OrcaServers(self.nb, self.server)
        self.orca.arrival(t)
        if t >= self.rebuild_at[node] or set(self.dl[node]) != set(cand):
            self.rebuild(node, t, cand)
        dl, w = self.dl[node], self.sw[node]
        b = min(cand, key=lambda x: (dl[x], x))
        dl[b] += 1.0 / w[b]
        return b

    def done(self, node: int, b: int, t: float, latency: float, error: bool = False) -> None:
        if self.orca is not None:
            self.orca.done(b, t, error)
        self.on_report(node, b, t)

    def joined(self, node: int, b: int, t: float) -> None:
        self.nes[node][b] = self.upd[node][b] = -1.0
        self.wt[node][b] = 0.0


def capacity_weights(sc: Scenario) -> list[float]:
    """Static endpoint weights an operator would set: each backend's nominal capacity."""
    return [1.0 if math.isinf(b.capacity) else b.capacity for b in sc.backends]


def make(policy: str, sc: Scenario, nodes: int, rng: np.random.Generator) -> Peer:
    nb = len(sc.backends)
    if policy == "envoy-least-request":
        return EnvoyLeastRequest(nb, nodes, rng)
    if policy == "envoy-least-request-weighted":
        return EnvoyWeighted(nb, nodes, rng, capacity_weights(sc))
    if policy == "linkerd-penalty-ewma":
        return LinkerdPenaltyEwma(nb, nodes, rng)
    if policy == "jsq-stale":
        return JsqStale(nb, nodes, rng, sc.tick)
    if policy == "prequal":
        return Prequal(nb, nodes, rng)
    if policy == "c3":      # a pooled request holds a connection already: no backlog before it (see engine)
        return C3(nb, nodes, rng, rate_control=sc.pool is None)
    if policy == "c3-ranking":
        return C3(nb, nodes, rng, rate_control=False)
    if policy == "grpc-wrr":
        return GrpcWrr(nb, nodes, rng)
    raise ValueError("not a peer policy: %r" % policy)


__all__ = ["HOLD", "PEERS", "Peer", "Probe", "ServerState", "hcl", "make", "quantile", "wrr_effective",
           "wrr_weight"]
