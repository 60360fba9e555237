"""Deterministic discrete-event simulator of routing quality (issue 6).

* `scenarios` — the seven fixed scenarios (backends, load, events, windows),
  and pooled variants of some (clients that keep their connections).
* `engine` — the event loop: Poisson clients, multi-server FIFO backends,
  per-request proxies, and the agent's tick driving the *same* policy code as
  `equilibriumd.agent.routing` through a per-connection slot-table draw.
* `policies` — the load balancers: proxy (per request) and kernel (per
  connection, via weights) variants, and the oracle.
* `pools` — client connection pools (LIFO reuse, fixed size, waiting) and the
  rebalancer that closes idle connections so they follow the weights.
* `metrics` — latency percentiles, success ratio, shift time, oscillation,
  regret, Wardrop gap, cost against the social optimum; seed aggregation.

Entry point: `scripts/bench routing` (equilibriumd.lab.bench.routing).
"""
