"""Pooled connections follow the weights: the rebalancer (bpf/rebalance.bpf.c,
agent.rebalance) against the real kernel, with real keep-alive clients.

Each test runs the agent as a child process, HTTP backends (lab.testbed) and
clients inside a child cgroup: a urllib3 pool (lab.poolclient, what
`requests` uses) or raw sockets whose state a test controls (idle, or with
half a request sent so that one is outstanding).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

from equilibriumd.datapath import constants, pins
from equilibriumd.datapath.maps import Datapath
from equilibriumd.lab.poolclient import share_after

from helpers import PY, REPO, AgentProc, Cgroup, rand_tag

pytestmark = pytest.mark.root

DEAD = select.POLLERR | select.POLLHUP


def _config(path: Path, fe: str, addrs: list[str], weights: list[float], states: list[str] | None = None,
            rebalance: dict[str, Any] | None = None, svc: dict[str, Any] | None = None) -> Path:
    """One service `web`; `rebalance`: the file's rebalance section, `svc`: more service fields."""
    bes = [{"address": a, "weight": w, "state": (states or ["active"] * len(addrs))[i]}
           for i, (a, w) in enumerate(zip(addrs, weights))]
    doc: dict[str, Any] = {"tick": "0.2s", "policy": "static",
                           "rebalance": {"min_age": "0.3s", **(rebalance or {})},
                           "services": [{"name": "web", "frontend": "%s:80" % fe, **(svc or {}), "backends": bes}]}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture
def bed(tmp_path: Path, cgroup: Cgroup, agent: Callable[[Path], AgentProc], testbed: Any,
        frontend_ip: str) -> Iterator[dict[str, Any]]:
    tb = testbed(3)
    cfg = tmp_path / "c.yaml"

    def configure(weights: list[float], **kw: Any) -> Path:
        return _config(cfg, frontend_ip, tb.addrs, weights, **kw)

    yield {"tb": tb, "fe": frontend_ip, "cfg": cfg, "configure": configure, "agent": agent, "cgroup": cgroup}


def _start(bed: dict[str, Any], weights: list[float], **kw: Any) -> AgentProc:
    a = bed["agent"](bed["configure"](weights, **kw)).start()
    assert a.count("rebalance_unavailable") == 0, a.log_path.read_text()[-2000:]
    return a


def _reconfigure(a: AgentProc, bed: dict[str, Any], weights: list[float], **kw: Any) -> None:
    n = a.count("config_reloaded")
    bed["configure"](weights, **kw)
    a.hup()
    a.wait_event("config_reloaded", after=n)


def _keepalive(bed: dict[str, Any], n: int) -> list[Any]:
    """n keep-alive connections through the frontend, each after one answered request
    (idle, in a pool's terms), opened from inside the test cgroup."""
    import socket

    out = []
    with bed["cgroup"].enter():
        for _ in range(n):
            s = socket.create_connection((bed["fe"], 80), timeout=3)
            _request(s)
            out.append(s)
    return out


def _request(s: Any) -> bytes:
    s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    buf = b""
    while b"\r\n\r\n" not in buf or not buf.endswith(b"ok"):
        chunk = s.recv(4096)
        assert chunk, "connection closed before the response"
        buf += chunk
    return buf


def _backend_of(s: Any, bed: dict[str, Any]) -> int:
    """Which test backend a connection reached (X-Backend of one more request)."""
    head = _request(s).decode()
    name = next(ln.split(":", 1)[1].strip() for ln in head.split("\r\n") if ln.lower().startswith("x-backend"))
    return bed["tb"].names.index(name)


def _dead(socks: list[Any]) -> list[bool]:
    p = select.poll()
    for s in socks:
        p.register(s, select.POLLIN | select.POLLERR | select.POLLHUP)
    ready = dict(p.poll(0))
    return [bool(ready.get(s.fileno(), 0) & DEAD) for s in socks]


