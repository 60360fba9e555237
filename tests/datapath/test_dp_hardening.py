"""Issue 14, the datapath's part: what hostile or merely unusual sockets must not
do to the counts and reverse translations, on the real kernel.

- re-connects (a UDP socket connected thousands of times, a TCP socket after
  refused connects) leave eq_lb_active where it was;
- a backend id handed to a new backend does not inherit the old backend's open
  count, nor the resets and 5xx its connections see late (eq_backend.gen);
- a loop of socket(); sendto(frontend); close() does not evict another socket's
  reverse entry (sock_release deletes a socket's entries);
- a dual-stack IPv6 socket reaching an IPv4 frontend by its IPv4-mapped address
  is balanced and shown the frontend;
- sockops adds its callback flags to another program's instead of replacing them;
- a service id handed to a new service carries no caller's budget or counts.

The datapath is loaded directly on the test's child cgroup and written with
the agent's Reconciler (no agent process): each test controls when ids change.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
import socket
import threading
import time
from typing import Any, Callable, Iterator

import pytest

from equilibriumd.agent.reconcile import Reconciler
from equilibriumd.config import parse
from equilibriumd.datapath import constants, libbpf, lifecycle
from equilibriumd.datapath.maps import Datapath
from equilibriumd.datapath.structs import Rev4Key, Sock
from equilibriumd.datapath.telemetry import COUNTER

from helpers import RST, Cgroup, own_cgroup, rand_tag

pytestmark = pytest.mark.root

Loaded = Callable[..., tuple[Datapath, Reconciler]]


@pytest.fixture
def loaded(cgroup: Cgroup, pin_dir: str) -> Iterator[Loaded]:
    """Load the datapath on the test's cgroup; the Datapath handle is closed after."""
    opened: list[Datapath] = []

    def make(telemetry: bool = True) -> tuple[Datapath, Reconciler]:
        lifecycle.ensure_loaded(pin_dir, cgroup.path, telemetry=telemetry)
        dp = Datapath(pin_dir)
        opened.append(dp)
        return dp, Reconciler(dp)

    try:
        yield make
    finally:
        for dp in opened:
            dp.close()


def conf(fe: str, addrs: list[str], protocol: str = "tcp", balance: str = "weighted") -> Any:
    bes = ", ".join("{address: '%s'}" % a for a in addrs)
    return parse("balance: %s\nservices: [{name: s, frontend: '%s', protocol: %s, backends: [%s]}]"
                 % (balance, fe, protocol, bes))


def ids_of(rec: Reconciler) -> list[int]:
    return [int(i) for i in rec.services["s"].ids.tolist()]


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


# --- 1. re-connects -------------------------------------------------------------
def test_udp_reconnects_release_the_previous_count(cgroup, backends, loaded, frontend_ip):
    """connect4 runs at every UDP connect(): each must give back the count the
    socket held, or 2,000 re-connects leave 2,000 connections counted open
    (and balance: p2c avoids those backends for good)."""
    be = backends(2, udp=True)
    dp, rec = loaded()
    rec.apply(conf(frontend_ip + ":53", [be.addr(0), be.addr(1)], "udp", "p2c"), {"s": [1, 1]})
    ids = ids_of(rec)
    assert [int(dp.active()[i]) for i in ids] == [0, 0]
    with cgroup.enter():
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for _ in range(2000):
                u.connect((frontend_ip, 53))
            held = [int(dp.active()[i]) for i in ids]
            u.send(b"ping")
            u.settimeout(2)
            assert u.recv(16) == b"ping"
        finally:
            u.close()
    assert sum(held) == 1, "one socket, counted %s open" % held
    assert wait_for(lambda: [int(dp.active()[i]) for i in ids] == [0, 0]), [int(dp.active()[i]) for i in ids]


@pytest.mark.parametrize("telemetry", [True, False], ids=["telemetry", "no-telemetry"])
def test_tcp_reconnects_after_refusal_release_the_previous_count(cgroup, loaded, frontend_ip, telemetry):
    """A TCP socket may connect() again after a refused connect; without sockops
    (telemetry off) nothing but the re-connect itself can release the old count."""
    closed = socket.socket()
    closed.bind(("127.0.%d.9" % (os.getpid() % 200 + 1), 0))
    addr = "%s:%d" % closed.getsockname()
    closed.close()          # nothing listens there now: every connect is refused
    dp, rec = loaded(telemetry)
    rec.apply(conf(frontend_ip + ":80", [addr]), {"s": [1]})
    (bid,) = ids_of(rec)
    with cgroup.enter():
        c = socket.socket()
        try:
            for _ in range(200):
                assert c.connect_ex((frontend_ip, 80)) == errno.ECONNREFUSED
            held = int(dp.active()[bid])
        finally:
            c.close()
    assert held <= 1, "one socket, counted %d open" % held
    assert wait_for(lambda: int(dp.active()[bid]) == 0), int(dp.active()[bid])


