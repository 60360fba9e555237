"""Where the cgroup v2 hierarchy is: the one answer the datapath, discovery and the lab share.

The datapath attaches its programs to a v2 cgroup and counts callers by v2
cgroup id; discovery maps those ids to pods; the lab and the tests make child
cgroups to run traffic in. All of them ask `cgroup2_root()`.

Like `types`, this module imports nothing of the project.
"""

from __future__ import annotations

import errno
import os

#: This process's mount table (a container sees its own).
MOUNTS = "/proc/self/mounts"
#: Where the hierarchy usually is when the mount table does not say: the v2
#: mount of a unified node, then the v2 part of a hybrid (v1 + v2) node.
DEFAULT_ROOTS = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")


def is_cgroup2(path: str) -> bool:
    """True when `path` is a directory of a cgroup v2 hierarchy (only those have cgroup.controllers)."""
    return os.path.exists(os.path.join(path, "cgroup.controllers"))


def cgroup2_mounts(mounts: str = MOUNTS) -> list[str]:
    """Mount points of type cgroup2 in `mounts`, in table order ([] when it cannot be read)."""
    try:
        with open(mounts, encoding="utf-8") as f:
            return [parts[1] for parts in (line.split() for line in f) if parts[2:3] == ["cgroup2"]]
    except OSError:
        return []


def cgroup2_root(hint: str | None = None, mounts: str = MOUNTS) -> str:
    """The root of the cgroup v2 hierarchy (the node's root cgroup).

    With `hint`, a cgroup filesystem the caller was pointed at (such as the
    host's /sys/fs/cgroup mounted into the agent's container): `hint` itself
    if it is v2, else `hint/unified` (a hybrid node). Without it: this
    process's first cgroup2 mount, else the usual places (DEFAULT_ROOTS).
    Raises FileNotFoundError when none is v2: a pure cgroup v1 node, or
    nothing mounted.
    """
    if hint:
        candidates = [hint, os.path.join(hint, "unified")]
    else:
        candidates = cgroup2_mounts(mounts) + list(DEFAULT_ROOTS)
    for c in candidates:
        if is_cgroup2(c):
            return c
    if hint:
        raise FileNotFoundError(errno.ENOENT, "neither %s nor its unified/ is a cgroup v2 hierarchy" % hint)
    raise FileNotFoundError(errno.ENOENT, "no cgroup2 hierarchy is mounted")
