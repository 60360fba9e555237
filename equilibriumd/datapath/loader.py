"""Short-lived loader: compile (bcc), load, attach (bpf_link), pin, exit.

Two program groups: translation (bpf/lb.bpf.c, always) and telemetry
(bpf/telemetry.bpf.c, unless --no-telemetry). They share maps through pins.

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


def load(pin_dir: str, cgroup: str, telemetry: bool = True) -> dict[str, object]:
    from bcc import BPF  # only here: the agent never imports bcc

    if not pins.is_bpffs(os.path.dirname(pin_dir.rstrip("/")) or "/"):
        raise SystemExit("loader: %s is not on a bpf filesystem (mount -t bpf bpf /sys/fs/bpf)" % pin_dir)
    os.makedirs(pin_dir, exist_ok=True)
    why = pins.layout_error(pin_dir)
    if why:
        raise SystemExit("loader: " + why)
    flags = constants.cflags(pin_dir, telemetry)
    wanted = constants.programs(telemetry)
    t0 = time.perf_counter()
    objs = {src: BPF(src_file=str(constants.bpf_dir() / src).encode(), cflags=flags)
            for src in dict.fromkeys(p.source for p in wanted)}
    compile_s = time.perf_counter() - t0

    lb = objs["lb.bpf.c"]
    lb["eq_meta"][ct.c_uint32(0)] = Meta(source_hash=pins.source_hash(pin_dir, telemetry),
                                         layout=constants.LAYOUT_VERSION)
    missing = [m for m in constants.MAPS if not os.path.exists(pins.map_pin(pin_dir, m))]
    if missing:
        raise SystemExit("loader: maps not pinned: %s" % ", ".join(missing))

    cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    cg_id = cgroup_id(cgroup)
    out: dict[str, object] = {"compile_seconds": round(compile_s, 3), "telemetry": telemetry}
    progs: dict[str, int] = {}
    links: dict[str, int] = {}
    try:
        for p in wanted:
            fn = objs[p.source].load_func(p.name.encode(), getattr(BPF, p.prog_type),
                                          attach_type=-1 if p.tracepoint else p.attach)
            if p.tracepoint and p.tracepoint.replace("/", ":").encode() in objs[p.source].tracepoint_fds:
                # bcc auto-attaches tracepoint__* functions through a perf event that dies
                # with this process; the same program cannot be on one tracepoint twice.
                objs[p.source].detach_tracepoint(p.tracepoint.replace("/", ":").encode())
            progs[p.name] = libbpf.obj_id(fn.fd)
            link_fd = _attach(pin_dir, p, fn.fd, cg_fd, cg_id)
            links[p.name] = libbpf.obj_id(link_fd)
            os.close(link_fd)
        for p in constants.PROGRAMS:  # a group switched off: detach what an earlier load attached
            if p not in wanted:
                pins.detach_link(pins.link_pin(pin_dir, p.name))
    finally:
        os.close(cg_fd)
    out["rebalance"] = _load_rebalancer(pin_dir, telemetry)
    out.update(programs=progs, links=links, cgroup=cgroup, pin_dir=pin_dir,
               maps={m: _map_id(pins.map_pin(pin_dir, m)) for m in constants.MAPS})
    return out


def _attach(pin_dir: str, p: constants.Prog, prog_fd: int, cg_fd: int, cg_id: int) -> int:
    """Attach through a pinned bpf_link; an existing cgroup link on the same
    cgroup gets its program swapped atomically instead. Returns the link fd."""
    lpin = pins.link_pin(pin_dir, p.name)
    if os.path.exists(lpin):
        link_fd = libbpf.obj_get(lpin)
        if p.tracepoint is None and libbpf.link_cgroup_id(link_fd) == cg_id:
            libbpf.link_update(link_fd, prog_fd)
            return link_fd
        # attached elsewhere, or a perf link (cannot be updated): replace it
        libbpf.link_detach(link_fd)
        os.close(link_fd)
        os.unlink(lpin)
    if p.tracepoint:
        link_fd = libbpf.tracepoint_link(prog_fd, p.tracepoint)
    else:
        link_fd = libbpf.link_create(prog_fd, cg_fd, p.attach)
    libbpf.obj_pin(link_fd, lpin)
    return link_fd


def _load_rebalancer(pin_dir: str, telemetry: bool) -> str:
    """The optional CO-RE group: "loaded", or "unavailable: <why>" (the datapath
    works without it; the agent logs the reason)."""
    from .core import CoreUnavailable, load_rebalancer

    if not telemetry:
        for prog in constants.REBALANCE_PROGS:
            pins.detach_link(pins.link_pin(pin_dir, prog))
        return "unavailable: it needs the telemetry (which sockets carry a request), and --no-telemetry is set"
    try:
        load_rebalancer(pin_dir)
    except CoreUnavailable as e:
        for prog in constants.REBALANCE_PROGS:
            pins.detach_link(pins.link_pin(pin_dir, prog))
        return "unavailable: %s" % e
    return "loaded"


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
    ap.add_argument("--no-telemetry", action="store_true", help="attach the translation programs only")
    args = ap.parse_args(argv)
    try:
        res = load(args.pin_dir, args.cgroup, telemetry=not args.no_telemetry)
    except OSError as e:
        print("loader: %s" % e, file=sys.stderr)
        return 1
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
