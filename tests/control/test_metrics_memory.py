"""The /metrics collector over the real agent's apply, tick and snapshot, with
an in-memory datapath in place of the pinned maps (no kernel, no root): the
exported counters are what the kernel side counted. tests/test_metrics.py
holds the same against real traffic, and the dashboards against Prometheus."""

from __future__ import annotations

import math
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from equilibriumd import metrics
from equilibriumd.agent.daemon import Agent, AgentOptions
from equilibriumd.agent.reconcile import Reconciler
from equilibriumd.config import Config, parse_addr
from equilibriumd.datapath.memory import MemoryDatapath
from equilibriumd.datapath.structs import HIST_BUCKETS

from .support import config, service_yaml

C = config(
    service_yaml("web", "10.96.0.1:80", ["10.0.0.1:80", "10.0.0.2:80"]),
    service_yaml("db", "10.96.0.2:5432", ["10.0.1.1:5432"], policy="static"),
)


def memory_agent(cfg: Config, dp: MemoryDatapath | None = None) -> Agent:
    """The real agent, started on an in-memory datapath instead of pinned maps."""
    a = Agent(AgentOptions(config_path="", cgroup="", pin_dir="/nonexistent/equilibrium-test", metrics_addr="off"))
    a.dp = dp or MemoryDatapath()
    a.rec = Reconciler(a.dp)
    a.telemetry = a.dp.telemetry()
    a.config = cfg
    a.apply(cfg)
    return a


def scrape(agent: Any, max_backends: int = metrics.DEFAULT_MAX_BACKENDS) -> dict[str, Any]:
    reg = metrics.make_registry(agent, process=False, max_backends=max_backends)
    return {f.name: f for f in text_string_to_metric_families(generate_latest(reg).decode())}


def samples(fams: dict[str, Any], family: str, suffix: str = "") -> dict[tuple[str, ...], float]:
    f = fams[family]
    name = family + (suffix or ("_total" if f.type == "counter" else ""))
    return {tuple(s.labels[k] for k in sorted(s.labels)): s.value for s in f.samples if s.name == name}


def serving(a: Agent) -> tuple[Any, int]:
    """The agent's own /metrics server on a free port of 127.0.0.1, after one tick."""
    import socket

    a.tick()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = metrics.start_metrics_server(a, "127.0.0.1:%d" % port)
    assert srv is not None
    return srv, port