def _wait(cond: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def _closed(pin_dir: str) -> Any:
    with Datapath(pin_dir) as dp:
        moved = dp.rebalanced(64)
    assert moved is not None
    return moved


def _ids(pin_dir: str) -> dict[str, int]:
    with Datapath(pin_dir) as dp:
        return {str(b.address): b.id for b in dp.backends()}


def test_pool_moves_off_a_downweighted_backend(bed: dict[str, Any], pin_dir: str) -> None:
    """A urllib3 pool (8 connections, 20 ms think time) keeps no request on a
    backend the weights left, and sees no failed request."""
    a = _start(bed, [1, 0, 0])   # every pooled connection opens to backend 0
    p = subprocess.Popen([PY, "-m", "equilibriumd.lab.poolclient", "--url", "http://%s:80/" % bed["fe"],
                          "--seconds", "8", "--cgroup", bed["cgroup"].path], stdout=subprocess.PIPE, text=True,
                         cwd=REPO)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        time.sleep(3)
        _reconfigure(a, bed, [0, 1, 1])
        t_change = 3.0
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    res = json.loads(out.strip().splitlines()[-1])
    b0 = bed["tb"].addrs[0]
    names = bed["tb"].names
    assert res["failures"] == {}, res
    before = share_after({"per_second": {k: v for k, v in res["per_second"].items() if int(k) < 3}},
                         names[0], 0)
    assert before == 1.0, res["per_second"]
    after = share_after(res, names[0], t_change + 1.5)
    assert after == 0.0, res["per_second"]
    moved = _closed(pin_dir)[_ids(pin_dir)[b0]]
    assert moved[0] >= 1 and moved[1] == moved[2] == 0, moved   # closed for excess only
    ctl = subprocess.run([PY, "-m", "equilibriumd.cli.ctl", "backends", "web", "--pin-dir", pin_dir, "-o", "json"],
                         capture_output=True, text=True, cwd=REPO)
    assert ctl.returncode == 0, ctl.stderr
    rows = {r["address"]: r for r in json.loads(ctl.stdout)["backends"]}
    assert rows[b0]["rebalanced"]["excess"] == moved[0]


def test_draining_closes_idle_and_keeps_a_request_in_flight(bed: dict[str, Any], pin_dir: str) -> None:
    a = _start(bed, [1, 0, 0])
    idle = _keepalive(bed, 4)
    busy = _keepalive(bed, 1)[0]
    busy.sendall(b"GET / HTTP/1.1\r\n")   # half a request: one is outstanding on this socket
    assert all(_backend_of(s, bed) == 0 for s in idle)
    _reconfigure(a, bed, [1, 1, 1], states=["draining", "active", "active"])
    assert _wait(lambda: all(_dead(idle)), 5), _dead(idle)
    time.sleep(1.0)   # several more ticks with work to do
    assert _dead([busy]) == [False]
    busy.sendall(b"Host: t\r\n\r\n")   # the rest of the request: answered on the same connection
    assert busy.recv(4096).startswith(b"HTTP/1.1 200")
    moved = _closed(pin_dir)[_ids(pin_dir)[bed["tb"].addrs[0]]]
    assert moved.tolist() == [0, 4, 0]
    a.wait_event("connections_rebalanced")


def test_idle_connections_to_a_quarantined_backend_are_closed(bed: dict[str, Any], pin_dir: str) -> None:
    """Policy equilibrium: a backend that starts failing is quarantined (no slots); the
    pool's idle connections to it are closed and reopen to the others."""
    bed["configure"]([1, 1, 1])
    doc = yaml.safe_load(bed["cfg"].read_text())
    doc["policy"] = "equilibrium"
    bed["cfg"].write_text(yaml.safe_dump(doc))
    a = bed["agent"](bed["cfg"]).start()
    p = subprocess.Popen([PY, "-m", "equilibriumd.lab.poolclient", "--url", "http://%s:80/" % bed["fe"],
                          "--seconds", "12", "--cgroup", bed["cgroup"].path], stdout=subprocess.PIPE, text=True,
                         cwd=REPO)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        time.sleep(2.5)
        bed["tb"].set(0, error_ratio=1.0)
        q = a.wait_event("backend_quarantined", timeout=8)
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    res = json.loads(out.strip().splitlines()[-1])
    assert q["backend"] == bed["tb"].addrs[0]
    assert res["failures"] == {}, res   # 503s are answers, not failed connections
    moved = _closed(pin_dir)[_ids(pin_dir)[bed["tb"].addrs[0]]]
    assert moved[0] >= 1, moved
    print(json.dumps(res["per_second"]))
    # once quarantined and its connections moved, the failing backend gets only the agent's probes
    assert (share_after(res, "5xx", 9) or 0.0) < 0.05, res["per_second"]


def test_idle_connections_to_a_removed_backend_are_closed(bed: dict[str, Any], pin_dir: str, tmp_path: Path) -> None:
    a = _start(bed, [1, 0, 0])
    b0 = _ids(pin_dir)[bed["tb"].addrs[0]]
    idle = _keepalive(bed, 3)
    n = a.count("config_reloaded")
    _config(bed["cfg"], bed["fe"], bed["tb"].addrs[1:], [1, 1], rebalance={"min_age": "0.3s"})
    a.hup()
    a.wait_event("config_reloaded", after=n)
    assert _wait(lambda: all(_dead(idle)), 5), _dead(idle)
    assert _closed(pin_dir)[b0].tolist() == [0, 3, 0]   # drained: its id no longer names it


def test_budget_and_minimum_age(bed: dict[str, Any], pin_dir: str) -> None:
    """At most max_closes per service per tick, none younger than min_age."""
    rb = {"max_closes": 1, "min_age": "2s"}
    a = _start(bed, [1, 0, 0], rebalance=rb)
    socks = _keepalive(bed, 6)
    opened = time.monotonic()
    _reconfigure(a, bed, [0, 1, 1], rebalance=rb)
    time.sleep(1.2)
    assert not any(_dead(socks)), "closed before min_age"
    assert _wait(lambda: all(_dead(socks)), 8), _dead(socks)
    per_walk = [e["closed"] for e in a.events() if e.get("event") == "connections_rebalanced"]
    assert max(per_walk) == 1 and sum(per_walk) == 6, per_walk
    assert time.monotonic() - opened >= 2.0


def test_off_leaves_connections_alone(bed: dict[str, Any], pin_dir: str) -> None:
    a = _start(bed, [1, 0, 0], rebalance={"mode": "off"})
    socks = _keepalive(bed, 3)
    _reconfigure(a, bed, [0, 1, 1], states=["draining", "active", "active"], rebalance={"mode": "off"})
    time.sleep(2.0)
    assert not any(_dead(socks))
    assert [_backend_of(s, bed) for s in socks] == [0, 0, 0]   # still served where they were
    # the service's own switch overrides the file's default
    _reconfigure(a, bed, [0, 1, 1], states=["draining", "active", "active"], svc={"rebalance": "off"})
    time.sleep(1.0)
    assert not any(_dead(socks))
    assert _closed(pin_dir).sum() == 0


def test_off_with_a_max_age_closes_by_age_only(bed: dict[str, Any], pin_dir: str) -> None:
    """`mode: off` with `max_connection_age`: for protocols whose idleness the kernel
    cannot see, the age is the only close; a draining backend is not drained early."""
    rb = {"mode": "off", "max_connection_age": "2s", "min_age": "0"}
    a = _start(bed, [1, 0, 0], rebalance=rb)
    socks = _keepalive(bed, 2)
    _reconfigure(a, bed, [1, 1, 1], states=["draining", "active", "active"], rebalance=rb)
    time.sleep(0.8)
    assert not any(_dead(socks))            # idle, draining, younger than the max age: kept
    assert _wait(lambda: all(_dead(socks)), 5)
    moved = _closed(pin_dir)[_ids(pin_dir)[bed["tb"].addrs[0]]]
    assert moved.tolist() == [0, 0, 2]       # by age, not by drain


def test_max_connection_age_closes_busy_connections_without_blaming_the_backend(
        bed: dict[str, Any], pin_dir: str) -> None:
    _start(bed, [1, 1, 1], rebalance={"max_connection_age": "1s", "min_age": "0"})
    busy = _keepalive(bed, 1)[0]
    busy.sendall(b"GET / HTTP/1.1\r\n")   # outstanding, never finished
    assert _wait(lambda: _dead([busy]) == [True], 4)
    moved = _closed(pin_dir)
    assert moved[:, 2].sum() == 1 and moved[:, :2].sum() == 0
    with Datapath(pin_dir) as dp:
        c, _, _ = dp.telemetry().totals(64)
    from equilibriumd.datapath.telemetry import COUNTER
    assert c[:, COUNTER["req_errors"]].sum() == 0   # cut off by us: not the backend's error


def test_pool_in_another_network_namespace(tmp_path: Path, cgroup: Cgroup, agent: Callable[[Path], AgentProc],
                                           testbed: Any, frontend_ip: str, pin_dir: str) -> None:
    """A pod's namespace: clients and backends in a namespace this test made; the agent
    (in the host's) finds it from the cgroup's processes and walks its sockets."""
    ns = "eqtest-" + rand_tag(6)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    p = None
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        tb = testbed(["127.0.0.1:0", "127.0.0.2:0", "127.0.0.3:0"], netns=ns)
        cfg = _config(tmp_path / "c.yaml", frontend_ip, tb.addrs, [1, 1, 1])
        a = agent(cfg).start()
        # into the cgroup before `ip netns exec`, which mounts a sysfs of the namespace's own
        # (no cgroup hierarchy under it); membership carries over exec
        p = subprocess.Popen(["ip", "netns", "exec", ns, PY, "-m", "equilibriumd.lab.poolclient", "--url",
                              "http://%s:80/" % frontend_ip, "--seconds", "7"],
                             stdout=subprocess.PIPE, text=True, cwd=REPO,
                             env=dict(os.environ, PYTHONPATH=str(REPO)), preexec_fn=lambda: _join(cgroup.path))
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        time.sleep(2.5)
        n = a.count("config_reloaded")
        _config(cfg, frontend_ip, tb.addrs, [0, 1, 1])
        a.hup()
        a.wait_event("config_reloaded", after=n)
        out, _ = p.communicate(timeout=60)
        res = json.loads(out.strip().splitlines()[-1])
        assert res["failures"] == {}, res
        assert share_after(res, tb.names[0], 4.5) == 0.0, res["per_second"]
        assert a.count("rebalance_netns_denied") == 0
        assert _closed(pin_dir)[_ids(pin_dir)[tb.addrs[0]], 0] >= 1   # closed there, by the agent's walk
    finally:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()
        subprocess.run(["ip", "netns", "del", ns], check=False)


def _join(cgroup: str) -> None:
    with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))


