"""Bring the pinned datapath up (via the loader child process) and tear it down.

`ensure_loaded` runs the loader only when something is missing or the
programs on disk differ from the pinned ones (an upgrade); otherwise the
agent simply adopts what is pinned, which is what keeps a restart gap-free.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

from ..cgroups import cgroup2_root
from . import constants, libbpf, pins


class LoadError(RuntimeError):
    """The loader failed; the message carries its last lines of output."""


@dataclass
class LoadResult:
    ran_loader: bool
    reason: str
    details: dict[str, object] = field(default_factory=dict)


def check_cgroup(path: str) -> str:
    """Validate a cgroup v2 directory to attach to; returns its real path."""
    real = os.path.realpath(path)
    if not os.path.isdir(real) or not os.path.exists(os.path.join(real, "cgroup.procs")):
        raise ValueError("--cgroup %s is not a cgroup directory" % path)
    root = cgroup2_root()
    if not (real == root or real.startswith(root.rstrip("/") + "/")):
        raise ValueError("--cgroup %s is not in the cgroup v2 hierarchy at %s" % (path, root))
    return real


def _pinned_hash(pin_dir: str) -> int | None:
    meta = pins.pinned_meta(pin_dir)
    return None if meta is None else meta[0]


def _links_on(pin_dir: str, cgroup: str, telemetry: bool) -> bool:
    cg_id = os.stat(cgroup).st_ino
    for p in constants.programs(telemetry):
        if p.tracepoint:
            continue
        fd = libbpf.obj_get(pins.link_pin(pin_dir, p.name))
        try:
            if libbpf.link_cgroup_id(fd) != cg_id:
                return False
        finally:
            os.close(fd)
    return True


def ensure_loaded(pin_dir: str, cgroup: str, force: bool = False, telemetry: bool = True) -> LoadResult:
    state = pins.pin_state(pin_dir, telemetry)
    why = pins.layout_error(pin_dir)
    if why:
        raise LoadError(why)
    if force:
        reason = "reload requested"
    elif not state.complete:
        reason = "nothing pinned" if state.empty else "pins incomplete"
    elif _pinned_hash(pin_dir) != pins.source_hash(pin_dir, telemetry):
        reason = "programs or telemetry switch changed"
    elif not _links_on(pin_dir, cgroup, telemetry):
        reason = "attached to another cgroup"
    else:
        return LoadResult(False, "adopted pinned datapath")
    cmd = [sys.executable, "-m", "equilibriumd.datapath.loader", "--pin-dir", pin_dir, "--cgroup", cgroup]
    if not telemetry:
        cmd.append("--no-telemetry")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-15:])
        raise LoadError("loading the BPF programs failed (%s):\n%s" % (" ".join(cmd), tail))
    return LoadResult(True, reason, json.loads(r.stdout.strip().splitlines()[-1]))


@dataclass
class TeardownReport:
    links: list[str] = field(default_factory=list)
    maps: list[str] = field(default_factory=list)
    others: list[str] = field(default_factory=list)


def teardown(pin_dir: str) -> TeardownReport:
    """Detach every link and remove every pin under pin_dir, then the directory.

    Links are detached explicitly (not only unpinned) so that nothing stays
    attached even if some process still holds a link fd.
    """
    rep = TeardownReport()
    if not os.path.isdir(pin_dir):
        return rep
    for name in [p.name for p in constants.PROGRAMS] + list(constants.REBALANCE_PROGS):
        if pins.detach_link(pins.link_pin(pin_dir, name)):
            rep.links.append(name)
    for m in constants.MAPS + constants.REBALANCE_MAPS:
        p = pins.map_pin(pin_dir, m)
        if os.path.exists(p):
            os.unlink(p)
            rep.maps.append(m)
    for f in sorted(os.listdir(pin_dir)):  # leftovers of ours from an older layout
        if f.startswith(("eq_", "link_")):
            os.unlink(os.path.join(pin_dir, f))
            rep.others.append(f)
    try:
        os.rmdir(pin_dir)
    except OSError as e:
        rep.others.append("left %s in place: %s" % (pin_dir, e.strerror))
    return rep
