"""What the pinned maps cost in kernel memory, derived from the node limits.

Arrays are preallocated: max_entries x value size (values rounded up to 8
bytes). Per-CPU maps hold one value per possible CPU. Hash and LRU maps are
preallocated too; each element carries the key, the value and the kernel's
element header (`HASH_ELEM`, an estimate: struct htab_elem and alignment).
The README's table comes from `table()`; `python -m equilibriumd.datapath.sizing
[CPUS...]` prints it for other CPU counts.
"""

from __future__ import annotations

import ctypes as ct
import sys

from . import constants as c
from . import structs as s

#: bytes of kernel bookkeeping per hash-map element (struct htab_elem: list node,
#: hash, padding), an estimate good to a few bytes
HASH_ELEM = 48


def _r8(n: int) -> int:
    return (n + 7) // 8 * 8


def map_memory(ncpu: int) -> dict[str, int]:
    """Bytes each pinned map holds on a node with `ncpu` possible CPUs."""

    def array(entries: int, value: type[ct._CData] | int, percpu: bool = False) -> int:
        size = value if isinstance(value, int) else ct.sizeof(value)
        return entries * _r8(size) * (ncpu if percpu else 1)

    def hashed(entries: int, key: type[ct._CData], value: type[ct._CData] | int, percpu: bool = False) -> int:
        size = value if isinstance(value, int) else ct.sizeof(value)
        per = HASH_ELEM + _r8(ct.sizeof(key)) + (8 if percpu else _r8(size))   # per-CPU: a pointer
        return entries * per + (entries * _r8(size) * ncpu if percpu else 0)

    return {
        "eq_lb4_fe": hashed(c.MAX_SERVICES, s.FE4Key, 4),
        "eq_lb6_fe": hashed(c.MAX_SERVICES, s.FE6Key, 4),
        "eq_lb_svc": array(c.MAX_SERVICES, s.Svc),
        "eq_lb_slots": array(c.MAX_SERVICES * 2, s.Table),
        "eq_lb_be": array(c.MAX_BACKENDS, s.Backend),
        "eq_lb4_rev": hashed(c.MAX_REVNAT, s.Rev4Key, s.Rev4Val),
        "eq_lb6_rev": hashed(c.MAX_REVNAT, s.Rev6Key, s.Rev6Val),
        "eq_lb_revsk": hashed(c.MAX_REVNAT, ct.c_uint64, s.RevSk),   # not preallocated: at most this
        "eq_lb_rev_stat": array(1, s.RevStat, percpu=True),
        "eq_lb_active": array(c.MAX_BACKENDS, 8),
        "eq_lb_be_stat": array(c.MAX_BACKENDS, s.BeStats, percpu=True),
        "eq_lb_svc_err": array(c.MAX_SERVICES, s.SvcErrs, percpu=True),
        "eq_lb_cursor": array(c.MAX_SERVICES, 4, percpu=True),
        "eq_svc_name": array(c.MAX_SERVICES, s.SvcName),
        "eq_meta": array(1, s.Meta),
        "eq_lb_budget": hashed(c.MAX_CALLERS, s.CallerKey, s.Budget),
        "eq_lb_budgeted": array(c.MAX_SERVICES, 4),
        "eq_tel_sock": hashed(c.MAX_SOCKS, ct.c_uint64, s.Sock),
        "eq_tel_be": array(c.MAX_BACKENDS // c.TEL_GROUP, s.TelGroup, percpu=True),
        "eq_tel_hist": array(c.MAX_BACKENDS, s.BeHist),
        "eq_tel_caller": hashed(c.MAX_CALLERS, s.CallerKey, s.CallerVal, percpu=True),
        "eq_tel_cb": array(c.MAX_BACKENDS, s.Cb),
    }


def table(cpus: tuple[int, ...] = (2, 16, 64, 128)) -> str:
    """A markdown table: MiB per map and in total, shared and per CPU."""
    rows = {n: map_memory(n) for n in cpus}
    mib = 1 << 20
    out = ["| map | " + " | ".join("%d CPUs" % n for n in cpus) + " |",
           "|---|" + "---:|" * len(cpus)]
    for name in c.MAPS:
        out.append("| `%s` | " % name + " | ".join("%.1f" % (rows[n][name] / mib) for n in cpus) + " |")
    out.append("| **total, MiB** | " + " | ".join("**%.0f**" % (sum(rows[n].values()) / mib) for n in cpus) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    print(table(tuple(int(a) for a in sys.argv[1:]) or (2, 16, 64, 128)))
