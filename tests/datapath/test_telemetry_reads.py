"""Issue 14: reading the per-CPU telemetry costs memory bounded whatever the CPU
count, and a /metrics scrape reads nothing per-CPU that the tick already read.

The per-CPU counters (eq_tel_be) are 2,816 B a key (16 backends) and CPU: a
whole map at 128 CPUs is ~1.5 MB a key. The reader reads `group_chunk` keys per
batch (READ_BUDGET bytes at most) and sums each chunk over CPUs at once; scrapes
export the counters the tick read (`last_counters`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from prometheus_client import generate_latest

from equilibriumd import metrics
from equilibriumd.datapath import constants, telemetry
from equilibriumd.datapath.memory import MemoryDatapath, MemoryTelemetryReader
from equilibriumd.datapath.telemetry import COUNTER, READ_BUDGET, group_chunk

PER_KEY_CPU = 2816   # bytes of one eq_tel_be value (16 x struct eq_be_tel) on one CPU


class Counting(MemoryTelemetryReader):
    """The real reader's logic over a memory datapath, recording every batch read."""

    def __init__(self, dp: MemoryDatapath, **kw: Any) -> None:
        super().__init__(dp)
        if kw:
            telemetry.TelemetryReader.__init__(self, -1, dp.ncpu, -1, **kw)
        self.reads: list[tuple[str, int]] = []

    def _read_chunk(self, which: str, k: int, start: int) -> np.ndarray:
        self.reads.append((which, k))
        return super()._read_chunk(which, k, start)


@pytest.mark.parametrize("ncpu", [2, 16, 128])
def test_one_read_copies_at_most_the_budget(ncpu):
    assert group_chunk(ncpu) * ncpu * PER_KEY_CPU <= max(READ_BUDGET, ncpu * PER_KEY_CPU)
    assert group_chunk(128) == 2 and group_chunk(2) == READ_BUDGET // (2 * PER_KEY_CPU)


def test_chunked_read_equals_the_sum_and_stays_in_budget():
    """128 CPUs, 1,000 backends with counts on many CPUs: every batch read takes at
    most `group_chunk` keys (its buffer at most the budget), and the sums are exact."""
    ncpu, n = 128, 1000
    dp = MemoryDatapath(ncpu=ncpu)
    rng = np.random.default_rng(3)
    want = np.zeros((n, len(COUNTER)), dtype=np.uint64)
    for bid in rng.choice(n, 60, replace=False).tolist():
        for cpu in rng.choice(ncpu, 5, replace=False).tolist():
            req, est = int(rng.integers(1, 1000)), int(rng.integers(1, 50))
            dp.add_telemetry(bid, cpu=cpu, requests=req, established=est)
            want[bid, COUNTER["requests"]] += req
            want[bid, COUNTER["established"]] += est
    r = Counting(dp)
    got = r._counters(n)
    per_read = [k for which, k in r.reads if which == "counters"]
    assert max(per_read) == r.group_chunk == 2
    assert sum(per_read) == -(-n // constants.TEL_GROUP)
    assert r._buf.nbytes <= READ_BUDGET
    assert (got == want).all()
    # a smaller budget: more reads, the same sums
    small = Counting(dp, budget=1)
    assert small.group_chunk == 1 and (small._counters(n) == want).all()


def test_a_scrape_reuses_the_ticks_counters():
    """After a tick, a scrape reads no per-CPU counters: it exports what the tick read
    (and counts the kernel added since show at the next tick)."""
    from equilibriumd.agent.daemon import Agent, AgentOptions
    from equilibriumd.agent.reconcile import Reconciler
    from equilibriumd.config import parse, parse_addr

    cfg = parse("services: [{name: web, frontend: '10.96.0.1:80', backends: [{address: '10.0.0.1:80'}]}]")
    a = Agent(AgentOptions(config_path="", cgroup="", pin_dir="/nonexistent/equilibrium-test", metrics_addr="off"))
    dp = MemoryDatapath()
    a.dp, a.rec, a.config = dp, Reconciler(dp), cfg
    a.telemetry = dp.telemetry()
    a.apply(cfg)
    bid = a.rec.services["web"].backends[parse_addr("10.0.0.1:80")]
    reader = Counting(dp)
    a.telemetry = reader
    dp.add_telemetry(bid, cpu=1, requests=7, resp_2xx=7)
    a.tick()
    ticks = len(reader.reads)
    assert ticks > 0
    reg = metrics.make_registry(a, process=False)
    scraped: list[tuple[str, int]] = []
    orig = MemoryTelemetryReader._read_chunk

    def spy(self: Any, which: str, k: int, start: int) -> np.ndarray:
        scraped.append((which, k))
        return orig(self, which, k, start)

    MemoryTelemetryReader._read_chunk = spy   # type: ignore[method-assign]
    try:
        text = generate_latest(reg).decode()
        dp.add_telemetry(bid, cpu=0, requests=5)      # after the tick: not in the next scrape
        text2 = generate_latest(reg).decode()
    finally:
        MemoryTelemetryReader._read_chunk = orig   # type: ignore[method-assign]
    assert [w for w, _ in scraped if w == "counters"] == [], scraped
    assert 'equilibrium_backend_requests_total{backend="10.0.0.1:80",service="web"} 7.0' in text
    assert 'equilibrium_backend_requests_total{backend="10.0.0.1:80",service="web"} 7.0' in text2
    a.tick()
    text3 = generate_latest(reg).decode()
    assert 'equilibrium_backend_requests_total{backend="10.0.0.1:80",service="web"} 12.0' in text3


@pytest.mark.root
def test_chunked_kernel_read_equals_one_full_read(cgroup, backends, pin_dir, frontend_ip):
    """On the real per-CPU map: a reader taking one key a read returns what one read
    of every key, summed over CPUs, returns."""
    import ctypes as ct
    import socket

    from equilibriumd.agent.reconcile import Reconciler
    from equilibriumd.config import parse
    from equilibriumd.datapath import libbpf, lifecycle
    from equilibriumd.datapath.maps import Datapath
    from equilibriumd.datapath.structs import TelGroup

    be = backends(3)
    lifecycle.ensure_loaded(pin_dir, cgroup.path)
    with Datapath(pin_dir) as dp:
        rec = Reconciler(dp)
        addrs = ", ".join("{address: '%s'}" % be.addr(i) for i in range(3))
        rec.apply(parse("services: [{name: s, frontend: '%s:80', backends: [%s]}]" % (frontend_ip, addrs)),
                  {"s": [1, 1, 1]})
        with cgroup.enter():
            for _ in range(30):
                socket.create_connection((frontend_ip, 80), timeout=2).close()
        assert be.settle(30) == 30
        n = constants.TEL_GROUP * 3     # three keys
        one = dp.telemetry()
        one.__init__(dp.fd["eq_tel_be"], dp.ncpu, dp.fd["eq_tel_hist"], budget=1)   # one key a read
        assert one.group_chunk == 1
        got = one._counters(n)
        raw = libbpf.array_read(dp.fd["eq_tel_be"], ct.sizeof(TelGroup) * dp.ncpu, 3)
        full = np.frombuffer(raw, dtype=np.uint64).reshape(3, dp.ncpu, constants.TEL_GROUP, len(COUNTER))
        want = full.sum(axis=1, dtype=np.uint64).reshape(n, len(COUNTER))
        assert (got == want).all()
        assert int(got[:, COUNTER["established"]].sum()) == 30
