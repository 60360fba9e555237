"""equilibriumd.cgroups: the one place that says where the cgroup v2 hierarchy is."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from equilibriumd import cgroups


def _v2(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    return root


def _mounts(tmp_path: Path, *lines: str) -> str:
    p = tmp_path / "mounts"
    p.write_text("".join(line + "\n" for line in lines))
    return str(p)


def test_hint_v2_or_its_unified(tmp_path: Path) -> None:
    unified_node = _v2(tmp_path / "a")
    assert cgroups.cgroup2_root(str(unified_node)) == str(unified_node)
    hybrid = tmp_path / "b"
    (hybrid / "memory").mkdir(parents=True)
    _v2(hybrid / "unified")
    assert cgroups.cgroup2_root(str(hybrid)) == str(hybrid / "unified")


def test_hint_on_a_pure_v1_node_raises(tmp_path: Path) -> None:
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="not|no"):
        cgroups.cgroup2_root(str(v1))


def test_mount_table_first_cgroup2_mount_wins(tmp_path: Path) -> None:
    first, second = _v2(tmp_path / "first"), _v2(tmp_path / "second")
    mounts = _mounts(tmp_path,
                     "proc /proc proc rw 0 0",
                     "cgroup %s/memory cgroup rw,memory 0 0" % tmp_path,
                     "cgroup2 %s cgroup2 rw,nsdelegate 0 0" % first,
                     "cgroup2 %s cgroup2 rw 0 0" % second)
    assert cgroups.cgroup2_mounts(mounts) == [str(first), str(second)]
    assert cgroups.cgroup2_root(mounts=mounts) == str(first)


def test_unreadable_mount_table_means_no_mounts(tmp_path: Path) -> None:
    assert cgroups.cgroup2_mounts(str(tmp_path / "absent")) == []


def test_this_machine() -> None:
    """scripts/setup mounts a v2 hierarchy: the answer is a v2 directory that holds this process's cgroup."""
    root = cgroups.cgroup2_root()
    assert cgroups.is_cgroup2(root) and os.path.isdir(root)
    with open("/proc/self/cgroup") as f:
        own = [line.strip()[3:] for line in f if line.startswith("0::")]
    if own:
        assert os.path.isdir(os.path.join(root, own[0].lstrip("/")))


def test_every_user_takes_it_from_equilibriumd_cgroups() -> None:
    """One definition: nobody else defines a cgroup2_root (the datapath re-exports this one)."""
    repo = Path(__file__).resolve().parents[1]
    defs = [str(p.relative_to(repo)) for d in ("equilibriumd", "tests") for p in (repo / d).rglob("*.py")
            if re.search(r"^\s*def cgroup2_root\(", p.read_text(), re.M)]
    assert defs == ["equilibriumd/cgroups.py"]
    from equilibriumd.datapath import lifecycle
    from equilibriumd.discovery import pods
    assert lifecycle.cgroup2_root is cgroups.cgroup2_root and pods.cgroup2_root is cgroups.cgroup2_root
