"""The Python mirrors must match what the compiler built (like Cilium's
alignchecker): sizes and field offsets from bcc's view of the compiled maps."""

from __future__ import annotations

import ctypes as ct

import pytest

from equilibriumd.datapath import constants
from equilibriumd.datapath.structs import MIRRORS

pytestmark = pytest.mark.root

#: map name -> (key struct, value struct) as declared in bpf/lb.bpf.c
MAP_TYPES = {
    "eq_lb4_fe": ("eq_fe4_key", None),
    "eq_lb6_fe": ("eq_fe6_key", None),
    "eq_lb_svc": (None, "eq_svc"),
    "eq_lb_be": (None, "eq_backend"),
    "eq_lb4_rev": ("eq_rev4_key", "eq_rev4_val"),
    "eq_lb6_rev": ("eq_rev6_key", "eq_rev6_val"),
    "eq_lb_revsk": (None, "eq_revsk"),
    "eq_lb_rev_stat": (None, "eq_rev_stat"),
    "eq_lb_be_stat": (None, "eq_be_stats"),

    "eq_lb_svc_err": (None, "eq_svc_errs"),
    "eq_svc_name": (None, "eq_svc_name"),
    "eq_meta": (None, "eq_meta"),
    "eq_tel_sock": (None, "eq_sock"),
    "eq_tel_be": (None, "eq_tel_group"),
    "eq_tel_hist": (None, "eq_be_hist"),
    "eq_tel_caller": ("eq_caller_key", "eq_caller_val"),
}


def _layout(t: type) -> tuple[int, dict[str, tuple[int, int]]]:
    fields = {}
    for f in t._fields_:
        name = f[0]
        if name.startswith("__pad") or name == "pad":
            continue
        desc = getattr(t, name)
        fields[name] = (desc.offset, desc.size)
    return ct.sizeof(t), fields


@pytest.fixture(scope="module")
def compiled():
    from bcc import BPF

    from equilibriumd.datapath import lifecycle

    from helpers import rand_tag

    pin_dir = "/sys/fs/bpf/eqtest-" + rand_tag(8)  # BPF_TABLE_PINNED pins here; removed below
    try:
        b = BPF(src_file=str(constants.bpf_dir() / "lb.bpf.c").encode(), cflags=constants.cflags(pin_dir))
        yield b
        b.cleanup()
    finally:
        lifecycle.teardown(pin_dir)


@pytest.mark.parametrize("mapname", sorted(MAP_TYPES))
def test_mirrors_match_compiled_layout(compiled, mapname):
    table = compiled[mapname.encode()]
    key_struct, val_struct = MAP_TYPES[mapname]
    for cname, ctype in ((key_struct, table.Key), (val_struct, table.Leaf)):
        if cname is None:
            continue
        if issubclass(ctype, ct.Array):  # per-CPU maps: bcc's Leaf is one struct per CPU
            ctype = ctype._type_
        mirror = MIRRORS[cname]
        size, fields = _layout(mirror)
        csize, cfields = _layout(ctype)
        assert size == csize, "%s: Python %d bytes, compiled %d" % (cname, size, csize)
        assert fields == cfields, "%s: offsets differ" % cname


@pytest.mark.parametrize("mapname,size", [("eq_lb_slots", 4 * constants.SLOTS), ("eq_lb_active", 8)])
def test_scalar_map_values(compiled, mapname, size):
    """Maps of plain numbers the agent reads and writes as numpy arrays (eq_lb_slots:
    one whole table half, SLOTS packed u32 (id | share << ID_BITS), per value)."""
    assert ct.sizeof(compiled[mapname.encode()].Leaf) == size


def test_attach_types_match_bcc():
    from bcc import BPFAttachType

    for name in ("CGROUP_INET_INGRESS", "CGROUP_INET_EGRESS", "CGROUP_SOCK_OPS", "CGROUP_INET4_CONNECT",
                 "CGROUP_INET6_CONNECT", "CGROUP_UDP4_SENDMSG", "CGROUP_UDP6_SENDMSG", "CGROUP_UDP4_RECVMSG",
                 "CGROUP_UDP6_RECVMSG", "CGROUP_INET4_GETPEERNAME", "CGROUP_INET6_GETPEERNAME"):
        assert int(getattr(BPFAttachType, name)) == getattr(constants, name), name


@pytest.mark.parametrize("name", ["EQ_MAX_SERVICES", "EQ_SLOTS", "EQ_HIST_BUCKETS"])
def test_sizes_come_only_from_the_loader(name):
    """bpf/lib/types.h defines no size of its own: without the loader's -D it refuses to build
    (so the Python constant in datapath.constants is the one definition)."""
    from bcc import BPF

    src = (b'#include <uapi/linux/bpf.h>\n#include "lib/types.h"\n'
           b"int f(void *ctx) { return sizeof(struct eq_be_tel); }\n")
    flags = constants.cflags("/nonexistent")          # no maps in this source: nothing is pinned
    BPF(text=src, cflags=flags).cleanup()
    with pytest.raises(Exception, match="compile"):
        BPF(text=src, cflags=[f for f in flags if not f.startswith("-D%s=" % name)])
