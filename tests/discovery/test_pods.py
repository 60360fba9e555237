"""Caller identity: cgroup id -> "namespace/pod" for kubelet's cgroup layouts.

The layouts are built as plain directories in a temporary directory (inode
numbers are what a cgroup id is, on cgroupfs as on any filesystem); one root
test builds the systemd layout in a real child cgroup. The pod list comes
from the loopback API server of fakeapi.py (no API server can be installed
on these machines) through the real kubernetes client.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterator

import pytest

from equilibriumd.cgroups import cgroup2_root
from equilibriumd.discovery.client import api_client_for
from equilibriumd.discovery.pods import PodIdentity, cgroup_ids_for_pods, map_cgroups, scan_pod_cgroups, uid_key

from .fakeapi import FakeAPIServer
from .objects import pod

UID_A = "0b6f3c2e-5a1d-4e8f-9b7a-1c2d3e4f5a6b"
UID_B = "7f00aa11-2b3c-4d5e-8f90-a1b2c3d4e5f6"
UID_C = "c0ffee00-1111-2222-3333-444455556666"
STATIC_HASH = "6c1f4b0e9a8d7c6b5a4f3e2d1c0b9a88"
CID = "4b1a" * 16  # a container id: 64 hex digits


def _v2(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    return root


def _mk(root: Path, rel: str) -> int:
    p = root / rel
    p.mkdir(parents=True, exist_ok=True)
    return os.stat(p).st_ino


PODS = [pod("gateway-7d9f-abcde", UID_A), pod("bus-5c8b-fghij", UID_B, ns="transit"),
        pod("kube-apiserver-node-a", "d2c1b0a9-8877-6655-4433-221100ffeedd", ns="kube-system", mirror=STATIC_HASH)]


def test_systemd_driver_v2(tmp_path: Path) -> None:
    root = _v2(tmp_path / "cg")
    ua, ub = UID_A.replace("-", "_"), UID_B.replace("-", "_")
    pod_a = _mk(root, "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod%s.slice" % ua)
    ctr_a = _mk(root, "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod%s.slice/"
                      "cri-containerd-%s.scope" % (ua, CID))
    ctr_b = _mk(root, "kubepods.slice/kubepods-pod%s.slice/crio-%s.scope" % (ub, CID))  # Guaranteed QoS
    nested = _mk(root, "kubepods.slice/kubepods-pod%s.slice/crio-%s.scope/container" % (ub, CID))
    other = _mk(root, "system.slice/containerd.service")
    _mk(root, "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod%s.slice/x.scope"
        % UID_C.replace("-", "_"))  # a pod the API does not list (just deleted): unnamed
    m = map_cgroups(PODS, str(root))
    assert m[pod_a] == m[ctr_a] == "urbanmove/gateway-7d9f-abcde"
    assert m[ctr_b] == m[nested] == "transit/bus-5c8b-fghij"
    assert other not in m and set(m.values()) == {"urbanmove/gateway-7d9f-abcde", "transit/bus-5c8b-fghij"}


def test_cgroupfs_driver_v2(tmp_path: Path) -> None:
    root = _v2(tmp_path / "cg")
    ctr_a = _mk(root, "kubepods/burstable/pod%s/%s" % (UID_A, CID))
    pause_a = _mk(root, "kubepods/burstable/pod%s/%s" % (UID_A, "9" * 64))
    ctr_b = _mk(root, "kubepods/pod%s/%s" % (UID_B, CID))
    static = _mk(root, "kubepods/burstable/pod%s/%s" % (STATIC_HASH, CID))
    m = map_cgroups(PODS, str(root))
    assert m[ctr_a] == m[pause_a] == "urbanmove/gateway-7d9f-abcde"
    assert m[ctr_b] == "transit/bus-5c8b-fghij"
    assert m[static] == "kube-system/kube-apiserver-node-a"  # static pod, named through its mirror


def test_cgroup_v1_hybrid_uses_the_unified_hierarchy(tmp_path: Path) -> None:
    """On a v1 node BPF reports v2 ids: those of /sys/fs/cgroup/unified, where
    systemd and runc mirror the tree. The v1 controller trees are not ids BPF sees."""
    root = tmp_path / "cg"
    v1_memory = _mk(root, "memory/kubepods/burstable/pod%s/%s" % (UID_A, CID))
    _v2(root / "unified")
    unified = _mk(root, "unified/kubepods/burstable/pod%s/%s" % (UID_A, CID))
    unified_sd = _mk(root, "unified/kubepods.slice/kubepods-pod%s.slice/docker-%s.scope"
                     % (UID_B.replace("-", "_"), CID))
    assert cgroup2_root(str(root)) == str(root / "unified")
    m = map_cgroups(PODS, str(root))
    assert m[unified] == "urbanmove/gateway-7d9f-abcde" and m[unified_sd] == "transit/bus-5c8b-fghij"
    assert v1_memory not in m


def test_pure_cgroup_v1_names_nobody(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    _mk(root, "memory/kubepods/burstable/pod%s/%s" % (UID_A, CID))
    with pytest.raises(FileNotFoundError):
        cgroup2_root(str(root))
    assert map_cgroups(PODS, str(root)) == {}


def test_nested_kubelet_in_a_container(tmp_path: Path) -> None:
    root = _v2(tmp_path / "cg")
    ctr = _mk(root, "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
                    "kubelet-kubepods-besteffort-pod%s.slice/cri-containerd-%s.scope" % (UID_A.replace("-", "_"), CID))
    assert map_cgroups(PODS, str(root))[ctr] == "urbanmove/gateway-7d9f-abcde"


def test_uid_key_and_noise() -> None:
    assert uid_key(UID_A) == uid_key(UID_A.replace("-", "_")) == UID_A.replace("-", "")
    assert uid_key("not-a-uid") is None


def test_directories_that_vanish_during_the_scan_are_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _v2(tmp_path / "cg")
    ctr = _mk(root, "kubepods/pod%s/%s" % (UID_A, CID))
    gone = root / "kubepods" / ("pod" + UID_B)
    gone.mkdir()
    real = os.scandir

    def flaky(path: str | os.PathLike[str]) -> Iterator[os.DirEntry[str]]:
        if str(path) == str(gone):
            raise FileNotFoundError(path)
        return real(path)  # type: ignore[return-value]

    monkeypatch.setattr(os, "scandir", flaky)
    assert scan_pod_cgroups(str(root))[ctr] == UID_A.replace("-", "")




def test_cgroup_ids_for_pods_asks_for_this_nodes_pods(api: FakeAPIServer, tmp_path: Path) -> None:
    root = _v2(tmp_path / "cg")
    ctr_a = _mk(root, "kubepods/burstable/pod%s/%s" % (UID_A, CID))
    ctr_c = _mk(root, "kubepods/burstable/pod%s/%s" % (UID_C, CID))
    for p in PODS:
        api.put("Pod", p)
    api.put("Pod", pod("elsewhere", UID_C, node="node-b"))  # same uid dir here, but not this node's pod
    m = cgroup_ids_for_pods("node-a", str(root), api_client=api_client_for(api.url))
    assert m[ctr_a] == "urbanmove/gateway-7d9f-abcde" and ctr_c not in m


@pytest.mark.timeout(20)
def test_pod_identity_follows_pods_and_new_containers(api: FakeAPIServer, tmp_path: Path) -> None:
    root = _v2(tmp_path / "cg")
    ctr_a = _mk(root, "kubepods/pod%s/%s" % (UID_A, CID))
    api.put("Pod", PODS[0])
    ident = PodIdentity("node-a", api_client_for(api.url), str(root), rescan_interval=60)
    ident.start()
    try:
        assert ident.pods.synced.wait(5)
        assert ident.name_of(ctr_a) == "urbanmove/gateway-7d9f-abcde"
        # a new pod: its watch event marks the map stale
        ctr_b = _mk(root, "kubepods/pod%s/%s" % (UID_B, CID))
        api.put("Pod", PODS[1])
        end = time.monotonic() + 5
        while ident.names().get(ctr_b) != "transit/bus-5c8b-fghij":
            assert time.monotonic() < end, "new pod not named"
            time.sleep(0.02)
        # a container started after the last scan is found on the first miss
        ctr_a2 = _mk(root, "kubepods/pod%s/%s" % (UID_A, "e" * 64))
        time.sleep(1.05)
        assert ident.name_of(ctr_a2) == "urbanmove/gateway-7d9f-abcde"
    finally:
        ident.stop()


@pytest.mark.root
def test_real_cgroupfs_systemd_layout(cgroup: object) -> None:
    """The same scan on real cgroup v2 directories (kernfs inodes), in a child cgroup."""
    base = Path(cgroup.path)  # type: ignore[attr-defined]
    rels = ["kubepods.slice", "kubepods.slice/kubepods-pod%s.slice" % UID_A.replace("-", "_"),
            "kubepods.slice/kubepods-pod%s.slice/cri-containerd-%s.scope" % (UID_A.replace("-", "_"), CID)]
    made = []
    try:
        for r in rels:
            (base / r).mkdir()
            made.append(base / r)
        ino = os.stat(made[-1]).st_ino
        m = map_cgroups(PODS, str(base))  # a child cgroup is a v2 directory too
        assert m[ino] == "urbanmove/gateway-7d9f-abcde"
        assert os.stat(made[0]).st_ino not in m
    finally:
        for p in reversed(made):
            p.rmdir()
