"""Prequal as a reverse proxy (equilibriumd.lab.prequal_proxy) and the test backends' probe
endpoint, on real sockets in 127.0.0.0/8 (no root needed).

The pick rule is checked on a fixed pool against hand-computed decisions; the rest runs the
proxy in this process (its pool can be inspected) in front of real test backends, and once
as the command the benchmark starts (ready line, SIGTERM -> exit 0)."""

from __future__ import annotations

import asyncio
import collections
import json
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from equilibriumd.lab import prequal_proxy as pp
from equilibriumd.lab.sim import peers
from equilibriumd.lab.sim.peers import Probe
from equilibriumd.lab.testbed import TestBackends
from equilibriumd.lab.testbed import server as tbserver

# -- the pick rule on a fixed pool (pure) ----------------------------------------------------------


def test_constants_are_the_simulators() -> None:
    assert (peers.PREQUAL_PROBES, peers.PREQUAL_POOL, peers.PREQUAL_MAX_AGE, peers.PREQUAL_REUSE,
            peers.PREQUAL_Q_RIF) == (3, 16, 1.0, 2, 0.84)
    assert (pp.PREQUAL_PROBES, pp.PREQUAL_POOL, pp.PREQUAL_MAX_AGE, pp.PREQUAL_REUSE) == (3, 16, 1.0, 2)
    assert tbserver.PROBE_LATENCY_WINDOW == peers.PREQUAL_LAT_WINDOW


def test_pick_rule_on_a_fixed_pool() -> None:
    pool = pp.Pool(5, random.Random(0))
    # backend: rif, latency. RIFs sorted 0 1 2 3 9: Q_RIF 0.84 at position 0.84 x 4 = 3.36,
    # 3 + 0.36 x (9 - 3) = 5.16: backend 4 (RIF 9) is hot, although its latency is the lowest.
    for b, rif, lat in ((0, 0, 0.050), (1, 1, 0.020), (2, 2, 0.030), (3, 3, 0.040), (4, 9, 0.001)):
        pool.add(Probe(b, rif, lat, 10.0))
    assert pool.pick(10.5) == 1           # the cold probe with the lowest latency
    assert pool.pick(10.5) == 1           # used twice (b_reuse 2): it leaves the pool
    assert [p.backend for p in pool.probes] == [0, 2, 3, 4]
    # RIFs 0 2 3 9: position 2.52, 3 + 0.52 x 6 = 6.12: backend 4 still hot
    assert pool.pick(10.5) == 2
    # older than 1 s: dropped; an empty pool answers None (the proxy then draws at random)
    assert pool.pick(11.01) is None
    assert pool.probes == []


def test_pool_keeps_the_newest_sixteen_and_ties_go_to_the_oldest() -> None:
    pool = pp.Pool(3, random.Random(0))
    for i in range(20):
        pool.add(Probe(i % 3, 0, 0.010, float(i)))
    assert len(pool.probes) == 16 and pool.probes[0].at == 4.0
    assert pool.pick(19.0) is not None    # everything older than 18.0 dropped first
    # all RIF 0 (all cold), equal latency: the oldest remaining probe (at 18.0, backend 0)
    pool2 = pp.Pool(3, random.Random(0))
    pool2.add(Probe(2, 0, 0.010, 5.0))
    pool2.add(Probe(1, 0, 0.010, 5.1))
    assert pool2.pick(5.2) == 2


def test_probe_targets_are_distinct_and_r_probe_of_them() -> None:
    pool = pp.Pool(5, random.Random(3))
    for _ in range(50):
        t = pool.targets()
        assert len(t) == 3 == len(set(t)) and all(0 <= b < 5 for b in t)
    assert sorted(pp.Pool(2, random.Random(0)).targets()) == [0, 1]


# -- the backends' probe endpoint ------------------------------------------------------------------