def test_counters_are_what_the_kernel_counted():
    a = memory_agent(C)
    dp = a.dp
    assert isinstance(dp, MemoryDatapath)
    web1, web2 = (a.rec.services["web"].backends[parse_addr(x)] for x in ("10.0.0.1:80", "10.0.0.2:80"))
    db1 = a.rec.services["db"].backends[parse_addr("10.0.1.1:5432")]
    # two CPUs' worth of counts: the exported value is their sum
    dp.add_telemetry(web1, cpu=0, attempts=12, established=10, closed=8, requests=30, resp_2xx=25, resp_5xx=2,
                     req_ns_sum=3_000_000, req_hist={3: 20, 9: 5}, conn_hist={5: 10}, bytes_sent=100)
    dp.add_telemetry(web1, cpu=1, attempts=3, established=2, refused=1, requests=5, resp_2xx=3, req_errors=1,
                     req_ns_sum=1_000_000, req_hist={3: 1, 31: 2}, bytes_sent=23, rtt_sum_us=500, rtt_samples=2,
                     req_open=4, req_done=1)
    dp.add_telemetry(db1, cpu=1, attempts=4, established=4, timed_out=1)
    dp.add_selections(web1, 9, cpu=0)
    dp.add_selections(web1, 6, cpu=1)
    dp.set_active(web1, 4)
    dp.add_service_errors(a.rec.services["web"].id, cpu=1, no_backend=3, rev_update=1)
    a.tick()
    fams = scrape(a)
    w1, w2, d1 = ("10.0.0.1:80", "web"), ("10.0.0.2:80", "web"), ("10.0.1.1:5432", "db")

    def got(family: str) -> dict[tuple[str, ...], float]:
        return samples(fams, family)

    assert got("equilibrium_backend_selections") == {w1: 15, w2: 0, d1: 0}
    assert got("equilibrium_backend_connect_attempts") == {w1: 15, w2: 0, d1: 4}
    assert got("equilibrium_backend_connections") == {w1: 12, w2: 0, d1: 4}
    assert got("equilibrium_backend_open_connections") == {w1: 4, w2: 0, d1: 4}
    assert got("equilibrium_backend_active_connections") == {w1: 4, w2: 0, d1: 0}
    assert got("equilibrium_backend_requests") == {w1: 35, w2: 0, d1: 0}
    assert got("equilibrium_backend_responses_2xx")[w1] == 28 and got("equilibrium_backend_responses_5xx")[w1] == 2
    assert got("equilibrium_backend_requests_unanswered")[w1] == 1
    assert got("equilibrium_backend_inflight_requests")[w1] == 4 - 1   # sockets with a request outstanding
    assert got("equilibrium_backend_errors") == {w1: 2 + 1 + 1, w2: 0, d1: 1}          # 5xx, unanswered, refused
    assert got("equilibrium_backend_connect_errors") == {w1: 1, w2: 0, d1: 1}
    assert got("equilibrium_backend_sent_bytes")[w1] == 123
    assert samples(fams, "equilibrium_backend_rtt_seconds", "_count")[w1] == 2
    assert samples(fams, "equilibrium_backend_rtt_seconds", "_sum")[w1] == pytest.approx(500e-6)
    assert samples(fams, "equilibrium_service_no_backend")[("web",)] == 3
    assert samples(fams, "equilibrium_service_revnat_update_errors")[("web",)] == 1
    assert samples(fams, "equilibrium_service_no_backend")[("db",)] == 0
    assert samples(fams, "equilibrium_agent_scrape_errors")[()] == 0
    assert samples(fams, "equilibrium_agent_ticks")[()] == 1

    # histograms: cumulative over the log2 buckets; +Inf is the count; the sum is the summed time
    fam = "equilibrium_backend_request_latency_seconds"
    buckets = sorted((float(s.labels["le"]), s.value) for s in fams[fam].samples
                     if s.name == fam + "_bucket" and s.labels["backend"] == w1[0])
    assert len(buckets) == HIST_BUCKETS and buckets[-1][0] == math.inf
    want = [sum(n for b, n in ((3, 21), (9, 5), (31, 2)) if b <= i) for i in range(HIST_BUCKETS)]
    assert [v for _, v in buckets] == want
    assert buckets[2][0] == pytest.approx(2 ** 3 * 1e-6)     # bucket i ends at 2^(i+1) µs
    assert samples(fams, fam, "_count")[w1] == 28
    assert samples(fams, fam, "_sum")[w1] == pytest.approx(4e-3)
    conn = "equilibrium_backend_connect_latency_seconds"
    assert samples(fams, conn, "_count") == {w1: 10, w2: 0, d1: 0}

    # counters only grow, tick after tick
    dp.add_telemetry(web1, cpu=1, requests=5)
    a.tick()
    assert samples(scrape(a), "equilibrium_backend_requests")[w1] == 40


def test_an_empty_datapath_scrapes_cleanly():
    # no services at all
    a = memory_agent(config())
    a.tick()
    fams = scrape(a)
    assert samples(fams, "equilibrium_agent_scrape_errors")[()] == 0
    assert "equilibrium_backend_requests" not in fams
    # services, but nothing counted yet: every counter at zero, still no error
    a = memory_agent(C)
    fams = scrape(a)
    assert samples(fams, "equilibrium_agent_scrape_errors")[()] == 0
    assert set(samples(fams, "equilibrium_backend_requests").values()) == {0.0}
    assert len(samples(fams, "equilibrium_backend_requests")) == 3
    assert set(samples(fams, "equilibrium_service_stale_slot").values()) == {0.0}


