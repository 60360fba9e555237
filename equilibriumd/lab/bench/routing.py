"""Routing-quality benchmark: Equilibrium against the best load balancers, in
simulation (equilibriumd.lab.sim) and on live traffic (bench.routing_live).

`scripts/bench routing [--quick] [--json FILE] [--seeds N] [--live/--no-live]
[--scenarios a,b] [--policies a,b] [--plots DIR] [--workers N] [--suite all|default|peers]`

By default (`--suite all`) it runs the default suite below, then the peers
suite (issue 16), whose JSON and Markdown go beside the others
(bench-results/routing-peers.json); `--suite default` or `--suite peers` runs
one, and so does a run given --scenarios or --policies (default unless peers).

Simulation: the seven scenarios of equilibriumd.lab.sim.scenarios and the
pooled ones (clients keep their connections in pools: NAME-pooled, each
compared with its per-connection twin NAME, which runs too) x every policy
of equilibriumd.lab.sim.policies (and, in pooled scenarios, the
`equilibrium@no-rebalance` reference) x seeds (default 10; `--quick` 3), on
`--workers` processes (default 2). Every metric is the mean over seeds with a
Student-t 95 % interval. Prints one table per scenario and the verdict on
issue 6's targets, then the pooled scenarios and the verdict on the pool
targets; writes JSON (default bench-results/routing.json)

    {"scenarios": {scenario: {policy: {"p50_seconds", "p99_seconds", "p999_seconds",
        "success_ratio", "shift_seconds", "oscillation", "cost_ratio",
        "external_regret_seconds", "wardrop_gap_seconds", "ci95": {...}, "n": {...}, "seeds",
        pooled scenarios also: "pool_wait_ratio", "connections", "closes_per_second",
        "close_fraction_per_second", "opened_per_second", "excess_closes", "drain_closes"}}},
     "live": {...} | null, "targets": {..., "pools": {...}}, "settings": {...}, "machine": {...}}

(absent metrics null) and PNG plots (default bench-results/routing/): per
scenario, latency CDFs of every policy and shares over time of a few, from
seed 0.

`--suite peers` (issue 16; simulated only): the scenarios
of scenarios.PEER_SCENARIOS x equilibrium, p2c-ewma, round-robin, the oracle
and policies.PEERS and PEERS_KERNEL (their @kernel forms; each overridable with
--scenarios / --policies). Every run
adds metrics.PEER_METRICS (success within 1 s, mean latency, throughput,
external regret per node, the load at which the p99 doubles in a ramp) and
"per_seed" (PAIRED_METRICS seed by seed); "targets"."peers" holds the
seed-by-seed ratios of every policy over the oracle's and over equilibrium's
("paired": mean latency over the oracle's is the empirical price of anarchy)
and issue 16's targets.

Live (default in the full run, off with --quick or --no-live): see
bench.routing_live.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import common

TARGET_POLICY = "equilibrium"
PEER = "p2c-ewma"
#: pool targets: p99 pooled / p99 with one connection per request, for kernel policies
POOL_P99_RATIO = 1.1
#: ... at or below the peer's p99 in at least this fraction of the pooled scenarios
POOL_AT_OR_BELOW = 0.5
#: ... and rebalancing closes at most this fraction of the connections per second, steady and equal
POOL_CLOSE_FRACTION = 0.05
#: the pooled scenario with equal backends and nothing happening
POOL_STEADY = "steady-pooled"
SHARE_PLOT_POLICIES = ("equilibrium", "equilibrium-tolls", "p2c-ewma", "p2c-ewma@kernel", "round-robin", "oracle")
#: `--suite peers` (issue 16): the peer scenarios' metrics everywhere (set by main before the workers fork)
PEER_SUITE = False
#: `--suite peers`: the policies besides policies.PEERS (the oracle: the reference of the price of anarchy)
PEER_BASE = ("equilibrium", "p2c-ewma", "round-robin", "oracle")
#: per-seed values kept for the seed-by-seed ratios (peer runs only)
PAIRED_METRICS = ("p50_seconds", "p99_seconds", "p999_seconds", "success_within_1s", "mean_latency_seconds",
                  "throughput_per_second", "node_regret_seconds", "shift_seconds", "p99_doubling_load")
#: issue 16's targets: equilibrium's p99 at or below the best peer in at least half the scenarios,
#: never above 1.25x it; mean latency / oracle <= 1.10 where a peer reaches that; Linkerd's setup:
#: success within 1 s >= 99.95 %; homogeneous CPU-bound: throughput >= 0.98x and p99 <= 1.05x round robin
PEER_P99_MAX = 1.25
PEER_POA_MAX = 1.10
LINKERD_SUCCESS = 0.9995
HOMOGENEOUS_THROUGHPUT = 0.98
HOMOGENEOUS_P99 = 1.05
CDF_POINTS = np.concatenate([np.linspace(0.0, 0.99, 100), 1 - np.logspace(-2, -4, 41)[1:]])


def _task(args: tuple[str, str, int]) -> tuple[str, str, int, dict[str, Any], dict[str, Any] | None, float]:
    from equilibriumd.lab.sim.engine import simulate
    from equilibriumd.lab.sim.metrics import _window_stats, caller_metrics, peer_metrics, ramp_p99, run_metrics
    from equilibriumd.lab.sim.scenarios import CALLERS, PEER_SCENARIOS, RAMPS, SCENARIOS

    name, policy, seed = args
    sc = SCENARIOS[name]
    t0 = time.perf_counter()
    run = simulate(sc, policy, seed)
    met = run_metrics(run, sc, _optimum(name))
    if PEER_SUITE or name in PEER_SCENARIOS:   # issue 16's figures: opt-in, the default JSON is unchanged
        met.update(peer_metrics(run, sc))
    if name in CALLERS:        # scenarios with callers (overload): per-caller success and fairness
        met.update(caller_metrics(run, sc, CALLERS[name], seed))
    extra = None
    if seed == 0:
        m = (run.arrival >= sc.warmup) & ~run.error
        lat = run.latency[m]
        shares, _, _ = _window_stats(run, sc, 0.0, sc.duration, 1.0, np.zeros(run.arrival.size))
        extra = {"cdf": np.quantile(lat, CDF_POINTS).tolist() if lat.size else [],
                 "shares": shares.tolist()}
        if name in RAMPS:      # Prequal's figure: the p99 per load bin of the ramp (plots)
            extra["ramp"] = ramp_p99(run, sc, RAMPS[name])
    return name, policy, seed, met, extra, time.perf_counter() - t0


_OPT: dict[str, float] = {}


def _optimum(name: str) -> float:
    from equilibriumd.lab.sim.metrics import social_optimum
    from equilibriumd.lab.sim.scenarios import SCENARIOS
    if name not in _OPT:
        _OPT[name] = social_optimum(SCENARIOS[name])
    return _OPT[name]


def run_sim(plan: dict[str, list[str]], seeds: int, workers: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every (scenario, policy) of `plan` (scenario -> its policies) x seeds."""
    from equilibriumd.lab.sim.metrics import aggregate

    tasks = [(s, p, k) for k in range(seeds) for s, ps in plan.items() for p in ps]
    # the slow ones (many-nodes with 20 agents) first, for an even finish
    tasks.sort(key=lambda t: (t[0] != "many-nodes", t[2]))
    per: dict[tuple[str, str], list[tuple[int, dict[str, Any]]]] = {}
    extras: dict[str, dict[str, Any]] = {}
    done, t0, busy = 0, time.monotonic(), 0.0
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(workers) as pool:
        for name, policy, seed, met, extra, secs in pool.imap_unordered(_task, tasks, chunksize=1):
            per.setdefault((name, policy), []).append((seed, met))
            if extra is not None:
                extras.setdefault(name, {})[policy] = extra
            done += 1
            busy += secs
            if done % max(1, len(tasks) // 10) == 0 or done == len(tasks):
                common.progress("simulated %d/%d runs in %.0f s" % (done, len(tasks), time.monotonic() - t0))
    out: dict[str, Any] = {}
    for s, ps in plan.items():
        out[s] = {}
        for p in ps:
            rows = [m for _, m in sorted(per[(s, p)], key=lambda x: x[0])]
            out[s][p] = aggregate(rows)
            # per seed, in seed order: every policy meets the same traffic per seed
            # (common random numbers), so two policies compare seed by seed
            out[s][p]["p99_per_seed"] = [m.get("p99_seconds") for m in rows]
            if any("mean_latency_seconds" in m for m in rows):   # peer runs: every paired metric, per seed
                out[s][p]["per_seed"] = {k: [m.get(k) for m in rows] for k in PAIRED_METRICS}
    return out, extras


def paired_p99(sim: dict[str, Any], a: str, b: str) -> dict[str, Any]:
    """Per scenario, p99 of `a` over `b` seed by seed (same traffic): mean ratio with a
    95 % interval, and in how many seeds `a` was at or below `b`."""
    out: dict[str, Any] = {}
    for s, r in sim.items():
        if a not in r or b not in r:
            continue
        pr = _paired(r[a].get("p99_per_seed", []), r[b].get("p99_per_seed", []))
        if pr is not None:
            out[s] = pr
    return out


def _paired(xs: list[float | None], ys: list[float | None]) -> dict[str, Any] | None:
    """x / y seed by seed: mean ratio with a 95 % interval, and the seeds with x <= y."""
    from equilibriumd.lab.sim.metrics import mean_ci

    pairs = [(x, y) for x, y in zip(xs, ys) if x is not None and y]
    if not pairs:
        return None
    mu, lo, hi, n = mean_ci([x / y for x, y in pairs])
    return {"mean_ratio": mu, "ci95": [lo, hi], "seeds_at_or_below": sum(1 for x, y in pairs if x <= y), "seeds": n}


# --- table and targets --------------------------------------------------------------

def scenario_table(name: str, res: dict[str, Any]) -> str:
    headers = ["policy", "p50 ms", "p99 ms", "±", "p99.9 ms", "success", "shift s", "oscill.", "regret ms",
               "wardrop ms", "cost/opt"]
    rows = []
    for pol, r in res.items():
        lo, hi = r["ci95"]["p99_seconds"]
        half = (hi - lo) / 2 if lo is not None and hi is not None else None
        rows.append([pol, common.ms(r["p50_seconds"]), common.ms(r["p99_seconds"]), common.ms(half),
                     common.ms(r["p999_seconds"]), common.num(r["success_ratio"], 4),
                     common.num(r["shift_seconds"], 1), common.num(r["oscillation"]),
                     common.ms(r["external_regret_seconds"]), common.ms(r["wardrop_gap_seconds"]),
                     common.num(r["cost_ratio"], 2)])
    return common.table(headers, rows)


def summary_table(sim: dict[str, Any], pols: list[str]) -> str:
    """p99 (ms) per scenario x policy: the README's summary."""
    headers = ["scenario"] + pols
    rows = [[s] + [common.ms(sim[s][p]["p99_seconds"]) if p in sim[s] else "-" for p in pols] for s in sim]
    return common.table(headers, rows)


def targets(sim: dict[str, Any]) -> dict[str, Any]:
    """Issue 6's targets for `equilibrium` (only for the scenarios present)."""
    out: dict[str, Any] = {}
    eq = {s: r.get(TARGET_POLICY) for s, r in sim.items()}
    peer = {s: r.get(PEER) for s, r in sim.items()}
    ratios: dict[str, float | None] = {}
    for s in sim:
        a = eq[s] and eq[s]["p99_seconds"]
        b = peer[s] and peer[s]["p99_seconds"]
        ratios[s] = (a / b) if a is not None and b else None
    valid = {s: r for s, r in ratios.items() if r is not None}
    at_or_below = [s for s, r in valid.items() if r <= 1.0]
    out["p99_vs_p2c_ewma"] = {"ratios": ratios, "at_or_below": at_or_below,
                              "met_4_of_7": len(at_or_below) >= 4,
                              "never_above_1_25": bool(valid) and max(valid.values()) <= 1.25,
                              "paired": paired_p99(sim, TARGET_POLICY, PEER)}
    if "many-nodes" in valid:
        out["many_nodes_below_p2c_ewma"] = valid["many-nodes"] < 1.0
    if "heterogeneous" in sim and "equilibrium-tolls" in sim["heterogeneous"]:
        c = sim["heterogeneous"]["equilibrium-tolls"]["cost_ratio"]
        out["tolls_heterogeneous_cost_ratio"] = c
        out["tolls_within_1_02"] = c is not None and c <= 1.02
    if "fast-failing" in sim and eq.get("fast-failing") and peer.get("fast-failing"):
        a, b = eq["fast-failing"]["success_ratio"], peer["fast-failing"]["success_ratio"]
        out["fast_failing_success"] = {"equilibrium": a, "p2c-ewma": b, "met": a is not None and b is not None
                                       and a >= b}
    return out


def targets_text(t: dict[str, Any]) -> str:
    lines = []
    pv = t.get("p99_vs_p2c_ewma", {})
    rs = ", ".join("%s %.2f" % (s, r) for s, r in pv.get("ratios", {}).items() if r is not None)
    lines.append("p99 equilibrium / p2c-ewma: %s" % rs)
    lines.append("  at or below in %d scenario(s) (target >= 4): %s" % (len(pv.get("at_or_below", [])),
                                                                   "met" if pv.get("met_4_of_7") else "MISSED"))
    lines.append("  never above 1.25x: %s" % ("met" if pv.get("never_above_1_25") else "MISSED"))
    pr = pv.get("paired", {})
    if pr:
        lines.append("  seed by seed (same traffic): " + ", ".join(
            "%s %s (%s-%s), lower or equal in %d/%d" % (s, common.num(x["mean_ratio"], 2), common.num(x["ci95"][0], 2),
                                                      common.num(x["ci95"][1], 2), x["seeds_at_or_below"], x["seeds"])
            for s, x in pr.items()))
    if "many_nodes_below_p2c_ewma" in t:
        lines.append("  below p2c-ewma in many-nodes: %s" % ("met" if t["many_nodes_below_p2c_ewma"] else "MISSED"))
    if "tolls_heterogeneous_cost_ratio" in t:
        c = t["tolls_heterogeneous_cost_ratio"]
        lines.append("equilibrium-tolls cost / social optimum in heterogeneous: %s (target <= 1.02): %s"
                     % (common.num(c, 3), "met" if t["tolls_within_1_02"] else "MISSED"))
    if "fast_failing_success" in t:
        f = t["fast_failing_success"]
        lines.append("fast-failing success ratio: equilibrium %s vs p2c-ewma %s: %s"
                     % (common.num(f["equilibrium"], 4), common.num(f["p2c-ewma"], 4), "met" if f["met"] else "MISSED"))
    return "\n".join(lines)


def caller_table(res: dict[str, Any]) -> str:
    """Scenarios with callers: p99, success overall / of the callers within their max-min fair
    share / above it, Jain's index of throughput over fair share, and each caller's success."""
    headers = ["policy", "p99 ms", "success", "within fair", "above fair", "Jain"]   # success: steady window
    k = len(next(iter(res.values()))["caller_success"])
    headers += ["c%d" % i for i in range(k)]
    flood = any("honest_p99_ratio_no_flood" in r for r in res.values())   # scenarios with an attacker
    if flood:
        headers += ["honest p99 ms", "no flood", "ratio", "flood admitted/s"]
    rows = []
    for pol, r in res.items():
        rows.append([pol, common.ms(r["p99_seconds"]), common.num(r["success_steady"], 4),
                     common.num(r["success_within_fair_share"], 4), common.num(r["success_above_fair_share"], 4),
                     common.num(r["jain_index"], 3)] + [common.num(x, 3) for x in r["caller_success"]])
        if flood:
            rows[-1] += [common.ms(r.get("honest_p99_seconds")), common.ms(r.get("honest_p99_no_flood_seconds")),
                         common.num(r.get("honest_p99_ratio_no_flood"), 2),
                         common.num(r.get("flooder_admitted_per_second"), 1)]
    return common.table(headers, rows)


# --- peer suite (issue 16) ----------------------------------------------------------

def _is_peer(policy: str) -> bool:
    """A peer of equilibrium: neither one of its variants nor the oracle (the reference)."""
    return not policy.startswith("equilibrium") and policy != "oracle"


def peer_paired(sim: dict[str, Any]) -> dict[str, Any]:
    """Per scenario and policy, every PAIRED_METRICS seed by seed (same traffic) over the oracle's
    and over equilibrium's: mean ratio, 95 % interval, seeds at or below. Over the oracle,
    `mean_latency_seconds` is the empirical price of anarchy."""
    out: dict[str, Any] = {}
    for s, r in sim.items():
        for p, x in r.items():
            if "per_seed" not in x:
                continue
            row: dict[str, Any] = {}
            for ref, key in (("oracle", "vs_oracle"), (TARGET_POLICY, "vs_equilibrium")):
                if ref in r and ref != p and "per_seed" in r[ref]:
                    row[key] = {k: _paired(x["per_seed"][k], r[ref]["per_seed"][k]) for k in PAIRED_METRICS}
            out.setdefault(s, {})[p] = row
    return out


def _poa(paired: dict[str, Any], s: str, p: str) -> float | None:
    x = paired.get(s, {}).get(p, {}).get("vs_oracle", {}).get("mean_latency_seconds")
    return None if x is None else x["mean_ratio"]


def peer_targets(sim: dict[str, Any]) -> dict[str, Any]:
    """Issue 16's targets for `equilibrium` over the scenarios present (see PEER_P99_MAX...)."""
    paired = peer_paired(sim)
    out: dict[str, Any] = {"paired": paired}
    ratios: dict[str, Any] = {}
    poa: dict[str, Any] = {}
    for s, r in sim.items():
        eq = r.get(TARGET_POLICY)
        peers = {p: x["p99_seconds"] for p, x in r.items() if _is_peer(p) and x["p99_seconds"] is not None}
        if eq is not None and eq["p99_seconds"] is not None and peers:
            best = min(peers, key=lambda p: peers[p])
            ratios[s] = {"best_peer": best, "ratio": _ratio(eq["p99_seconds"], peers[best])}
        pe = {p: _poa(paired, s, p) for p in r if p != "oracle"}
        reach = [p for p, v in pe.items() if _is_peer(p) and v is not None and v <= PEER_POA_MAX]
        e = pe.get(TARGET_POLICY)
        poa[s] = {"by_policy": pe, "peers_within": reach, "applies": bool(reach),
                  "met": None if not reach else e is not None and e <= PEER_POA_MAX}
    valid = {s: x["ratio"] for s, x in ratios.items() if x["ratio"] is not None}
    below = [s for s, v in valid.items() if v <= 1.0]
    out["p99_vs_best_peer"] = {"ratios": ratios, "at_or_below": below,
                               "met_half": bool(valid) and 2 * len(below) >= len(valid),
                               "never_above": bool(valid) and max(valid.values()) <= PEER_P99_MAX,
                               "max_ratio": PEER_P99_MAX}
    out["price_of_anarchy"] = {"scenarios": poa, "max": PEER_POA_MAX,
                               "met": all(x["met"] for x in poa.values() if x["applies"])}
    lk = sim.get("linkerd-2016", {}).get(TARGET_POLICY)
    if lk is not None:
        v = lk.get("success_within_1s")
        out["linkerd_2016_success"] = {"value": v, "target": LINKERD_SUCCESS,
                                       "met": v is not None and v >= LINKERD_SUCCESS}
    hc = sim.get("homogeneous-cpu", {})
    if TARGET_POLICY in hc and "round-robin" in hc:
        e, rr = hc[TARGET_POLICY], hc["round-robin"]
        tr = _ratio(e.get("throughput_per_second"), rr.get("throughput_per_second"))
        pr = _ratio(e["p99_seconds"], rr["p99_seconds"])
        out["homogeneous_vs_round_robin"] = {
            "throughput_ratio": tr, "p99_ratio": pr,
            "met": tr is not None and pr is not None and tr >= HOMOGENEOUS_THROUGHPUT and pr <= HOMOGENEOUS_P99}
    return out


def peer_table(name: str, res: dict[str, Any], paired: dict[str, Any]) -> str:
    """One peer scenario: percentiles, success within 1 s, mean latency and its ratio to the
    oracle's (seed by seed), regret per node, throughput, shift, p99 over equilibrium's (seed
    by seed), and the load at which the p99 doubles (ramps)."""
    headers = ["policy", "p50 ms", "p99 ms", "p99.9 ms", "succ<1s", "mean ms", "mean/oracle", "regret ms",
               "thr/s", "shift s", "p99/eq", "p99x2 load"]
    rows = []
    for pol, r in res.items():
        pe = paired.get(name, {}).get(pol, {})
        vs_eq = pe.get("vs_equilibrium", {}).get("p99_seconds")
        rows.append([pol, common.ms(r["p50_seconds"]), common.ms(r["p99_seconds"]), common.ms(r["p999_seconds"]),
                     common.num(r.get("success_within_1s"), 4), common.ms(r.get("mean_latency_seconds")),
                     common.num(_poa(paired, name, pol), 3), common.ms(r.get("node_regret_seconds")),
                     common.num(r.get("throughput_per_second"), 1), common.num(r["shift_seconds"], 1),
                     common.num(None if vs_eq is None else vs_eq["mean_ratio"], 2),
                     common.num(r.get("p99_doubling_load"), 3)])
    return common.table(headers, rows)


def peer_targets_text(t: dict[str, Any]) -> str:
    lines = []
    pv = t["p99_vs_best_peer"]
    lines.append("p99 %s / best peer: %s" % (TARGET_POLICY, ", ".join(
        "%s %s (%s)" % (s, common.num(x["ratio"], 2), x["best_peer"]) for s, x in pv["ratios"].items())))
    lines.append("  at or below in %d of %d (target >= half): %s; never above %.2fx: %s" % (
        len(pv["at_or_below"]), sum(1 for x in pv["ratios"].values() if x["ratio"] is not None),
        "met" if pv["met_half"] else "MISSED", pv["max_ratio"], "met" if pv["never_above"] else "MISSED"))
    pa = t["price_of_anarchy"]
    lines.append("mean latency / oracle (seed by seed) of %s: %s" % (TARGET_POLICY, ", ".join(
        "%s %s%s" % (s, common.num(x["by_policy"].get(TARGET_POLICY), 3), "" if x["applies"] else " (no peer <= %.2f)"
                     % pa["max"]) for s, x in pa["scenarios"].items())))
    missed = [s for s, x in pa["scenarios"].items() if x["applies"] and not x["met"]]
    lines.append("  <= %.2f wherever a peer reaches it: %s" % (pa["max"], "met" if pa["met"] else
                                                               "MISSED in " + ", ".join(missed)))
    if "linkerd_2016_success" in t:
        x = t["linkerd_2016_success"]
        lines.append("linkerd-2016 success within 1 s: %s (target >= %s): %s" % (
            common.num(x["value"], 5), x["target"], "met" if x["met"] else "MISSED"))
    if "homogeneous_vs_round_robin" in t:
        x = t["homogeneous_vs_round_robin"]
        lines.append("homogeneous-cpu vs round-robin: throughput %s (>= %.2f), p99 %s (<= %.2f): %s" % (
            common.num(x["throughput_ratio"], 4), HOMOGENEOUS_THROUGHPUT, common.num(x["p99_ratio"], 2),
            HOMOGENEOUS_P99, "met" if x["met"] else "MISSED"))
    return "\n".join(lines)


# --- pooled scenarios ---------------------------------------------------------------

def _twin_policy(policy: str) -> str:
    """The policy a pooled run is compared with in the per-connection twin (a pool-only
    variant is the target policy there: without pools it changes nothing)."""
    from equilibriumd.lab.sim import policies
    return TARGET_POLICY if policy in policies.POOL_ONLY else policy


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def pool_targets(sim: dict[str, Any], pooled: list[str]) -> dict[str, Any]:
    """The pool targets (only for the pooled scenarios present, with their twins):
    p99 pooled / per connection per policy (<= 1.1 for kernel policies; the pool-only
    reference is reported, not counted), equilibrium against per-request p2c-ewma
    (at or below in at least half), and rebalance closes per second over the open
    connections in the steady equal-backends scenario (<= 5 %)."""
    from equilibriumd.lab.sim import policies
    from equilibriumd.lab.sim.scenarios import SCENARIOS

    ratio: dict[str, dict[str, Any]] = {}
    closes: dict[str, dict[str, Any]] = {}
    for s in pooled:
        twin = SCENARIOS[s].twin
        ratio[s], closes[s] = {}, {}
        for p, r in sim[s].items():
            ref = sim.get(twin or "", {}).get(_twin_policy(p))
            if ref is not None:
                x = _ratio(r["p99_seconds"], ref["p99_seconds"])
                ratio[s][p] = {"pooled": r["p99_seconds"], "per_connection": ref["p99_seconds"], "ratio": x,
                               "paired": _paired(r.get("p99_per_seed", []), ref.get("p99_per_seed", [])),
                               "counted": policies.kind(p) == "kernel" and p not in policies.POOL_ONLY,
                               "within": x is not None and x <= POOL_P99_RATIO}
            if r.get("connections") is not None:
                closes[s][p] = {k: r.get(k) for k in ("closes_per_second", "connections", "close_fraction_per_second",
                                                      "excess_closes", "drain_closes", "opened_per_second",
                                                      "pool_wait_ratio")}
    counted = [(s, p) for s in ratio for p, x in ratio[s].items() if x["counted"]]
    missed = ["%s/%s" % (s, p) for s, p in counted if not ratio[s][p]["within"]]
    eq = {s: ratio[s][TARGET_POLICY] for s in ratio if TARGET_POLICY in ratio[s]}
    out: dict[str, Any] = {
        "p99_pooled_over_per_connection": ratio,
        "target_ratio": POOL_P99_RATIO,
        "equilibrium_within": {"ratios": {s: x["ratio"] for s, x in eq.items()},
                               "missed": [s for s, x in eq.items() if not x["within"]],
                               "met": bool(eq) and all(x["within"] for x in eq.values())},
        "kernel_within": {"met": len(counted) - len(missed), "of": len(counted), "missed": missed},
        "closes": closes,
    }
    vs = {s: _ratio(sim[s][TARGET_POLICY]["p99_seconds"], sim[s][PEER]["p99_seconds"])
          for s in pooled if TARGET_POLICY in sim[s] and PEER in sim[s]}
    valid = {s: x for s, x in vs.items() if x is not None}
    below = [s for s, x in valid.items() if x <= 1.0]
    out["p99_vs_p2c_ewma"] = {"ratios": vs, "at_or_below": below,
                              "met_half": bool(valid) and len(below) >= POOL_AT_OR_BELOW * len(valid),
                              "paired": paired_p99({s: sim[s] for s in pooled}, TARGET_POLICY, PEER)}
    if POOL_STEADY in closes and TARGET_POLICY in closes[POOL_STEADY]:
        f = closes[POOL_STEADY][TARGET_POLICY]["close_fraction_per_second"]
        out["steady_close_fraction"] = {"scenario": POOL_STEADY, "policy": TARGET_POLICY, "fraction": f,
                                        "target": POOL_CLOSE_FRACTION,
                                        "met": f is not None and f <= POOL_CLOSE_FRACTION,
                                        "by_policy": {p: x["close_fraction_per_second"]
                                                      for p, x in closes[POOL_STEADY].items()}}
    return out


def pool_tables(sim: dict[str, Any], pooled: list[str], pols: list[str], tg: dict[str, Any]) -> str:
    """p99 pooled (ms), the ratio to the per-connection twin, and the rebalancer's closes."""
    rat = tg["p99_pooled_over_per_connection"]
    cols = [p for p in pols if any(p in sim[s] for s in pooled)]
    rows = [[s] + [common.ms(sim[s][p]["p99_seconds"]) if p in sim[s] else "-" for p in cols] for s in pooled]
    out = ["p99 (ms):", common.table(["scenario"] + cols, rows), "",
           "p99 pooled / p99 with one connection per request (same policy, same traffic):"]
    rows = [[s] + [common.num(rat[s][p]["ratio"], 2) if p in rat.get(s, {}) else "-" for p in cols] for s in pooled]
    out += [common.table(["scenario"] + cols, rows), ""]
    cl = tg["closes"]
    kcols = [p for p in cols if any(p in cl.get(s, {}) for s in pooled)]
    rows = []
    for s in pooled:
        row = [s]
        for p in kcols:
            x = cl.get(s, {}).get(p)
            row.append("-" if x is None else "%s/s of %s = %s" % (
                common.num(x["closes_per_second"], 2), common.num(x["connections"], 0),
                "-" if x["close_fraction_per_second"] is None else "%.1f%%" % (100 * x["close_fraction_per_second"])))
        rows.append(row)
    out += ["rebalancing, steady window: closes per second of the open connections:",
            common.table(["scenario"] + kcols, rows)]
    return "\n".join(out)


def pool_targets_text(t: dict[str, Any]) -> str:
    lines = []
    ew = t["equilibrium_within"]
    lines.append("p99 %s pooled / per connection: %s (target <= %.1f): %s" % (
        TARGET_POLICY, ", ".join("%s %s" % (s, common.num(x, 2)) for s, x in ew["ratios"].items()),
        t["target_ratio"], "met" if ew["met"] else "MISSED in " + ", ".join(ew["missed"])))
    for s, x in t["p99_pooled_over_per_connection"].items():
        pr = x.get(TARGET_POLICY, {}).get("paired")
        if pr:
            lines.append("  %s seed by seed: %s (%s-%s), pooled lower or equal in %d/%d" % (
                s, common.num(pr["mean_ratio"], 2), common.num(pr["ci95"][0], 2), common.num(pr["ci95"][1], 2),
                pr["seeds_at_or_below"], pr["seeds"]))
    kw = t["kernel_within"]
    lines.append("kernel policies within %.1fx: %d of %d (scenario, policy)%s" % (
        t["target_ratio"], kw["met"], kw["of"], "; missed: " + ", ".join(kw["missed"]) if kw["missed"] else ""))
    pv = t["p99_vs_p2c_ewma"]
    lines.append("p99 %s / %s in pooled scenarios: %s" % (TARGET_POLICY, PEER, ", ".join(
        "%s %.2f" % (s, x) for s, x in pv["ratios"].items() if x is not None)))
    lines.append("  at or below in %d of %d (target >= half): %s" % (
        len(pv["at_or_below"]), sum(1 for x in pv["ratios"].values() if x is not None),
        "met" if pv["met_half"] else "MISSED"))
    if pv["paired"]:
        lines.append("  seed by seed (same traffic): " + ", ".join(
            "%s %s (%s-%s), lower or equal in %d/%d" % (s, common.num(x["mean_ratio"], 2), common.num(x["ci95"][0], 2),
                                                      common.num(x["ci95"][1], 2), x["seeds_at_or_below"], x["seeds"])
            for s, x in pv["paired"].items()))
    sf = t.get("steady_close_fraction")
    if sf:
        others = ", ".join("%s %s" % (p, "-" if f is None else "%.1f%%" % (100 * f))
                           for p, f in sf["by_policy"].items() if p != sf["policy"])
        lines.append("rebalance closes per second / connections in %s: %s %s (target <= %.0f%%): %s" % (
            sf["scenario"], sf["policy"], "-" if sf["fraction"] is None else "%.2f%%" % (100 * sf["fraction"]),
            100 * sf["target"], "met" if sf["met"] else "MISSED"))
        lines.append("  other kernel policies: " + others)
    return "\n".join(lines)


def markdown(sim: dict[str, Any], pols: list[str], tg: dict[str, Any], seeds: int,
             live: dict[str, Any] | None, pooled: list[str] | None = None) -> str:
    """The README's summary: p99 and success per scenario x policy, target verdicts, live rows."""
    def md(headers: list[str], rows: list[list[str]]) -> str:
        return "\n".join(["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] +
                          ["| " + " | ".join(r) + " |" for r in rows])
    out = ["p99 latency in ms (mean over %d seeds; success ratio under the 1 s timeout in brackets when below 0.999):"
           % seeds, ""]
    rows = []
    for s in [x for x in sim if x not in (pooled or [])]:
        row = [s]
        for p in pols:
            r = sim[s].get(p)
            if r is None:
                row.append("-")
                continue
            cell = common.ms(r["p99_seconds"])
            if r["success_ratio"] is not None and r["success_ratio"] < 0.999:
                cell += " (%.3f)" % r["success_ratio"]
            row.append(cell)
        rows.append(row)
    out += [md(["scenario"] + pols, rows), ""]
    if tg.get("p99_vs_p2c_ewma", {}).get("ratios") or "peers" not in tg:   # issue 6's, when its scenarios ran
        out += ["```", targets_text(tg), "```", ""]
    if "peers" in tg:
        out += ["Issue 16 (peer scenarios; ratios seed by seed over the same traffic):", "", "```"]
        out += ["%s\n%s\n" % (s, peer_table(s, sim[s], tg["peers"]["paired"])) for s in tg["peers"]["paired"]]
        out += [peer_targets_text(tg["peers"]), "```", ""]
    if pooled and "pools" in tg:
        out += ["Pooled scenarios (clients keep their connections in pools):", "", "```",
                pool_tables(sim, pooled, pols, tg["pools"]), "", pool_targets_text(tg["pools"]), "```", ""]
    if live and "scenarios" in live:
        out += ["Live subset (%s):" % live.get("note", ""), "", "```", routing_live_table(live), "```", ""]
    return "\n".join(out)


def routing_live_table(live: dict[str, Any]) -> str:
    from . import routing_live
    return routing_live.table(live)


# --- plots --------------------------------------------------------------------------

def plots(extras: dict[str, Any], out_dir: str) -> list[str]:
    """Latency CDFs (every policy) and shares over time (a few policies), seed 0."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        common.progress("matplotlib not installed (pip install -e '.[lab]'): no plots")
        return []
    from equilibriumd.lab.sim.metrics import RAMP_BIN
    from equilibriumd.lab.sim.scenarios import SCENARIOS

    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig: Any, p: Path) -> str:
        fig.tight_layout()
        fig.savefig(p, dpi=90)
        plt.close(fig)
        return str(p)
    for name, pols in extras.items():
        fig, ax = plt.subplots(figsize=(8, 5))
        for pol, e in pols.items():
            if not e["cdf"]:
                continue
            style = "-" if "@kernel" not in pol else "--"
            lw = 2.5 if pol.startswith("equilibrium") else 1.2
            ax.plot(e["cdf"], CDF_POINTS, style, lw=lw, label=pol)
        ax.set_xscale("log")
        ax.set_xlabel("latency (s), non-5xx answers")
        ax.set_ylabel("CDF")
        ax.set_title("%s — latency CDF (seed 0)" % name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        p = d / ("%s-cdf.png" % name)
        written.append(save(fig, p))

        ramps = {pol: e["ramp"] for pol, e in pols.items() if e.get("ramp")}
        if ramps:        # Prequal's figure: p99 against the load, and where each one's doubles
            fig, ax = plt.subplots(figsize=(8, 5))
            for pol, (p0, curve) in ramps.items():
                if not curve:
                    continue
                style = "-" if "@kernel" not in pol else "--"
                lw = 2.5 if pol.startswith("equilibrium") else 1.2
                line = ax.plot([c[0] for c in curve], [c[1] for c in curve], style, lw=lw, label=pol)
                at = next((c for c in curve if c[1] >= 2 * p0), None)   # where its p99 doubles
                if at is not None:
                    ax.plot([at[0]], [at[1]], "o", color=line[0].get_color(), ms=5)
            ax.set_yscale("log")
            ax.set_xlabel("load (x capacity)")
            ax.set_ylabel("p99 (s) per %.3gx load bin" % RAMP_BIN)
            ax.set_title("%s — p99 along the ramp, dots where it doubles (seed 0)" % name)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
            p = d / ("%s-p99-load.png" % name)
            written.append(save(fig, p))

        show = [p for p in SHARE_PLOT_POLICIES if p in pols]
        if not show:
            continue
        fig, axes = plt.subplots(len(show), 1, figsize=(8, 1.8 * len(show)), sharex=True)
        axes = np.atleast_1d(axes)
        sc = SCENARIOS[name]
        for ax, pol in zip(axes, show):
            sh = np.array(pols[pol]["shares"])
            x = np.arange(sh.shape[0]) + 0.5
            ax.stackplot(x, sh.T, labels=["b%d" % i for i in range(sh.shape[1])])
            ax.set_ylim(0, 1)
            ax.set_ylabel(pol, fontsize=7)
            for e in sc.events:
                ax.axvline(e.at, color="k", lw=0.8, ls=":")
        axes[0].set_title("%s — share of new requests per backend, 1 s windows (seed 0)" % name)
        axes[-1].set_xlabel("time (s)")
        axes[0].legend(fontsize=6, ncol=min(sh.shape[1], 11), loc="upper right")
        p = d / ("%s-shares.png" % name)
        written.append(save(fig, p))
    return written


# --- main ---------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    from equilibriumd.lab.sim import policies
    from equilibriumd.lab.sim.scenarios import CALLERS, NAMES, PEER_SCENARIOS, POOLED, SCENARIOS

    global PEER_SUITE
    ap = argparse.ArgumentParser(prog="scripts/bench routing", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 seeds, no live subset (a few minutes at most)")
    ap.add_argument("--json", default="bench-results/routing.json", help="output file")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per scenario and policy (default 10; quick 3)")
    ap.add_argument("--workers", type=int, default=2, help="simulation processes")
    ap.add_argument("--scenarios", default=None,
                    help="comma-separated subset (a pooled scenario brings its per-connection twin; default: "
                    "issue 6's seven and the pooled ones, or with --suite peers %s)" % ", ".join(PEER_SCENARIOS))
    ap.add_argument("--policies", default=None,
                    help="comma-separated subset (with %s, pooled scenarios also run %s; default: policies.ALL, "
                    "or with --suite peers %s and the peers)" % (TARGET_POLICY, ", ".join(policies.POOL_ONLY),
                                                                 ", ".join(PEER_BASE)))
    ap.add_argument("--suite", choices=("all", "default", "peers"), default="all",
                    help="default: issue 6's scenarios and the pooled ones (the live subset included); peers: "
                    "issue 16's scenarios and peer policies, their metrics (success within 1 s, mean latency / "
                    "oracle, regret per node, throughput, p99-doubling load) and targets, simulated only; all "
                    "(the default): both, the peers' JSON and Markdown beside the others as NAME-peers "
                    "(with --scenarios or --policies: default)")
    ap.add_argument("--plots", default="bench-results/routing", help="directory for PNG plots ('' for none)")
    ap.add_argument("--markdown", default="bench-results/routing.md",
                    help="summary (tables and target verdicts) in Markdown, for the README ('' for none)")
    ap.add_argument("--live", dest="live", action="store_true", default=None, help="run the live subset")
    ap.add_argument("--no-live", dest="live", action="store_false", help="skip the live subset")
    ap.add_argument("--live-seconds", type=float, default=None, help="length of each live run (default 24)")
    args = ap.parse_args(argv)
    if args.suite == "all":
        rest = list(sys.argv[1:] if argv is None else argv)
        rc = main(rest + ["--suite", "default"])
        if rc or args.scenarios is not None or args.policies is not None:
            return rc
        more = ["--suite", "peers", "--no-live", "--json", _beside(args.json, "peers")]
        if args.markdown:
            more += ["--markdown", _beside(args.markdown, "peers")]
        return main(rest + more)

    peers = args.suite == "peers"
    PEER_SUITE = peers                      # read by _task in the forked workers
    if args.scenarios is None:
        args.scenarios = ",".join(PEER_SCENARIOS if peers else NAMES + POOLED)
    if args.policies is None:
        args.policies = ",".join(PEER_BASE + tuple(getattr(policies, "PEERS", ()))
                                 + tuple(getattr(policies, "PEERS_KERNEL", ())) if peers else policies.ALL)
    scen = [s for s in args.scenarios.split(",") if s]
    pols = [p for p in args.policies.split(",") if p]
    if TARGET_POLICY in pols and any(s in CALLERS for s in scen):
        # scenarios with callers: also the target policy without its admission layer, and with
        # cooperation's as its only one (issue 15: shedding and the flood defence compared)
        pols += [p for p in policies.ADMISSION if p not in pols]
    for s in scen:
        if s not in SCENARIOS:
            ap.error("unknown scenario %r; known: %s" % (s, ", ".join(SCENARIOS)))
    for p in pols:
        # coordinated and the admission variants: asked for by name only
        known = (policies.ALL + policies.POOL_ONLY + policies.COORDINATED + policies.ADMISSION + policies.PEERS
                 + policies.PEERS_KERNEL)
        if p not in known:
            ap.error("unknown policy %r; known: %s" % (p, ", ".join(known)))
    seeds = args.seeds or (3 if args.quick else 10)
    live = (not args.quick) if args.live is None else args.live

    # per-connection scenarios first (issue 6's tables and targets, as before), then the twins
    # the pooled scenarios are compared with, then the pooled ones with the pool-only references
    pooled = [s for s in scen if SCENARIOS[s].pool is not None]
    plain = [s for s in scen if SCENARIOS[s].pool is None]
    twins = list(dict.fromkeys(t for t in (SCENARIOS[s].twin for s in pooled) if t and t not in plain))
    base_pols = [p for p in pols if p not in policies.POOL_ONLY]
    pool_pols = pols + [p for p in policies.POOL_ONLY if p not in pols and TARGET_POLICY in pols]
    plan = {s: base_pols for s in plain + twins}
    plan.update({s: pool_pols for s in pooled})

    t0 = time.monotonic()
    common.progress("simulating %d scenario(s) x %d policies x %d seeds on %d worker(s)"
                    % (len(plan), len(pool_pols), seeds, args.workers))
    sim, extras = run_sim(plan, seeds, args.workers)
    sim_seconds = time.monotonic() - t0

    for s in plain:
        print("\n== %s: %s" % (s, SCENARIOS[s].description))
        print(scenario_table(s, sim[s]))
        if s in CALLERS:
            print("\nper caller, steady window %g-%g s (success: 2xx within %g s):"
                  % (SCENARIOS[s].steady + (SCENARIOS[s].timeout,)))
            print(caller_table(sim[s]))
    if plain:
        print("\n== p99 (ms), mean over %d seeds" % seeds)
        print(summary_table({s: sim[s] for s in plain}, base_pols))
    tg = targets({s: sim[s] for s in plain if s in NAMES})
    if not peers or any(s in NAMES for s in plain):
        print("\n== targets (simulation)")
        print(targets_text(tg))
    peer_scen = [s for s in plain if peers or s in PEER_SCENARIOS]
    if peer_scen:
        tg["peers"] = peer_targets({s: sim[s] for s in peer_scen})
        for s in peer_scen:
            print("\n== %s (peer metrics; ratios seed by seed, same traffic)" % s)
            print(peer_table(s, sim[s], tg["peers"]["paired"]))
        print("\n== targets (issue 16, simulation)")
        print(peer_targets_text(tg["peers"]))

    if pooled:
        for s in twins + pooled:
            print("\n== %s%s: %s" % (s, " (per-connection twin)" if s in twins else "", SCENARIOS[s].description))
            print(scenario_table(s, sim[s]))
        tg["pools"] = pool_targets(sim, pooled)
        print("\n== pooled scenarios, mean over %d seeds" % seeds)
        print(pool_tables(sim, pooled, pool_pols, tg["pools"]))
        print("\n== targets (simulation, pooled)")
        print(pool_targets_text(tg["pools"]))

    live_res: dict[str, Any] | None = None
    if live:
        from . import routing_live
        try:
            live_res = routing_live.run(seconds=args.live_seconds)
        except routing_live.LiveError as e:
            common.progress("live subset failed: %s" % e)
            live_res = {"error": str(e)}
        if live_res and "scenarios" in live_res:
            print("\n== live (real datapath, test backends; %s)" % live_res.get("note", ""))
            print(routing_live.table(live_res))

    written = plots(extras, args.plots) if args.plots else []
    result = {"scenarios": sim, "live": live_res, "targets": tg,
              "settings": {"seeds": seeds, "quick": args.quick, "workers": args.workers, "policies": pols,
                           "sim_seconds": round(sim_seconds, 1),
                           "scenario_descriptions": {s: SCENARIOS[s].description for s in plan},
                           "pooled": {s: {"twin": SCENARIOS[s].twin, "policies": pool_pols,
                                          "pools": dataclasses.asdict(SCENARIOS[s].pool)}  # type: ignore[arg-type]
                                      for s in pooled}},
              "plots": written, "machine": common.machine()}
    path = common.write_json(args.json, _clean(result))
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(markdown(sim, base_pols, tg, seeds, live_res, pooled))
    common.progress("wrote %s and %d plot(s); %.0f s in all" % (path, len(written), time.monotonic() - t0))
    return 0


def _beside(path: str, tag: str) -> str:
    """bench-results/routing.json, "peers" -> bench-results/routing-peers.json"""
    p = Path(path)
    return str(p.with_name("%s-%s%s" % (p.stem, tag, p.suffix)))


def _clean(x: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> float, recursively."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (float, np.floating)):
        v = float(x)
        return v if math.isfinite(v) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


if __name__ == "__main__":
    sys.exit(main())
