"""The seven routing scenarios (names fixed by issue 6), and their pooled variants.

A backend is a FIFO queue with `servers` identical servers (None: unlimited,
a pure delay) and a service-time distribution (`exp`: exponential with mean
`mean`; `normal`: mean ± std, clipped at 0). `delay` is extra latency that
holds no server (a slow dependency or network path); `failing` answers 5xx
after 1 ms without queueing; `cold` multiplies the service time by
`cold_factor` when the backend joins, falling linearly to 1 over `cold`
seconds. Capacity = servers / mean (requests per second).

Clients are open-loop Poisson at `rate(t)` (piecewise linear), spread evenly
over `nodes` nodes (each with its own agent or proxy).

Windows (seconds): metrics count requests that *arrive* after `warmup`;
`steady` is where a policy should have settled (oscillation, Wardrop gap,
cost against the social optimum); `bad` = (backend, onset, end) is the event
the shift time is measured on.

Pooled variants (`-pooled`): the same backends, load and events, but the
clients keep their connections in pools (`pool`, see pools.py): the kernel
picks a backend per connection, and a connection carries many requests. Each
shares its random streams with its `twin` (the same scenario with one
connection per request): same arrivals, same service times, same decision
draws, so the two compare seed by seed. `steady` (equal backends, constant
load, no event) exists as the twin of `steady-pooled`, where rebalancing
should close almost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .pools import PoolSpec


@dataclass(frozen=True)
class Backend:
    servers: int | None        #: parallel servers; None = unlimited (pure delay)
    mean: float                #: mean service time, seconds
    dist: str = "exp"          #: "exp" | "normal"
    std: float = 0.0           #: for "normal"

    @property
    def capacity(self) -> float:
        return float("inf") if self.servers is None else self.servers / self.mean


@dataclass(frozen=True)
class Event:
    at: float
    backend: int
    delay: float | None = None        #: new extra delay (seconds)
    failing: bool | None = None       #: answers 5xx in 1 ms
    present: bool | None = None       #: joins (True) / leaves (False) the service
    cold: float = 0.0                 #: on join: warm-up seconds (service time x cold_factor -> x1)
    cold_factor: float = 4.0


@dataclass(frozen=True)
class Attack:
    """A flooding caller (issue 15 item 3): its requests are drawn at `top` requests / s and
    thinned to the rate its adaptive attacker picks each period (sim.admission) from `start`."""
    caller: int                #: its index in CALLERS
    top: float                 #: its largest rate (its demand in CALLERS)
    start: float = 10.0        #: seconds: quiet before (the agents see the service calm first)
    silent: bool = False       #: the no-flood twin: it never sends


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    backends: tuple[Backend, ...]
    rate: tuple[tuple[float, float], ...]      #: (t, requests/s) points, linear in between
    duration: float
    events: tuple[Event, ...] = ()
    present: tuple[bool, ...] | None = None   #: initially present (default all)
    nodes: int = 1
    warmup: float = 5.0
    steady: tuple[float, float] = (20.0, 60.0)
    bad: tuple[int, float, float] | None = None
    tick: float = 0.5
    timeout: float = 1.0
    stagger: bool = False                      #: many nodes: agents tick at spread phases
    pool: PoolSpec | None = None               #: clients keep connections in pools (None: one per request)
    twin: str | None = None                    #: scenario whose random streams this one shares
    coordinator_stops: float | None = None     #: equilibrium-coordinated: the coordinator dies then
    attack: Attack | None = None               #: a flooding caller (scenarios with callers only)

    @property
    def stream(self) -> str:
        """The name keying the random streams (the twin's, for a pooled variant)."""
        return self.twin or self.name

    def rate_at(self, t: float) -> float:
        pts = self.rate
        if t <= pts[0][0]:
            return pts[0][1]
        for (t0, r0), (t1, r1) in zip(pts, pts[1:]):
            if t <= t1:
                return r0 + (r1 - r0) * (t - t0) / max(t1 - t0, 1e-12)
        return pts[-1][1]

    def initially_present(self) -> tuple[bool, ...]:
        return self.present if self.present is not None else (True,) * len(self.backends)

    def state_at(self, t: float) -> list[dict[str, object]]:
        """Each backend's condition at time t (for the social optimum and the oracle tests)."""
        st: list[dict[str, object]] = [
            {"delay": 0.0, "failing": False, "present": p, "mult": 1.0, "joined": 0.0, "cold": 0.0,
             "cold_factor": 1.0} for p in self.initially_present()]
        for e in sorted(self.events, key=lambda e: e.at):
            if e.at > t:
                break
            s = st[e.backend]
            if e.delay is not None:
                s["delay"] = e.delay
            if e.failing is not None:
                s["failing"] = e.failing
            if e.present is not None:
                s["present"] = e.present
                if e.present:
                    s["joined"], s["cold"], s["cold_factor"] = e.at, e.cold, e.cold_factor
        for s in st:
            if s["cold"]:
                frac = max(0.0, 1.0 - (t - float(s["joined"])) / float(s["cold"]))  # type: ignore[arg-type]
                s["mult"] = 1.0 + (float(s["cold_factor"]) - 1.0) * frac  # type: ignore[arg-type]
        return st

    def scaled(self, duration_factor: float) -> "Scenario":
        """A shorter copy (tests): every time scaled, rates unchanged."""
        f = duration_factor
        return replace(self, rate=tuple((t * f, r) for t, r in self.rate), duration=self.duration * f,
                       events=tuple(replace(e, at=e.at * f, cold=e.cold * f) for e in self.events),
                       warmup=self.warmup * f,
                       coordinator_stops=None if self.coordinator_stops is None else self.coordinator_stops * f,
                       attack=None if self.attack is None else replace(self.attack, start=self.attack.start * f),
                       steady=(self.steady[0] * f, self.steady[1] * f),
                       bad=None if self.bad is None else (self.bad[0], self.bad[1] * f, self.bad[2] * f))


def _same(n: int, servers: int | None, mean: float, **kw: object) -> tuple[Backend, ...]:
    return tuple(Backend(servers, mean, **kw) for _ in range(n))  # type: ignore[arg-type]


# capacities 1, 1, 2, 4 as servers 2, 2, 4, 8 of 25 ms each: 80, 80, 160, 320 req/s (640 in all)
_HET = (Backend(2, 0.025), Backend(2, 0.025), Backend(4, 0.025), Backend(8, 0.025))

SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario(
        "linkerd-replica",
        "11 backends, 167 ms ± 5 ms (no queueing), 1000 req/s; backend 0 answers in 2 s from t=15 to 45 s",
        _same(11, None, 0.167, dist="normal", std=0.005), ((0, 1000.0),), 60.0,
        events=(Event(15.0, 0, delay=1.833), Event(45.0, 0, delay=0.0)),
        steady=(30.0, 45.0), bad=(0, 15.0, 45.0)),
    Scenario(
        "heterogeneous",
        "capacities 1:1:2:4 (2/2/4/8 servers, exp 25 ms; 640 req/s in all), load 65 %",
        _HET, ((0, 416.0),), 60.0, steady=(20.0, 60.0)),
    Scenario(
        "slow-backend",
        "3 backends x 4 servers, exp 20 ms (600 req/s), load 50 %; backend 0 +500 ms from t=15 to 40 s",
        _same(3, 4, 0.020), ((0, 300.0),), 60.0,
        events=(Event(15.0, 0, delay=0.5), Event(40.0, 0, delay=0.0)),
        steady=(25.0, 40.0), bad=(0, 15.0, 40.0)),
    Scenario(
        "fast-failing",
        "3 backends x 4 servers, exp 20 ms, load 50 %; backend 0 answers 5xx in 1 ms from t=15 to 45 s",
        _same(3, 4, 0.020), ((0, 300.0),), 60.0,
        events=(Event(15.0, 0, failing=True), Event(45.0, 0, failing=False)),
        steady=(25.0, 45.0), bad=(0, 15.0, 45.0)),
    Scenario(
        "surge",
        "4 backends x 4 servers, exp 20 ms (800 req/s); load 40 % until t=10, rising to 95 % at t=40, held",
        _same(4, 4, 0.020), ((0, 320.0), (10.0, 320.0), (40.0, 760.0)), 60.0, steady=(45.0, 60.0)),
    Scenario(
        "churn",
        "backends 0-2 (4 servers, exp 20 ms), load 360 req/s (60 %); backend 3 joins cold at t=20 "
        "(service x4, warming over 10 s); backend 1 leaves at t=35",
        _same(4, 4, 0.020), ((0, 360.0),), 60.0,
        events=(Event(20.0, 3, present=True, cold=10.0, cold_factor=4.0), Event(35.0, 1, present=False)),
        present=(True, True, True, False), steady=(45.0, 60.0)),
    Scenario(
        "many-nodes",
        "20 nodes with their own agent/proxy sharing the heterogeneous backends (1:1:2:4), load 65 %; "
        "each sees only its own traffic; agents tick at staggered phases",
        _HET, ((0, 416.0),), 60.0, nodes=20, steady=(20.0, 60.0), stagger=True),
)}

