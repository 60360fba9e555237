"""Client connection pools and the connection rebalancer, as the simulator runs them.

Real clients keep their connections (HTTP keep-alive, gRPC, database pools),
so the kernel's pick, made once per connection at connect(), only acts when
a pool opens a connection. The model:

* Every node runs `clients` client processes, each with its own pool of at
  most `size` connections. A request takes the most recently returned idle
  connection (urllib3's LifoQueue, Go's idle list: the warmest connection
  first), else opens one if the pool is below its size, else waits (FIFO)
  for one to come back; the wait counts in its latency. A pool opens
  connections on demand only: it holds what its peak concurrency needed.
* A kernel policy's connection is bound to the backend the kernel picked when
  it was opened (p2c over the node's open connections per slot). A proxy's
  (or the oracle's) connection goes to the local proxy, which picks a backend
  per request: `backend` is UNBOUND.
* Each agent tick, after the new table is written, the rebalancer
  (bpf/rebalance.bpf.c) closes idle connections: those of backends that left
  (drain), and those of backends holding more than their share of the
  node's connections, up to the quota `policy.rebalance.excess_quota` gives
  (excess). Idle: no request outstanding, nothing for `min_idle`, at least
  `min_age` old. At most `max_closes` per tick, all reasons together; the
  kernel walks sockets in hash order, which is no order the pools know of,
  so the walk here is a random permutation. Closing removes the connection
  from its pool (the client's check at checkout sees the reset); the pool
  reopens on demand, and that connect follows today's table.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ...policy.rebalance import confirmed, excess_quota, shares

#: A proxy's connection: the local proxy picks the backend per request.
UNBOUND = -1
EXCESS, DRAIN = "excess", "drain"


@dataclass(frozen=True)
class PoolSpec:
    """Pools of a scenario, and the rebalancer's settings (the config defaults:
    config.RebalanceConfig)."""

    clients: int = 8            #: pools per node (client processes, each with its own pool)
    size: int = 8               #: most connections a pool holds
    rebalance: bool = True      #: the agent closes idle connections (rebalance.mode: idle)
    max_closes: int = 8         #: closes per service per tick on a node, all reasons together
    min_age: float = 2.0        #: seconds: younger connections are never closed
    min_idle: float = 0.010     #: seconds: nor those with traffic more recent than this
    #: rebalancer walks per tick, evenly spaced, sharing the tick's quotas and budget;
    #: 0: as the agent's walker (engine.agent_walks: every 100 ms within the tick)
    walks: int = 0


class Conn:
    """One pooled connection; `last` is the end of its last request (or its open)."""

    __slots__ = ("id", "backend", "pool", "opened", "last")

    def __init__(self, cid: int, backend: int, pool: int, opened: float) -> None:
        self.id, self.backend, self.pool, self.opened, self.last = cid, backend, pool, opened, opened


class Pool:
    """One client's pool: a LIFO stack of idle connections, FIFO waiters."""

    __slots__ = ("size", "idle", "n", "waiting", "peak")

    def __init__(self, size: int) -> None:
        self.size = size
        self.idle: list[Conn] = []        #: the top (most recently returned) is last
        self.n = 0                        #: open connections, idle or busy
        self.waiting: deque[int] = deque()  #: requests waiting for a connection
        self.peak = 0


@dataclass
class PoolLog:
    """What the pools did in one run (for the metrics and the tests)."""

    opened: int = 0
    peak: int = 0                                            #: most connections any pool held at once
    close_t: list[float] = field(default_factory=list)       #: per close: time, node, connection, backend, why
    close_node: list[int] = field(default_factory=list)
    close_conn: list[int] = field(default_factory=list)
    close_backend: list[int] = field(default_factory=list)
    close_reason: list[str] = field(default_factory=list)
    sample_t: list[float] = field(default_factory=list)      #: per node tick: time and the node's
    sample_open: list[int] = field(default_factory=list)     #: open connections after the rebalance