# --- 2. a reused backend id ---------------------------------------------------------
class HoldingServer:
    """A TCP server that accepts and holds connections; `answer_and_reset` sends each
    one a 503 and closes it with a RST (an old backend's late failures)."""

    def __init__(self, ip: str) -> None:
        self.ls = socket.socket()
        self.ls.bind((ip, 0))
        self.ls.listen(256)
        self.addr = "%s:%d" % self.ls.getsockname()
        self.conns: list[socket.socket] = []
        self._stop = False
        self.t = threading.Thread(target=self._accept, daemon=True)
        self.ls.settimeout(0.1)
        self.t.start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                c, _ = self.ls.accept()
            except (socket.timeout, OSError):
                continue
            self.conns.append(c)

    def answer_and_reset(self) -> None:
        for c in self.conns:
            c.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
        time.sleep(0.2)         # the responses arrive before the RSTs
        for c in self.conns:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
            c.close()
        self.conns = []

    def close(self) -> None:
        self._stop = True
        self.t.join(timeout=2)
        for c in self.conns:
            c.close()
        self.ls.close()


def test_reused_backend_id_inherits_nothing(cgroup, backends, loaded, frontend_ip):
    """Backend A (20 connections, each with a request outstanding) is removed and
    its id handed to a new backend C; then A answers 503 and resets them all. C's
    open count, resets, 5xx and failed requests must be its own (zero resets)."""
    base = "127.0.%d" % (os.getpid() % 200 + 1)
    old = HoldingServer(base + ".31")
    try:
        be = backends(2)   # B and C: echo servers
        dp, rec = loaded()
        fe = frontend_ip + ":80"
        rec.apply(conf(fe, [old.addr]), {"s": [1]})
        (a_id,) = ids_of(rec)
        olds = []
        with cgroup.enter():
            for _ in range(20):
                c = socket.create_connection((frontend_ip, 80), timeout=2)
                c.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
                olds.append(c)
        assert wait_for(lambda: len(old.conns) == 20)
        assert int(dp.active()[a_id]) == 20
        rec.apply(conf(fe, [be.addr(0)]), {"s": [1]})                      # A removed: its id is free
        rec.apply(conf(fe, [be.addr(0), be.addr(1)]), {"s": [0, 1]})       # C takes the lowest free id
        c_id = ids_of(rec)[1]
        assert c_id == a_id, "the test needs the id reused (%d, %d)" % (a_id, c_id)
        news = []
        with cgroup.enter():
            for _ in range(5):
                news.append(socket.create_connection((frontend_ip, 80), timeout=2))
        assert be.settle(5) == 5 and be.accepts[1] == 5
        assert int(dp.active()[c_id]) == 5, "C inherited A's open connections"
        old.answer_and_reset()
        for c in olds:      # the clients see the 503 and the RST
            try:
                c.settimeout(2)
                while c.recv(4096):
                    pass
            except OSError:
                pass
            c.close()
        time.sleep(0.3)
        counters, _, _ = dp.telemetry().totals(c_id + 1)
        row = counters[c_id]
        seen = {k: int(row[COUNTER[k]]) for k in ("reset", "resp_5xx", "req_errors", "closed", "established")}
        assert seen["reset"] == 0 and seen["resp_5xx"] == 0 and seen["req_errors"] == 0, seen
        assert seen["closed"] == 0 and seen["established"] == 5, seen
        ev = dp.evidence().read(c_id + 1)      # what C's callers saw of it: none of A's failures
        assert ev["resp_5xx"][c_id].sum() == 0 and ev["reset"][c_id].sum() == 0
        assert ev["established"][c_id].sum() > 0
        assert int(dp.active()[c_id]) == 5, "A's closes counted down C's open connections"
        for c in news:
            c.close()
        assert wait_for(lambda: int(dp.active()[c_id]) == 0)
    finally:
        old.close()


