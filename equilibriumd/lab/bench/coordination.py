"""Benchmark: what the simulated coordinator buys, seed by seed (issue 15).

For each seed, the same traffic (common random numbers) in `many-nodes` under
independent `equilibrium`, `equilibrium-coordinated` and the instant `oracle`,
and in `many-nodes-coordinator-fails` (the coordinator dies at 30 s) under
`equilibrium-coordinated` (`equilibrium` there is `many-nodes`' run: the twin
scenarios differ only for the coordinated policy). Reported per seed, as paired
ratios within the seed:

* efficiency gain: independent p99 / coordinated p99 (and mean latency);
* coordinated p99 and mean latency / the oracle's;
* with the coordinator killed: p99 / independent p99 (whole run, and the
  requests after it died), and the fallback: per node, the time from its last
  recommendation's expiry to the first tick it no longer follows it (max and
  median over nodes), with the ticks' period for scale.

Also many-nodes with longer coordinator periods (`--periods`, in agent ticks),
and the coordinator's cost: `coordination.recommend` for 1 and 200 services
x 20 nodes x 8 backends, with its fast path and with the LP forced.

The result goes under "coordination" in the JSON file given (the routing
benchmark's file for the same scenarios, which it keeps).

Usage: ``python -m equilibriumd.lab.bench.coordination [--seeds 10] [--workers 2]
[--json docs/bench-coordination.json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np

from . import common

POLICIES = ("equilibrium", "equilibrium-coordinated", "oracle")
FAILS = "many-nodes-coordinator-fails"


def _one(job: tuple[str, str, int, int]) -> dict[str, Any]:
    from ..sim import coordinated
    from ..sim.engine import simulate
    from ..sim.scenarios import SCENARIOS
    scn, policy, seed, period = job
    coordinated.PERIOD_TICKS = period        # this worker process only
    sc = SCENARIOS[scn]
    run = simulate(sc, policy, seed)
    m = run.arrival >= sc.warmup
    ok = m & ~run.error
    out: dict[str, Any] = {"scenario": scn, "policy": policy, "seed": seed, "period_ticks": period,
                           "p99": float(np.percentile(run.latency[ok], 99)),
                           "mean": float(run.latency[m].mean())}
    # the requests after the coordinator died (the same window in many-nodes, for the pairs)
    after = ok & (run.arrival >= float(SCENARIOS[FAILS].coordinator_stops or 0.0))
    out["p99_after_stop"] = float(np.percentile(run.latency[after], 99))
    if run.coordination is not None:
        coord, agents = run.coordination
        ags = [a for a in agents if isinstance(a, coordinated.CoordinatedAgent)]
        out["following"] = float(np.mean([f for a in ags for _, f, _ in a.history]))
        if sc.coordinator_stops is not None:
            out["fallback_seconds"] = fallback_delays(coord, ags)
    return out


def fallback_delays(coord: Any, agents: list[Any]) -> list[float]:
    """Per node: from its last recommendation's expiry to its first tick at or after
    it that does not follow (that tick's weights are its own learning's, eased)."""
    out = []
    for a in agents:
        rec = coord.recs.get(a.node)
        if rec is None:
            continue
        first = next((t for t, f, _ in a.history if t >= rec.expires and not f), None)
        out.append(float("inf") if first is None else first - rec.expires)
    return out


def _time(services: int, nodes: int, backends: int, lp: bool, repeat: int) -> float:
    from ...policy import coordination as co
    rng = np.random.default_rng(0)
    caps = np.resize([80.0, 80.0, 160.0, 320.0], backends)
    bes = tuple("10.0.%d.%d:8080" % (i // 200, i % 200) for i in range(backends))
    w = caps / caps.sum()
    total = 0.65 * caps.sum()
    sums = []
    for k in range(nodes):
        svcs = {}
        for s in range(services):
            lat = co.latency(w * total, caps, 0.025) * rng.uniform(0.9, 1.1, backends)
            load = w * total / nodes * rng.uniform(0.8, 1.2, backends)
            svcs["svc-%03d" % s] = co.ServiceSummary(bes, tuple(map(float, load)), tuple(map(float, lat)))
        sums.append(co.NodeSummary("node-%02d" % k, 0.0, svcs))
    co.recommend(sums, 0.0, 1.0, lp=True)          # scipy's import is not the round
    prev: dict[str, Any] = {}
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        recs = co.recommend(sums, 0.0, 1.0, previous=prev, lp=lp)
        ts.append(time.perf_counter() - t0)
        prev = {r.service: r for r in recs}
    return float(statistics.median(ts))


def _stats(xs: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(xs)), "median": float(np.median(xs)), "min": float(np.min(xs)),
            "max": float(np.max(xs))}


def summarize(rows: list[dict[str, Any]], seeds: int) -> dict[str, Any]:
    by = {(r["scenario"], r["policy"], r["seed"]): r for r in rows if r["period_ticks"] == 1}
    per_seed = []
    for s in range(seeds):
        eq, co_, orc = (by[("many-nodes", p, s)] for p in POLICIES)
        f = by[(FAILS, "equilibrium-coordinated", s)]
        fb = f["fallback_seconds"]
        per_seed.append({
            "seed": s,
            "p99_ms": {"equilibrium": eq["p99"] * 1e3, "equilibrium-coordinated": co_["p99"] * 1e3,
                       "oracle": orc["p99"] * 1e3, "coordinator-fails": f["p99"] * 1e3},
            "mean_ms": {"equilibrium": eq["mean"] * 1e3, "equilibrium-coordinated": co_["mean"] * 1e3,
                        "oracle": orc["mean"] * 1e3, "coordinator-fails": f["mean"] * 1e3},
            "gain_p99": eq["p99"] / co_["p99"],
            "gain_mean": eq["mean"] / co_["mean"],
            "coordinated_vs_oracle_p99": co_["p99"] / orc["p99"],
            "coordinated_vs_oracle_mean": co_["mean"] / orc["mean"],
            "independent_vs_oracle_p99": eq["p99"] / orc["p99"],
            "independent_vs_oracle_mean": eq["mean"] / orc["mean"],
            "fails_vs_independent_p99": f["p99"] / eq["p99"],
            "fails_after_stop_p99_ms": f["p99_after_stop"] * 1e3,
            "fails_after_stop_vs_independent_p99": f["p99_after_stop"] / eq["p99_after_stop"],
            "following": co_["following"],
            "fallback_max_seconds": max(fb),
            "fallback_median_seconds": float(np.median(fb)),
        })
    keys = ("gain_p99", "gain_mean", "coordinated_vs_oracle_p99", "coordinated_vs_oracle_mean",
            "independent_vs_oracle_p99", "independent_vs_oracle_mean", "fails_vs_independent_p99",
            "fails_after_stop_vs_independent_p99",
            "following", "fallback_max_seconds", "fallback_median_seconds")
    return {"per_seed": per_seed, "ratios": {k: _stats([p[k] for p in per_seed]) for k in keys}}


def report(seeds: int = 10, workers: int = 2, periods: tuple[int, ...] = (4, 10, 20), repeat_small: int = 20,
           repeat_large: int = 3) -> dict[str, Any]:
    from ...policy import coordination as co
    from ..sim import coordinated
    from ..sim.scenarios import SCENARIOS
    base = coordinated.PERIOD_TICKS
    jobs = [("many-nodes", p, s, base) for p in POLICIES for s in range(seeds)]
    jobs += [(FAILS, "equilibrium-coordinated", s, base) for s in range(seeds)]
    jobs += [("many-nodes", "equilibrium-coordinated", s, k) for k in periods if k != base for s in range(seeds)]
    common.progress("simulating %d runs on %d worker(s)" % (len(jobs), workers))
    t0 = time.monotonic()
    with Pool(workers) as pool:
        rows = pool.map(_one, jobs)
    sim_seconds = time.monotonic() - t0
    res = summarize(rows, seeds)
    tick = SCENARIOS["many-nodes"].tick
    orc = {r["seed"]: r["p99"] for r in rows if r["policy"] == "oracle"}
    res["period_sensitivity"] = {
        "%g" % (k * tick): {
            "p99_ms": float(np.mean([r["p99"] for r in rows if r["policy"] == "equilibrium-coordinated"
                                     and r["scenario"] == "many-nodes" and r["period_ticks"] == k])) * 1e3,
            "vs_oracle_p99": float(np.mean([r["p99"] / orc[r["seed"]] for r in rows
                                            if r["policy"] == "equilibrium-coordinated"
                                            and r["scenario"] == "many-nodes" and r["period_ticks"] == k])),
            "following": float(np.mean([r["following"] for r in rows if r["policy"] == "equilibrium-coordinated"
                                        and r["scenario"] == "many-nodes" and r["period_ticks"] == k]))}
        for k in sorted({base, *periods})}
    sc = SCENARIOS[FAILS]
    res["fallback"] = {"tick_seconds": sc.tick, "ttl_seconds": coordinated.TTL_PERIODS * coordinated.PERIOD_TICKS
                       * sc.tick, "coordinator_stops": sc.coordinator_stops,
                       "target_seconds": 2 * sc.tick,
                       "max_seconds": res["ratios"]["fallback_max_seconds"]["max"],
                       "median_seconds": float(np.median([p["fallback_median_seconds"] for p in res["per_seed"]])),
                       "handover_ticks": handover_ticks()}
    common.progress("timing recommend()")
    res["recommend_seconds"] = {
        "1x20x8": {"fast": _time(1, 20, 8, False, repeat_small), "lp": _time(1, 20, 8, True, repeat_small)},
        "200x20x8": {"fast": _time(200, 20, 8, False, repeat_large), "lp": _time(200, 20, 8, True, repeat_large)},
    }
    res["settings"] = {"seeds": seeds, "workers": workers, "sim_seconds": round(sim_seconds, 1),
                       "period_seconds": coordinated.PERIOD_TICKS * SCENARIOS["many-nodes"].tick,
                       "smoothing": co.SMOOTHING, "smoothing_seconds": co.SMOOTHING_SECONDS,
                       "smoothing_max": co.SMOOTHING_MAX, "tilt": co.TILT, "tolerance": co.TOLERANCE,
                       "latency_ewma": coordinated.LATENCY_EWMA, "obey_ewma": coordinated.OBEY_EWMA,
                       "handover": coordinated.HANDOVER}
    return res


def handover_ticks() -> int:
    """Ticks until the last followed split's weight falls below 5 % (then it is dropped)."""
    from ..sim import coordinated
    k, e = 0, 1.0
    while e >= 0.05:
        e *= coordinated.HANDOVER
        k += 1
    return k