def test_teardown_removes_the_iterator_and_its_maps(bed: dict[str, Any], pin_dir: str) -> None:
    a = _start(bed, [1, 1, 1])
    assert os.path.exists(pins.link_pin(pin_dir, constants.REBALANCE_PROG))
    a.stop()
    r = subprocess.run([PY, "-m", "equilibriumd", "teardown", "--pin-dir", pin_dir], capture_output=True,
                       text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(pin_dir)


def test_rebalancer_structs_match_the_maps(bed: dict[str, Any], pin_dir: str) -> None:
    """The Python mirrors have the value sizes of the maps libbpf created from the C structs."""
    import ctypes as ct

    from equilibriumd.datapath import libbpf
    from equilibriumd.datapath.structs import RbClosed, RbSvc

    _start(bed, [1, 1, 1])
    for name, size in (("eq_rb_svc", ct.sizeof(RbSvc)), ("eq_rb_quota", 8), ("eq_rb_closed", ct.sizeof(RbClosed))):
        fd = libbpf.obj_get(pins.map_pin(pin_dir, name))
        try:
            info = libbpf.obj_info(fd)
        finally:
            os.close(fd)
        # struct bpf_map_info: type, id, key_size, value_size, max_entries (u32 each)
        assert int.from_bytes(info[12:16], "little") == size, name
    assert sys.byteorder == "little"


def test_without_cap_sys_admin_other_namespaces_are_left_with_a_reason() -> None:
    """No CAP_SYS_ADMIN (the DaemonSet without it): the walk stays in the agent's own
    namespace and says why, once, instead of failing the tick."""
    ns = "eqtest-" + rand_tag(6)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        code = ("from equilibriumd.agent.netns import Namespaces, own_netns; import json, os;"
                "n = Namespaces('/sys/fs/cgroup', dirs=('/run/netns',));"
                "p = [p for p in n.foreign().values() if p.endswith('/%s')][0];"
                "mine = own_netns(); here = lambda: os.stat('/proc/thread-self/ns/net').st_ino;"
                "ok = n.enter(p); inside = here() != mine;"
                "back = n.enter(None) and here() == mine;"
                "print(json.dumps([ok, inside, back, n.denied]))" % ns)
        r = subprocess.run(["setpriv", "--inh-caps=-sys_admin", "--bounding-set=-sys_admin", PY, "-c", code],
                           capture_output=True, text=True, cwd=REPO, timeout=60)
        assert r.returncode == 0, r.stderr
        ok, inside, _, denied = json.loads(r.stdout)
        assert not ok and not inside and "CAP_SYS_ADMIN" in denied
        # with it, the same calls go in and come back
        r = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == [True, True, True, None]
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_connected_udp_max_age_and_removed_backend(tmp_path: Path, cgroup: Cgroup,
                                                   agent: Callable[[Path], AgentProc], backends: Any,
                                                   frontend_ip: str, pin_dir: str) -> None:
    """Connected UDP (iter/udp): no exchange is visible, so only a max age and a
    removed backend close a socket; the application's next call fails with
    ECONNABORTED and a new connect() is steered by today's table."""
    import errno
    import socket

    be = backends(2, udp=True)
    addrs = [be.addr(0), be.addr(1)]

    def config(bes: list[str], **svc: Any) -> Path:
        doc = {"tick": "0.2s", "policy": "static", "rebalance": {"min_age": "0"},
               "services": [{"name": "dns", "frontend": "%s:53" % frontend_ip, "protocol": "udp", **svc,
                             "backends": [{"address": a} for a in bes]}]}
        path = tmp_path / "u.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path

    def udp_socket() -> socket.socket:
        with cgroup.enter():
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(2)
            s.connect((frontend_ip, 53))
        s.send(b"q")
        assert s.recv(64) == b"q"
        return s

    def aborted(s: socket.socket) -> bool:
        try:
            s.send(b"q")
            s.recv(64)
        except OSError as e:
            return e.errno in (errno.ECONNABORTED, errno.EDESTADDRREQ, errno.ENOTCONN)
        return False

    a = agent(config(addrs[:1])).start()   # every socket on backend 0
    assert os.path.exists(pins.link_pin(pin_dir, constants.REBALANCE_UDP_PROG))
    kept = udp_socket()
    time.sleep(1.0)
    assert not aborted(kept)   # no max age, backend present: left alone
    n = a.count("config_reloaded")
    config(addrs[1:])           # backend 0 removed
    a.hup()
    a.wait_event("config_reloaded", after=n)
    assert _wait(lambda: aborted(kept), 5)
    # a max age closes a socket however busy
    n = a.count("config_reloaded")
    config(addrs[1:], max_connection_age="1s")
    a.hup()
    a.wait_event("config_reloaded", after=n)
    s = udp_socket()
    assert not aborted(s)
    assert _wait(lambda: aborted(s), 5)
    with Datapath(pin_dir) as dp:
        moved = dp.rebalanced(8)
    assert moved is not None and moved[:, 1].sum() >= 1 and moved[:, 2].sum() >= 1, moved