# --- 3. unconnected UDP reverse entries ---------------------------------------------
def _rev4_entries(dp: Datapath) -> int:
    return sum(1 for _ in libbpf.map_keys(dp.fd["eq_lb4_rev"], Rev4Key))


def test_close_loop_cannot_evict_another_sockets_reverse_entry(cgroup, loaded, frontend_ip):
    """A victim sends to the frontend, then the same cgroup runs 2x the reverse
    map's capacity of socket(); sendto(frontend); close(). The backend answers the
    victim only after that: the reply must still come from the frontend address,
    and the map must hold about nothing (entries go with their sockets)."""
    ip = "127.0.%d.41" % (os.getpid() % 200 + 1)
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)    # a UDP backend that answers when told
    srv.bind((ip, 0))
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    try:
        dp, rec = loaded()
        rec.apply(conf(frontend_ip + ":53", ["%s:%d" % srv.getsockname()], "udp"), {"s": [1]})
        before = dp.revnat_stats()
        with cgroup.enter():
            victim = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            victim.settimeout(2)
            victim.sendto(b"victim", (frontend_ip, 53))
            srv.settimeout(2)
            data, peer = srv.recvfrom(64)
            assert data == b"victim"
            flood = 2 * constants.MAX_REVNAT
            for _ in range(flood):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.sendto(b"x", (frontend_ip, 53))
                s.close()
        entries = _rev4_entries(dp)
        stats = dp.revnat_stats()
        srv.sendto(b"late", peer)
        got, src = victim.recvfrom(64)
        victim.close()
    finally:
        srv.close()
    assert got == b"late"
    assert src == (frontend_ip, 53), "the reply showed %s: the victim's reverse entry was evicted" % (src,)
    assert entries <= 16, "%d reverse entries left by closed sockets" % entries
    assert stats["inserted"] - before["inserted"] >= flood + 1
    assert stats["released"] - before["released"] >= flood
    assert stats["evicted"] == before["evicted"]
    assert stats["live"] <= 16


def test_reverse_entries_of_a_socket_go_with_it(cgroup, backends, loaded, frontend_ip):
    """A socket that sent to two backends holds two entries, both deleted at close."""
    be = backends(2, udp=True)
    dp, rec = loaded()
    rec.apply(conf(frontend_ip + ":53", [be.addr(0), be.addr(1)], "udp"), {"s": [1, 1]})
    base = _rev4_entries(dp)
    with cgroup.enter():
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.settimeout(2)
        for i in range(64):       # both backends, with near certainty (2 * 2^-64 otherwise)
            u.sendto(b"%d" % i, (frontend_ip, 53))
            data, src = u.recvfrom(64)
            assert data == b"%d" % i and src == (frontend_ip, 53)
        held = _rev4_entries(dp) - base
        u.close()
    assert held == 2
    assert _rev4_entries(dp) == base


# --- 4. IPv4-mapped addresses ----------------------------------------------------------
def _dual_stack(kind: int) -> socket.socket:
    s = socket.socket(socket.AF_INET6, kind)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.settimeout(2)
    return s


def test_ipv4_mapped_connect_is_balanced_and_shows_the_frontend(cgroup, backends, loaded, frontend_ip):
    be = backends(2)
    dp, rec = loaded()
    rec.apply(conf(frontend_ip + ":80", [be.addr(0), be.addr(1)]), {"s": [1, 1]})
    ids = ids_of(rec)
    mapped = "::ffff:" + frontend_ip
    with cgroup.enter():
        socks = []
        for _ in range(20):
            c = _dual_stack(socket.SOCK_STREAM)
            c.connect((mapped, 80))
            socks.append(c)
    try:
        assert be.settle(20) == 20
        assert be.accepts[0] > 0 and be.accepts[1] > 0, be.accepts   # balanced, not one backend
        for c in socks:
            assert c.getpeername()[:2] == (mapped, 80)
        socks[0].sendall(b"hi")
        assert socks[0].recv(8) == b"hi"
        assert sum(int(dp.active()[i]) for i in ids) == 20
    finally:
        for c in socks:
            c.close()
    assert wait_for(lambda: sum(int(dp.active()[i]) for i in ids) == 0)