#: issue 6's seven scenarios (one connection per request); their targets are counted over these
NAMES = tuple(SCENARIOS)

# equal backends, constant load, nothing happens: the pooled variant measures rebalancing's churn from noise
SCENARIOS["steady"] = Scenario(
    "steady", "3 backends x 4 servers, exp 20 ms (600 req/s), load 50 %, nothing happens",
    _same(3, 4, 0.020), ((0, 300.0),), 60.0, steady=(20.0, 60.0))

# issue 15: many-nodes whose coordinator (policy equilibrium-coordinated) dies at t=30 s; the same
# random streams as many-nodes (twin), so the two compare seed by seed. Not in NAMES (the benchmark's set).
SCENARIOS["many-nodes-coordinator-fails"] = replace(
    SCENARIOS["many-nodes"], name="many-nodes-coordinator-fails", twin="many-nodes", coordinator_stops=30.0,
    description=SCENARIOS["many-nodes"].description + "; the coordinator stops at t=30 s")


def _pooled(base: Scenario, spec: PoolSpec) -> Scenario:
    return replace(base, name=base.name + "-pooled", twin=base.name, pool=spec,
                   description="%s; clients keep connections in pools (%d clients x %d connections per node)"
                   % (base.description, spec.clients, spec.size))


#: pooled variants (clients with connection pools) of these, named NAME-pooled, twins of NAME
POOLED_FROM = ("slow-backend", "heterogeneous", "churn", "steady")
SCENARIOS.update({p.name: p for p in (_pooled(SCENARIOS[n], PoolSpec()) for n in POOLED_FROM)})
POOLED = tuple(n + "-pooled" for n in POOLED_FROM)

