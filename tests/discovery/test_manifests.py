"""daemonset/: every manifest is valid against the Kubernetes schemas
(kubernetes-validate, strict: unknown fields fail; schemas ship in the
package, no network), the kustomization builds, the DaemonSet grants only
what the agent needs and mounts everything it opens, and the UrbanMove
example matches its standalone twin."""

from __future__ import annotations

import glob
import inspect
import ipaddress
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate  # the test extra installs it
import pytest
import yaml

from equilibriumd import config as cfg
from equilibriumd.agent import lock
from equilibriumd.cli.daemon import cli
from equilibriumd.datapath import constants, libbpf
from equilibriumd.discovery.build import ANNOTATION_ENABLED, ANNOTATION_POLICY, build_config

from .objects import endpoint_slice

REPO = Path(__file__).resolve().parents[2]
DS = REPO / "daemonset"
URBAN = DS / "examples" / "urbanmove"
#: oldest and newest Kubernetes versions the manifests must validate against
K8S_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())
NOT_OBJECTS = {"kustomization.yaml", "standalone.yaml"}


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _manifests() -> list[Path]:
    return sorted(p for p in list(DS.glob("*.yaml")) + list(URBAN.glob("*.yaml")) if p.name not in NOT_OBJECTS)


def _all(kind: str, paths: list[Path] | None = None) -> list[dict[str, Any]]:
    return [d for p in (paths or _manifests()) for d in _docs(p) if d.get("kind") == kind]


def _one(kind: str, base: Path = DS) -> dict[str, Any]:
    found = _all(kind, sorted(base.glob("*.yaml")))
    assert len(found) == 1, "%d %s objects in %s" % (len(found), kind, base)
    return found[0]


def _agent() -> dict[str, Any]:
    return _one("DaemonSet")["spec"]["template"]["spec"]["containers"][0]


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


def test_servicemonitor_selects_the_metrics_service() -> None:
    sm, svc = _one("ServiceMonitor"), _one("Service")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(sm["spec"]) <= {"selector", "namespaceSelector", "endpoints", "jobLabel"}
    sel = sm["spec"]["selector"]["matchLabels"]
    assert all(svc["metadata"]["labels"].get(k) == v for k, v in sel.items())
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [svc["metadata"]["namespace"]]
    ports = {p["name"] for p in svc["spec"]["ports"]}
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics"] and "metrics" in ports
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"


def test_networkpolicy_admits_only_prometheus_to_the_metrics_port() -> None:
    """/metrics binds 0.0.0.0 in the pod's network namespace: the NetworkPolicy is
    what keeps the rest of the cluster out. It selects the DaemonSet's pods, covers
    Ingress (so everything it does not admit is denied), and admits one peer, the
    monitoring namespace's Prometheus pods, on the container's metrics port only."""
    np_, ds = _one("NetworkPolicy"), _one("DaemonSet")
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
    ports = {p["name"]: p for p in _agent()["ports"]}
    assert rule["ports"] == [{"port": "metrics", "protocol": "TCP"}] and "metrics" in ports
    assert ports["metrics"]["containerPort"] == 9500
    addr = [a for a in _agent()["args"] if a.startswith("--metrics-addr=")]
    assert addr == ["--metrics-addr=0.0.0.0:9500"] and ds["spec"]["template"]["spec"]["hostNetwork"] is False


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
    assert sorted(k["resources"]) == sorted(p.name for p in DS.glob("*.yaml") if p.name not in NOT_OBJECTS)
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
                            "ConfigMap", "DaemonSet", "Service", "ServiceMonitor", "NetworkPolicy"])
    for o in objs:
        if o["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert o["metadata"]["namespace"] == "equilibrium", o["metadata"]
        if not o["apiVersion"].startswith("monitoring.coreos.com/"):
            kubernetes_validate.validate(o, K8S_VERSIONS[-1], strict=True)
    dash = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "equilibrium-dashboards"][0]
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert sorted(dash["data"]) == sorted(os.path.basename(p) for p in glob.glob(str(DS / "dashboards" / "*.json")))
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
    svc = _one("Service")
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
