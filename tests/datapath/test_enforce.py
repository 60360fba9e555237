"""Folk-theorem enforcement in the kernel: a caller with an admission budget
(eq_lb_budget, what the agent writes for a caller it punishes) is held to it at
connect(): over budget, connect fails at once with ECONNREFUSED (throttle) or is
counted and let through (observe); other callers, and the same caller on other
services, are never held back; without a budget nothing changes."""

from __future__ import annotations

import errno
import os
import socket
import time
from contextlib import contextmanager
from typing import Iterator

import pytest

from equilibriumd.datapath import constants
from equilibriumd.datapath.maps import Datapath
from equilibriumd.datapath.structs import Budget

from helpers import RST, own_cgroup, write_config
from test_steering import svc

pytestmark = pytest.mark.root


@contextmanager
def inside(path: str) -> Iterator[None]:
    back = own_cgroup()
    with open(os.path.join(path, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
    try:
        yield
    finally:
        with open(os.path.join(back, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))


def burst(host: str, port: int, n: int) -> dict[str, float]:
    """n connects as fast as they go: how many got through, were refused, and the slowest refusal."""
    ok = refused = 0
    slowest = 0.0
    for _ in range(n):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
        s.settimeout(2)
        t0 = time.monotonic()
        try:
            s.connect((host, port))
            ok += 1
        except OSError as e:
            assert e.errno == errno.ECONNREFUSED, e
            refused += 1
            slowest = max(slowest, time.monotonic() - t0)
        finally:
            s.close()
    return {"ok": ok, "refused": refused, "slowest_refusal": slowest}


def test_budget_throttles_observes_and_spares_everyone_else(tmp_path, cgroup, backends, agent, frontend_ip, pin_dir):
    b = backends(2)
    cfg = write_config(tmp_path / "c.yaml", [svc("trajet", frontend_ip + ":80", [b.addr(0), b.addr(1)]),
                                             svc("other", frontend_ip + ":81", [b.addr(0), b.addr(1)])],
                       policy="static")
    agent(cfg).start()
    kids = [os.path.join(cgroup.path, k) for k in ("flooder", "honest")]
    for k in kids:
        os.mkdir(k)
    try:
        flooder, honest = (os.stat(k).st_ino for k in kids)
        with Datapath(pin_dir) as dp:
            sid = {s.name: s.id for s in dp.services()}["trajet"]
            # 20 connects/s, at most 0.1 s ahead of schedule
            assert dp.budgeted(sid) == 0       # no budget: connect does not even look one up
            dp.set_budget(flooder, sid, Budget(interval_ns=50_000_000, burst_ns=100_000_000,
                                               mode=constants.ENFORCE_THROTTLE))
            assert dp.budgeted(sid) == 1
            t0 = time.monotonic()
            with inside(kids[0]):
                flood = burst(frontend_ip, 80, 300)
                elsewhere = burst(frontend_ip, 81, 50)
            took = time.monotonic() - t0
            with inside(kids[1]):
                fair = burst(frontend_ip, 80, 300)
            got = dp.budgets()[(flooder, sid)]
            assert flood["ok"] <= 20 * took + 5, (flood, took)        # held to its rate (plus its burst)
            assert flood["refused"] >= 250 and flood["slowest_refusal"] < 0.05, flood   # at once, never a hang
            assert got.throttled == flood["refused"] and got.admitted == flood["ok"]
            assert elsewhere["refused"] == 0 and fair["refused"] == 0   # other services, other callers: free

            dp.set_budget(flooder, sid, Budget(interval_ns=50_000_000, burst_ns=100_000_000,
                                               mode=constants.ENFORCE_OBSERVE))
            with inside(kids[0]):
                watched = burst(frontend_ip, 80, 200)
            assert watched["refused"] == 0
            assert dp.budgets()[(flooder, sid)].observed >= 150         # counted, let through

            assert dp.budgeted(sid) == 1       # the mode changed, not the number of budgets
            assert dp.delete_budget(flooder, sid) and dp.budgeted(sid) == 0
            with inside(kids[0]):
                assert burst(frontend_ip, 80, 200)["refused"] == 0      # forgiven: no budget, no limit
    finally:
        for k in kids:
            os.rmdir(k)


def test_budget_holds_unconnected_udp_at_sendmsg(tmp_path, cgroup, backends, agent, frontend_ip, pin_dir):
    """Unconnected UDP is steered per datagram in sendmsg4: a punished caller's datagrams
    over its budget fail at sendto() with ECONNREFUSED, and reach nothing."""
    ube = backends(2, udp=True)
    cfg = write_config(tmp_path / "c.yaml", [svc("dns", frontend_ip + ":53", [ube.addr(0), ube.addr(1)],
                                                 protocol="udp")], policy="static")
    agent(cfg).start()
    kid = os.path.join(cgroup.path, "flooder")
    os.mkdir(kid)
    try:
        with Datapath(pin_dir) as dp:
            sid = {s.name: s.id for s in dp.services()}["dns"]
            dp.set_budget(os.stat(kid).st_ino, sid, Budget(interval_ns=100_000_000, burst_ns=100_000_000,
                                                           mode=constants.ENFORCE_THROTTLE))
            sent = refused = 0
            with inside(kid):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                try:
                    for _ in range(100):
                        try:
                            s.sendto(b"q", (frontend_ip, 53))
                            sent += 1
                        except OSError as e:
                            assert e.errno == errno.ECONNREFUSED, e
                            refused += 1
                finally:
                    s.close()
            time.sleep(0.2)
            got = dp.budgets()[(os.stat(kid).st_ino, sid)]
            assert sent <= 5 and refused >= 95, (sent, refused)       # 10/s, 0.1 s of burst
            assert got.throttled == refused and sum(ube.udp_seen.values()) == sent
    finally:
        os.rmdir(kid)
