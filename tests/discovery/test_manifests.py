"""daemonset/: every manifest is valid against the Kubernetes schemas
(kubernetes-validate, strict: unknown fields fail; schemas ship in the
package, no network), the kustomization builds, the DaemonSet grants only
what the agent needs and mounts everything it opens, the coordinator's
Deployment and Roles are least-privilege, the dashboard shows the
coordination metrics the code exports, and the UrbanMove example matches its
standalone twin."""

from __future__ import annotations

import glob
import inspect
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate  # the test extra installs it
import pytest
import yaml

from equilibriumd import config as cfg
from equilibriumd.agent import lock
from equilibriumd.cli.coordinate import coordinate
from equilibriumd.cli.daemon import cli
from equilibriumd.coordinator.metrics import NAMES as COORDINATOR_NAMES
from equilibriumd.datapath import constants, libbpf
from equilibriumd.discovery.build import ANNOTATION_ENABLED, ANNOTATION_POLICY, build_config
from equilibriumd.discovery.lease import DEFAULT_LEASE_NAME

from .objects import endpoint_slice

REPO = Path(__file__).resolve().parents[2]
DS = REPO / "daemonset"
COORD = DS / "coordinator"
URBAN = DS / "examples" / "urbanmove"
DASHBOARDS = sorted((DS / "dashboards").glob("*.json"))
#: oldest and newest Kubernetes versions the manifests must validate against
K8S_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())
NOT_OBJECTS = {"kustomization.yaml", "standalone.yaml"}


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _manifests() -> list[Path]:
    return sorted(p for d in (DS, COORD, URBAN) for p in d.glob("*.yaml") if p.name not in NOT_OBJECTS)


def _installed() -> list[Path]:
    """The files ../kustomization.yaml installs: daemonset/*.yaml and coordinator/*.yaml."""
    return sorted(p for d in (DS, COORD) for p in d.glob("*.yaml") if p.name not in NOT_OBJECTS)


def _all(kind: str, paths: list[Path] | None = None) -> list[dict[str, Any]]:
    return [d for p in (paths or _manifests()) for d in _docs(p) if d.get("kind") == kind]


def _one(kind: str, base: Path = DS, component: str | None = None) -> dict[str, Any]:
    """The one `kind` object in base/*.yaml (of that app.kubernetes.io/component, if given)."""
    found = [d for d in _all(kind, sorted(base.glob("*.yaml")))
             if component is None or d["metadata"]["labels"].get("app.kubernetes.io/component") == component]
    assert len(found) == 1, "%d %s objects (component %s) in %s" % (len(found), kind, component, base)
    return found[0]


def _agent() -> dict[str, Any]:
    return _one("DaemonSet")["spec"]["template"]["spec"]["containers"][0]


def _coordinator() -> dict[str, Any]:
    return _one("Deployment", COORD)


def _workload(component: str) -> dict[str, Any]:
    return _one("DaemonSet") if component == "agent" else _coordinator()


# --- schemas ----------------------------------------------------------------------