def test_ipv4_mapped_udp_sendto_and_connect(cgroup, backends, loaded, frontend_ip):
    be = backends(1, udp=True)
    dp, rec = loaded()
    rec.apply(conf(frontend_ip + ":53", [be.addr(0)], "udp"), {"s": [1]})
    mapped = "::ffff:" + frontend_ip
    with cgroup.enter():
        u = _dual_stack(socket.SOCK_DGRAM)
        u.sendto(b"one", (mapped, 53))
        data, src = u.recvfrom(16)
        u.close()
        c = _dual_stack(socket.SOCK_DGRAM)
        c.connect((mapped, 53))
        peer = c.getpeername()[:2]
        c.send(b"two")
        data2 = c.recv(16)
        c.close()
    assert data == b"one" and src[:2] == (mapped, 53), src
    assert data2 == b"two" and peer == (mapped, 53), peer
    assert be.udp_seen[0] == 2


# --- 5. sockops callback flags -----------------------------------------------------------
_RTT_PROG = r"""
#include <uapi/linux/bpf.h>
BPF_ARRAY(rtt_seen, u64, 1);
int other_sockops(struct bpf_sock_ops *skops)
{
    if (skops->op == BPF_SOCK_OPS_TCP_CONNECT_CB) {
        bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_RTT_CB_FLAG);
    } else if (skops->op == BPF_SOCK_OPS_RTT_CB) {
        int k = 0;
        u64 *n = rtt_seen.lookup(&k);
        if (n)
            __sync_fetch_and_add(n, 1);
    }
    return 1;
}
"""


