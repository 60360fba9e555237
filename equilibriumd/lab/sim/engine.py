"""The event loop: one scenario, one policy, one seed -> every request's fate.

Deterministic for (scenario, policy, seed). Common random numbers: arrival
times, nodes and unit service draws depend on (scenario, seed) only, so
every policy meets the same traffic; decision draws come from their own
stream per (scenario, seed).

Model:

* Arrivals: Poisson at the scenario's rate(t) (thinning), each from a node
  (round-robin over nodes, so every node carries 1/nodes of the load).
* Backends: FIFO with c servers: a request starts at max(arrival, the
  earliest free server) and holds that server for its service time (the
  Kiefer-Wolfowitz workload vector; exact for FIFO). Extra `delay` holds no
  server. A failing backend answers 5xx after 1 ms. Backends that leave
  finish what they have.
* Requests are not cancelled: the 1 s timeout is applied when scoring, so
  every policy sees the true latency of slow responses.
* Proxy variants decide per request with the node's own in-flight counts and
  response times, updated instantly.
* Kernel variants: one request per connection (the assumption: the caller
  opens a connection per request, as the datapath benchmark does); each
  connection takes a slot of the node's 1,024-slot table (the next of the
  node's sweep of it, SVC_SWEEP, for every policy but `random`: one CPU's
  cursor per node; a uniformly random one for `random`),
  or, for a policy whose balance is `p2c` (config.balance_of), that and a random slot and
  the backend with fewer of the node's open connections per slot (the first
  unless the second is over 1/16 less loaded): the kernel's rule, through
  its one Python mirror (datapath.pick), with the node's in-flight counts as
  eq_lb_active.
  Every `tick` seconds the node's agent gets the telemetry of the tick that
  just ended — requests sent, responses (5xx apart) and their summed latency
  to first byte, and the in-flight gauge, exactly what the kernel counts —
  and its new weights take effect at once (so decisions in a tick use
  telemetry one tick old). With `stagger`, node k ticks at phase k/nodes of
  the period. A membership change rebuilds every table at once from the
  current weights over the present backends (the reconciler's job), and the
  agents see the new backend set at their next tick.
* Callers (scenarios with callers, scenarios.CALLERS): each request carries its
  caller, and an admission layer (sim.admission) in front of routing refuses
  the connects over a caller's budget at once, as eq_lb_budget does (a failure
  at latency 0, never queued), and drops the requests a flooder chose not to
  send (Scenario.attack). Only `equilibrium` (shedding and the flood defence)
  and `equilibrium@cooperation` set budgets; every other policy has none.
* Peers (sim.peers, issue 16) are proxies that may also read a backend's state at
  a time through `server_view` (requests in flight from every node, requests
  queued for a server, busy servers, current mean service time): what Prequal's
  probes, C3's piggybacked queue sizes, gRPC's ORCA reports and JSQ's snapshot
  carry. It only reads; the engine keeps the queued requests' start times for it.
  A peer that `holds` (C3's rate control) may answer HOLD: the request then waits in
  its node's backlog, in order, and goes when the peer's `wake` says a token has come
  (its latency counts the wait). Later arrivals at that node queue behind it.
* Oracle: the backend with the earliest expected completion given the exact
  server free times, delays, failures and cold factors (ties at random).
* Pooled scenarios (`Scenario.pool`, see pools.py): each request goes to a
  client (uniformly at random among the node's `clients`), which takes an
  idle connection of its pool (the most recently returned), opens one, or
  waits for one; the wait counts in the request's latency. Kernel policies
  pick a backend per *connection* (the draw above, over the node's open
  connections per backend, idle ones included: eq_lb_active), and the
  connection keeps it; proxies and the oracle decide per request when the
  request gets its connection. The agent's telemetry counts connections
  opened and open (`make_delta`), and after each tick the rebalancer closes
  idle connections (pools.NodePools.rebalance), unless the policy runs
  without it (policies.NO_REBALANCE). A backend that leaves keeps answering
  on the connections it has (a pod in its termination grace period) until
  they are closed.
"""

from __future__ import annotations

import heapq
import math
import zlib
from collections import deque
from dataclasses import dataclass

import numpy as np