def test_a_snapshot_naming_ids_the_maps_never_held():
    # an agent-like source whose snapshot names backend ids on a datapath nobody wrote
    mem = MemoryDatapath()

    class Source:
        dp = mem
        telemetry = mem.telemetry()
        rec = None
        def metrics_snapshot(self, max_backends: int) -> dict[str, Any]:
            return self.snapshot

        snapshot = {"agent": {}, "services": [{"name": "web", "backends": [
            {"address": "10.0.0.1:80", "id": 0, "state": "active"},
            {"address": "10.0.0.2:80", "id": 700, "state": "draining"},
            {"address": "10.0.0.3:80", "id": None, "state": "active"}]}]}

    fams = scrape(Source())
    assert samples(fams, "equilibrium_agent_scrape_errors")[()] == 0
    assert samples(fams, "equilibrium_backend_requests") == {("10.0.0.1:80", "web"): 0, ("10.0.0.2:80", "web"): 0}
    assert samples(fams, "equilibrium_backend_draining")[("10.0.0.2:80", "web")] == 1


def test_a_node_sized_scrape_has_series_per_service_and_a_budget_of_backends():
    """Every service has its series; only the first services' backends (config order,
    whole services, up to the budget) have their own; the rest are counted."""
    svcs = [service_yaml("s%d" % i, "10.96.1.%d:80" % i, ["10.1.%d.%d:80" % (i, j) for j in range(4)])
            for i in range(10)]
    a = memory_agent(config(*svcs))
    a.tick()
    fams = scrape(a, max_backends=10)     # s0 and s1: 8 backends; s2 would make 12
    assert len(samples(fams, "equilibrium_service_backends")) == 10
    assert set(samples(fams, "equilibrium_service_backends").values()) == {4.0}
    assert set(samples(fams, "equilibrium_service_backends_available").values()) == {4.0}
    assert len(samples(fams, "equilibrium_service_no_backend")) == 10
    per_backend = samples(fams, "equilibrium_routing_probability")
    assert {svc for _, svc in per_backend} == {"s0", "s1"} and len(per_backend) == 8
    assert {svc for _, svc in samples(fams, "equilibrium_backend_requests")} == {"s0", "s1"}
    assert samples(fams, "equilibrium_agent_metrics_backends_omitted")[()] == 32
    assert samples(scrape(a, max_backends=0), "equilibrium_agent_metrics_backends_omitted")[()] == 40
    assert "equilibrium_routing_probability" not in scrape(a, max_backends=0) or \
        not samples(scrape(a, max_backends=0), "equilibrium_routing_probability")
    assert samples(scrape(a, max_backends=1000), "equilibrium_agent_metrics_backends_omitted")[()] == 0


def test_the_server_streams_the_page_refuses_other_paths_and_drops_idle_clients(monkeypatch, capfd):
    """The agent's /metrics server (no root: the real agent on an in-memory datapath):
    the page is the registry's, sent in chunks family by family; another path is a
    404; a client that connects and sends nothing is dropped after the timeout."""
    import socket
    import time
    import urllib.error
    import urllib.request

    monkeypatch.setattr(metrics._Handler, "timeout", 0.5)
    srv, port = serving(memory_agent(C))
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=10) as r:
            assert r.headers["Transfer-Encoding"] == "chunked"
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            page = r.read().decode()
        got = {f.name for f in text_string_to_metric_families(page)}
        assert {"equilibrium_agent_ticks", "equilibrium_service_backends", "equilibrium_backend_requests",
                "process_resident_memory_bytes"} <= got
        def steady(text: str) -> list[str]:   # the process's own figures move between two renderings
            return [x for x in text.splitlines() if not x.startswith(("process_", "equilibrium_agent_resident"))]

        assert steady(page) == steady(generate_latest(srv.registry).decode())   # what prometheus_client renders
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen("http://127.0.0.1:%d/debug" % port, timeout=10)
        assert e.value.code == 404
        idle = socket.create_connection(("127.0.0.1", port), timeout=5)
        t0 = time.monotonic()
        assert idle.recv(1) == b""          # closed by the server, not by our 5 s timeout
        assert time.monotonic() - t0 < 3
        idle.close()
        for _ in range(3):   # scrapers that hang up mid-page: no traceback, the next scrape is whole
            rude = socket.create_connection(("127.0.0.1", port), timeout=5)
            rude.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            rude.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            rude.recv(100)
            rude.close()      # linger 0: a reset, while the page is being written
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=10) as r:
            assert steady(r.read().decode()) == steady(page)
        assert "Traceback" not in capfd.readouterr().err
    finally:
        srv.close()
