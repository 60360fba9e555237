"""One source of truth for datapath sizes, names and attach points.

Handed to the BPF compiler as sorted -D flags (see `cflags`), and used by the
agent to size its Python views of the maps. Changing a size changes a map's
layout: bump LAYOUT_VERSION so an old pinned map is not reused by mistake.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Bumped whenever a shared struct or a map size changes.
LAYOUT_VERSION = 1

#: Services per node (frontend maps, slot tables, per-service counters).
MAX_SERVICES = 1024
#: Backends per node, over all services (backend ids are node-global).
MAX_BACKENDS = 16384
#: Backends one service may have. A 1,024-slot table represents a weight
#: split to within 0.1 %; more backends than this would starve small weights.
MAX_BACKENDS_PER_SERVICE = 256
#: Slots per service table; a power of two so the kernel masks, not divides.
SLOTS = 1024
#: Reverse-translation entries (one per live translated socket and backend).
MAX_REVNAT = 262144

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
    "eq_lb_be_stat",
    "eq_lb_svc_err",
    "eq_svc_name",
    "eq_meta",
)

#: (program function, bcc attach type name) — one pinned bpf_link each.
PROGRAMS = (
    ("eq_connect4", "CGROUP_INET4_CONNECT"),
    ("eq_connect6", "CGROUP_INET6_CONNECT"),
    ("eq_sendmsg4", "CGROUP_UDP4_SENDMSG"),
    ("eq_sendmsg6", "CGROUP_UDP6_SENDMSG"),
    ("eq_getpeername4", "CGROUP_INET4_GETPEERNAME"),
    ("eq_getpeername6", "CGROUP_INET6_GETPEERNAME"),
    ("eq_recvmsg4", "CGROUP_UDP4_RECVMSG"),
    ("eq_recvmsg6", "CGROUP_UDP6_RECVMSG"),
)

#: Kernel attach-type numbers (enum bpf_attach_type, stable UAPI).
ATTACH_TYPES = {
    "CGROUP_INET4_CONNECT": 10,
    "CGROUP_INET6_CONNECT": 11,
    "CGROUP_UDP4_SENDMSG": 14,
    "CGROUP_UDP6_SENDMSG": 15,
    "CGROUP_UDP4_RECVMSG": 19,
    "CGROUP_UDP6_RECVMSG": 20,
    "CGROUP_INET4_GETPEERNAME": 29,
    "CGROUP_INET6_GETPEERNAME": 30,
}

#: Backend states, as in bpf/lib/types.h.
BE_UNUSED, BE_ACTIVE, BE_DRAINING, BE_QUARANTINED = 0, 1, 2, 3
STATE_NAMES = {BE_UNUSED: "unused", BE_ACTIVE: "active", BE_DRAINING: "draining", BE_QUARANTINED: "quarantined"}
STATE_BY_NAME = {v: k for k, v in STATE_NAMES.items()}
NO_BACKEND = 0xFFFFFFFF


def bpf_dir() -> Path:
    """Where the BPF C sources live: $EQUILIBRIUM_BPF_DIR, else the repo's bpf/."""
    env = os.environ.get("EQUILIBRIUM_BPF_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "bpf"


def defines(pin_dir: str) -> dict[str, str]:
    """The -D values the programs are built with."""
    return {
        "EQ_LAYOUT_VERSION": str(LAYOUT_VERSION),
        "EQ_MAX_BACKENDS": str(MAX_BACKENDS),
        "EQ_MAX_REVNAT": str(MAX_REVNAT),
        "EQ_MAX_SERVICES": str(MAX_SERVICES),
        "EQ_PIN_DIR": '"%s"' % pin_dir,
        "EQ_SLOTS": str(SLOTS),
    }


def cflags(pin_dir: str) -> list[str]:
    """Sorted -D flags plus the include path for bpf/lib."""
    flags = ["-D%s=%s" % (k, v) for k, v in sorted(defines(pin_dir).items())]
    return flags + ["-I%s" % bpf_dir(), "-Wno-unused-function"]
