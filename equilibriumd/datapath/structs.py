"""Python mirrors of the structs in bpf/lib/types.h.

Each class must match the C struct of the same name in bpf/lib/types.h;
tests/datapath/test_structs.py compares sizes and offsets with what the
compiler built. Padding is explicit on both sides. Addresses and ports are
network order: use the helpers below, never hand-packed integers.
"""

from __future__ import annotations

import ctypes as ct
import ipaddress
import socket

from ..types import Addr
from .constants import CB_SLOTS, HIST_BUCKETS, SLOTS, TEL_GROUP  # noqa: F401  (HIST_BUCKETS re-exported: the histograms' length)

u8, u16, u32, u64 = ct.c_uint8, ct.c_uint16, ct.c_uint32, ct.c_uint64


class FE4Key(ct.Structure):  # must match struct eq_fe4_key in bpf/lib/types.h
    _fields_ = [("addr", u32), ("port", u16), ("proto", u8), ("pad", u8)]


class FE6Key(ct.Structure):  # must match struct eq_fe6_key in bpf/lib/types.h
    _fields_ = [("addr", u32 * 4), ("port", u16), ("proto", u8), ("pad", u8)]


class Table(ct.Structure):  # must match struct eq_table in bpf/lib/types.h
    _fields_ = [("be", u32 * SLOTS)]


class Svc(ct.Structure):  # must match struct eq_svc in bpf/lib/types.h
    _fields_ = [("gen", u32), ("n_avail", u32), ("n_backends", u32), ("flags", u32)]


class Backend(ct.Structure):  # must match struct eq_backend in bpf/lib/types.h
    _fields_ = [
        ("addr", u32 * 4),
        ("port", u16),
        ("family", u8),
        ("state", u8),
        ("svc", u32),
        ("weight", u32),
        ("gen", u32),   # bumped each time the id is handed to a new backend (Datapath.reset_backend_stats)
    ]


class Rev4Key(ct.Structure):  # must match struct eq_rev4_key in bpf/lib/types.h
    _fields_ = [("cookie", u64), ("addr", u32), ("port", u16), ("pad", u16)]


class Rev4Val(ct.Structure):  # must match struct eq_rev4_val in bpf/lib/types.h
    _fields_ = [("addr", u32), ("port", u16), ("pad", u16)]


class Rev6Key(ct.Structure):  # must match struct eq_rev6_key in bpf/lib/types.h
    _fields_ = [("cookie", u64), ("addr", u32 * 4), ("port", u16), ("pad", u16 * 3)]


class Rev6Val(ct.Structure):  # must match struct eq_rev6_val in bpf/lib/types.h
    _fields_ = [("addr", u32 * 4), ("port", u16), ("pad", u16)]


#: Reverse entries a socket's eq_lb_revsk record names (EQ_REVSK_N in bpf/lib/types.h).
REVSK_N = 4


class RevSkEnt(ct.Structure):  # must match struct eq_revsk_ent in bpf/lib/types.h
    _fields_ = [("addr", u32 * 4), ("port", u16), ("v6", u8), ("used", u8)]


class RevSk(ct.Structure):  # must match struct eq_revsk in bpf/lib/types.h
    _fields_ = [("e", RevSkEnt * REVSK_N)]


class RevStat(ct.Structure):  # must match struct eq_rev_stat in bpf/lib/types.h
    _fields_ = [("inserted", u64), ("released", u64), ("evicted", u64), ("untracked", u64)]


class BeStats(ct.Structure):  # must match struct eq_be_stats in bpf/lib/types.h
    _fields_ = [("selections", u64)]


class SvcErrs(ct.Structure):  # must match struct eq_svc_errs in bpf/lib/types.h
    _fields_ = [("no_backend", u64), ("stale_slot", u64), ("rev_update", u64)]


class SvcName(ct.Structure):  # must match struct eq_svc_name in bpf/lib/types.h
    _fields_ = [("name", ct.c_char * 64)]


class Meta(ct.Structure):  # must match struct eq_meta in bpf/lib/types.h
    _fields_ = [("source_hash", u64), ("layout", u32), ("pad", u32)]


#: The u64 counters of struct eq_be_tel, in order.
BE_TEL_COUNTERS = (
    "attempts", "established", "refused", "reset", "timed_out", "closed", "retrans", "bytes_sent",
    "bytes_recv", "rtt_sum_us", "rtt_samples", "requests", "resp_1xx", "resp_2xx", "resp_3xx",
    "resp_4xx", "resp_5xx", "req_errors", "conn_ns_sum", "req_ns_sum", "req_open", "req_done",
)


class Sock(ct.Structure):  # must match struct eq_sock in bpf/lib/types.h
    _fields_ = [("fe_addr", u32 * 4), ("be_addr", u32 * 4), ("fe_port", u16), ("be_port", u16),
                ("backend", u32), ("svc", u32), ("be_gen", u32), ("flags", u64), ("caller", u64), ("start_ns", u64),
                ("req_ns", u64)]


class BeTel(ct.Structure):  # must match struct eq_be_tel in bpf/lib/types.h
    _fields_ = [(name, u64) for name in BE_TEL_COUNTERS]


