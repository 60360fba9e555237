"""Benchmark: one round of the cross-node coordinator at cluster sizes.

A round is `coordinator.process.Coordinator.round` on a directory channel
(real files, as `equilibriumd coordinate --dir` runs): list and parse every
node's summary, solve one correlated equilibrium per service with several
calling nodes, pack and write every node's bundle, and check obedience for
up to CHECKS_PER_ROUND recommendations. Every node calls every service (the
worst case for the round: each service's game has all the nodes as players
in 3 groups), with backends of unequal capacity and loads that differ by node.

The coordinator's period is 10 s by default: the round must stay a small
part of it. Also reported: the bytes of one node's summary and bundle (a
ConfigMap holds at most 1 MiB; the channel refuses more than 256 KiB from an
agent and 512 KiB from the coordinator).

Usage: ``python -m equilibriumd.lab.bench.coordinator [--sizes 20x10x8,...]
[--repeat N] [--json FILE]`` (``scripts/bench coordinator``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from equilibriumd import logs
from equilibriumd.coordinator.process import CHECKS_PER_ROUND, Coordinator
from equilibriumd.discovery.channel_types import recommendation_name, summary_name
from equilibriumd.discovery.localchannel import DirChannel
from equilibriumd.policy import coordination as co

DEFAULT_SIZES = "10x10x4,20x64x8,100x64x8,20x256x8"


class _Leader:
    identity, epoch = "bench", 1

    def is_leader(self) -> bool:
        return True


def _summaries(nodes: int, services: int, backends: int, seed: int) -> list[co.NodeSummary]:
    rng = np.random.default_rng(seed)
    out = []
    for n in range(nodes):
        svcs = {}
        for s in range(services):
            caps = 100.0 * (1 + np.arange(backends) % 3)
            load = caps * rng.uniform(0.3, 0.7, backends) / nodes
            lat = 0.01 / (1 - np.clip(load * nodes / caps, 0, 0.9))
            svcs["ns-%d/svc-%d" % (s % 17, s)] = co.ServiceSummary(
                tuple("10.%d.%d.%d:8080" % (s // 250, s % 250, b + 1) for b in range(backends)),
                tuple(float(x) for x in load), tuple(float(x) for x in lat))
        out.append(co.NodeSummary("node-%04d" % n, time.time(), svcs))
    return out


def run_size(nodes: int, services: int, backends: int, repeat: int) -> dict[str, Any]:
    d = tempfile.mkdtemp(prefix="eqbench-coord-")
    try:
        ch = DirChannel(d, min_interval=0, max_bytes=1024 * 1024)
        summary_bytes = 0
        for s in _summaries(nodes, services, backends, seed=nodes * 1000 + services):
            payload = json.loads(s.to_json())
            summary_bytes = max(summary_bytes, len(ch.encode(summary_name(s.node), payload)))
            ch.publish(summary_name(s.node), payload, "summary")
        c = Coordinator(ch, _Leader(), interval=10.0, ttl=30.0)
        times = []
        rep = None
        for _ in range(repeat):
            t0 = time.perf_counter()
            rep = c.round()
            times.append(time.perf_counter() - t0)
            assert rep is not None and rep.fresh == nodes
        assert rep is not None
        bundle_bytes = os.path.getsize(os.path.join(d, recommendation_name("node-0000") + ".json"))
        return {"nodes": nodes, "services": services, "backends": backends, "repeat": repeat,
                "round_median_seconds": float(np.median(times)), "round_max_seconds": float(np.max(times)),
                "recommendations": rep.recommendations, "services_coordinated": c.stats.services,
                "summary_bytes": summary_bytes, "bundle_bytes": bundle_bytes,
                "per_service_ms": 1e3 * float(np.median(times)) / max(1, c.stats.services)}
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help="NODESxSERVICESxBACKENDS, comma-separated  "
                    "[default: %(default)s]")
    ap.add_argument("--repeat", type=int, default=3, help="rounds per size (the first has no previous model)")
    ap.add_argument("--json", default="bench-results/coordinator.json", help="where to write the results")
    args = ap.parse_args(argv)
    logs.setup("warning")
    try:
        sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
        if any(len(s) != 3 or min(s) < 1 for s in sizes):
            raise ValueError
    except ValueError:
        ap.error("--sizes: expected NODESxSERVICESxBACKENDS[,...] with positive numbers, got %r" % args.sizes)
    rows = []
    print("%7s %9s %9s %12s %10s %8s %12s %12s" % ("nodes", "services", "backends", "round (s)", "ms/service",
                                                  "recs", "summary (B)", "bundle (B)"))
    for n, s, b in sizes:
        print("  running %dx%dx%d ..." % (n, s, b), file=sys.stderr, flush=True)
        r = run_size(n, s, b, args.repeat)
        rows.append(r)
        print("%7d %9d %9d %12.3f %10.2f %8d %12d %12d" % (n, s, b, r["round_median_seconds"], r["per_service_ms"],
                                                        r["recommendations"], r["summary_bytes"], r["bundle_bytes"]))
    out = {"benchmark": "coordinator", "host": platform.node(), "python": platform.python_version(),
           "checks_per_round": CHECKS_PER_ROUND, "results": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print("wrote %s" % args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
