"""Where the datapath lives in bpffs, and whether what is pinned is current.

Layout under the pin directory (default /sys/fs/bpf/equilibrium):
    <map name>          one pin per map in constants.MAPS
    link_<program>      one pinned bpf_link per program in constants.PROGRAMS

Pinned links keep the programs attached with no process holding them, so
traffic keeps flowing on the last weights while the agent restarts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..digest import sha256
from . import constants, libbpf


def link_pin(pin_dir: str, prog: str) -> str:
    return os.path.join(pin_dir, "link_" + prog)


def detach_link(path: str) -> bool:
    """Detach a pinned link (even if other fds hold it) and remove its pin.
    Returns False when there was no such pin."""
    if not os.path.exists(path):
        return False
    fd = libbpf.obj_get(path)
    try:
        libbpf.link_detach(fd)
    finally:
        os.close(fd)
    os.unlink(path)
    return True


def map_pin(pin_dir: str, name: str) -> str:
    return os.path.join(pin_dir, name)


def pinned_meta(pin_dir: str) -> tuple[int, int] | None:
    """(source hash, layout version) the pinned datapath was built with; None if none is pinned."""
    import ctypes as ct

    from .structs import Meta

    path = map_pin(pin_dir, "eq_meta")
    if not os.path.exists(path):
        return None
    fd = libbpf.obj_get(path)
    try:
        m = Meta()
        libbpf.map_lookup(fd, ct.c_uint32(0), m)
        return int(m.source_hash), int(m.layout)
    finally:
        os.close(fd)


def layout_error(pin_dir: str) -> str | None:
    """Why the pinned datapath cannot be upgraded in place, or None if it can.

    BPF_TABLE_PINNED reuses a pinned map whatever its value size, so programs
    built for another layout would load against maps of the wrong shape (or
    half of them would, before the verifier refuses the rest)."""
    meta = pinned_meta(pin_dir)
    if meta is None or meta[1] == constants.LAYOUT_VERSION:
        return None
    return ("%s holds a datapath of layout %d; this build uses layout %d (maps changed shape), so it cannot "
            "be upgraded in place. Run `equilibriumd teardown --pin-dir %s` first: connections already open "
            "keep flowing, new connects to the frontends fail until the agent has loaded the datapath again."
            % (pin_dir, meta[1], constants.LAYOUT_VERSION, pin_dir))


def source_hash(pin_dir: str, telemetry: bool = True) -> int:
    """64-bit hash of every BPF source, the -D flags and the telemetry switch:
    changes when what the loader would build differs from what it built."""
    h = sha256()
    h.update(b"telemetry=%d\0" % telemetry)
    root = constants.bpf_dir()
    for dirpath, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            if f.endswith((".c", ".h")):
                p = os.path.join(dirpath, f)
                h.update(os.path.relpath(p, root).encode())
                with open(p, "rb") as fh:
                    h.update(fh.read())
    h.update("\0".join(constants.cflags(pin_dir, telemetry)).encode())
    return int.from_bytes(h.digest()[:8], "little")


def is_bpffs(path: str) -> bool:
    """True when `path` is on a mounted bpf filesystem."""
    path = os.path.realpath(path)
    best = ("", "")
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            mnt, fstype = parts[1], parts[2]
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best[0]):
                best = (mnt, fstype)
    return best[1] == "bpf"


@dataclass(frozen=True)
class PinState:
    maps_present: tuple[str, ...]
    links_present: tuple[str, ...]
    links_expected: tuple[str, ...]

    @property
    def complete(self) -> bool:
        return (len(self.maps_present) == len(constants.MAPS)
                and set(self.links_expected) <= set(self.links_present))

    @property
    def empty(self) -> bool:
        return not self.maps_present and not self.links_present


def pin_state(pin_dir: str, telemetry: bool = True) -> PinState:
    maps = tuple(m for m in constants.MAPS if os.path.exists(map_pin(pin_dir, m)))
    links = tuple(p.name for p in constants.PROGRAMS if os.path.exists(link_pin(pin_dir, p.name)))
    return PinState(maps, links, tuple(p.name for p in constants.programs(telemetry)))
