"""A keep-alive HTTP client pool as real services run one (urllib3, what `requests` uses).

Workers share one `urllib3.HTTPConnectionPool` of `connections` keep-alive
connections (a LIFO queue; a worker blocks for a free connection) and each
sends a request, reads the response, thinks for `think` seconds and goes
again: one service calling another. urllib3 checks a pooled connection
before reusing it (dropped -> replaced by a new one), and `retries=False`
means a request that fails is reported, never silently retried.

    python -m equilibriumd.lab.poolclient --url http://127.77.0.1:80/ --seconds 20 \
        [--cgroup /sys/fs/cgroup/child]

`--cgroup` moves the process into that (child) cgroup first, so its
connections are steered. Prints `ready`, then one JSON object at the end: requests, failures
by kind, requests per backend (X-Backend) per second, latency percentiles.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import threading
import time
from typing import Any


class PoolLoad:
    def __init__(self, url: str, connections: int = 8, workers: int = 8, think: float = 0.02,
                 timeout: float = 5.0) -> None:
        import urllib3

        u = urllib3.util.parse_url(url)
        self.path = u.path or "/"
        if not u.host:
            raise ValueError("--url %s names no host" % url)
        self.pool = urllib3.HTTPConnectionPool(u.host, u.port or 80, maxsize=connections, block=True,
                                               timeout=urllib3.Timeout(connect=timeout, read=timeout),
                                               retries=False)
        self.workers, self.think = workers, think
        self.lock = threading.Lock()
        self.t0 = 0.0
        self.per_second: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.failures: collections.Counter[str] = collections.Counter()
        self.failed_at: list[float] = []
        self.latencies: list[float] = []
        self.requests = 0

    def _worker(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            t = time.monotonic()
            try:
                r = self.pool.request("GET", self.path, preload_content=True)
                be = r.headers.get("X-Backend", "?") if r.status < 500 else "5xx"
            except Exception as e:   # noqa: BLE001 - a failed request is what we count
                with self.lock:
                    self.failures[type(e).__name__] += 1
                    self.failed_at.append(round(t - self.t0, 3))
                time.sleep(self.think)
                continue
            lat = time.monotonic() - t
            with self.lock:
                self.requests += 1
                self.per_second[int(t - self.t0)][be] += 1
                self.latencies.append(lat)
            time.sleep(self.think)

    def run(self, seconds: float) -> dict[str, Any]:
        self.t0 = time.monotonic()
        deadline = self.t0 + seconds
        ts = [threading.Thread(target=self._worker, args=(deadline,), daemon=True) for _ in range(self.workers)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        lat = sorted(self.latencies)

        def pct(q: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(q * len(lat)))], 5) if lat else None

        return {"requests": self.requests, "failures": dict(self.failures), "failed_at": self.failed_at[:50],
                "connections_opened": self.pool.num_connections,
                "per_second": {str(k): dict(v) for k, v in sorted(self.per_second.items())},
                "p50": pct(0.5), "p99": pct(0.99)}


def share_after(result: dict[str, Any], backend: str, since: float) -> float | None:
    """Fraction of the requests answered by `backend` from second `since` on."""
    tot = hit = 0
    for sec, by in result["per_second"].items():
        if int(sec) >= since:
            tot += sum(by.values())
            hit += by.get(backend, 0)
    return hit / tot if tot else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True, help="http://frontend:port/path")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--connections", type=int, default=8, help="pool size")
    ap.add_argument("--workers", type=int, default=8, help="threads sharing the pool")
    ap.add_argument("--think", type=float, default=0.02, help="seconds between a response and the next request")
    ap.add_argument("--cgroup", help="a child cgroup to move this process into first")
    a = ap.parse_args(argv)
    if a.cgroup:
        with open(os.path.join(a.cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    print("ready", flush=True)
    res = PoolLoad(a.url, a.connections, a.workers, a.think).run(a.seconds)
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
