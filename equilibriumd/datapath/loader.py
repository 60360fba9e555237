"""Short-lived loader: compile (bcc), load, attach (bpf_link), pin, exit.

Run as a child process (`python -m equilibriumd.datapath.loader`) so that
bcc and LLVM never live in the agent's memory. Maps are declared with
BPF_TABLE_PINNED, so a reload reuses the pinned maps (weights and counters
survive an upgrade) and existing links get their program swapped atomically
with bpf_link_update: there is no moment without a program attached.

Prints one JSON object on stdout: program, link and map ids, compile time.
"""

from __future__ import annotations

import argparse
import ctypes as ct
import json
import os
import sys
import time

from . import constants, libbpf, pins
from .structs import Meta


def cgroup_id(path: str) -> int:
    """A cgroup v2 directory's id is its inode number."""
    return os.stat(path).st_ino


def load(pin_dir: str, cgroup: str) -> dict[str, object]:
    from bcc import BPF, BPFAttachType  # only here: the agent never imports bcc

    if not pins.is_bpffs(os.path.dirname(pin_dir.rstrip("/")) or "/"):
        raise SystemExit("loader: %s is not on a bpf filesystem (mount -t bpf bpf /sys/fs/bpf)" % pin_dir)
    os.makedirs(pin_dir, exist_ok=True)
    src = constants.bpf_dir() / "lb.bpf.c"
    flags = constants.cflags(pin_dir)
    t0 = time.perf_counter()
    b = BPF(src_file=str(src).encode(), cflags=flags)
    compile_s = time.perf_counter() - t0

    meta = b["eq_meta"]
    meta[ct.c_uint32(0)] = Meta(source_hash=pins.source_hash(pin_dir), layout=constants.LAYOUT_VERSION)
    b["eq_svc_name"]  # make sure bcc created and pinned the names map too
    missing = [m for m in constants.MAPS if not os.path.exists(pins.map_pin(pin_dir, m))]
    if missing:
        raise SystemExit("loader: maps not pinned: %s" % ", ".join(missing))

    cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    cg_id = cgroup_id(cgroup)
    out: dict[str, object] = {"compile_seconds": round(compile_s, 3), "programs": {}, "links": {}}
    try:
        for prog, attach_name in constants.PROGRAMS:
            attach = int(getattr(BPFAttachType, attach_name))
            assert attach == constants.ATTACH_TYPES[attach_name], attach_name
            fn = b.load_func(prog.encode(), BPF.CGROUP_SOCK_ADDR, attach_type=attach)
            out["programs"][prog] = libbpf.obj_id(fn.fd)  # type: ignore[index]
            lpin = pins.link_pin(pin_dir, prog)
            link_fd = -1
            if os.path.exists(lpin):
                link_fd = libbpf.obj_get(lpin)
                if libbpf.link_cgroup_id(link_fd) == cg_id:
                    libbpf.link_update(link_fd, fn.fd)
                else:  # attached elsewhere: move it (detach old, attach new)
                    libbpf.link_detach(link_fd)
                    os.close(link_fd)
                    os.unlink(lpin)
                    link_fd = -1
            if link_fd < 0:
                link_fd = libbpf.link_create(fn.fd, cg_fd, attach)
                libbpf.obj_pin(link_fd, lpin)
            out["links"][prog] = libbpf.obj_id(link_fd)  # type: ignore[index]
            os.close(link_fd)
    finally:
        os.close(cg_fd)
    out["maps"] = {m: _map_id(pins.map_pin(pin_dir, m)) for m in constants.MAPS}
    out["cgroup"] = cgroup
    out["pin_dir"] = pin_dir
    return out


def _map_id(path: str) -> int:
    fd = libbpf.obj_get(path)
    try:
        return libbpf.obj_id(fd)
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Compile, load, attach and pin Equilibrium's BPF programs.")
    ap.add_argument("--pin-dir", default=constants.DEFAULT_PIN_DIR)
    ap.add_argument("--cgroup", required=True, help="cgroup v2 directory to attach to")
    args = ap.parse_args(argv)
    try:
        res = load(args.pin_dir, args.cgroup)
    except OSError as e:
        print("loader: %s" % e, file=sys.stderr)
        return 1
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
