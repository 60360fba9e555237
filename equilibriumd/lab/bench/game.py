"""Benchmark: one tick of the engine the agent runs, for many services.

A tick is ``equilibriumd.game.engine.EquilibriumEngine.update`` (what
``agent.routing.Router.tick`` calls for every ``equilibrium`` service at
once): latency estimates, payoffs, discounted RM+, Bayesian beliefs and
quarantine, slow start, caps, floors, Wardrop gap and the convergence
detector, over (services x 64 backends), followed by the slot-count
apportionment of every row (``datapath.slots.apportion_rows``, what the
reconciler does next). It runs at 10, 100 and 1,000 services so the table
shows how the cost grows; the target is <= 20 ms per tick for 1,000 x 64 on
one core. The whole live tick (telemetry read, engine, map writes) is
``scripts/bench agent``.

Usage: ``python -m equilibriumd.lab.bench.game [--json FILE] [--repeat N] [--check]``.
Prints a table, writes JSON (default ``bench-results/game.json``); with
``--check`` exits 1 when the 1,000-service median exceeds the budget.
BLAS/OpenMP thread counts are pinned to 1 when this module is imported
before numpy (as with ``python -m``) so the timing is for one core.
"""

from __future__ import annotations

# ruff: noqa: E402  (the thread counts must be in the environment before numpy is imported)
import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from equilibriumd.datapath.slots import apportion_rows
from equilibriumd.game.engine import EquilibriumEngine, Observation

SERVICES = (10, 100, 1000)
BACKENDS = 64
BUDGET_MS = 20.0
WARMUP = 5


def _telemetry(rng: np.random.Generator, services: int, variants: int) -> list[Observation]:
    """Pre-generated per-tick telemetry so the timing covers the engine only."""
    base = rng.uniform(0.005, 0.2, (services, BACKENDS))
    out = []
    for _ in range(variants):
        requests = rng.poisson(30.0, (services, BACKENDS)).astype(np.float64)
        latency = base * rng.lognormal(0.0, 0.25, (services, BACKENDS))
        latency[requests == 0] = np.nan
        errors = rng.binomial(requests.astype(np.int64), 0.01).astype(np.float64)
        inflight = rng.poisson(2.0, (services, BACKENDS)).astype(np.float64)
        out.append(Observation(latency, requests, errors, inflight, 0.5, requests - errors))
    return out


def measure(services: int, repeat: int, seed: int = 0) -> dict[str, float]:
    """Time ``repeat`` ticks for ``services`` x 64 backends; returns ms statistics."""
    rng = np.random.default_rng(seed)
    mask = np.ones((services, BACKENDS), dtype=bool)
    # Services have between 2 and 64 backends, as in a real node.
    counts = rng.integers(2, BACKENDS + 1, services)
    mask[np.arange(BACKENDS)[None, :] >= counts[:, None]] = False
    engine = EquilibriumEngine(mask, now=-3600.0)
    data = _telemetry(rng, services, 8)
    for i in range(WARMUP):
        engine.update(data[i % len(data)], i * 0.5)
    times = np.empty(repeat)
    for i in range(repeat):
        now = (WARMUP + i) * 0.5
        start = time.perf_counter()
        apportion_rows(engine.update(data[i % len(data)], now))
        times[i] = time.perf_counter() - start
    ms = times * 1e3
    median = float(np.median(ms))
    return {
        "services": services,
        "backends": BACKENDS,
        "median_ms": median,
        "p90_ms": float(np.percentile(ms, 90)),
        "ms_per_service": median / services,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m equilibriumd.lab.bench.game", description=__doc__)
    parser.add_argument("--json", default="bench-results/game.json", help="output file")
    parser.add_argument("--repeat", type=int, default=50, help="timed ticks per size")
    parser.add_argument("--check", action="store_true", help="exit 1 if over the budget")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")

    rows = [measure(s, args.repeat) for s in SERVICES]
    print(f"{'services':>8} {'backends':>8} {'median ms':>10} {'p90 ms':>8} {'ms/service':>11}")
    for r in rows:
        print(
            f"{r['services']:>8} {r['backends']:>8} {r['median_ms']:>10.3f} "
            f"{r['p90_ms']:>8.3f} {r['ms_per_service']:>11.5f}"
        )
    largest = rows[-1]
    within = largest["median_ms"] <= BUDGET_MS
    growth = largest["median_ms"] / rows[-2]["median_ms"]
    print(
        f"budget: {largest['median_ms']:.2f} ms <= {BUDGET_MS:.0f} ms at "
        f"{largest['services']} services: {'yes' if within else 'NO'}; "
        f"x{growth:.1f} from {rows[-2]['services']} to {largest['services']} services"
    )
    result = {
        "benchmark": "game",
        "tick": "equilibriumd.game.engine.EquilibriumEngine.update + datapath.slots.apportion_rows",
        "repeat": args.repeat,
        "budget_ms": BUDGET_MS,
        "within_budget": within,
        "growth_100_to_1000": growth,
        "rows": rows,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "threads": {v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")},
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 1 if args.check and not within else 0


if __name__ == "__main__":
    sys.exit(main())
