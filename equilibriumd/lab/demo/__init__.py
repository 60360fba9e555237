"""scripts/demo: the UrbanMove services under the `equilibrium` policy, on real connections.

Serves five services (gateway, bus, trajet, user, ticket) with three test
backends each on 127.0.0.0/8, as in daemonset/examples/urbanmove/standalone.yaml,
runs the real agent (`equilibriumd run`, policy equilibrium, tick 0.5 s) attached
to a child cgroup, and drives open-loop load through the frontends
127.77.0.10-14:80 from `equilibriumd.lab.loadgen` inside that cgroup. With
`--clients new` (the default) every request is a new connection, so every
request is a routing decision in the kernel. With `--clients pooled` the same
requests, at the same rates, come from keep-alive pools (per service 8 pools
of at most 8 connections, `--pools`, `--pool-size`): the kernel steers only
the connections the pools open, and the agent's rebalancer closes idle
connections of backends holding more than their share so that the pools
reconnect by the current weights. The figures are the same, measured on
where requests go; the summary adds what the rebalancer closed (the agent's
`connections_rebalanced` events and its per-backend counters), the pools'
connections and reuse, and the failed requests.

Timeline (80 s by default): even split; at t = 20 s backend bus-1 gets 500 ms
slower; at t = 60 s it is restored. Seed Scenario 3 runs beside it: trajet's
backends serve 60 requests/s each (a queue beyond that), trajet runs
`enforce: throttle`, and from t = 30 s the ticket pods (a child cgroup
of the demo's: their own caller) flood trajet with 300 requests/s (to t = 50 s); the agent
must punish them within 5 s (their connects over budget refused), keep the
other callers' trajet p99 within 1.2x of before once contained, and forgive
them within 30 s of their stopping. The flood is a new connection per request
in both modes (connect-level throttling is what it tests; see run.py). Shorter
runs scale the events. A live view refreshes once a second on a terminal; the
run ends with a PNG (bus
shares and weights, bus p99, distance to equilibrium and the regret potential
over time) and a summary: shift_seconds,
recovery_seconds, oscillation, bus p99 before / during / after, agent peak RSS
and tick time, flood_contained_seconds, forgiven_seconds,
honest_p99_ratio_during_flood, and the targets met or missed (pooled: the
request rate instead of the connection rate, plus the rebalancer's closes).

Outputs go to --out (default demo-out/): urbanmove.png, summary.json,
records.jsonl (every request), agent-timeline.jsonl (the agent's view of bus
each tick), agent.log, loadgen.log, runtime-config.yaml.

Everything it creates (cgroup, pins, processes) is removed at the end, also on
Ctrl-C, SIGTERM and errors. `--headless --duration S --summary FILE` runs
without a TTY and writes the summary as JSON.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from .run import main as _main
    return _main(argv, doc=__doc__)