from ...agent.rebalance import WALK_INTERVAL, WALK_WINDOW
from ...datapath import pick
from ...datapath.constants import BALANCE_P2C, SVC_P2C, SVC_SWEEP
from ...datapath.slots import build_table
from ...datapath.slots import counts as slot_counts
from ...types import SLOTS
from . import admission, coordinated, peers, peers_kernel, policies
from .pools import UNBOUND, Conn, NodePools, PoolLog
from .scenarios import Scenario


def agent_walks(tick: float) -> int:
    """Walks per tick as the agent's walker makes them while wanted connections are
    busy: one every WALK_INTERVAL within WALK_WINDOW of the tick (agent.rebalance)."""
    return max(1, int(WALK_WINDOW * tick / WALK_INTERVAL + 1e-9) + 1)

FAIL_LATENCY = 0.001


@dataclass
class Run:
    scenario: str
    policy: str
    seed: int
    arrival: np.ndarray     #: (N,) seconds
    node: np.ndarray        #: (N,) int
    backend: np.ndarray     #: (N,) int
    latency: np.ndarray     #: (N,) seconds from arrival to response
    error: np.ndarray       #: (N,) bool: answered 5xx
    n_backends: int
    ticks: int = 0
    #: pooled scenarios only: each request's client (its pool on its node), its connection id and its
    #: wait for one (seconds), and the pools' log
    client: np.ndarray | None = None
    conn: np.ndarray | None = None
    wait: np.ndarray | None = None
    pools: PoolLog | None = None
    #: equilibrium-coordinated only: the simulated coordinator and its agents
    coordination: tuple[coordinated.SimCoordinator, list[policies.KernelAgent]] | None = None
    #: scenarios with callers only (sim.admission): each request's caller, whether admission refused
    #: it (it failed fast, error True), and the admission controller (its per-period log)
    caller: np.ndarray | None = None
    refused: np.ndarray | None = None
    admission: admission.Admission | None = None


def _table(weights: list[float]) -> tuple[list[int], list[int]]:
    """A node's slot table over backends 0..n-1, and the slots each holds (the
    shares the agent writes beside it, which the kernel's two-choice draw reads)."""
    t = build_table(list(range(len(weights))), weights)
    return t.tolist(), slot_counts(t, range(len(weights))).tolist()


