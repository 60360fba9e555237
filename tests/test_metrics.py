"""Prometheus /metrics and the Grafana dashboards, against the real kernel
and a real Prometheus.

A real agent serves /metrics; HTTP traffic goes through a frontend from inside
the test cgroup to the testbed's backends; the scraped counters must equal what
the servers saw, and only `service`/`backend` (and `le`) labels may appear.
Then a real Prometheus (Debian package `prometheus`, installed by scripts/setup)
scrapes the agent every second and every expression of every dashboard panel
must parse and return data.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from equilibriumd import metrics

from helpers import REPO, RST, write_config

pytestmark = pytest.mark.root

DASHBOARDS = sorted((REPO / "daemonset" / "dashboards").glob("*.json"))
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
ALLOWED_LABELS = {"service", "backend"}
RATE_INTERVAL = "15s"


# --- helpers ----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(host: str, port: int, n: int) -> list[int]:
    """n GETs, one connection each (Connection: close); the status codes."""
    out = []
    for _ in range(n):
        with socket.create_connection((host, port), timeout=5) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
            s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            buf = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        out.append(int(buf[9:12]))
    return out


def scrape(port: int) -> str:
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=5) as r:
        return r.read().decode()


def parse(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def values(fams: dict[str, Any], family: str, sample: str | None = None) -> dict[tuple[str, str], float]:
    """{(service, backend): value} of one family's samples (sample name defaults to the family's)."""
    f = fams[family]
    name = sample or (family + "_total" if f.type == "counter" else family)
    return {(s.labels.get("service", ""), s.labels.get("backend", "")): s.value
            for s in f.samples if s.name == name}


def start_agent(agent: Any, cfg: Path, port: int) -> Any:
    a = agent(cfg)
    a.cmd += ["--metrics-addr", "127.0.0.1:%d" % port]  # AgentProc builds the rest of the command line
    return a.start()


def service(name: str, frontend: str, addrs: list[str]) -> dict[str, Any]:
    return {"name": name, "frontend": frontend, "protocol": "tcp",
            "backends": [{"address": a, "weight": 1} for a in addrs]}


# --- the exposition against real traffic ---------------------------------------------
def test_metrics_match_traffic(tmp_path, cgroup, testbed, agent, frontend_ip):
    n = 150
    tb = testbed(2, behaviours=[{}, {"error_ratio": 0.3, "error_status": 503}], seed=7)
    cfg = write_config(tmp_path / "c.yaml", [service("web", frontend_ip + ":80", tb.addrs)], policy="equilibrium")
    port = free_port()
    a = start_agent(agent, cfg, port)
    assert a.wait_event("metrics_listening")["addr"] == "127.0.0.1:%d" % port
    with cgroup.enter():
        codes = get(frontend_ip, 80, n)
    assert set(codes) <= {200, 503} and len(codes) == n

    deadline = time.monotonic() + 10
    while True:  # the last closes land a moment after the last response
        fams = parse(scrape(port))
        reqs = values(fams, "equilibrium_backend_requests")
        conns = values(fams, "equilibrium_backend_connections")
        ticks = values(fams, "equilibrium_agent_ticks").get(("", ""), 0)
        if (sum(reqs.values()) == n and sum(conns.values()) == n and ticks >= 3) or time.monotonic() > deadline:
            break
        time.sleep(0.1)

    # names, types, labels
    types = {
        "equilibrium_routing_probability": "gauge", "equilibrium_routing_regret": "gauge",
        "equilibrium_routing_payoff": "gauge", "equilibrium_routing_toll_seconds": "gauge",
        "equilibrium_routing_effective_latency_seconds": "gauge",
        "equilibrium_nash_status": "gauge", "equilibrium_convergence_diverging": "gauge",
        "equilibrium_convergence_distance": "gauge", "equilibrium_convergence_regret_potential": "gauge",
        "equilibrium_nash_wardrop_gap_seconds": "gauge", "equilibrium_backend_failing_probability": "gauge",
        "equilibrium_backend_quarantined": "gauge", "equilibrium_backend_draining": "gauge",
        "equilibrium_backend_selections": "counter", "equilibrium_backend_connections": "counter",
        "equilibrium_backend_connect_attempts": "counter", "equilibrium_backend_connect_errors": "counter",
        "equilibrium_backend_connect_refused": "counter", "equilibrium_backend_connect_timeouts": "counter",
        "equilibrium_backend_connection_resets": "counter", "equilibrium_backend_requests": "counter",
        "equilibrium_backend_requests_unanswered": "counter", "equilibrium_backend_errors": "counter",
        "equilibrium_backend_responses_1xx": "counter", "equilibrium_backend_responses_2xx": "counter",
        "equilibrium_backend_responses_3xx": "counter", "equilibrium_backend_responses_4xx": "counter",
        "equilibrium_backend_responses_5xx": "counter", "equilibrium_backend_open_connections": "gauge",
        "equilibrium_backend_active_connections": "gauge",
        "equilibrium_backend_inflight_requests": "gauge", "equilibrium_backend_retransmits": "counter",
        "equilibrium_backend_sent_bytes": "counter", "equilibrium_backend_received_bytes": "counter",
        "equilibrium_backend_rtt_seconds": "summary",
        "equilibrium_backend_request_latency_seconds": "histogram",
        "equilibrium_backend_connect_latency_seconds": "histogram",
        "equilibrium_service_no_backend": "counter", "equilibrium_service_stale_slot": "counter",
        "equilibrium_service_revnat_update_errors": "counter",
        "equilibrium_agent_ticks": "counter", "equilibrium_agent_map_errors": "counter",
        "equilibrium_agent_scrape_errors": "counter", "equilibrium_agent_tick_duration_seconds": "gauge",
        "equilibrium_agent_last_successful_tick_timestamp_seconds": "gauge",
        "equilibrium_agent_resident_memory_bytes": "gauge",
        "equilibrium_rebalanced_connections": "counter", "equilibrium_agent_rebalance_available": "gauge",
    }
    for name, kind in types.items():
        assert name in fams, "missing %s" % name
        assert fams[name].type == kind, (name, fams[name].type)
    for f in fams.values():
        assert f.name.startswith(("equilibrium_", "process_")), f.name
        assert f.documentation, "no HELP for %s" % f.name
        if f.type == "counter":
            assert all(s.name.endswith("_total") for s in f.samples), f.name
        for s in f.samples:
            extra = set(s.labels) - ALLOWED_LABELS - ({"le"} if s.name.endswith("_bucket") else set()) \
                - ({"reason"} if f.name in ("equilibrium_rebalanced_connections", "equilibrium_admission_budgets")
                   else set())
            assert not extra, "%s has labels %s" % (s.name, sorted(extra))
            assert "percent" not in s.name
        if f.name.startswith("equilibrium_backend_") or f.name.startswith("equilibrium_routing_"):
            assert all(set(s.labels) - {"le"} == ALLOWED_LABELS for s in f.samples), f.name

    # counters equal the traffic, backend by backend
    be = {addr: tb.stats(addr) for addr in tb.addrs}
    keys = {("web", addr) for addr in tb.addrs}
    assert set(values(fams, "equilibrium_backend_requests")) == keys
    ok = values(fams, "equilibrium_backend_responses_2xx")
    bad = values(fams, "equilibrium_backend_responses_5xx")
    for addr, st in be.items():
        k = ("web", addr)
        assert reqs[k] == st["requests"], (addr, reqs[k], st)
        assert conns[k] == st["connections"]
        assert ok[k] == st["responses"].get("200", 0)
        assert bad[k] == st["responses"].get("503", 0)
        assert values(fams, "equilibrium_backend_selections")[k] == st["connections"]
        assert values(fams, "equilibrium_backend_errors")[k] == bad[k]
        assert values(fams, "equilibrium_backend_connect_errors")[k] == 0
        assert values(fams, "equilibrium_backend_open_connections")[k] == 0
        assert values(fams, "equilibrium_backend_active_connections")[k] == 0
    assert sum(reqs.values()) == n and sum(ok.values()) == codes.count(200) and sum(bad.values()) == codes.count(503)
    assert codes.count(503) > 0

    # histograms: cumulative buckets, +Inf == count == answered requests, a positive sum
    for fam, count_of in (("equilibrium_backend_request_latency_seconds", reqs),
                          ("equilibrium_backend_connect_latency_seconds", conns)):
        f = fams[fam]
        for k in keys:
            lab = {"service": k[0], "backend": k[1]}
            buckets = [(float(s.labels["le"]), s.value) for s in f.samples
                       if s.name == fam + "_bucket" and {x: s.labels[x] for x in lab} == lab]
            assert [b for b, _ in buckets] == sorted(b for b, _ in buckets) and buckets[-1][0] == math.inf
            assert all(b2 >= b1 for (_, b1), (_, b2) in zip(buckets, buckets[1:]))
            count = values(fams, fam, fam + "_count")[k]
            assert buckets[-1][1] == count == count_of[k], (fam, k, count, count_of[k])
            assert 0 < values(fams, fam, fam + "_sum")[k] < count  # every one well under a second
            les = [b for b, _ in buckets[:-1]]
            assert les[0] == pytest.approx(2e-6) and all(b2 == pytest.approx(2 * b1) for b1, b2 in zip(les, les[1:]))

    # game state and agent health
    prob = values(fams, "equilibrium_routing_probability")
    assert set(prob) == keys and sum(prob.values()) == pytest.approx(1.0, abs=1e-6)
    assert values(fams, "equilibrium_nash_status")[("web", "")] in (0.0, 1.0)
    assert values(fams, "equilibrium_convergence_distance")[("web", "")] >= 0
    assert set(values(fams, "equilibrium_backend_failing_probability")) == keys
    agent_v = {f: values(fams, f)[("", "")] for f in (
        "equilibrium_agent_ticks", "equilibrium_agent_tick_duration_seconds", "equilibrium_agent_map_errors",
        "equilibrium_agent_scrape_errors", "equilibrium_agent_last_successful_tick_timestamp_seconds",
        "equilibrium_agent_resident_memory_bytes")}
    assert agent_v["equilibrium_agent_ticks"] > 0 and 0 < agent_v["equilibrium_agent_tick_duration_seconds"] < 0.5
    assert agent_v["equilibrium_agent_map_errors"] == 0 and agent_v["equilibrium_agent_scrape_errors"] == 0
    assert abs(time.time() - agent_v["equilibrium_agent_last_successful_tick_timestamp_seconds"]) < 10
    assert 5e6 < agent_v["equilibrium_agent_resident_memory_bytes"] < 100e6
    assert values(fams, "equilibrium_service_no_backend")[("web", "")] == 0


def test_port_in_use_is_a_clear_start_error(tmp_path, testbed, agent, frontend_ip):
    tb = testbed(1)
    cfg = write_config(tmp_path / "c.yaml", [service("web", frontend_ip + ":80", tb.addrs)])
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        addr = "127.0.0.1:%d" % held.getsockname()[1]
        a = agent(cfg)
        a.cmd += ["--metrics-addr", addr]
        a.start(wait=False)
        assert a.proc is not None
        rc = a.proc.wait(timeout=90)
    assert rc == 1
    failed = a.wait_event("start_failed")
    assert addr in failed["error"] and "in use" in failed["error"], failed


def test_bad_metrics_addr_is_a_usage_error():
    from equilibriumd.cli.daemon import cli

    for bad, why in (("9500", "HOST:PORT"), ("localhost:0", "1..65535"), ("::1:9500", "brackets"),
                     ("[::1:9500", "unbalanced")):
        r = CliRunner().invoke(cli, ["run", "--config", "x.yaml", "--metrics-addr", bad])
        assert r.exit_code == 2 and "--metrics-addr" in r.output and why in r.output, (bad, r.output)
    assert metrics.parse_addr("off") is None and metrics.parse_addr("") is None
    assert metrics.parse_addr("[::1]:9500") == ("::1", 9500)
    assert metrics.parse_addr("0.0.0.0:9100") == ("0.0.0.0", 9100)


def test_a_failing_map_read_never_fails_the_scrape():
    """The collector logs and counts a map error, and still exports the snapshot."""

    class Broken:
        def read_raw(self, n: int) -> None:
            raise OSError(9, "bpf_map_lookup_batch(fd 99): Bad file descriptor")

        def totals(self, n: int) -> None:
            raise OSError(9, "bpf_map_lookup_batch(fd 99): Bad file descriptor")

        def telemetry(self) -> "Broken":
            return self

        def _percpu_sum(self, *a: Any) -> None:
            raise OSError(9, "Bad file descriptor")

    class Rec:
        services = {"web": type("A", (), {"id": 0})()}

    class FakeAgent:
        def metrics_snapshot(self, max_backends: int) -> dict[str, Any]:
            return self.snapshot

        snapshot = {"agent": {"ticks": 3, "last_tick_duration_seconds": 0.001, "map_errors_total": 0,
                              "last_success_unix": time.time(), "rss_bytes": 1 << 24, "tick_seconds": 0.5},
                    "services": [{"name": "web", "status": "converged", "distance": 0.01,
                                  "wardrop_gap_seconds": 0.0, "regret_potential": None,
                                  "backends": [{"address": "127.0.0.11:80", "id": 0, "state": "active",
                                                "probability": 1.0, "regret": float("nan"),
                                                "quarantined": False}]}]}
        dp = Broken()
        telemetry = Broken()
        rec = Rec()

    reg = metrics.make_registry(FakeAgent(), process=False)  # type: ignore[arg-type]
    for i in (1, 2):
        fams = parse(generate_latest(reg).decode())
        assert values(fams, "equilibrium_agent_scrape_errors")[("", "")] == 2 * i  # telemetry and service errors
    assert values(fams, "equilibrium_nash_status")[("web", "")] == 1.0
    assert values(fams, "equilibrium_routing_probability")[("web", "127.0.0.11:80")] == 1.0
    assert "equilibrium_routing_regret" not in fams or not fams["equilibrium_routing_regret"].samples  # NaN: left out
    assert "equilibrium_backend_requests" not in fams


# --- a real Prometheus over the dashboards ---------------------------------------------
class Prometheus:
    """/usr/bin/prometheus on 127.0.0.1, scraping its targets every second, in a temp dir."""

    def __init__(self, *targets: str) -> None:
        if not os.access(PROMETHEUS, os.X_OK):
            pytest.fail("prometheus is not installed (scripts/setup installs the Debian package)")
        self.dir = tempfile.mkdtemp(prefix="eqprom-")
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        try:
            conf = Path(self.dir) / "prometheus.yml"
            conf.write_text(json.dumps({  # JSON is YAML
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [{"job_name": "equilibrium", "static_configs": [{"targets": list(targets)}]}],
            }))
            self.log = open(Path(self.dir) / "prometheus.log", "wb")
            self.proc = subprocess.Popen(
                [PROMETHEUS, "--config.file=%s" % conf, "--storage.tsdb.path=%s" % (Path(self.dir) / "data"),
                 "--storage.tsdb.retention.time=1h", "--web.listen-address=127.0.0.1:%d" % self.port],
                stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.dir)
        except BaseException:
            self.close()
            raise

    def api(self, path: str, **params: str) -> Any:
        url = "http://127.0.0.1:%d/api/v1/%s" % (self.port, path)
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:  # 400/422: a bad query; the body says why
            return json.loads(e.read())

    def wait_scraped(self, scrapes: int = 1, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        seen = 0.0
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, "prometheus exited:\n" + self.tail()
            try:
                ts = self.api("targets")["data"]["activeTargets"]
                up = [t for t in ts if t["health"] == "up"]
                if up:
                    r = self.api("query", query="count_over_time(up[1m])")["data"]["result"]
                    seen = float(r[0]["value"][1]) if r else 0.0
                    if seen >= scrapes:
                        return
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.25)
        raise AssertionError("prometheus scraped %d times in %ss:\n%s" % (seen, timeout, self.tail()))

    def tail(self) -> str:
        try:
            return (Path(self.dir) / "prometheus.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)  # by its own PID
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        if getattr(self, "log", None) is not None:
            self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def grafana_regex_value(v: str) -> str:
    """A variable's value as Grafana puts it into `=~"..."`: regex metacharacters
    escaped with a backslash that is itself escaped for the PromQL string."""
    return re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\\\1", v)


def panel_targets(dash: dict[str, Any]) -> list[tuple[str, str]]:
    out = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            walk(p.get("panels", []))
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((p["title"], t["expr"]))

    walk(dash.get("panels", []))
    return out


def test_dashboards_are_plain_json_with_fixed_uids():
    assert DASHBOARDS, "no dashboards in daemonset/dashboards"
    uids = set()
    for path in DASHBOARDS:
        d = json.loads(path.read_text())
        assert re.fullmatch(r"[a-z0-9-]{1,40}", d["uid"]) and d["uid"] not in uids, path
        uids.add(d["uid"])
        names = {v["name"]: v for v in d["templating"]["list"]}
        assert names["datasource"]["type"] == "datasource" and names["datasource"]["query"] == "prometheus"
        assert names["service"]["type"] == "query"
        assert panel_targets(d), path
        for p in d["panels"]:
            if p["type"] != "row":
                assert p["datasource"]["uid"] == "${datasource}", p["title"]


def test_every_dashboard_query_returns_data_from_a_real_prometheus(tmp_path, cgroup, testbed, agent, frontend_ip):
    assert DASHBOARDS, "no dashboards in daemonset/dashboards"
    tb = testbed(3, behaviours=[{}, {}, {"error_ratio": 0.2}], seed=3)
    cfg = write_config(tmp_path / "c.yaml", [service("bus-service", frontend_ip + ":80", tb.addrs)],
                       policy="equilibrium-tolls")
    port, cport = free_port(), free_port()
    # the coordination panels: the agent follows a local coordinator (its own /metrics
    # is the second target). A second calling node is needed for the service to be
    # coordinated at all: its summary is written here, as that node's agent would
    # (tests/test_coordination_live.py runs two real agents).
    chan = tmp_path / "channel"
    a = agent(cfg)
    a.cmd += ["--metrics-addr", "127.0.0.1:%d" % port, "--coordinator", "dir:%s" % chan,
              "--coordination-period", "0.5", "--node-name", "node-0"]
    a.start()
    coord = subprocess.Popen([sys.executable, "-m", "equilibriumd", "coordinate", "--dir", str(chan),
                              "--interval", "0.5", "--ttl", "3", "--metrics-addr", "127.0.0.1:%d" % cport],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    prom = Prometheus("127.0.0.1:%d" % port, "127.0.0.1:%d" % cport)
    stop = threading.Event()
    sent = [0]

    def load() -> None:
        while not stop.is_set():
            get(frontend_ip, 80, 5)
            sent[0] += 5
            time.sleep(0.02)

    def peer() -> None:
        from equilibriumd.discovery.channel_types import summary_name
        from equilibriumd.discovery.localchannel import DirChannel
        from equilibriumd.policy.coordination import NodeSummary, ServiceSummary

        ch = DirChannel(str(chan), min_interval=0)
        while not stop.wait(0.5):
            s = NodeSummary("node-1", time.time(), {"bus-service": ServiceSummary(
                tuple(tb.addrs), (30.0, 30.0, 30.0), (0.002, 0.002, 0.003))})
            ch.publish(summary_name("node-1"), json.loads(s.to_json()), "summary")

    threading.Thread(target=peer, daemon=True).start()
    try:
        with cgroup.enter():  # the whole process (every thread) is in the test cgroup
            t = threading.Thread(target=load, daemon=True)
            t.start()
            try:
                prom.wait_scraped(scrapes=1)
                start = time.monotonic()
                prom.wait_scraped(scrapes=8)  # enough points for a rate over RATE_INTERVAL
                assert time.monotonic() - start < 30
            finally:
                stop.set()
                t.join(timeout=10)
        assert sent[0] > 0
        time.sleep(1.5)  # one more scrape after the last request

        services = prom.api("label/service/values", **{"match[]": "equilibrium_routing_probability"})
        assert "bus-service" in services["data"], services
        problems = []
        for path in DASHBOARDS:
            dash = json.loads(path.read_text())
            for title, expr in panel_targets(dash):
                q = (expr.replace("$service", grafana_regex_value("bus-service"))
                     .replace("$__rate_interval", RATE_INTERVAL))
                assert "$" not in q, (title, q)
                r = prom.api("query", query=q)
                if r.get("status") != "success":
                    problems.append("%s: %s: %s" % (path.name, title, r.get("error")))
                    continue
                result = r["data"]["result"]
                finite = [x for x in result if math.isfinite(float(x["value"][1]))]
                if not result:
                    problems.append("%s: %s: no series for %s" % (path.name, title, q))
                elif not finite:
                    problems.append("%s: %s: only NaN/Inf for %s" % (path.name, title, q))
        assert not problems, "\n".join(problems)
    finally:
        stop.set()
        prom.close()
        if coord.poll() is None:
            coord.send_signal(signal.SIGTERM)   # by its own PID
        coord.wait(timeout=15)
    assert not os.path.exists(prom.dir)