class NodePools:
    """One node's pools and its open connections per backend (eq_lb_active)."""

    def __init__(self, spec: PoolSpec, n_backends: int) -> None:
        self.spec = spec
        self.pools = [Pool(spec.size) for _ in range(spec.clients)]
        self.open = [0] * n_backends
        # the rebalancer's state for the current tick (plan)
        self.quota = [0] * n_backends
        self.gone = [False] * n_backends
        self.budget = 0
        self.prev: np.ndarray | None = None   # last tick's quotas (policy.rebalance.confirmed)

    def acquire(self, pool: int) -> Conn | None:
        """The most recently returned idle connection of a pool, if any."""
        idle = self.pools[pool].idle
        return idle.pop() if idle else None

    def can_open(self, pool: int) -> bool:
        p = self.pools[pool]
        return p.n < p.size

    def open_conn(self, cid: int, pool: int, backend: int, t: float, log: PoolLog) -> Conn:
        p = self.pools[pool]
        if p.n >= p.size:
            raise RuntimeError("pool %d is full (%d connections)" % (pool, p.n))
        p.n += 1
        p.peak = max(p.peak, p.n)
        log.peak = max(log.peak, p.n)
        log.opened += 1
        if backend != UNBOUND:
            self.open[backend] += 1
        return Conn(cid, backend, pool, t)

    def release(self, c: Conn, t: float) -> int | None:
        """A response came back on `c`: the first waiter takes it at once (its
        request index is returned), else it goes on top of the idle stack."""
        p = self.pools[c.pool]
        c.last = t
        if p.waiting:
            return p.waiting.popleft()
        p.idle.append(c)
        return None

    def wait(self, pool: int, request: int) -> None:
        self.pools[pool].waiting.append(request)

    def close(self, c: Conn) -> None:
        """Close an idle connection (the rebalancer's abort)."""
        p = self.pools[c.pool]
        p.idle.remove(c)
        p.n -= 1
        if c.backend != UNBOUND:
            self.open[c.backend] -= 1

    def open_total(self) -> int:
        return sum(p.n for p in self.pools)

    def plan(self, slots: list[int], present: list[bool]) -> None:
        """The agent's writes after a tick: each backend's quota (from the table
        just written) and the service's budget for the tick."""
        raw = excess_quota(np.asarray([self.open]), shares(np.asarray([slots])), np.asarray([present]))
        self.quota = confirmed(raw, self.prev)[0].tolist()   # as the agent: two ticks must agree
        self.prev = raw
        self.gone = [not x for x in present]
        self.budget = self.spec.max_closes

    def walk(self, now: float, rng: np.random.Generator) -> list[tuple[Conn, str]]:
        """One walk of the rebalancer: closes idle connections of backends that
        left, and of backends over their share, while the tick's quotas and
        budget last. Returns what it closed."""
        spec, quota, gone = self.spec, self.quota, self.gone
        if self.budget <= 0 or (not any(quota) and not any(self.open[b] for b in range(len(gone)) if gone[b])):
            return []
        # eligible now, in the kernel's sense: idle long enough and old enough, with a reason
        cand = [c for p in self.pools for c in p.idle
                if now - c.opened >= spec.min_age and now - c.last >= spec.min_idle
                and c.backend != UNBOUND and (gone[c.backend] or quota[c.backend] > 0)]
        out: list[tuple[Conn, str]] = []
        for j in rng.permutation(len(cand)).tolist() if cand else []:
            if self.budget <= 0:
                break
            c = cand[j]
            if gone[c.backend]:
                why = DRAIN
            elif quota[c.backend] > 0:
                quota[c.backend] -= 1
                why = EXCESS
            else:
                continue
            self.budget -= 1
            self.close(c)
            out.append((c, why))
        return out

    def rebalance(self, now: float, slots: list[int], present: list[bool],
                  rng: np.random.Generator) -> list[tuple[Conn, str]]:
        """The tick's quotas and budget, and its first walk."""
        self.plan(slots, present)
        return self.walk(now, rng)