# issue 15 item 2 (feasible payoffs under overload): the heterogeneous backends (640 req/s in all)
# offered 1.3x their capacity (832 req/s) by 8 callers of unequal demand. The engine has no notion of
# callers and every policy here routes regardless of the caller, so a caller is a mark drawn per request
# with probability demand / total (metrics.caller_labels): independent marks split a Poisson stream into
# independent Poisson streams of those rates, exactly the superposition of 8 callers. Max-min fair shares
# of 640 req/s: 20, 40, 60, 80, 100 (callers 0-4, within their share) and 113.3 each for callers 5-7
# (demands 132, 200, 200: above it). Not in NAMES (the benchmark's set): asked for by name.
SCENARIOS["overload"] = Scenario(
    "overload",
    "heterogeneous backends (1:1:2:4, 640 req/s) offered 832 req/s (1.3x) by 8 callers demanding "
    "20/40/60/80/100/132/200/200 req/s (max-min fair shares of 640: 20/40/60/80/100/113/113/113)",
    _HET, ((0, 832.0),), 60.0, steady=(20.0, 60.0))

#: per-caller demands (requests per second) of the scenarios with callers; they sum to the scenario's rate
CALLERS: dict[str, tuple[float, ...]] = {"overload": (20.0, 40.0, 60.0, 80.0, 100.0, 132.0, 200.0, 200.0)}