def raw_get(addr: tuple[str, int], path: str) -> tuple[int, bytes]:
    with socket.create_connection(addr, timeout=10) as s:
        s.sendall(b"GET %s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" % path.encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_probe_reports_rif_and_latency_at_that_rif_and_is_not_a_request() -> None:
    with TestBackends(1, behaviour={"latency": 0.3}, seed=1) as tb:
        a = tb.address(0)
        assert raw_get(a, "/.probe") == (200, b'{"rif": 0, "latency": 0.0}')
        socks = []
        for _ in range(2):                # two requests held in flight for 0.3 s
            s = socket.create_connection(a, timeout=10)
            s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            socks.append(s)
        time.sleep(0.1)
        t0 = time.monotonic()
        status, body = raw_get(a, "/.probe")
        assert time.monotonic() - t0 < 0.1   # answered at once, not behind the 0.3 s delay
        assert status == 200 and json.loads(body) == {"rif": 2, "latency": 0.0}
        for s in socks:
            assert s.recv(100).startswith(b"HTTP/1.1 200")
            s.close()
        time.sleep(0.05)
        d = json.loads(raw_get(a, "/.probe")[1])
        # the first arrived at RIF 0, the second at RIF 1; at RIF 0 the median of its window
        assert d["rif"] == 0 and 0.29 < d["latency"] < 0.4
        st = tb.stats(0)
        assert (st["requests"], st["responses"], st["probes"]) == (2, {"200": 2}, 3)


# -- the proxy in front of real backends ---------------------------------------------------------------


@pytest.fixture
def tb() -> Iterator[TestBackends]:
    with TestBackends(3, behaviour={"latency": 0.005}, names=["b0", "b1", "b2"], seed=5) as b:
        yield b


async def get(addr: tuple[str, int]) -> tuple[int, str]:
    """One request on a new connection: (status, X-Backend)."""
    r, w = await asyncio.open_connection(*addr)
    w.write(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    data = await asyncio.wait_for(r.read(), 10)
    w.close()
    lines = data.split(b"\r\n")
    backend = next((x.split(b":", 1)[1].strip().decode() for x in lines if x.lower().startswith(b"x-backend:")),
                   "")
    return int(lines[0].split()[1]), backend


async def burst(addr: tuple[str, int], rounds: int, width: int) -> collections.Counter[tuple[int, str]]:
    c: collections.Counter[tuple[int, str]] = collections.Counter()
    for _ in range(rounds):
        c.update(await asyncio.gather(*[get(addr) for _ in range(width)]))
    return c


def test_proxy_forwards_and_probes_fill_the_pool(tb: TestBackends) -> None:
    async def main() -> tuple[collections.Counter[tuple[int, str]], pp.PrequalProxy, list[Probe]]:
        proxy = pp.PrequalProxy([tb.address(i) for i in range(3)], seed=1)
        addr = await proxy.start("127.0.0.1", 0)
        c = await burst(addr, 20, 3)
        await asyncio.sleep(0.05)
        probes = list(proxy.pool.probes)
        # keep-alive on the client side: two requests on one connection
        r, w = await asyncio.open_connection(*addr)
        for _ in range(2):
            w.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            head = await r.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and b"Connection: keep-alive" in head
            assert await r.readexactly(2) == b"ok"
        w.close()
        await asyncio.sleep(0.1)          # the last probes' answers
        await proxy.close()
        return c, proxy, probes

    c, proxy, probes = asyncio.run(main())
    assert sum(c.values()) == 60 and all(s == 200 for s, _ in c)
    assert 0 < len(probes) <= 16 and {p.backend for p in probes} <= {0, 1, 2}
    assert all(p.rif >= 0 and p.latency >= 0 for p in probes)
    assert proxy.random_picks < 10        # most picks came from the pool
    st = tb.stats_all()
    assert sum(s["requests"] for s in st) == 62               # probes are not requests
    assert sum(s["probes"] for s in st) == 3 * 62 == sum(ch.answered for ch in proxy.channels)


def test_proxy_moves_requests_off_a_slow_backend(tb: TestBackends) -> None:
    tb.set(0, latency=0.050)              # 10x slower at the same RIF

    async def main() -> collections.Counter[tuple[int, str]]:
        proxy = pp.PrequalProxy([tb.address(i) for i in range(3)], seed=2)
        addr = await proxy.start("127.0.0.1", 0)
        c = await burst(addr, 50, 4)
        await proxy.close()
        return c

    c = asyncio.run(main())
    by = collections.Counter(b for _, b in c.elements())
    assert sum(by.values()) == 200
    assert by["b0"] < 0.1 * 200, by       # round robin would send it a third


def test_dead_backend_gives_502_and_the_proxy_serves_through_the_others(tb: TestBackends) -> None:
    async def main() -> tuple[collections.Counter[tuple[int, str]], pp.PrequalProxy]:
        proxy = pp.PrequalProxy([tb.address(i) for i in range(3)], seed=3)
        addr = await proxy.start("127.0.0.1", 0)
        tb.set(0, latency=0.020)
        tb.set(1, latency=0.020)          # b2 the fastest: the pool prefers it
        await burst(addr, 10, 3)          # probe connections to all three are open
        tb.set(2, refuse=True)            # listener closed: connects are refused (probes still answered
        c = await burst(addr, 40, 3)      # on the open connection until the proxy resets it)
        await proxy.close()
        return c, proxy

    c, proxy = asyncio.run(main())
    assert set(s for s, _ in c) <= {200, 502}
    n502 = sum(v for (s, _), v in c.items() if s == 502)
    assert n502 >= 1 and n502 == proxy.failed[2] and proxy.failed[:2] == [0, 0]
    assert all(b in ("b0", "b1") for (s, b) in c if s == 200)
    assert c[(200, "b0")] + c[(200, "b1")] >= 110    # of 120: the others keep serving
    assert proxy.channels[2].failed_connects >= 1    # b2's probe connection was reset; reconnects refused


def test_cli_ready_then_sigterm_exits_0(tb: TestBackends) -> None:
    cmd = [sys.executable, "-m", "equilibriumd.lab.prequal_proxy", "--listen", "127.0.0.1:0"]
    for a in tb.addrs:
        cmd += ["--backend", a]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert p.stdout is not None
        line = p.stdout.readline().decode()
        assert line.startswith("ready 127.0.0.1:")
        host, port = line.split()[1].rsplit(":", 1)
        c = asyncio.run(burst((host, int(port)), 10, 2))
        assert sum(v for (s, _), v in c.items() if s == 200) == 20
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=10)
        assert p.returncode == 0
        assert out == b""                 # nothing per request
        assert b"requests [" in err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_cli_refuses_bad_arguments() -> None:
    r = subprocess.run([sys.executable, "-m", "equilibriumd.lab.prequal_proxy", "--listen", "127.0.0.1:0"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "no backends" in r.stderr


def test_backend_reset_mid_request_gives_502_and_the_proxy_carries_on(tb: TestBackends) -> None:
    tb.set_all(close_mid_request=1.0)     # every request read, then the connection closed without a byte

    async def main() -> tuple[collections.Counter[tuple[int, str]], collections.Counter[tuple[int, str]],
                              pp.PrequalProxy]:
        proxy = pp.PrequalProxy([tb.address(i) for i in range(3)], seed=4)
        addr = await proxy.start("127.0.0.1", 0)
        bad = await burst(addr, 5, 2)
        await asyncio.to_thread(tb.set_all, close_mid_request=0.0)
        good = await burst(addr, 5, 2)
        await proxy.close()
        return bad, good, proxy

    bad, good, proxy = asyncio.run(main())
    assert bad == {(502, ""): 10} and sum(proxy.failed) == 10
    assert sum(v for (s, _), v in good.items() if s == 200) == 10


def test_live_table_reports_the_proxy_overhead() -> None:
    from equilibriumd.lab.bench import routing_live
    assert "prequal-proxy" in routing_live.POLICIES and "haproxy-leastconn" in routing_live.POLICIES
    ov = {"rate": 50.0, "direct": {"p50_seconds": 0.0011, "p99_seconds": 0.002},
          "proxy": {"p50_seconds": 0.0019, "p99_seconds": 0.004},
          "haproxy": {"p50_seconds": 0.0013, "p99_seconds": 0.0025}}
    text = routing_live.table({"scenarios": {}, "prequal_proxy_overhead": ov})
    assert "p50 1.10 ms direct to a backend, 1.90 ms through the proxy; p99 2.00 / 4.00 ms" in text
    assert "through HAProxy p50 1.30, p99 2.50 ms" in text