def text(res: dict[str, Any]) -> str:
    rows = []
    for p in res["per_seed"]:
        q = p["p99_ms"]
        rows.append([str(p["seed"]), "%.1f" % q["equilibrium"], "%.1f" % q["equilibrium-coordinated"],
                     "%.1f" % q["oracle"], "%.3f" % p["gain_p99"], "%.3f" % p["coordinated_vs_oracle_p99"],
                     "%.3f" % p["coordinated_vs_oracle_mean"], "%.1f" % q["coordinator-fails"],
                     "%.3f" % p["fails_vs_independent_p99"],
                     "%.3f" % p["fails_after_stop_vs_independent_p99"], "%.0f / %.0f" % (
                         p["fallback_max_seconds"] * 1e3, p["fallback_median_seconds"] * 1e3)])
    r = res["ratios"]
    rows.append(["mean", "%.1f" % np.mean([p["p99_ms"]["equilibrium"] for p in res["per_seed"]]),
                 "%.1f" % np.mean([p["p99_ms"]["equilibrium-coordinated"] for p in res["per_seed"]]),
                 "%.1f" % np.mean([p["p99_ms"]["oracle"] for p in res["per_seed"]]),
                 "%.3f" % r["gain_p99"]["mean"], "%.3f" % r["coordinated_vs_oracle_p99"]["mean"],
                 "%.3f" % r["coordinated_vs_oracle_mean"]["mean"],
                 "%.1f" % np.mean([p["p99_ms"]["coordinator-fails"] for p in res["per_seed"]]),
                 "%.3f" % r["fails_vs_independent_p99"]["mean"],
                 "%.3f" % r["fails_after_stop_vs_independent_p99"]["mean"],
                 "%.0f / %.0f" % (res["fallback"]["max_seconds"] * 1e3, res["fallback"]["median_seconds"] * 1e3)])
    head = ["seed", "indep. p99", "coord. p99", "oracle p99", "gain (indep/coord)", "coord/oracle p99",
            "coord/oracle mean", "fails p99", "fails/indep", "after stop: fails/indep", "fallback max/median ms"]
    t = res["recommend_seconds"]
    per = "; ".join("%s s: p99 %.1f ms (%.3fx oracle), following %.2f" % (k, v["p99_ms"], v["vs_oracle_p99"],
                                                                         v["following"])
                    for k, v in res["period_sensitivity"].items())
    return (common.table(head, rows) + "\n\ncoordinator period: " + per +
            "\n\nrecommend(): 1 x 20 x 8: %.1f ms (LP forced: %.1f ms); "
            "200 x 20 x 8: %.0f ms (LP forced: %.0f ms)" % (
                t["1x20x8"]["fast"] * 1e3, t["1x20x8"]["lp"] * 1e3, t["200x20x8"]["fast"] * 1e3,
                t["200x20x8"]["lp"] * 1e3))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--periods", default="4,10,20",
                    help="other coordinator periods to run many-nodes with, in agent ticks (0.5 s)")
    ap.add_argument("--json", default="docs/bench-coordination.json",
                    help="file to add the 'coordination' section to ('' for none)")
    args = ap.parse_args(argv)
    res = report(args.seeds, args.workers, tuple(int(x) for x in args.periods.split(",") if x))
    print(text(res))
    if args.json:
        p = Path(args.json)
        data = json.loads(p.read_text()) if p.exists() else {}
        data["coordination"] = res
        data.setdefault("machine", common.machine())
        common.write_json(p, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