# issue 15 item 3 (zero-sum flood defence): six honest callers at 40 req/s (240 req/s, 37.5 % of the
# heterogeneous backends' 640) and, from t=10 s, an adaptive flooder (caller 6) of up to 1280 req/s
# (2x capacity) that picks its rate each period as the best response to the defence it faces
# (sim.admission). `flood-calm` is its twin without the flood (same random streams: the same honest
# requests, seed by seed): the reference of the honest callers' p99. Asked for by name.
SCENARIOS["flood"] = Scenario(
    "flood",
    "heterogeneous backends (1:1:2:4, 640 req/s); 6 honest callers at 40 req/s (240 req/s) and, from "
    "t=10 s, an adaptive flooder of up to 1280 req/s (its best response to the defence each period)",
    _HET, ((0, 1520.0),), 60.0, steady=(20.0, 60.0), attack=Attack(caller=6, top=1280.0))
SCENARIOS["flood-calm"] = replace(
    SCENARIOS["flood"], name="flood-calm", twin="flood", attack=Attack(caller=6, top=1280.0, silent=True),
    description="the flood scenario's honest callers alone (its twin: the same requests, no flood)")
CALLERS["flood"] = (40.0,) * 6 + (1280.0,)
CALLERS["flood-calm"] = CALLERS["flood"]

# issue 16 item 2: the setups of the peers' own papers and posts, and one where balancing can only cost.
# Not in NAMES (the benchmark's default set): run with `--suite peers` or by name. Failures and delays
# are events (an event at t=0 sets a condition from the start), as in the scenarios above.
_RAMP_CAP = 700.0      # prequal-ramp's capacity: 6 x 2/20 ms (100 req/s each) + 2 x 2/40 ms (50 each)
_CPU = 24              # homogeneous-cpu: backends of one server each
_ZONE = 4              # zone-skew: backends per zone
SCENARIOS.update({s.name: s for s in (
    # Linkerd's 2016 benchmark ("Beyond Round Robin", linkerd.io 2016-03-16): the very setup of
    # linkerd-replica, kept under its own name so the peer suite reports it; its twin, so the same
    # requests seed by seed; success = a 2xx within the 1 s timeout (Linkerd's success rate)
    replace(SCENARIOS["linkerd-replica"], name="linkerd-2016", twin="linkerd-replica", timeout=1.0,
            description="Linkerd 2016: 11 backends, 167 ms ± 5 ms, 1000 req/s; backend 0 answers in 2 s "
                        "from t=15 to 45 s; success = 2xx within 1 s"),
    # Prequal (NSDI 2024) ramps the load past the replicas' capacity on heterogeneous machines and reads
    # where each balancer's tail breaks: 0.75x held (the baseline), then linear to 1.75x over 120 s
    # (slow enough for the queues to follow the load: near 1x they take seconds to settle)
    Scenario(
        "prequal-ramp",
        "8 backends x 2 servers: 6 at exp 20 ms, 2 at exp 40 ms (700 req/s in all); load 0.75x (525 req/s) "
        "until t=20, rising linearly to 1.75x (1225 req/s) at t=140",
        _same(6, 2, 0.020) + _same(2, 2, 0.040),
        ((0, 0.75 * _RAMP_CAP), (20.0, 0.75 * _RAMP_CAP), (140.0, 1.75 * _RAMP_CAP)), 140.0,
        steady=(5.0, 20.0)),
    # C3/Prequal-style heterogeneity at its extreme: a blind split (round robin) overloads the slow ones
    Scenario(
        "fast-and-slow",
        "14 backends x 2 servers at exp 20 ms and 2 at exp 320 ms (16x slower; 1412.5 req/s in all), "
        "load 50 %",
        _same(14, 2, 0.020) + _same(2, 2, 0.320), ((0, 706.0),), 60.0, steady=(20.0, 60.0)),
    # fast 5xx attract latency-driven balancers (the failure PenaltyPeakEwma penalises), at scale
    Scenario(
        "two-failing",
        "20 backends x 2 servers, exp 20 ms (2000 req/s), load 50 %; backends 0 and 1 answer 5xx in 1 ms "
        "from t=15 to 45 s",
        _same(20, 2, 0.020), ((0, 1000.0),), 60.0,
        events=(Event(15.0, 0, failing=True), Event(15.0, 1, failing=True),
                Event(45.0, 0, failing=False), Event(45.0, 1, failing=False)),
        steady=(25.0, 45.0), bad=(0, 15.0, 45.0)),
    # autoscaling: capacity doubles while the load is high, and the new replicas are slow at first
    Scenario(
        "cold-scale-up",
        "backends 0-3 (4 servers, exp 20 ms; 800 req/s); load 60 % rising to 90 % (720 req/s) from t=10 "
        "to 20; backends 4-7 join cold at t=20 (service x4, warming over 15 s)",
        _same(8, 4, 0.020), ((0, 480.0), (10.0, 480.0), (20.0, 720.0)), 60.0,
        events=tuple(Event(20.0, b, present=True, cold=15.0, cold_factor=4.0) for b in range(4, 8)),
        present=(True,) * 4 + (False,) * 4, steady=(40.0, 60.0)),
    # identical single-threaded CPU-bound replicas: nothing to learn, so any signal-driven skew only adds
    # queueing (round robin is near optimal); Equilibrium's tick-old table + two-choice draw pays here
    Scenario(
        "homogeneous-cpu",
        "%d backends x 1 server, service 20 ms ± 4 ms (normal; %d req/s in all), load 90 %%" % (_CPU, 50 * _CPU),
        _same(_CPU, 1, 0.020, dist="normal", std=0.004), ((0, 0.9 * 50 * _CPU),), 60.0, steady=(20.0, 60.0)),
    # two zones: the local one cannot carry the load alone, so the remote one (+5 ms) must take the excess
    Scenario(
        "zone-skew",
        "2 zones x %d backends x 2 servers, exp 20 ms (800 req/s in all); the remote zone (backends %d-%d) "
        "+5 ms; load 60 %% (480 req/s: more than the local zone's 400)" % (_ZONE, _ZONE, 2 * _ZONE - 1),
        _same(2 * _ZONE, 2, 0.020), ((0, 480.0),), 60.0,
        events=tuple(Event(0.0, b, delay=0.005) for b in range(_ZONE, 2 * _ZONE)), steady=(20.0, 60.0)),
)})
#: issue 16's scenarios (`--suite peers`), in report order
PEER_SCENARIOS = ("linkerd-2016", "prequal-ramp", "fast-and-slow", "two-failing", "cold-scale-up",
                  "homogeneous-cpu", "zone-skew")