def _key(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def arrivals(sc: Scenario, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(times, nodes, unit exponentials, standard normals) for (scenario, seed)."""
    rng = np.random.default_rng([seed, _key(sc.stream, "traffic")])
    peak = max(r for _, r in sc.rate)
    n_max = int(peak * sc.duration * 1.2 + 50 * math.sqrt(peak * sc.duration) + 100)
    gaps = rng.exponential(1.0 / peak, size=n_max)
    t = np.cumsum(gaps)
    t = t[t < sc.duration]
    grid = np.array([p[0] for p in sc.rate] + [sc.duration])
    vals = np.array([p[1] for p in sc.rate] + [sc.rate[-1][1]])
    keep = rng.random(t.size) * peak < np.interp(t, grid, vals)
    t = t[keep]
    nodes = (np.arange(t.size) % sc.nodes).astype(np.int64)
    return t, nodes, rng.standard_exponential(t.size), rng.standard_normal(t.size)


def simulate(sc: Scenario, policy: str, seed: int) -> Run:
    kind = policies.kind(policy)
    T, NODE, E, Z = arrivals(sc, seed)
    drng = np.random.default_rng([seed, _key(sc.stream, "decisions")])
    U1, U2 = drng.random(T.size), drng.random(T.size)
    R1, R2 = U1.tolist(), U2.tolist()
    # the same two uniforms as the kernel's one random u32 (first slot, second slot)
    RK = pick.compose((U1 * SLOTS).astype(np.int64), (U2 * SLOTS).astype(np.int64)).tolist()
    prng = np.random.default_rng([seed, _key(sc.stream, "policy-init")])

    nb, nn = len(sc.backends), sc.nodes
    servers = [None if b.servers is None else [0.0] * b.servers for b in sc.backends]
    mean = [b.mean for b in sc.backends]
    normal = [b.dist == "normal" for b in sc.backends]
    std = [b.std for b in sc.backends]
    delay = [0.0] * nb
    failing = [False] * nb
    present = list(sc.initially_present())
    joined, cold, cold_f = [0.0] * nb, [0.0] * nb, [1.0] * nb
    cand = [b for b in range(nb) if present[b]]
    events = sorted(sc.events, key=lambda e: e.at)
    ei = 0

    infl = [[0] * nb for _ in range(nn)]        # per node, for proxies and telemetry
    # per-node telemetry of the current tick
    sent = [[0.0] * nb for _ in range(nn)]
    answered = [[0.0] * nb for _ in range(nn)]
    err5 = [[0.0] * nb for _ in range(nn)]
    latsum = [[0.0] * nb for _ in range(nn)]

    # pools (pooled scenarios only): their own random streams, so the shared ones stay the twin's
    spec = sc.pool
    nodes: list[NodePools] = []
    plog = PoolLog()
    CL: list[int] = []
    rb_rng = np.random.default_rng([seed, _key(sc.stream, "rebalance")])
    rebalancing = False
    walks = (spec.walks or agent_walks(sc.tick)) if spec is not None else 1
    opened = [[0.0] * nb for _ in range(nn)]    # connects this tick (telemetry)
    out_conn = [-1] * T.size
    out_wait = [0.0] * T.size
    if spec is not None:
        nodes = [NodePools(spec, nb) for _ in range(nn)]
        CL = np.random.default_rng([seed, _key(sc.stream, "pools")]).integers(0, spec.clients, T.size).tolist()
        rebalancing = kind == "kernel" and spec.rebalance and policy not in policies.NO_REBALANCE

    proxy: policies.Proxy | peers.Peer | None = None
    if kind == "request":
        proxy = peers.make(policy, sc, nn, prng) if policy in policies.PEERS else policies.Proxy(policy, nb, nn, prng)
    # peers (sim.peers) read the servers' state: per backend, the start times of the requests queued for a server
    viewed = isinstance(proxy, peers.Peer) or policy in policies.PEERS_KERNEL
    queued: list[list[float]] = [[] for _ in range(nb)]
    agents: list[policies.KernelAgent] = []
    tables: list[list[int]] = []
    cnts: list[list[int]] = []
    weights: list[list[float]] = []
    tick_heap: list[tuple[float, int]] = []
    walk_heap: list[tuple[float, int]] = []     # the rebalancer's further walks in a tick (PoolSpec.walks)
    last_tick = [0.0] * nn
    coord: coordinated.SimCoordinator | None = None
    flags = 0                                   # eq_svc.flags of the simulated service
    # SVC_SWEEP: each node's connects so far (one CPU's eq_lb_cursor, from a random start) and
    # its table's backends with weight (eq_svc.n_avail)
    cursor = np.random.default_rng([seed, _key(sc.stream, "sweep")]).integers(0, 1 << 32, nn).tolist()
    n_avail: list[int] = []
    if kind == "kernel":
        if policy in policies.COORDINATED:
            agents, coord = coordinated.agents(sc, policy, nn)
        else:
            agents = [policies.KernelAgent(policy, sc.tick) for _ in range(nn)]
        flags = (SVC_P2C if agents[0].balance == BALANCE_P2C else 0) | (SVC_SWEEP if agents[0].sweep else 0)
        w0 = agents[0].weights(tuple(cand), None, 0.0)   # the agent's first weights (no telemetry yet)
        for k in range(nn):
            full = [0.0] * nb
            for b, x in zip(cand, w0):
                full[b] = x
            weights.append(full)
            tab0, cnt0 = _table(full)
            tables.append(tab0)
            cnts.append(cnt0)
            n_avail.append(sum(1 for x in full if x > 0))
            phase = (k / nn) * sc.tick if sc.stagger else 0.0
            heapq.heappush(tick_heap, (sc.tick + phase, k))
            last_tick[k] = phase

    out_b = [0] * T.size
    out_lat = [0.0] * T.size
    out_err = [False] * T.size
    # scenarios with callers: per-caller admission in front of routing (sim.admission)
    adm = admission.Admission(sc, policy, seed, T.size, nb) if sc.stream in admission.CALLERS else None
    fate = [admission.ADMITTED] * T.size if adm is not None else []
    # (time, seq, backend, node, latency, 5xx, pooled connection or None)
    dep: list[tuple[float, int, int, int, float, bool, Conn | None]] = []
    inf = math.inf
    n_ticks = 0
    Tl, NODEl, El, Zl = T.tolist(), NODE.tolist(), E.tolist(), Z.tolist()

    def rebuild_tables() -> None:
        for k in range(nn):
            w = [weights[k][b] if present[b] else 0.0 for b in range(nb)]
            if sum(w) <= 0:
                w = [1.0 if present[b] else 0.0 for b in range(nb)]
            tables[k], cnts[k] = _table(w)
            n_avail[k] = sum(1 for x in w if x > 0)

    def draw(i: int, k: int) -> int:
        """Connect i's random u32 as node k's kernel uses it: under SVC_SWEEP its first slot is
        the next of the node's sweep (one CPU per node: the kernel keeps a cursor per CPU)."""
        if not flags & SVC_SWEEP:
            return RK[i]
        c = cursor[k]
        cursor[k] = (c + 1) & 0xFFFFFFFF
        return pick.sweep_draw(RK[i], c, n_avail[k])

    def decide(i: int, k: int, t: float) -> int:
        """A per-request decision at time t: a proxy's, or the oracle's."""
        if proxy is not None:
            return proxy.choose(k, t, cand, infl[k], R1[i], R2[i])
        costs = []
        for x in cand:
            if failing[x]:
                c = 1e9
            else:
                m = mean[x] * (1.0 + (cold_f[x] - 1.0) * max(0.0, 1.0 - (t - joined[x]) / cold[x])
                               if cold[x] else 1.0)
                srv = servers[x]
                c = (max(t, srv[0]) if srv is not None else t) + m + delay[x]
            costs.append(c)
        low = min(costs) + 1e-12
        ties = [x for x, c in zip(cand, costs) if c <= low]
        return ties[int(R2[i] * len(ties))]

    def server_view(b: int, t: float) -> peers.ServerState:
        """Backend b's state at t, as the server would report it (read-only; peers only)."""
        srv, q = servers[b], queued[b]
        while q and q[0] <= t:
            heapq.heappop(q)
        m = mean[b] * (1.0 + (cold_f[b] - 1.0) * max(0.0, 1.0 - (t - joined[b]) / cold[b]) if cold[b] else 1.0)
        # FIFO onto the earliest free server: a server whose free time is after t is busy at t
        busy = 0.0 if srv is None else sum(1 for f in srv if f > t) / len(srv)
        return peers.ServerState(sum(infl[k][b] for k in range(nn)), len(q), busy, m)

    if isinstance(proxy, peers.Peer):
        proxy.attach(server_view)
    # a peer that holds (C3's rate control): per node, the requests waiting for a token, in order, and
    # when to try again (one wake per node: wake_at; an older heap entry is stale)
    holding = isinstance(proxy, peers.Peer) and proxy.holds and not nodes
    backlog: list[deque[int]] = [deque() for _ in range(nn)]
    wake_heap: list[tuple[float, int]] = []
    wake_at = [inf] * nn

    def hold(k: int, t: float, at: float | None = None) -> None:
        w = proxy.wake(k, t, cand) if at is None else at    # type: ignore[union-attr]
        if w < wake_at[k]:
            wake_at[k] = w
            heapq.heappush(wake_heap, (w, k))

    def send_held(k: int, t: float) -> None:
        """Node k's backlog goes out in order while tokens last; the rest waits for the next wake."""
        q = backlog[k]
        while q:
            i = q[0]
            b = proxy.choose(k, t, cand, infl[k], R1[i], R2[i])     # type: ignore[union-attr]
            if b == peers.HOLD:
                hold(k, t)
                return
            q.popleft()
            serve(i, k, b, t, None)

    def on_wake() -> None:
        tw, k = heapq.heappop(wake_heap)
        if tw == wake_at[k]:
            wake_at[k] = inf
            send_held(k, tw)
    # the peers' @kernel forms (sim.peers_kernel) read the scenario and the servers' state at tick time;
    # grpc-wrr@kernel's servers also record their ORCA reports (fed below: arrivals, responses)
    orca = peers_kernel.attach(sc, agents, server_view) if policy in policies.PEERS_KERNEL else None

    def serve(i: int, k: int, b: int, t: float, conn: Conn | None) -> None:
        """Request i reaches backend b at t (its arrival, or when its pool gave it a connection)."""
        if failing[b]:
            lat, bad = FAIL_LATENCY, True
        else:
            if normal[b]:
                s = max(0.0, mean[b] + std[b] * Zl[i])
            else:
                s = mean[b] * El[i]
            if cold[b]:
                s *= 1.0 + (cold_f[b] - 1.0) * max(0.0, 1.0 - (t - joined[b]) / cold[b])
            srv = servers[b]
            if srv is None:
                fin = t + s
            else:
                start = srv[0] if srv[0] > t else t
                fin = start + s
                heapq.heapreplace(srv, fin)
                if viewed and start > t:
                    heapq.heappush(queued[b], start)
            lat, bad = fin - t + delay[b], False
        infl[k][b] += 1
        sent[k][b] += 1
        if adm is not None:
            adm.sent(b)
        heapq.heappush(dep, (t + lat, i, b, k, lat, bad, conn))
        out_b[i] = b
        out_lat[i] = (t - Tl[i]) + lat          # + the wait for a connection (0.0 without pools: exact)
        out_err[i] = bad

    def on_conn(i: int, k: int, conn: Conn, t: float) -> None:
        """Request i got pooled connection `conn` at t: a kernel connection has its
        backend; a proxy's goes to the proxy, which picks per request."""
        out_conn[i] = conn.id
        out_wait[i] = t - Tl[i]
        serve(i, k, conn.backend if conn.backend != UNBOUND else decide(i, k, t), t, conn)

    def connect(i: int, k: int, pool: int, t: float) -> Conn:
        """Pool `pool` of node k opens a connection for request i: the kernel's pick
        over the node's open connections (idle ones count: eq_lb_active)."""
        b = pick.pick_one(tables[k], cnts[k], nodes[k].open, flags, draw(i, k)) if kind == "kernel" else UNBOUND
        if b != UNBOUND:
            opened[k][b] += 1
        return nodes[k].open_conn(plog.opened, pool, b, t, plog)

    def done(ft: float, b: int, k: int, lat: float, bad: bool, conn: Conn | None) -> None:
        infl[k][b] -= 1
        answered[k][b] += 1
        if adm is not None:
            adm.answered(b, lat, bad)
        latsum[k][b] += lat
        if bad:
            err5[k][b] += 1
        if proxy is not None:
            proxy.done(k, b, ft, lat, bad)
        if orca is not None:
            orca.done(b, ft, bad)
        if conn is not None:
            j = nodes[k].release(conn, ft)
            if j is not None:                   # the pool's first waiter takes it at once
                on_conn(j, k, conn, ft)

    def closed(t: float, k: int, what: list[tuple[Conn, str]]) -> None:
        for conn, why in what:
            plog.close_t.append(t)
            plog.close_node.append(k)
            plog.close_conn.append(conn.id)
            plog.close_backend.append(conn.backend)
            plog.close_reason.append(why)

    for i in range(T.size):
        t = Tl[i]
        # everything due before this arrival, in time order (events first on ties; held requests after
        # the responses and ticks of their instant)
        while True:
            nd = dep[0][0] if dep else inf
            nt = tick_heap[0][0] if tick_heap else inf
            nw = walk_heap[0][0] if walk_heap else inf
            ne = events[ei].at if ei < len(events) else inf
            nh = wake_heap[0][0] if wake_heap else inf
            if nh <= t and nh < ne and nh < nd and nh < nt and nh < nw:
                on_wake()
                continue
            if ne <= t and ne <= nd and ne <= nt and ne <= nw:
                e = events[ei]
                ei += 1
                b = e.backend
                if e.delay is not None:
                    delay[b] = e.delay
                if e.failing is not None:
                    failing[b] = e.failing
                if e.present is not None and e.present != present[b]:
                    present[b] = e.present
                    if e.present:
                        joined[b], cold[b], cold_f[b] = e.at, e.cold, e.cold_factor
                        if servers[b] is not None:
                            servers[b] = [e.at] * len(servers[b])  # type: ignore[arg-type]
                        if proxy is not None:
                            for k in range(nn):
                                proxy.joined(k, b, e.at)
                    cand = [x for x in range(nb) if present[x]]
                    if kind == "kernel":
                        rebuild_tables()
                    for k in range(nn):
                        if backlog[k]:              # a new server has tokens: the backlog may go now
                            hold(k, e.at, e.at)
                continue
            if nd <= t and nd <= nt and nd <= nw:
                ft, _, b, k, lat, bad, conn = heapq.heappop(dep)
                done(ft, b, k, lat, bad, conn)
                continue
            if nw <= t and nw < nt:
                tw, k = heapq.heappop(walk_heap)
                closed(tw, k, nodes[k].walk(tw, rb_rng))
                continue
            if nt <= t:
                tt, k = heapq.heappop(tick_heap)
                delta = policies.make_delta(tt - last_tick[k], sent[k], answered[k], err5[k], latsum[k], infl[k],
                                            open_conns=nodes[k].open if nodes else None,
                                            connects=opened[k] if nodes else None)
                w = agents[k].weights(tuple(cand), delta, tt)
                full = [0.0] * nb
                for b, x in zip(cand, w):
                    full[b] = x
                weights[k] = full
                if sum(full) <= 0:
                    full = [1.0 if present[b] else 0.0 for b in range(nb)]
                tables[k], cnts[k] = _table(full)
                n_avail[k] = sum(1 for x in full if x > 0)
                if nodes:
                    # the walk after the tick's writes: quotas from the table just written
                    if rebalancing:
                        closed(tt, k, nodes[k].rebalance(tt, cnts[k], present, rb_rng))
                        for j in range(1, walks):
                            heapq.heappush(walk_heap, (tt + sc.tick * j / walks, k))
                    plog.sample_t.append(tt)
                    plog.sample_open.append(nodes[k].open_total())
                    opened[k] = [0.0] * nb
                sent[k] = [0.0] * nb
                answered[k] = [0.0] * nb
                err5[k] = [0.0] * nb
                latsum[k] = [0.0] * nb
                last_tick[k] = tt
                n_ticks += 1
                heapq.heappush(tick_heap, (tt + sc.tick, k))
                continue
            break

        k = NODEl[i]
        if orca is not None:                    # the servers sample their utilization at arrivals
            orca.arrival(t)
        if adm is not None:
            f = fate[i] = adm.admit(i, t)
            if f != admission.ADMITTED:         # refused: fails at once (never queued); absent: never sent
                out_err[i] = True
                continue
        if not nodes:
            if holding and backlog[k]:          # behind the node's waiting requests
                backlog[k].append(i)
                continue
            # one connection per request: the kernel picks over the node's in-flight counts
            b = pick.pick_one(tables[k], cnts[k], infl[k], flags, draw(i, k)) if kind == "kernel" else decide(i, k, t)
            if b == peers.HOLD:
                backlog[k].append(i)
                hold(k, t)
                continue
            serve(i, k, b, t, None)
            continue
        pool = CL[i]
        conn = nodes[k].acquire(pool)
        if conn is None:
            if not nodes[k].can_open(pool):
                nodes[k].wait(pool, i)          # served when one of its pool's connections comes back
                continue
            conn = connect(i, k, pool, t)
        on_conn(i, k, conn, t)

    # the requests still held at their node go as tokens come (the responses before each wake feed the rates)
    while wake_heap:
        if dep and dep[0][0] <= wake_heap[0][0]:
            ft, _, b, k, lat, bad, conn = heapq.heappop(dep)
            done(ft, b, k, lat, bad, conn)
        else:
            on_wake()
    # the requests still waiting for a connection get one as the last responses come back
    while nodes and dep:
        ft, _, b, k, lat, bad, conn = heapq.heappop(dep)
        done(ft, b, k, lat, bad, conn)

    run = Run(sc.name, policy, seed, T, NODE, np.asarray(out_b, dtype=np.int64), np.asarray(out_lat),
               np.asarray(out_err, dtype=bool), nb, n_ticks,
               client=np.asarray(CL, dtype=np.int64) if nodes else None,
               conn=np.asarray(out_conn, dtype=np.int64) if nodes else None,
               wait=np.asarray(out_wait) if nodes else None, pools=plog if nodes else None,
               coordination=None if coord is None else (coord, agents))
    if adm is not None:
        fa = np.asarray(fate)
        run.caller, run.refused, run.admission = adm.caller, fa == admission.REFUSED, adm
        if (fa == admission.ABSENT).any():      # a flooder's requests it did not send
            keep = fa != admission.ABSENT
            for name in ("arrival", "node", "backend", "latency", "error", "caller", "refused"):
                setattr(run, name, getattr(run, name)[keep])
    return run
