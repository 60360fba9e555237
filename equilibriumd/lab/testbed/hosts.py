"""Test hosts: network namespaces joined to this one by a veth pair, with an
optional real bandwidth limit (a tbf qdisc), for backends whose link matters.

    with netns_host(bandwidth=mbit(4)) as h:          # needs root
        with TestBackends([h.ip + ":8080"], netns=h.netns) as tb:
            ...                                       # responses leave h at 4 Mbit/s
        h.set_bandwidth(mbit(16))                     # tc qdisc change, at run time
        h.set_bandwidth(None)                         # tc qdisc del: unlimited

A host is a netns `eqtb-<tag>` holding `eth0` (address 10.213.X.Y+2/30) and
`lo`, and a veth end `eqtb-<tag>` in the current namespace (10.213.X.Y+1/30),
so the only route it adds here is a /30 to a link we own: traffic can go to
that namespace and nowhere else. netem is absent on this kernel, so added
latency lives in the server (testbed.server); tbf and htb work.

The tbf sits on the egress of the namespace's `eth0`, i.e. it limits what
the host sends (the responses). `rate` is the limit; `burst` the bucket
(default: 20 ms of rate, at least 8 KiB so a full-size GSO segment never
stalls); `latency` bounds the queue (packets beyond it are dropped, which TCP
sees as loss).

Why `ip`/`tc` commands rather than pyroute2: every step is the command an
engineer would type to reproduce or inspect it, failures come back with
iproute2's own message, and no pyroute2 netns helper process is left behind;
the few milliseconds per command only matter at set-up. Everything created
is removed on exit, in reverse order, also when set-up fails half-way.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import random
import string
import subprocess
from collections.abc import Iterator

#: Test hosts take /30s from here; these addresses live only on links we create.
POOL = ipaddress.ip_network("10.213.0.0/16")
PREFIX = "eqtb-"


def mbit(n: float) -> float:
    """n Mbit/s in bytes/s (the unit of every bandwidth here)."""
    return n * 1e6 / 8


class HostError(RuntimeError):
    """An ip/tc command failed; the message holds the command and its error."""


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and r.returncode != 0:
        raise HostError("%s: exit %d: %s" % (" ".join(cmd), r.returncode, (r.stderr or r.stdout).strip()))
    return r


def _used_networks() -> list[ipaddress.IPv4Network]:
    """Networks of the IPv4 routes in this namespace that touch the pool."""
    used = []
    for route in json.loads(run("ip", "-j", "-4", "route", "show", "table", "all").stdout or "[]"):
        dst = route.get("dst", "")
        if dst in ("default", ""):
            continue
        try:
            net = ipaddress.ip_network(dst, strict=False)
        except ValueError:
            continue
        if isinstance(net, ipaddress.IPv4Network) and net.overlaps(POOL):
            used.append(net)
    return used


def _free_subnet() -> ipaddress.IPv4Network:
    used = _used_networks()
    subnets = 1 << (30 - POOL.prefixlen)
    for _ in range(1000):
        k = random.randrange(subnets)
        net = ipaddress.IPv4Network((int(POOL.network_address) + 4 * k, 30))
        if not any(net.overlaps(u) for u in used):
            return net
    raise HostError("no free /30 left in %s" % POOL)


class TestHost:
    """One test host (see the module docstring). Made by `netns_host()`."""

    __test__ = False  # a library class, not a pytest test class

    def __init__(self, tag: str, subnet: ipaddress.IPv4Network) -> None:
        self.netns = PREFIX + tag                 # namespace name
        self.host_ifname = PREFIX + tag           # veth end in the current namespace
        self.ns_ifname = "eth0"                   # veth end inside the namespace
        first = subnet.network_address
        self.host_ip = str(first + 1)             # address of our end
        self.ip = str(first + 2)                  # address of the host (servers bind here)
        self.subnet = subnet
        self.bandwidth: float | None = None       # bytes/s of the tbf, None: no qdisc
        self.burst: int = 0                       # bytes
        self.latency: float = 0.0                 # seconds

    def exec_args(self, *cmd: str) -> list[str]:
        """argv running `cmd` inside the namespace."""
        return ["ip", "netns", "exec", self.netns, *cmd]

    def set_bandwidth(self, bandwidth: float | None, burst: int | None = None, latency: float = 0.2) -> None:
        """Limit what the host sends to `bandwidth` bytes/s with a tbf (add,
        or change in place), or remove the limit (None)."""
        if bandwidth is None:
            if self.bandwidth is not None:
                run("tc", "-n", self.netns, "qdisc", "del", "dev", self.ns_ifname, "root")
                self.bandwidth = None
            return
        if bandwidth <= 0 or latency <= 0:
            raise ValueError("tbf needs bandwidth > 0 bytes/s and latency > 0 s, got %r, %r" % (bandwidth, latency))
        burst = burst if burst is not None else max(8192, int(bandwidth * 0.02))
        verb = "add" if self.bandwidth is None else "change"
        run("tc", "-n", self.netns, "qdisc", verb, "dev", self.ns_ifname, "root", "tbf",
            "rate", "%dbit" % round(bandwidth * 8), "burst", str(burst), "latency", "%dus" % round(latency * 1e6))
        self.bandwidth, self.burst, self.latency = bandwidth, burst, latency

    def qdisc(self) -> str:
        """`tc qdisc show` of the namespace's end, for checks and messages."""
        return run("tc", "-n", self.netns, "qdisc", "show", "dev", self.ns_ifname).stdout.strip()

    def __repr__(self) -> str:
        return "TestHost(%s, ip=%s, bandwidth=%s)" % (self.netns, self.ip, self.bandwidth)


@contextlib.contextmanager
def netns_host(bandwidth: float | None = None, burst: int | None = None, latency: float = 0.2) -> Iterator[TestHost]:
    """A fresh test host, removed (qdisc, veth, netns) on exit or failure.
    `bandwidth` in bytes/s (see mbit()); needs root."""
    tag = "".join(random.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    host = TestHost(tag, _free_subnet())
    with contextlib.ExitStack() as undo:
        run("ip", "netns", "add", host.netns)
        undo.callback(_delete_netns, host.netns)
        run("ip", "link", "add", host.host_ifname, "type", "veth",
            "peer", "name", host.ns_ifname, "netns", host.netns)
        # Deleting our end removes the pair even while a process keeps the netns alive.
        undo.callback(run, "ip", "link", "del", host.host_ifname, check=False)
        run("ip", "addr", "add", "%s/30" % host.host_ip, "dev", host.host_ifname)
        run("ip", "-n", host.netns, "addr", "add", "%s/30" % host.ip, "dev", host.ns_ifname)
        run("ip", "-n", host.netns, "link", "set", "lo", "up")
        run("ip", "-n", host.netns, "link", "set", host.ns_ifname, "up")
        run("ip", "link", "set", host.host_ifname, "up")
        if bandwidth is not None:
            host.set_bandwidth(bandwidth, burst, latency)
        undo.callback(_delete_qdisc, host)
        yield host


def _delete_qdisc(host: TestHost) -> None:
    if host.bandwidth is not None:
        run("tc", "-n", host.netns, "qdisc", "del", "dev", host.ns_ifname, "root", check=False)
        host.bandwidth = None


def _delete_netns(name: str) -> None:
    run("ip", "netns", "del", name, check=False)


@contextlib.contextmanager
def netns_hosts(n: int, bandwidth: float | None = None) -> Iterator[list[TestHost]]:
    """n test hosts (each its own netns, veth and /30), removed on exit."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(netns_host(bandwidth)) for _ in range(n)]