# C3's own simulations (NSDI 2015 section 5, the authors' absim defaults): many clients, each a small part
# of every server's load, where its rate control was designed to work (each client sends a server about
# 7 req/s). Not in PEER_SCENARIOS: asked for by name, to check `c3` against `c3-ranking` in its own setting.
SCENARIOS["c3-paper"] = Scenario(
    "c3-paper",
    "C3's simulation setup: 30 clients (nodes), 10 backends x 1 server at exp 4 ms (2500 req/s in all), "
    "load 80 %",
    _same(10, 1, 0.004), ((0, 2000.0),), 30.0, nodes=30, steady=(10.0, 30.0))

#: load-ramp scenarios -> the capacity their load is expressed against (metrics.p99_doubling_load)
RAMPS: dict[str, float] = {"prequal-ramp": _RAMP_CAP}


def caller_labels(n: int, demands: tuple[float, ...], seed: int) -> np.ndarray:
    """Each of n requests' caller, drawn independently with probability demand / total.

    Independent marks split a Poisson stream into independent Poisson streams of rates
    `demands`, so this is the superposition of the callers. Its own stream, keyed by the seed
    only: the same labels for every policy, request by request (arrivals are common random
    numbers)."""
    d = np.asarray(demands, dtype=np.float64)
    rng = np.random.default_rng([seed, 15, 2])      # 15, 2: issue 15 item 2, apart from the engine's streams
    return rng.choice(d.size, size=n, p=d / d.sum()).astype(np.int64)
