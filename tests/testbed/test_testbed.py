"""The configurable test backends (equilibriumd.lab.testbed) against real sockets.

Backends listen on 127.0.0.0/8 (no root needed); the bandwidth tests build
test hosts in network namespaces with a tbf qdisc and are marked root.
"""

from __future__ import annotations

import json
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from equilibriumd.lab.testbed import Behaviour, Latency, TestBackends, hosts, mbit, netns_host

# -- a minimal HTTP client that shows exactly what came over the wire ---------


class Conn:
    """One client connection: send requests, read whole responses."""

    def __init__(self, addr: tuple[str, int]) -> None:
        self.sock = socket.create_connection(addr, timeout=10)
        self.rfile = self.sock.makefile("rb")

    def send(self, method: str = "GET", body: bytes = b"", close: bool = False) -> None:
        head = "%s / HTTP/1.1\r\nHost: t\r\n" % method
        if body:
            head += "Content-Length: %d\r\n" % len(body)
        if close:
            head += "Connection: close\r\n"
        self.sock.sendall(head.encode() + b"\r\n" + body)

    def read(self, head: bool = False) -> tuple[int, dict[str, str], bytes]:
        status_line = self.rfile.readline()
        if not status_line:
            raise EOFError("connection closed before a response")
        status = int(status_line.split()[1])
        headers = {}
        while (line := self.rfile.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode().partition(":")
            headers[k.strip().lower()] = v.strip()
        body = b"" if head else self.rfile.read(int(headers["content-length"]))
        return status, headers, body

    def request(self, method: str = "GET", body: bytes = b"", close: bool = False) -> tuple[int, dict[str, str], bytes]:
        self.send(method, body, close)
        return self.read(head=method == "HEAD")

    def at_eof(self) -> bool:
        return self.rfile.read(1) == b""

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()


def fetch(addr: tuple[str, int]) -> tuple[int, float]:
    """One request on a new connection; (body bytes, seconds to the last byte)."""
    t0 = time.perf_counter()
    c = Conn(addr)
    try:
        _, _, body = c.request(close=True)
    finally:
        c.close()
    return len(body), time.perf_counter() - t0


@pytest.fixture
def tb() -> Iterator[TestBackends]:
    with TestBackends(2, seed=7) as b:
        yield b


# -- behaviour records (pure) --------------------------------------------------


def test_bad_behaviour_is_refused_with_its_name() -> None:
    b = Behaviour()
    with pytest.raises(ValueError, match="unknown behaviour key 'latncy'"):
        b.updated({"latncy": 0.1})
    with pytest.raises(ValueError, match=r"error_ratio: expected a ratio in \[0, 1\]"):
        b.updated({"error_ratio": 1.5})
    with pytest.raises(ValueError, match="lognormal needs sigma"):
        b.updated({"latency": {"dist": "lognormal", "median": 0.1}})
    with pytest.raises(ValueError, match="unknown dist 'gamma'"):
        b.updated({"latency": {"dist": "gamma"}})
    with pytest.raises(ValueError, match="uniform needs low <= high"):
        b.updated({"latency": {"dist": "uniform", "low": 0.2, "high": 0.1}})
    with pytest.raises(ValueError, match="error_status"):
        b.updated({"error_status": 200})
    assert b == Behaviour()


@pytest.mark.parametrize("spec,mean,tol", [
    (0.05, 0.05, 0.0),
    ({"dist": "uniform", "low": 0.01, "high": 0.03}, 0.02, 0.0005),
    ({"dist": "exponential", "mean": 0.02}, 0.02, 0.001),
    ({"dist": "lognormal", "median": 0.01, "sigma": 0.5}, 0.01 * 2.718281828 ** (0.5 ** 2 / 2), 0.0005),
    ({"dist": "normal", "mean": 0.03, "std": 0.005}, 0.03, 0.0003),
])
def test_latency_distributions(spec: object, mean: float, tol: float) -> None:
    lat = Latency.parse(spec)
    xs = [lat.sample(random.Random(s)) for s in range(20000)]
    assert min(xs) >= 0
    assert abs(statistics.fmean(xs) - mean) <= tol
    assert xs[:50] == [lat.sample(random.Random(s)) for s in range(50)]  # seeded: reproducible


def test_normal_latency_is_clipped_at_zero() -> None:
    lat = Latency.parse({"dist": "normal", "mean": 0.0, "std": 0.01})
    xs = [lat.sample(random.Random(s)) for s in range(2000)]
    assert min(xs) == 0.0 and 0.4 < xs.count(0.0) / len(xs) < 0.6


# -- the server, over real sockets -------------------------------------------------


def test_fixed_latency_is_added_before_the_first_byte(tb: TestBackends) -> None:
    c = Conn(tb.address(0))
    t0 = time.perf_counter()
    assert c.request()[0] == 200
    assert time.perf_counter() - t0 < 0.05
    tb.set(0, latency=0.2)
    for _ in range(3):
        t0 = time.perf_counter()
        status, headers, body = c.request()
        assert (status, body) == (200, b"ok")
        assert 0.15 <= time.perf_counter() - t0 <= 0.25
    # the other backend is untouched
    assert fetch(tb.address(1))[1] < 0.05
    c.close()


def test_error_ratio(tb: TestBackends) -> None:
    c = Conn(tb.address(0))
    tb.set(0, error_ratio=1.0)
    assert {c.request()[0] for _ in range(50)} == {503}
    tb.set(0, error_ratio=0.3, error_status=502)
    tb.reset_stats()
    n = 1000
    errors = sum(c.request()[0] == 502 for _ in range(n))
    sd = (n * 0.3 * 0.7) ** 0.5
    assert abs(errors - 0.3 * n) < 5 * sd, errors
    st = tb.stats(0)
    assert st["requests"] == n
    assert st["responses"] == {"200": n - errors, "502": errors}
    c.close()


def test_refuse_closes_the_listener_and_reopens_it(tb: TestBackends) -> None:
    kept = Conn(tb.address(0))
    assert kept.request()[0] == 200
    tb.set(0, refuse=True)
    for _ in range(3):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(tb.address(0), timeout=2)
    assert kept.request()[0] == 200  # accepted connections keep being served
    assert fetch(tb.address(1))[0] == 2
    tb.set(0, refuse=False)
    assert fetch(tb.address(0))[0] == 2
    assert tb.stats(0)["connections"] == 2
    kept.close()


def test_close_mid_request_sends_nothing(tb: TestBackends) -> None:
    tb.set(0, close_mid_request=1.0)
    c = Conn(tb.address(0))
    c.send()
    assert c.sock.recv(100) == b""
    c.close()
    st = tb.stats(0)
    assert (st["requests"], st["closed_mid_request"], st["responses"]) == (1, 1, {})
    tb.set(0, close_mid_request=0.0)
    assert fetch(tb.address(0))[0] == 2


def test_keep_alive_counts_requests_and_connections(tb: TestBackends) -> None:
    c = Conn(tb.address(0))
    for _ in range(100):
        assert c.request()[0] == 200
    st = tb.stats(0)
    assert (st["connections"], st["active_connections"], st["requests"]) == (1, 1, 100)
    assert st["responses"] == {"200": 100}
    # HEAD has no body, POST's body is consumed, and the connection carries on
    status, headers, body = c.request("HEAD")
    assert (status, headers["content-length"], body) == (200, "2", b"")
    assert c.request("POST", body=b"x" * 5000)[0] == 200
    # pipelined requests are answered in order
    c.send()
    c.send("POST", body=b"abc")
    c.send()
    assert [c.read()[0] for _ in range(3)] == [200, 200, 200]
    # Connection: close is honoured
    status, headers, _ = c.request(close=True)
    assert status == 200 and headers["connection"] == "close" and c.at_eof()
    c.close()
    assert tb.stats(0)["requests"] == 106


def test_runtime_changes_apply_to_the_next_request(tb: TestBackends) -> None:
    c = Conn(tb.address(1))
    assert c.request()[::2] == (200, b"ok")
    assert tb.set(1, body_bytes=1000)["body_bytes"] == 1000
    assert c.request()[::2] == (200, b"x" * 1000)
    tb.set(1, error_ratio=1.0, error_status=500)
    assert c.request()[0] == 500
    tb.set(1, error_ratio=0.0)
    status, headers, _ = c.request()
    assert status == 200 and headers["x-backend"] == tb.addrs[1]
    c.close()


def test_bad_change_names_the_problem_and_changes_nothing(tb: TestBackends) -> None:
    before = tb.get(0)
    with pytest.raises(ValueError, match="unknown behaviour key 'latncy'"):
        tb.set(0, error_ratio=1.0, latncy=0.1)
    with pytest.raises(ValueError, match="close_mid_request"):
        tb.set(0, close_mid_request=-0.5)
    with pytest.raises(ValueError, match="no backend 5"):
        tb.set(5, error_ratio=1.0)
    assert tb.get(0) == before
    assert fetch(tb.address(0))[0] == 2


def test_backends_are_named_by_address(tb: TestBackends) -> None:
    tb.set(tb.addrs[1], error_ratio=1.0)
    assert tb.get(1)["error_ratio"] == 1.0 and tb.get(0)["error_ratio"] == 0.0


def test_user_space_bandwidth_paces_the_body(tb: TestBackends) -> None:
    tb.set(0, body_bytes=100_000)
    n, fast = fetch(tb.address(0))
    assert n == 100_000 and fast < 0.05
    tb.set(0, bandwidth=500_000)
    n, slow = fetch(tb.address(0))
    assert n == 100_000 and 0.17 <= slow <= 0.4


def test_same_seed_same_outcomes() -> None:
    runs = []
    for _ in range(2):
        with TestBackends(1, seed=3, behaviour={"error_ratio": 0.5}) as b:
            c = Conn(b.address(0))
            runs.append([c.request()[0] for _ in range(40)])
            c.close()
    assert runs[0] == runs[1] and set(runs[0]) == {200, 503}


def test_cli_prints_ready_and_refuses_bad_behaviour() -> None:
    ip = "127.0.%d.%d" % (random.randint(1, 254), random.randint(11, 250))
    p = subprocess.Popen([sys.executable, "-m", "equilibriumd.lab.testbed.server", "--listen", ip + ":0",
                          "--behaviour", '{"error_ratio": 1.0}'], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        word, _, listeners = p.stdout.readline().partition(" ")
        assert word == "ready"
        (info,) = json.loads(listeners)
        assert info["index"] == 0 and info["addr"].startswith(ip + ":")
        host, _, port = info["addr"].rpartition(":")
        c = Conn((host, int(port)))
        assert c.request()[0] == 503
        c.close()
    finally:
        p.terminate()
        p.wait(timeout=5)
        p.stdout.close()  # type: ignore[union-attr]
    bad = subprocess.run([sys.executable, "-m", "equilibriumd.lab.testbed.server", "--listen", ip + ":0",
                          "--behaviour", '{"error_ratio": 2}'], capture_output=True, text=True, timeout=10)
    assert bad.returncode == 2 and "error_ratio: expected a ratio" in bad.stderr


# -- test hosts: a real tbf in a network namespace (root) ----------------------


def _netns_and_link_gone(name: str) -> bool:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    link = subprocess.run(["ip", "link", "show", name], capture_output=True, text=True)
    return name not in listed and link.returncode != 0


@pytest.mark.root
def test_tbf_limits_a_host_and_changes_at_run_time() -> None:
    with netns_host() as h:
        name = h.netns
        with TestBackends([h.ip + ":8080"], netns=h.netns, behaviour={"body_bytes": 200_000}) as b:
            n, unlimited = fetch(b.address(0))
            assert n == 200_000 and unlimited < 0.1
            h.set_bandwidth(mbit(4))
            assert "tbf" in h.qdisc() and "rate 4Mbit" in h.qdisc()
            n, limited = fetch(b.address(0))
            assert n == 200_000 and 0.35 <= limited <= 1.0
            h.set_bandwidth(mbit(16))  # tc qdisc change, in place
            assert "rate 16Mbit" in h.qdisc()
            n, faster = fetch(b.address(0))
            assert n == 200_000 and faster < limited / 2
            h.set_bandwidth(None)
            assert "tbf" not in h.qdisc()
            assert fetch(b.address(0))[1] < 0.1
    assert _netns_and_link_gone(name)


@pytest.mark.root
def test_host_is_removed_when_setup_or_the_body_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[hosts.TestHost] = []

    class Recorded(hosts.TestHost):
        def __init__(self, *a: Any) -> None:
            super().__init__(*a)
            made.append(self)

    monkeypatch.setattr(hosts, "TestHost", Recorded)
    with pytest.raises(RuntimeError, match="boom"):
        with netns_host(bandwidth=mbit(8)) as h:
            assert "rate 8Mbit" in h.qdisc()
            raise RuntimeError("boom")
    with pytest.raises(ValueError, match="tbf needs bandwidth > 0"):
        with netns_host(bandwidth=-1):
            pass  # not reached: set-up fails after the netns and the veth exist
    assert len(made) == 2
    for h in made:
        assert _netns_and_link_gone(h.netns), h