@pytest.mark.parametrize("path", _manifests(), ids=lambda p: str(p.relative_to(DS)))
def test_manifest_is_valid_against_the_kubernetes_schemas(path: Path) -> None:
    docs = _docs(path)
    assert docs, "%s holds no object" % path
    for d in docs:
        if d["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: no schema ships with kubernetes-validate; checked below
        for v in K8S_VERSIONS:
            kubernetes_validate.validate(d, v, strict=True)


@pytest.mark.parametrize("component", ["agent", "coordinator"])
def test_servicemonitor_selects_the_metrics_service(component: str) -> None:
    sm, svc = _one("ServiceMonitor", component=component), _one("Service", component=component)
    assert svc["spec"]["clusterIP"] == "None", "headless: Prometheus scrapes every pod"
    pod_labels = _workload(component)["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    others = [d for d in _all("Service", _installed()) if d["metadata"]["name"] != svc["metadata"]["name"]]
    assert all(not (d["spec"].get("selector") or {}).items() <= pod_labels.items() for d in others)
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(sm["spec"]) <= {"selector", "namespaceSelector", "endpoints", "jobLabel"}
    sel = sm["spec"]["selector"]["matchLabels"]
    assert all(svc["metadata"]["labels"].get(k) == v for k, v in sel.items())
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [svc["metadata"]["namespace"]]
    ports = {p["name"] for p in svc["spec"]["ports"]}
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics"] and "metrics" in ports
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"


@pytest.mark.parametrize("component,port", [("agent", 9500), ("coordinator", 9501)])
def test_networkpolicy_admits_only_prometheus_to_the_metrics_port(component: str, port: int) -> None:
    """/metrics binds 0.0.0.0 in the pod's network namespace: the NetworkPolicy is
    what keeps the rest of the cluster out. It selects the DaemonSet's (the
    coordinator's) pods, covers Ingress (so everything it does not admit is denied),
    and admits one peer, the monitoring namespace's Prometheus pods, on the
    container's metrics port only."""
    np_, ds = _one("NetworkPolicy", component=component), _workload(component)
    container = ds["spec"]["template"]["spec"]["containers"][0]
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    spec = np_["spec"]
    assert np_["metadata"]["namespace"] == ds["metadata"]["namespace"]
    assert spec["podSelector"]["matchLabels"] == pod_labels
    assert spec["policyTypes"] == ["Ingress"]
    [rule] = spec["ingress"]
    [peer] = rule["from"]   # namespace AND pod selector in one peer: both must match
    assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    assert peer["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}
    assert "ipBlock" not in peer
    ports = {p["name"]: p for p in container["ports"]}
    assert rule["ports"] == [{"port": "metrics", "protocol": "TCP"}] and list(ports) == ["metrics"]
    assert ports["metrics"]["containerPort"] == port
    addr = [a for a in container["args"] if a.startswith("--metrics-addr=")]
    assert addr == ["--metrics-addr=0.0.0.0:%d" % port] and ds["spec"]["template"]["spec"]["hostNetwork"] is False


def _kustomize(d: Path) -> list[dict[str, Any]]:
    if shutil.which("kubectl") is None:
        # kubectl comes with this machine image (not from Debian); elsewhere say so, in CI fail
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("kubectl (with its built-in kustomize) is not installed")
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    out = subprocess.run(["kubectl", "kustomize", str(d)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [x for x in yaml.safe_load_all(out.stdout) if x]


def test_kustomization_lists_every_file_and_every_dashboard() -> None:
    k = yaml.safe_load((DS / "kustomization.yaml").read_text())
    assert sorted(k["resources"]) == sorted(str(p.relative_to(DS)) for p in _installed())
    assert any(r.startswith("coordinator/") for r in k["resources"])
    gen = {g["name"]: g for g in k["configMapGenerator"]}["equilibrium-dashboards"]
    on_disk = sorted("dashboards/" + os.path.basename(p) for p in glob.glob(str(DS / "dashboards" / "*.json")))
    assert on_disk, "no dashboards in daemonset/dashboards/"
    assert sorted(gen["files"]) == on_disk, "add every dashboards/*.json to configMapGenerator.files"
    assert gen["options"]["labels"]["grafana_dashboard"] == "1"
    u = yaml.safe_load((URBAN / "kustomization.yaml").read_text())
    assert sorted(u["resources"]) == sorted(p.name for p in URBAN.glob("*.yaml") if p.name not in NOT_OBJECTS)


def test_kustomize_build_installs_it_all() -> None:
    objs = _kustomize(DS)
    kinds = sorted(o["kind"] for o in objs)
    assert kinds == sorted(["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap",
                            "ConfigMap", "DaemonSet", "Service", "ServiceMonitor", "NetworkPolicy",
                            # the coordinator
                            "ServiceAccount", "Role", "RoleBinding", "Role", "RoleBinding", "Deployment",
                            "PodDisruptionBudget", "Service", "ServiceMonitor", "NetworkPolicy"])
    for o in objs:
        if o["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert o["metadata"]["namespace"] == "equilibrium", o["metadata"]
        if not o["apiVersion"].startswith("monitoring.coreos.com/"):
            kubernetes_validate.validate(o, K8S_VERSIONS[-1], strict=True)
    dash = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "equilibrium-dashboards"][0]
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert sorted(dash["data"]) == sorted(os.path.basename(p) for p in glob.glob(str(DS / "dashboards" / "*.json")))
    # one image for both, pinned by the kustomization's digest (coordinator/deployment.yaml names it bare)
    images = {o["kind"]: o["spec"]["template"]["spec"]["containers"][0]["image"] for o in objs
              if o["kind"] in ("DaemonSet", "Deployment")}
    digest = [i["digest"] for i in yaml.safe_load((DS / "kustomization.yaml").read_text())["images"]
              if i["name"] == "equilibrium/equilibriumd"]
    assert images == {"DaemonSet": "equilibrium/equilibriumd@" + digest[0],
                      "Deployment": "equilibrium/equilibriumd@" + digest[0]}
    urban = _kustomize(URBAN)
    assert sorted({o["kind"] for o in urban}) == ["Deployment", "Namespace", "Service"]


def test_install_script_is_one_command_over_the_kustomization() -> None:
    text = (DS / "install.sh").read_text()
    assert os.access(DS / "install.sh", os.X_OK) and text.startswith("#!/bin/sh")
    assert subprocess.run(["sh", "-n", str(DS / "install.sh")]).returncode == 0
    assert "kubectl kustomize" in text and "apply --server-side" in text
    if shutil.which("kubectl"):
        out = subprocess.run([str(DS / "install.sh"), "--dry-run", "--image", "reg.example/eq:9"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "image: reg.example/eq:9" in out.stdout and "kind: DaemonSet" in out.stdout
        assert out.stdout.count("image: reg.example/eq:9") == 2 and "kind: Deployment" in out.stdout


# --- the DaemonSet's privileges -------------------------------------------------

ALLOWED_CAPS = {"BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN"}


def test_capabilities_drop_all_then_add_only_what_the_agent_needs_each_with_a_reason() -> None:
    sc = _agent()["securityContext"]
    assert sc.get("privileged") is False and sc["capabilities"]["drop"] == ["ALL"]
    added = sc["capabilities"]["add"]
    # SYS_ADMIN: the loader (bcc reopens pinned maps by id) and setns for the rebalancer; it
    # covers what BPF, PERFMON and NET_ADMIN would allow. tests/container/test_image.py runs the
    # image with exactly this set and shows each listed one is needed.
    assert set(added) <= ALLOWED_CAPS and "SYS_ADMIN" in added
    lines = (DS / "daemonset.yaml").read_text().splitlines()
    for cap in added:
        i = next(n for n, ln in enumerate(lines) if re.fullmatch(r"\s*- %s\s*" % cap, ln))
        j = i - 1
        while j > 0 and lines[j - 1].strip().startswith("#") and not lines[j].strip().startswith("# %s:" % cap):
            j -= 1  # to the first line of the comment block just above
        assert lines[j].strip().startswith("# %s:" % cap), "capability %s needs a comment saying why" % cap
        if cap == "SYS_ADMIN":
            assert "setns" in lines[j] and "network namespace" in " ".join(lines[j:i])
    ds_text = (DS / "daemonset.yaml").read_text()
    assert "privileged: true" not in ds_text
    assert all("privileged: true" not in p.read_text() for p in _manifests() if p.parent == DS)


def test_daemonset_scheduling_identity_and_updates() -> None:
    ds = _one("DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert pod["priorityClassName"] == "system-node-critical"
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    assert pod["serviceAccountName"] == _one("ServiceAccount")["metadata"]["name"]
    assert not pod.get("hostNetwork") and not pod.get("hostPID")
    env = {e["name"]: e for e in _agent()["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()


def test_rbac_is_read_only_services_endpointslices_pods() -> None:
    role = _one("ClusterRole")
    got = {(g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert got == {("", "services"), ("discovery.k8s.io", "endpointslices"), ("", "pods")}
    assert all(set(rule["verbs"]) <= {"get", "list", "watch"} for rule in role["rules"])
    binding, sa = _one("ClusterRoleBinding"), _one("ServiceAccount")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": sa["metadata"]["namespace"]}]


def test_agent_arguments_are_options_of_equilibriumd_run_and_match_the_ports() -> None:
    c = _agent()
    assert c["command"] == ["equilibriumd"] and c["args"][0] == "run"
    known = {o for p in cli.commands["run"].params for o in p.opts}  # type: ignore[attr-defined]
    for a in c["args"][1:]:
        assert a.split("=", 1)[0] in known, "%s is not an option of `equilibriumd run`" % a
    assert "--kubernetes" in c["args"]
    assert not any(a.startswith("--cgroup") for a in c["args"]), "--cgroup must default to the node's cgroup2 root"
    metrics = [a.split("=", 1)[1] for a in c["args"] if a.startswith("--metrics-addr=")][0]
    port = {p["name"]: p["containerPort"] for p in c["ports"]}["metrics"]
    assert metrics.endswith(":%d" % port)
    svc = _one("Service", component="agent")
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics" and svc["spec"]["ports"][0]["port"] == port
    assert svc["spec"]["selector"].items() <= _one("DaemonSet")["spec"]["template"]["metadata"]["labels"].items()


def test_config_map_is_a_valid_agent_config_at_the_path_the_agent_reads() -> None:
    c = _agent()
    path = [a.split("=", 1)[1] for a in c["args"] if a.startswith("--config=")][0]
    cm = _one("ConfigMap")
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in _one("DaemonSet")["spec"]["template"]["spec"]["volumes"]}
    mount = [m for m in mounts.values() if "configMap" in vols[m["name"]]][0]
    assert vols[mount["name"]]["configMap"]["name"] == cm["metadata"]["name"]
    key = os.path.relpath(path, mount["mountPath"])
    parsed = cfg.parse(cm["data"][key], "configmap:" + key)
    assert parsed.services == () and parsed.policy in cfg.POLICIES


# --- mounts: everything the agent opens -----------------------------------------

def _host_mounts() -> dict[str, tuple[str, bool]]:
    """container path -> (host path, read-only) for every hostPath mount."""
    pod = _one("DaemonSet")["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in pod["volumes"]}
    out = {}
    for m in _agent()["volumeMounts"]:
        hp = vols[m["name"]].get("hostPath")
        if hp:
            out[m["mountPath"]] = (hp["path"], bool(m.get("readOnly")))
    return out


def _covered(path: str, mounts: dict[str, tuple[str, bool]]) -> tuple[str, bool] | None:
    best = max((mp for mp in mounts if path == mp or path.startswith(mp.rstrip("/") + "/")), key=len, default=None)
    return mounts[best] if best else None


#: Paths the container itself provides: its own procfs and sysfs (which
#: carries /sys/kernel/btf and /sys/devices/system/cpu for libbpf), and the
#: image's clang, bpftool and libbpf headers (daemonset/Dockerfile) that build
#: the CO-RE rebalancer.
CONTAINER_OWN = ("/proc/self/", "/proc/", "/sys/kernel/btf", "/sys/devices/system/cpu", "/usr/sbin/",
                 "/usr/include/bpf/")
#: What the agent and its loader open on the host, where, and whether they write there.
AGENT_OPENS = [
    (constants.DEFAULT_PIN_DIR, True, "pinned maps and links (bpffs)"),
    (lock.RUN_DIR if lock.RUN_DIR.startswith("/run/") else "/run/equilibrium", True, "lock and admin socket"),
    (inspect.signature(libbpf.tracepoint_link).parameters["tracefs"].default + "/events", False,
     "tracepoint ids"),
    ("/sys/fs/cgroup", False, "cgroup2 root: attach point (--cgroup default) and pod cgroup scan"),
    ("/run/netns", False, "pods' network namespaces: the rebalancer enters them (setns)"),
    ("/lib/modules/RELEASE/build", False, "bcc: kernel headers of the running kernel"),
    ("/usr/src/linux-headers-RELEASE", False, "bcc: where /lib/modules/RELEASE/build points"),
]


@pytest.mark.parametrize("path,writes,why", AGENT_OPENS, ids=[a[2] for a in AGENT_OPENS])
def test_daemonset_mounts_what_the_agent_opens(path: str, writes: bool, why: str) -> None:
    m = _covered(path, _host_mounts())
    assert m is not None, "%s (%s) is not mounted from the host" % (path, why)
    host, read_only = m
    assert not (writes and read_only), "%s (%s) is written but mounted read-only" % (path, why)


def test_kernel_headers_cgroup_and_modules_are_read_only_and_bpffs_writable() -> None:
    m = _host_mounts()
    for p in ("/lib/modules", "/usr/src", "/sys/fs/cgroup", "/sys/kernel/tracing"):
        assert m[p] == (p, True), p
    assert m["/sys/fs/bpf"] == ("/sys/fs/bpf", False)
    assert m["/run/equilibrium"] == ("/run/equilibrium", False)
    env = {e["name"]: e.get("value") for e in _agent()["env"]}
    for var in ("EQUILIBRIUM_PIN_DIR", "EQUILIBRIUM_RUN_DIR"):
        mnt = _covered(env[var], m)
        assert mnt is not None and not mnt[1], "%s=%s must be on a writable host mount" % (var, env[var])


_ABS_PATH = re.compile(r"""["'](/(?:sys|run|lib|usr|var|etc|dev|proc)/[^"'\s%]*)["']""")
#: what never runs in the DaemonSet: the lab (benchmarks, test backends, demo, load generator),
#: which the image does not even hold (the wheel leaves it out; tests/test_packaging.py)
NOT_IN_AGENT = ("lab/",)


def test_every_host_path_in_the_agent_code_is_mounted_or_the_containers_own() -> None:
    """A new absolute path in the agent's code must come with a mount (or be the container's own)."""
    mounts = _host_mounts()
    pkg = REPO / "equilibriumd"
    missing = []
    for py in sorted(pkg.rglob("*.py")):
        rel = str(py.relative_to(pkg))
        if rel.startswith(NOT_IN_AGENT):
            continue
        for m in _ABS_PATH.finditer(py.read_text()):
            p = m.group(1)
            if p.startswith(CONTAINER_OWN) or _covered(p, mounts):
                continue
            missing.append("%s: %s" % (rel, p))
    assert not missing, "not mounted in daemonset.yaml: %s" % missing


# --- the coordinator (issue 15) ------------------------------------------------------

#: the Role each side of the coordinator's channel needs, and nothing else:
#: (apiGroup, resource, verb, resourceNames). Lease: leader election (get/update of
#: the one Lease, create when absent); ConfigMaps: every node's summary is listed and
#: watched, per-node recommendations are written and removed (named after nodes, so
#: not limitable by name); an agent writes its summary and reads its recommendation.
COORDINATOR_GRANTS = {
    ("coordination.k8s.io", "leases", "get", (DEFAULT_LEASE_NAME,)),
    ("coordination.k8s.io", "leases", "update", (DEFAULT_LEASE_NAME,)),
    ("coordination.k8s.io", "leases", "create", ()),
    ("", "configmaps", "list", ()),
    ("", "configmaps", "watch", ()),
    ("", "configmaps", "create", ()),
    ("", "configmaps", "update", ()),
    ("", "configmaps", "delete", ()),
}
AGENT_CHANNEL_GRANTS = {("", "configmaps", v, ()) for v in ("create", "update", "get")}


def _coordinator_container() -> dict[str, Any]:
    (c,) = _coordinator()["spec"]["template"]["spec"]["containers"]
    return c


def _grants(role: dict[str, Any]) -> set[tuple[str, str, str, tuple[str, ...]]]:
    return {(g, r, v, tuple(rule.get("resourceNames") or ())) for rule in role["rules"]
            for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def _bindings_of(sa: dict[str, Any]) -> list[dict[str, Any]]:
    """Every RoleBinding and ClusterRoleBinding in the installed manifests naming `sa`."""
    subject = {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": sa["metadata"]["namespace"]}
    return [b for kind in ("RoleBinding", "ClusterRoleBinding") for b in _all(kind, _installed())
            if subject in b["subjects"]]


def test_coordinator_runs_as_nobody_with_no_capability_and_a_read_only_root() -> None:
    pod = _coordinator()["spec"]["template"]["spec"]
    sc = _coordinator_container()["securityContext"]
    assert sc["runAsNonRoot"] is True and pod["securityContext"]["runAsNonRoot"] is True
    # numeric: the kubelet can check runAsNonRoot only against a uid, never a user name
    assert sc["runAsUser"] == pod["securityContext"]["runAsUser"] == 65534
    assert sc["capabilities"] == {"drop": ["ALL"]}, "the coordinator needs no capability"
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc.get("privileged") is False
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc.get("seccompProfile", {"type": "RuntimeDefault"}) == {"type": "RuntimeDefault"}
    assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    assert all("hostPath" not in v for v in pod.get("volumes", [])), "the coordinator needs nothing from the node"
    assert all(v.get("emptyDir") or v.get("projected") for v in pod.get("volumes", []))
    res = _coordinator_container()["resources"]
    assert res["requests"] == {"cpu": "100m", "memory": "128Mi"} and res["limits"] == {"cpu": "500m",
                                                                                       "memory": "256Mi"}


def test_coordinator_is_two_replicas_on_two_nodes_with_one_elected() -> None:
    dep = _coordinator()
    spec, pod = dep["spec"], dep["spec"]["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["replicas"] == 2 and spec["selector"]["matchLabels"].items() <= labels.items()
    assert labels["app.kubernetes.io/component"] == "coordinator"
    assert not labels.items() >= _one("DaemonSet")["spec"]["selector"]["matchLabels"].items()
    spread = pod.get("topologySpreadConstraints") or []
    anti = (pod.get("affinity") or {}).get("podAntiAffinity")
    assert any(t["topologyKey"] == "kubernetes.io/hostname"
               and t["labelSelector"]["matchLabels"].items() <= labels.items() for t in spread) or anti
    (pdb,) = _all("PodDisruptionBudget", _installed())
    assert pdb["spec"]["maxUnavailable"] == 1 and pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_coordinator_command_identity_and_metrics_port() -> None:
    c = _coordinator_container()
    assert c["command"] == ["equilibriumd"] and c["args"][:2] == ["coordinate", "--kubernetes"]
    known = {o for p in coordinate.params for o in p.opts}
    for a in c["args"][1:]:
        assert a.split("=", 1)[0] in known, "%s is not an option of `equilibriumd coordinate`" % a
    # and `equilibriumd coordinate` is what the entry point runs (main() adds it to the group)
    out = subprocess.run([sys.executable, "-m", "equilibriumd", "coordinate", "--help"], capture_output=True,
                         text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0 and "--kubernetes" in out.stdout, out.stderr
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    port = {p["name"]: p["containerPort"] for p in c["ports"]}["metrics"]
    assert port == 9501 and "--metrics-addr=0.0.0.0:%d" % port in c["args"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}, probe
    svc = _one("Service", component="coordinator")
    assert svc["spec"]["ports"] == [{"name": "metrics", "port": port, "targetPort": "metrics", "protocol": "TCP"}]
    # the kustomization's images: entry gives it the DaemonSet's digest (see test_kustomize_build_installs_it_all)
    k = yaml.safe_load((DS / "kustomization.yaml").read_text())
    assert c["image"] in [i["name"] for i in k["images"]], "name the image exactly as kustomization.yaml pins it"


def test_coordinator_account_is_bound_only_to_its_role() -> None:
    (sa,) = [d for d in _all("ServiceAccount", _installed()) if d["metadata"]["name"] == "equilibrium-coordinator"]
    assert _coordinator()["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    (binding,) = _bindings_of(sa)
    assert binding["kind"] == "RoleBinding" and binding["metadata"]["namespace"] == sa["metadata"]["namespace"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "equilibrium-coordinator"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": sa["metadata"]["namespace"]}]
    roles = {r["metadata"]["name"]: r for r in _all("Role", [COORD / "rbac.yaml"])}
    assert binding["roleRef"]["name"] in roles


@pytest.mark.parametrize("role_name,account,grants", [
    ("equilibrium-coordinator", "equilibrium-coordinator", COORDINATOR_GRANTS),
    ("equilibrium-agent-channel", "equilibrium-agent", AGENT_CHANNEL_GRANTS),
])
def test_channel_roles_grant_exactly_what_the_channel_needs(role_name: str, account: str,
                                                            grants: set[Any]) -> None:
    """Namespaced Roles (never cluster-scope), no wildcard, no Secrets; the Lease's
    get/update are limited to the one Lease by name."""
    assert not [r for r in _all("ClusterRole", _installed()) if r["metadata"]["name"] == role_name]
    (role,) = [r for r in _all("Role", [COORD / "rbac.yaml"]) if r["metadata"]["name"] == role_name]
    assert role["metadata"]["namespace"] == "equilibrium"
    got = _grants(role)
    assert got == grants
    assert not any("*" in (g, r, v) or "*" in names for g, r, v, names in got)
    assert not any(r in ("secrets", "pods/exec", "serviceaccounts/token") for _, r, _, _ in got)
    for _, r, v, names in got:
        if r == "leases" and v != "create":
            assert names == (DEFAULT_LEASE_NAME,), "%s on leases must name the Lease" % v
    (binding,) = [b for b in _all("RoleBinding", [COORD / "rbac.yaml"]) if b["roleRef"]["name"] == role_name]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": "equilibrium"}]
    # the account of that name is the one the workload runs as
    runs_as = {"equilibrium-agent": _one("DaemonSet"), "equilibrium-coordinator": _coordinator()}[account]
    assert runs_as["spec"]["template"]["spec"]["serviceAccountName"] == account


def test_agent_follows_the_coordinator_through_its_namespace() -> None:
    c = _agent()
    assert "--coordinator=kubernetes" in c["args"]
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


def test_rbac_header_says_what_rbac_cannot_limit() -> None:
    text = (COORD / "rbac.yaml").read_text()
    header = text.split("apiVersion:", 1)[0]
    assert "Not in ../kustomization.yaml" not in text
    for phrase in ("resourceNames", "ValidatingAdmissionPolicy", "equilibrium-recommendation-<node>",
                   "equilibrium-summary-<node>"):
        assert phrase in header, phrase


# --- the dashboard and the metrics the code exports ------------------------------

#: the coordination metrics (issue 15): the coordinator's (port 9501; all of
#: coordinator.metrics.NAMES are required too) and the agent's
COORDINATION_METRICS = [
    "equilibrium_coordinator_leader",
    "equilibrium_coordinator_rounds_total",
    "equilibrium_coordinator_round_seconds",
    "equilibrium_coordinator_last_round_timestamp_seconds",
    "equilibrium_coordinator_summaries",
    "equilibrium_coordinator_services_coordinated",
    "equilibrium_coordinator_recommendations_published_total",
    "equilibrium_coordinator_publish_failures_total",
    "equilibrium_coordinator_obedience_violations_total",
    "equilibrium_coordination_state",
    "equilibrium_coordination_following",
    "equilibrium_coordination_fallbacks_total",
    "equilibrium_coordination_recommendation_age_seconds",
    "equilibrium_coordination_summaries_published_total",
]
_METRIC = re.compile(r"\b(equilibrium_[a-z0-9_]+)")
#: a metric name as the code writes it: a string literal, possibly a %-template
_NAME_LITERAL = re.compile(r"""["'](equilibrium_[a-z0-9_%]+)["']""")
_SERIES_SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created")


def _dashboard_exprs() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expression) for every query, the variables' too."""
    out: list[tuple[str, str, str]] = []

    def walk(name: str, panels: list[dict[str, Any]]) -> None:
        for p in panels:
            walk(name, p.get("panels", []))
            out.extend((name, p["title"], t["expr"]) for t in p.get("targets", []) if t.get("expr"))

    for path in DASHBOARDS:
        d = json.loads(path.read_text())
        walk(path.name, d["panels"])
        for v in d.get("templating", {}).get("list", []):
            q = v.get("query")
            if isinstance(q, dict) and q.get("query"):
                out.append((path.name, "variable " + v["name"], q["query"]))
    return out


def _exported_names() -> list[re.Pattern[str]]:
    """Every metric name literal in the agent's and the coordinator's code (not the lab's),
    wherever it is defined (equilibriumd/metrics.py, the coordinator's module, ...)."""
    pkg = REPO / "equilibriumd"
    found = set()
    for py in sorted(pkg.rglob("*.py")):
        if not str(py.relative_to(pkg)).startswith(NOT_IN_AGENT):
            found.update(_NAME_LITERAL.findall(py.read_text()))
    return [re.compile(re.sub(r"%[sd]", "[a-z0-9]+", n)) for n in sorted(found)]


def _is_exported(name: str, exported: list[re.Pattern[str]]) -> bool:
    bases = [name] + [name[:-len(s)] for s in _SERIES_SUFFIXES if name.endswith(s)]
    return any(p.fullmatch(b) for p in exported for b in bases)


def test_dashboard_has_a_panel_for_every_coordination_metric() -> None:
    exprs = _dashboard_exprs()
    assert exprs
    used = {m for _, _, e in exprs for m in _METRIC.findall(e)}
    missing = [m for m in sorted(set(COORDINATION_METRICS) | set(COORDINATOR_NAMES)) if m not in used]
    assert not missing, "no dashboard panel queries %s" % missing
    rows = [p for path in DASHBOARDS for p in json.loads(path.read_text())["panels"] if p["type"] == "row"]
    assert "Coordination" in [r["title"] for r in rows]


def test_every_dashboard_metric_is_one_the_code_exports() -> None:
    """A renamed metric (or a typo) would leave a panel silently empty."""
    exported = _exported_names()
    assert any(p.pattern == "equilibrium_agent_ticks_total" for p in exported)  # the scan sees the agent's
    unknown = sorted({"%s: %s: %s" % (f, title, m) for f, title, e in _dashboard_exprs()
                      for m in _METRIC.findall(e) if not _is_exported(m, exported)})
    assert not unknown, "not exported by equilibriumd/:\n" + "\n".join(unknown)


def test_dashboard_panels_have_unique_ids_and_do_not_overlap() -> None:
    for path in DASHBOARDS:
        panels = json.loads(path.read_text())["panels"]
        ids = [p["id"] for p in panels]
        assert len(ids) == len(set(ids)), path.name
        cells: dict[tuple[int, int], str] = {}
        for p in panels:
            g = p["gridPos"]
            assert g["x"] + g["w"] <= 24, p["title"]
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    assert (x, y) not in cells, "%s overlaps %s" % (p["title"], cells[(x, y)])
                    cells[(x, y)] = p["title"]
            if p["type"] != "row":
                assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
                assert all(t["datasource"] == p["datasource"] for t in p["targets"]), p["title"]


# --- UrbanMove --------------------------------------------------------------------

URBAN_SERVICES = ["gateway", "bus", "trajet", "user", "ticket"]


def test_urbanmove_services_opt_in_with_three_replicas_each() -> None:
    paths = sorted(p for p in URBAN.glob("*.yaml") if p.name not in NOT_OBJECTS)
    svcs = {s["metadata"]["name"]: s for s in _all("Service", paths)}
    deps = {d["metadata"]["name"]: d for d in _all("Deployment", paths)}
    assert sorted(svcs) == sorted(URBAN_SERVICES) == sorted(deps)
    for name in URBAN_SERVICES:
        s, d = svcs[name], deps[name]
        assert s["metadata"]["annotations"][ANNOTATION_ENABLED] == "true"
        assert s["metadata"]["annotations"].get(ANNOTATION_POLICY, "equilibrium") in cfg.POLICIES
        assert d["spec"]["replicas"] == 3
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert s["spec"]["selector"].items() <= labels.items()
        named = {p["name"]: p["containerPort"] for c in d["spec"]["template"]["spec"]["containers"]
                 for p in c.get("ports", [])}
        for p in s["spec"]["ports"]:
            assert p["targetPort"] in named, "%s: targetPort %s is not a container port" % (name, p["targetPort"])


def test_urbanmove_in_the_cluster_is_the_standalone_topology() -> None:
    """Play the cluster: give each Service a ClusterIP and its three pods an
    EndpointSlice, run discovery's builder, and compare with standalone.yaml."""
    standalone = URBAN / "standalone.yaml"
    paths = sorted(p for p in URBAN.glob("*.yaml") if p.name not in NOT_OBJECTS)
    deps = {d["metadata"]["name"]: d for d in _all("Deployment", paths)}
    svcs, slices = [], []
    for i, s in enumerate(_all("Service", paths)):
        s = dict(s, spec=dict(s["spec"], clusterIP="10.96.0.%d" % (10 + i), clusterIPs=["10.96.0.%d" % (10 + i)]))
        svcs.append(s)
        name = s["metadata"]["name"]
        container = deps[name]["spec"]["template"]["spec"]["containers"][0]
        port = {p["name"]: p["containerPort"] for p in container["ports"]}[s["spec"]["ports"][0]["targetPort"]]
        pods = ["10.244.%d.%d" % (i, n) for n in range(1, deps[name]["spec"]["replicas"] + 1)]
        slices.append(endpoint_slice(name, name + "-x1", pods, port=port))
    res = build_config(svcs, slices, cfg.parse("tick: 0.5s\nservices: []\n"))
    assert res.errors == []
    local = cfg.load(str(standalone))
    assert sorted(s.name + ".urbanmove" for s in local.services) == sorted(s.name for s in res.config.services)
    by_name = {s.name: s for s in res.config.services}
    for s in local.services:
        k = by_name[s.name + ".urbanmove"]
        assert len(k.backends) == len(s.backends) == 3 and k.protocol == s.protocol
        assert (k.policy or res.config.policy) == local.policy_of(s)
        assert {b.address.port for b in s.backends} == {b.address.port for b in k.backends}
        assert ipaddress.ip_address(k.frontend.ip).version == s.frontend.family and k.frontend.port == s.frontend.port
