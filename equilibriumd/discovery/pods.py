"""Caller identity: which pod on this node a cgroup id belongs to.

The datapath counts per caller cgroup (`bpf_get_current_cgroup_id()` in
connect4: the cgroup v2 id, i.e. the inode number of the caller's cgroup
directory). This module maps those ids to "namespace/pod", for
`equilibriumctl callers` and the admin API; never for Prometheus labels
(unbounded).

Kubelet puts each pod in a cgroup whose directory name carries the pod UID,
and each container in a child of it. The layouts (all seen in the wild):

    systemd driver   kubepods.slice/kubepods-burstable.slice/
                       kubepods-burstable-pod<uid with _>.slice/cri-containerd-<id>.scope
                     kubepods.slice/kubepods-pod<uid>.slice/crio-<id>.scope      (Guaranteed)
    cgroupfs driver  kubepods/burstable/pod<uid>/<container id>
                     kubepods/pod<uid>/<container id>                             (Guaranteed)
    nested (kind)    kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/...
    static pods      pod<32 hex digits>: the config hash, which the mirror pod
                     carries in its `kubernetes.io/config.mirror` annotation

With cgroup v2 these sit under the cgroup2 mount (/sys/fs/cgroup). With
cgroup v1 the ids BPF reports still come from the v2 hierarchy: on a hybrid
node that is /sys/fs/cgroup/unified, where systemd and runc mirror the same
tree; on a pure v1 node (no v2 hierarchy mounted) every process is in the
v2 root, so callers cannot be told apart and the map is empty (logged).
So the scan does not depend on the driver or the QoS nesting: it walks the
v2 tree, and every directory named `...pod<uid>[.slice]`, with everything
below it (containers, and cgroups a container made for itself), maps to
that pod.
"""

from __future__ import annotations

import os
import re
import threading
import time
from typing import Any, Iterable

from .. import logs
from ..cgroups import cgroup2_root

ANNOTATION_MIRROR = "kubernetes.io/config.mirror"
_POD_DIR = re.compile(r"^(?:[A-Za-z0-9_.:-]*-)?pod([0-9a-fA-F][0-9a-fA-F_-]{30,40}[0-9a-fA-F])(?:\.slice)?$")
MAX_DEPTH = 12  #: directories below the root that are searched (nested runtimes go deep)

log = logs.get("discovery.pods")


def uid_key(uid: str) -> str | None:
    """A pod UID as it appears in cgroup names, normalized: 32 lower-case hex digits."""
    k = re.sub(r"[-_]", "", uid).lower()
    return k if re.fullmatch(r"[0-9a-f]{32}", k) else None


def scan_pod_cgroups(root: str) -> dict[int, str]:
    """cgroup id (inode) -> pod UID key, for every pod cgroup under `root` and its descendants."""
    out: dict[int, str] = {}
    stack: list[tuple[str, int, str | None]] = [(root, 0, None)]
    while stack:
        path, depth, uid = stack.pop()
        try:
            it = os.scandir(path)
        except OSError:
            continue  # gone while we walked (a pod ended): fine
        with it:
            for e in it:
                try:
                    if not e.is_dir(follow_symlinks=False):
                        continue
                    cur = uid
                    if cur is None:
                        m = _POD_DIR.match(e.name)
                        cur = uid_key(m.group(1)) if m else None
                    if cur is not None:
                        out[e.stat(follow_symlinks=False).st_ino] = cur
                except OSError:
                    continue
                if depth + 1 < MAX_DEPTH:
                    stack.append((e.path, depth + 1, cur))
    return out


def pod_names(pods: Iterable[Any]) -> dict[str, str]:
    """UID key -> "namespace/name" for pod objects (raw API dicts); malformed ones are skipped."""
    out: dict[str, str] = {}
    for p in pods:
        md = p.get("metadata") if isinstance(p, dict) else None
        if not isinstance(md, dict) or not isinstance(md.get("name"), str) or not isinstance(md.get("uid"), str):
            continue
        name = "%s/%s" % (md.get("namespace") or "default", md["name"])
        for raw in (md["uid"], (md.get("annotations") or {}).get(ANNOTATION_MIRROR)
                    if isinstance(md.get("annotations"), dict) else None):
            k = uid_key(raw) if isinstance(raw, str) else None
            if k:
                out[k] = name
    return out