def test_sockops_keeps_other_programs_callback_flags(cgroup, backends, loaded, frontend_ip):
    """Another sockops program (in a nested cgroup: it runs before ours) asks for
    RTT callbacks at connect; ours, asking for state callbacks, must not take
    that away (the RTT callbacks keep coming) and must still get its own (the
    connection's close is counted)."""
    from bcc import BPF

    be = backends(1)
    dp, rec = loaded()
    rec.apply(conf(frontend_ip + ":80", [be.addr(0)]), {"s": [1]})
    (bid,) = ids_of(rec)
    inner = os.path.join(cgroup.path, "inner-" + rand_tag(6))
    os.mkdir(inner)
    b = BPF(text=_RTT_PROG.encode())
    link = cg_fd = -1
    try:
        fn = b.load_func(b"other_sockops", BPF.SOCK_OPS)
        cg_fd = os.open(inner, os.O_RDONLY)
        link = libbpf.link_create(fn.fd, cg_fd, constants.CGROUP_SOCK_OPS)
        prev = own_cgroup()
        with open(os.path.join(inner, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
        try:
            for _ in range(5):
                c = socket.create_connection((frontend_ip, 80), timeout=2)
                c.sendall(b"x" * 100)
                assert c.recv(200)
                c.close()
        finally:
            with open(os.path.join(prev, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        rtt = int(b[b"rtt_seen"][ct.c_int(0)].value)
        assert wait_for(lambda: int(dp.telemetry().totals(bid + 1)[0][bid][COUNTER["closed"]]) == 5)
    finally:
        if link >= 0:
            os.close(link)
        if cg_fd >= 0:
            os.close(cg_fd)
        b.cleanup()
        for _ in range(50):
            try:
                os.rmdir(inner)
                break
            except OSError:
                time.sleep(0.1)
    assert rtt > 0, "the other program's RTT callbacks never fired: its flag was replaced"



# --- 7. reconciling the counts -------------------------------------------------------------
def test_audit_corrects_a_drifted_count_and_leaves_true_ones(cgroup, backends, loaded, frontend_ip):
    """Counts made wrong behind the kernel's back (+7 on one backend, -2 on the other)
    are found at once and corrected at the second audit that finds the same drift;
    counts that match their open sockets are never touched."""
    from equilibriumd.datapath.audit import ActiveAudit

    be = backends(2)
    dp, rec = loaded()
    rec.apply(conf(frontend_ip + ":80", [be.addr(0), be.addr(1)]), {"s": [1, 1]})
    ids = ids_of(rec)
    with cgroup.enter():
        held = [socket.create_connection((frontend_ip, 80), timeout=2) for _ in range(40)]
    try:
        assert be.settle(40) == 40
        n = max(ids) + 1
        audit = ActiveAudit(dp)
        clean = audit.run(n)
        assert clean.drift == 0 and clean.sockets == 40 and clean.counted == 40
        # the walk reads eq_tel_sock in bounded batches: small ones see every entry too
        assert sum(k for *_, k in libbpf.hash_batches(dp.fd["eq_tel_sock"], 8, ct.sizeof(Sock), chunk=3)) == 40
        want = [int(dp.active()[i]) for i in ids]
        fd = dp.fd["eq_lb_active"]
        for i, d in zip(ids, (7, -2)):
            libbpf.map_update(fd, ct.c_uint32(i), ct.c_int64(want[ids.index(i)] + d))
        first = audit.run(n)
        assert first.drift == 9 and first.corrected == {}
        second = audit.run(n)
        assert second.corrected == {ids[0]: 7, ids[1]: -2}
        assert [int(dp.active()[i]) for i in ids] == want
        assert audit.run(n).drift == 0
    finally:
        for c in held:
            c.close()
    assert wait_for(lambda: [int(dp.active()[i]) for i in ids] == [0, 0])
    assert ActiveAudit(dp).run(max(ids) + 1).sockets == 0


def test_the_agent_audits_its_counts(cgroup, backends, loaded, frontend_ip):
    """The agent's tick runs the audit every AUDIT_SECONDS: a drift injected into
    eq_lb_active is gone after the second audit that sees it."""
    from equilibriumd.agent.daemon import Agent, AgentOptions

    be = backends(1)
    dp, rec = loaded()
    rec.apply(conf(frontend_ip + ":80", [be.addr(0)]), {"s": [1]})
    (bid,) = ids_of(rec)
    a = Agent(AgentOptions(config_path="", cgroup="", pin_dir="/nonexistent/equilibrium-test", metrics_addr="off"))
    a.dp, a.rec = dp, rec
    with cgroup.enter():
        held = [socket.create_connection((frontend_ip, 80), timeout=2) for _ in range(10)]
    try:
        assert be.settle(10) == 10
        libbpf.map_update(dp.fd["eq_lb_active"], ct.c_uint32(bid), ct.c_int64(5010))   # 5,000 leaked
        a._audit_active()            # seen once
        a._audit_active()            # not due again yet: nothing done
        assert int(dp.active()[bid]) == 5010
        a._audit_due = 0.0           # (AUDIT_SECONDS later)
        a._audit_active()
        assert int(dp.active()[bid]) == 10
    finally:
        for c in held:
            c.close()
    assert wait_for(lambda: int(dp.active()[bid]) == 0)


def test_a_reused_service_id_inherits_no_budget_and_no_caller_counts(cgroup, backends, loaded, frontend_ip):
    """Service A's caller is punished (an admission budget) and counted per caller;
    A is removed and its id goes to service B on another frontend. Before, B's
    connects from that caller met A's budget (throttled from the first connect) and
    `equilibriumctl callers` showed A's counts as B's."""
    from equilibriumd.datapath.structs import Budget

    be = backends(2)
    dp, rec = loaded()
    caller = own_cgroup_id(cgroup)
    rec.apply(parse("services: [{name: a, frontend: '%s:80', backends: [{address: '%s'}]}]"
                    % (frontend_ip, be.addr(0))), {"a": [1]})
    sid = rec.services["a"].id
    with cgroup.enter():
        for _ in range(3):
            socket.create_connection((frontend_ip, 80), timeout=2).close()
    assert wait_for(lambda: any(c[1] == sid and c[2] >= 3 for c in dp.callers()))
    # throttled to one connect in 100 s, no burst: every connect after the first is refused
    dp.set_budget(caller, sid, Budget(interval_ns=100 * 10**9, burst_ns=0, mode=constants.ENFORCE_THROTTLE))
    assert dp.budgeted(sid) == 1

    c = "{name: c, frontend: '%s:82', backends: [{address: '%s'}]}" % (frontend_ip, be.addr(1))
    rec.apply(parse("services: [%s]" % c), {"c": [1]})           # A removed: its id is free
    rec.apply(parse("services: [%s, {name: b, frontend: '%s:81', backends: [{address: '%s'}]}]"
                    % (c, frontend_ip, be.addr(1))), {"b": [1], "c": [1]})   # B takes the lowest free id
    assert rec.services["b"].id == sid, "the test needs the id reused"
    assert dp.budgeted(sid) == 0 and (caller, sid) not in dp.budgets()
    assert not [c for c in dp.callers() if c[1] == sid]
    refused = 0
    with cgroup.enter():
        for _ in range(5):
            try:
                socket.create_connection((frontend_ip, 81), timeout=2).close()
            except OSError:
                refused += 1
    assert refused == 0, "B's caller met A's budget"
    assert wait_for(lambda: [c[2] for c in dp.callers() if c[1] == sid] == [5])


def own_cgroup_id(cgroup: Cgroup) -> int:
    return os.stat(cgroup.path).st_ino