class TelGroup(ct.Structure):  # must match struct eq_tel_group in bpf/lib/types.h
    _fields_ = [("be", BeTel * TEL_GROUP)]


class BeHist(ct.Structure):  # must match struct eq_be_hist in bpf/lib/types.h
    _fields_ = [("conn_hist", u32 * HIST_BUCKETS), ("req_hist", u32 * HIST_BUCKETS)]


class CallerKey(ct.Structure):  # must match struct eq_caller_key in bpf/lib/types.h
    _fields_ = [("cgroup", u64), ("svc", u32), ("pad", u32)]


class Budget(ct.Structure):  # must match struct eq_budget in bpf/lib/types.h
    _fields_ = [("tat", u64), ("interval_ns", u64), ("burst_ns", u64), ("throttled", u64), ("observed", u64),
                ("admitted", u64), ("mode", u32), ("pad", u32)]


class CallerVal(ct.Structure):  # must match struct eq_caller_val in bpf/lib/types.h
    _fields_ = [("connections", u64), ("requests", u64), ("errors", u64)]


#: struct eq_cb_slot's counters, in order after (cgroup, last_ns): one caller's
#: evidence about one backend (named as in eq_be_tel)
CB_COUNTERS = (
    "attempts", "established", "refused", "reset", "timed_out", "requests", "responses", "resp_5xx",
    "req_errors", "conn_ns_sum", "req_ns_sum",
)


class CbSlot(ct.Structure):  # must match struct eq_cb_slot in bpf/lib/types.h
    _fields_ = [("cgroup", u64), ("last_ns", u64)] + [(name, u64) for name in CB_COUNTERS]


class Cb(ct.Structure):  # must match struct eq_cb in bpf/lib/types.h
    _fields_ = [("slot", CbSlot * CB_SLOTS)]


class RbSvc(ct.Structure):  # must match struct eq_rb_svc in bpf/lib/types.h
    _fields_ = [("budget", ct.c_int64), ("min_age_ns", u64), ("min_idle_ns", u64), ("max_age_ns", u64),
                ("flags", u64)]


class RbClosed(ct.Structure):  # must match struct eq_rb_closed in bpf/lib/types.h
    _fields_ = [("n", u64 * 3), ("pad", u64)]


#: C struct name -> mirror, for the layout test.
MIRRORS: dict[str, type[ct.Structure]] = {
    "eq_fe4_key": FE4Key,
    "eq_fe6_key": FE6Key,
    "eq_table": Table,
    "eq_svc": Svc,
    "eq_backend": Backend,
    "eq_rev4_key": Rev4Key,
    "eq_rev4_val": Rev4Val,
    "eq_rev6_key": Rev6Key,
    "eq_rev6_val": Rev6Val,
    "eq_revsk": RevSk,
    "eq_rev_stat": RevStat,
    "eq_be_stats": BeStats,
    "eq_svc_errs": SvcErrs,
    "eq_budget": Budget,
    "eq_cb_slot": CbSlot,
    "eq_cb": Cb,
    "eq_svc_name": SvcName,
    "eq_meta": Meta,
    "eq_sock": Sock,
    "eq_be_tel": BeTel,
    "eq_be_hist": BeHist,
    "eq_tel_group": TelGroup,
    "eq_caller_key": CallerKey,
    "eq_caller_val": CallerVal,
}


# --- byte-order helpers -----------------------------------------------------
# The kernel compares raw network-order bytes; a little-endian u32/u16 field
# must therefore hold the integer whose memory bytes are the wire bytes.

def port_to_net(port: int) -> int:
    return int.from_bytes(port.to_bytes(2, "big"), "little")


def port_from_net(v: int) -> int:
    return int.from_bytes(v.to_bytes(2, "little"), "big")


def ip4_to_net(ip: str) -> int:
    return int.from_bytes(socket.inet_aton(ip), "little")


def ip4_from_net(v: int) -> str:
    return socket.inet_ntoa(v.to_bytes(4, "little"))


def ip6_to_net(ip: str) -> tuple[int, int, int, int]:
    raw = ipaddress.IPv6Address(ip).packed
    return tuple(int.from_bytes(raw[i:i + 4], "little") for i in range(0, 16, 4))  # type: ignore[return-value]


def ip6_from_net(words: "ct.Array[ct.c_uint32]") -> str:
    raw = b"".join(int(w).to_bytes(4, "little") for w in words)
    return str(ipaddress.IPv6Address(raw))


def backend_entry(svc_id: int, addr: Addr, state: int, weight: int) -> Backend:
    """The eq_lb_be value for a backend (network byte order, as the kernel reads it)."""
    b = Backend(port=port_to_net(addr.port), family=addr.family, state=state, svc=svc_id, weight=weight)
    if addr.family == 4:
        b.addr[0] = ip4_to_net(addr.ip)
    else:
        b.addr[:] = ip6_to_net(addr.ip)
    return b


def backend_addr(b: Backend) -> Addr:
    """The endpoint an eq_lb_be value names."""
    if b.family == 4:
        return Addr(4, ip4_from_net(b.addr[0]), port_from_net(b.port))
    return Addr(6, ip6_from_net(b.addr), port_from_net(b.port))