def map_cgroups(pods: Iterable[Any], cgroup_root: str | None = None) -> dict[int, str]:
    """cgroup id -> "namespace/pod" for the given pods (raw dicts) and this machine's cgroups."""
    try:
        root = cgroup2_root(cgroup_root)
    except FileNotFoundError:
        log.warning("no_cgroup2_hierarchy", cgroup_root=cgroup_root,
                    note="pure cgroup v1: BPF sees every caller in the v2 root; callers are not named")
        return {}
    names = pod_names(pods)
    return {cg: names[k] for cg, k in scan_pod_cgroups(root).items() if k in names}


def _list_node_pods(api_client: Any, node_name: str) -> list[dict[str, Any]]:
    import json

    from kubernetes import client as k8s

    items: list[dict[str, Any]] = []
    cont = None
    while True:
        kw: dict[str, Any] = {"field_selector": "spec.nodeName=%s" % node_name, "limit": 500,
                              "_preload_content": False, "_request_timeout": (10, 60)}
        if cont:
            kw["_continue"] = cont
        resp: Any = k8s.CoreV1Api(api_client).list_pod_for_all_namespaces(**kw)  # raw: _preload_content=False
        body = json.loads(resp.data)
        items += [i for i in body.get("items") or [] if isinstance(i, dict)]
        cont = (body.get("metadata") or {}).get("continue")
        if not cont:
            return items


def cgroup_ids_for_pods(node_name: str, cgroup_root: str | None = None, *, api_client: Any = None,
                        pods: Iterable[Any] | None = None) -> dict[int, str]:
    """One-shot: cgroup id -> "namespace/pod" for the pods on `node_name`.

    `pods`: raw pod dicts to use instead of asking the API server.
    `cgroup_root`: the cgroup mount (/sys/fs/cgroup); None finds the cgroup2 mount."""
    if pods is None:
        if api_client is None:
            from .client import api_client_from_env
            api_client = api_client_from_env()
        pods = _list_node_pods(api_client, node_name)
    return map_cgroups(pods, cgroup_root)


class PodIdentity:
    """Watches this node's pods and answers cgroup id -> "namespace/pod".

    The cgroup tree is rescanned lazily: when a pod was added or removed, at
    most every `rescan_interval` seconds otherwise, and on a miss (a
    container started since the last scan) at most once a second.
    """

    def __init__(self, node_name: str, api_client: Any = None, cgroup_root: str | None = None, *,
                 rescan_interval: float = 10.0, watch_timeout: int = 300) -> None:
        from kubernetes import client as k8s

        from .client import api_client_from_env
        from .reflector import Reflector

        self.node_name = node_name
        self.cgroup_root = cgroup_root
        self.rescan_interval = rescan_interval
        self.api = api_client if api_client is not None else api_client_from_env()
        self.pods = Reflector("pods", k8s.CoreV1Api(self.api).list_pod_for_all_namespaces, self._changed,
                              field_selector="spec.nodeName=%s" % node_name, watch_timeout=watch_timeout)
        self._lock = threading.Lock()
        self._map: dict[int, str] = {}
        self._scanned = 0.0
        self._stale = True

    def start(self) -> None:
        self.pods.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.pods.stop(timeout)

    def _changed(self) -> None:
        self._stale = True

    def _rescan(self) -> dict[int, str]:
        m = map_cgroups(self.pods.items(), self.cgroup_root)
        with self._lock:
            self._map, self._scanned, self._stale = m, time.monotonic(), False
        return m

    def names(self) -> dict[int, str]:
        """cgroup id -> "namespace/pod" for every pod cgroup on the node."""
        with self._lock:
            fresh = not self._stale and time.monotonic() - self._scanned < self.rescan_interval
            if fresh:
                return dict(self._map)
        return dict(self._rescan())

    def name_of(self, cgroup_id: int) -> str | None:
        m = self.names()
        if cgroup_id not in m and time.monotonic() - self._scanned >= 1.0:
            m = self._rescan()
        return m.get(cgroup_id)
