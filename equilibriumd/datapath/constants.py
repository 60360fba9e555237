"""One source of truth for datapath sizes, names and attach points.

Handed to the BPF compiler as sorted -D flags (see `cflags`), and used by the
agent to size its Python views of the maps. Changing a size changes a map's
layout: bump LAYOUT_VERSION so an old pinned map is not reused by mistake.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Node limits and the table size are the project's shared types (equilibriumd.types).
from ..types import (  # noqa: F401  (re-exported: the datapath's sizes)
    BALANCE_P2C,
    BALANCE_WEIGHTED,
    MAX_BACKENDS,
    MAX_BACKENDS_PER_SERVICE,
    MAX_SERVICES,
    SLOTS,
)

#: Bumped whenever a shared struct or a map size changes.
LAYOUT_VERSION = 12   # 12: eq_lb_cursor (the sweep, SVC_SWEEP)

#: Unconnected-UDP reverse translations (one per socket and backend it sent to).
MAX_REVNAT = 65536
#: Translated sockets tracked at once (reverse translation + telemetry);
#: entries are deleted when the socket closes, LRU evicts anything missed.
MAX_SOCKS = 131072
#: (caller cgroup, service) pairs counted at once (LRU).
MAX_CALLERS = 16384
#: Caller slots per backend in the evidence map (eq_tel_cb): the callers whose
#: evidence about a backend is told apart. A power of two (a mask).
CB_SLOTS = 4
#: Evidence counts halve every 2**CB_HALF_SHIFT ns (2**29: 0.54 s).
CB_HALF_SHIFT = 29
#: A caller slot idle this long may be taken by another caller.
CB_STALE_NS = 30 * 10 ** 9
#: Buckets of the per-backend latency histograms (struct eq_be_tel): log2 of µs,
#: bucket i holds [2^i, 2^(i+1)) µs and 0 holds [0, 2), so 32 reach past an hour.
#: A power of two: the kernel indexes with a mask.
HIST_BUCKETS = 32
#: Backends per value of the telemetry counters map (eq_tel_be holds groups): a
#: batch read costs ~0.5 µs per key whatever its size, so the agent's tick reads
#: MAX_BACKENDS / TEL_GROUP keys, not MAX_BACKENDS. A power of two (a mask).
TEL_GROUP = 16

DEFAULT_PIN_DIR = "/sys/fs/bpf/equilibrium"

#: Maps the programs use, by pin name (names stay <= 15 chars: the kernel's limit).
MAPS = (
    "eq_lb4_fe",
    "eq_lb6_fe",
    "eq_lb_svc",
    "eq_lb_slots",
    "eq_lb_be",
    "eq_lb4_rev",
    "eq_lb6_rev",
    "eq_lb_revsk",
    "eq_lb_rev_stat",
    "eq_lb_active",
    "eq_lb_be_stat",
    "eq_lb_svc_err",
    "eq_lb_cursor",
    "eq_svc_name",
    "eq_meta",
    "eq_lb_budget",
    "eq_lb_budgeted",
    "eq_tel_sock",
    "eq_tel_be",
    "eq_tel_hist",
    "eq_tel_caller",
    "eq_tel_cb",
)

#: The rebalancer (bpf/rebalance.bpf.c): TCP and UDP socket iterators built with
#: clang (CO-RE) by the loader when it can; their links pin as link_<program>.
#: Optional: the datapath is complete without it (pin_state ignores it).
REBALANCE_SOURCE = "rebalance.bpf.c"
REBALANCE_PROG = "eq_rebalance"            #: iter/tcp
REBALANCE_UDP_PROG = "eq_rebalance_udp"    #: iter/udp (connected UDP)
REBALANCE_PROGS = (REBALANCE_PROG, REBALANCE_UDP_PROG)
REBALANCE_MAPS = ("eq_rb_svc", "eq_rb_quota", "eq_rb_closed")
#: Why the rebalancer closed a connection (index of eq_rb_closed.n), as in bpf/lib/types.h.
RB_REASONS = ("excess", "drain", "max_age")


@dataclass(frozen=True)
class Prog:
    """One BPF program: where it comes from and where it attaches."""

    name: str                    #: function in the source; pinned as link_<name>
    source: str                  #: file under bpf/
    prog_type: str               #: bcc's BPF.<prog_type>
    attach: int                  #: enum bpf_attach_type (stable UAPI numbers)
    telemetry: bool = False      #: part of the optional telemetry group
    tracepoint: str | None = None  #: "category/event": attached through a perf-event link


#: Kernel attach-type numbers (enum bpf_attach_type).
CGROUP_INET_INGRESS, CGROUP_INET_EGRESS, CGROUP_SOCK_OPS = 0, 1, 3
CGROUP_INET4_CONNECT, CGROUP_INET6_CONNECT = 10, 11
CGROUP_UDP4_SENDMSG, CGROUP_UDP6_SENDMSG = 14, 15
CGROUP_UDP4_RECVMSG, CGROUP_UDP6_RECVMSG = 19, 20
CGROUP_INET4_GETPEERNAME, CGROUP_INET6_GETPEERNAME = 29, 30
CGROUP_INET_SOCK_RELEASE = 34
PERF_EVENT = 41

PROGRAMS = (
    Prog("eq_connect4", "lb.bpf.c", "CGROUP_SOCK_ADDR", CGROUP_INET4_CONNECT),
    Prog("eq_connect6", "lb.bpf.c", "CGROUP_SOCK_ADDR", CGROUP_INET6_CONNECT),
    Prog("eq_sendmsg4", "lb.bpf.c", "CGROUP_SOCK_ADDR", CGROUP_UDP4_SENDMSG),
    Prog("eq_sendmsg6", "lb.bpf.c", "CGROUP_SOCK_ADDR", CGROUP_UDP6_SENDMSG),
    Prog("eq_getpeername4", "lb.bpf.c", "CGROUP_SOCK_ADDR", CGROUP_INET4_GETPEERNAME),
    Prog("eq_getpeername6", "lb.bpf.c", "CGROUP_SOCK_ADDR", CGROUP_INET6_GETPEERNAME),
    Prog("eq_recvmsg4", "lb.bpf.c", "CGROUP_SOCK_ADDR", CGROUP_UDP4_RECVMSG),
    Prog("eq_recvmsg6", "lb.bpf.c", "CGROUP_SOCK_ADDR", CGROUP_UDP6_RECVMSG),
    Prog("eq_sock_release", "lb.bpf.c", "CGROUP_SOCK", CGROUP_INET_SOCK_RELEASE),
    Prog("eq_sockops", "telemetry.bpf.c", "SOCK_OPS", CGROUP_SOCK_OPS, telemetry=True),
    Prog("eq_skb_egress", "telemetry.bpf.c", "CGROUP_SKB", CGROUP_INET_EGRESS, telemetry=True),
    Prog("eq_skb_ingress", "telemetry.bpf.c", "CGROUP_SKB", CGROUP_INET_INGRESS, telemetry=True),
    Prog("tracepoint__tcp__tcp_receive_reset", "telemetry.bpf.c", "TRACEPOINT", PERF_EVENT, telemetry=True,
         tracepoint="tcp/tcp_receive_reset"),
)


def programs(telemetry: bool) -> tuple[Prog, ...]:
    """The programs a datapath with or without telemetry attaches."""
    return tuple(p for p in PROGRAMS if telemetry or not p.telemetry)


#: Backend states, as in bpf/lib/types.h.
BE_UNUSED, BE_ACTIVE, BE_DRAINING, BE_QUARANTINED = 0, 1, 2, 3
STATE_NAMES = {BE_UNUSED: "unused", BE_ACTIVE: "active", BE_DRAINING: "draining", BE_QUARANTINED: "quarantined"}
STATE_BY_NAME = {v: k for k, v in STATE_NAMES.items()}
NO_BACKEND = 0xFFFFFFFF
#: A slot packs a backend id (low ID_BITS) and that backend's slots in the same
#: half (above), as in bpf/lib/types.h (EQ_ID_BITS): see slots.pack.
ID_BITS = 16
ID_MASK = (1 << ID_BITS) - 1
if MAX_BACKENDS > 1 << ID_BITS or SLOTS >= 0xFFFF:
    raise ImportError("a slot packs a backend id (< 2**ID_BITS) and a share (< 0xFFFF)")
#: eq_svc.flags, as in bpf/lib/types.h.
SVC_P2C = 1
SVC_SWEEP = 2
#: eq_budget.mode, as in bpf/lib/types.h (config `enforce:`; "off" writes no budgets)
ENFORCE_OBSERVE, ENFORCE_THROTTLE = 1, 2
ENFORCE_MODES = {"observe": ENFORCE_OBSERVE, "throttle": ENFORCE_THROTTLE}


def bpf_dir() -> Path:
    """Where the BPF C sources live: $EQUILIBRIUM_BPF_DIR, else the repo's bpf/."""
    env = os.environ.get("EQUILIBRIUM_BPF_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "bpf"


def defines(pin_dir: str, telemetry: bool = True) -> dict[str, str]:
    """The -D values the programs are built with."""
    return {
        "EQ_TELEMETRY": "1" if telemetry else "0",
        "EQ_HIST_BUCKETS": str(HIST_BUCKETS),
        "EQ_ID_BITS": str(ID_BITS),
        "EQ_LAYOUT_VERSION": str(LAYOUT_VERSION),
        "EQ_MAX_BACKENDS": str(MAX_BACKENDS),
        "EQ_MAX_CALLERS": str(MAX_CALLERS),
        "EQ_CB_SLOTS": str(CB_SLOTS),
        "EQ_CB_HALF_SHIFT": str(CB_HALF_SHIFT),
        "EQ_CB_STALE_NS": "%dULL" % CB_STALE_NS,
        "EQ_MAX_REVNAT": str(MAX_REVNAT),
        "EQ_MAX_SERVICES": str(MAX_SERVICES),
        "EQ_MAX_SOCKS": str(MAX_SOCKS),
        "EQ_PIN_DIR": '"%s"' % pin_dir,
        "EQ_SLOTS": str(SLOTS),
        "EQ_TEL_GROUP": str(TEL_GROUP),
    }


def cflags(pin_dir: str, telemetry: bool = True) -> list[str]:
    """Sorted -D flags plus the include path for bpf/lib."""
    flags = ["-D%s=%s" % (k, v) for k, v in sorted(defines(pin_dir, telemetry).items())]
    return flags + ["-I%s" % bpf_dir(), "-Wno-unused-function"]
