"""The coordinator's Deployment (daemonset/coordinator/deployment.yaml) run from the
image built by daemonset/build-image.sh, under runc with exactly the Deployment's
security context (derived by ocispec.py): uid/gid 65534, no capabilities, no new
privileges, a RuntimeDefault seccomp profile, a read-only root, the
emptyDir /tmp as a tmpfs of the manifest's sizeLimit, its cpu and memory limits,
POD_NAME/POD_NAMESPACE from the downward API. It leads, solves a round for two
nodes sharing a service, writes both their recommendations, serves /metrics and
stops on SIGTERM.

What differs from Kubernetes, and why:
  * runc instead of containerd + kubelet: the same OCI runtime spec, built from the
    manifest's fields with containerd's defaults for an unprivileged container.
  * RuntimeDefault is CRI-O/podman's default seccomp profile, read from Debian's
    golang-github-containers-common (seccomp_profile.py), as the stand-in for the node
    runtime's; containerd's default differs slightly, so the test asserts that a filter
    is installed and that the coordinator works under it, not the exact syscall list.
  * No API server here: the manifest's `--kubernetes` is rewritten to the coordinator's
    standalone channel `--dir /tmp/channel --interval 0.5 --ttl 2` (the same rounds, with
    files in the emptyDir for the ConfigMaps and a flock for the Lease); every other
    argument is the manifest's (--metrics-addr=0.0.0.0:9501 included). Hence no service
    account token is mounted (automountServiceAccountToken), and no /etc/hosts,
    /etc/resolv.conf or termination-log bind mounts.
  * The pod's network namespace is a fresh one with only loopback; /metrics is read
    from inside it (`runc exec`), as the kubelet's probes would from the pod's address.
  * The two nodes' agents are stood in for by a `runc exec` of the image's own Python,
    as the container's user, writing their summaries into the channel directory.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from ocispec import FIELD_REFS, Substitutions, UnsupportedManifest, load_coordinator, runtime_config
from runcbox import DS, Container, metrics_addr, proc_status, run

from equilibriumd.policy import bundle as recbundle

from helpers import rand_tag

MANIFEST = DS / "coordinator" / "deployment.yaml"
CHANNEL = "/tmp/channel"
INTERVAL, TTL = 0.5, 2.0
NODES = ("node-a", "node-b")
BES = ("10.1.0.1:80", "10.1.0.2:80", "10.1.0.3:80")

# Two agents' summaries for one service, written with the image's own package (its
# NodeSummary and DirChannel), as the container's user.
WRITE_SUMMARIES = """
import json, os, sys, time
from equilibriumd.discovery.channel_types import summary_name
from equilibriumd.discovery.localchannel import DirChannel
from equilibriumd.policy import coordination as co
ch = DirChannel(sys.argv[1], min_interval=0)
bes = tuple(sys.argv[2].split(","))
for node in sys.argv[3:]:
    s = co.NodeSummary(node, time.time(), {"web": co.ServiceSummary(bes, (40.0, 40.0, 20.0), (0.004, 0.004, 0.012))})
    print(os.getuid(), node, ch.publish(summary_name(node), json.loads(s.to_json()), "summary"))
"""
FETCH = ("import urllib.request,sys; sys.stdout.write(urllib.request.urlopen("
         "'http://%s:%d/metrics', timeout=5).read().decode())")


def _cgroup_limits(cgroups_path: str) -> tuple[int, str]:
    """(memory limit bytes, "quota period") as runc wrote them, cgroup v2 or v1."""
    v2 = Path("/sys/fs/cgroup") / cgroups_path.lstrip("/")
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        return int((v2 / "memory.max").read_text()), (v2 / "cpu.max").read_text().strip()
    mem = Path("/sys/fs/cgroup/memory") / cgroups_path.lstrip("/")
    cpu = Path("/sys/fs/cgroup/cpu") / cgroups_path.lstrip("/")
    quota, period = (cpu / "cpu.cfs_quota_us").read_text().strip(), (cpu / "cpu.cfs_period_us").read_text().strip()
    return int((mem / "memory.limit_in_bytes").read_text()), "%s %s" % (quota, period)


def _samples(text: str) -> dict[str, float]:
    """Unlabelled samples of a Prometheus text exposition."""
    out = {}
    for m in re.finditer(r"^([a-z_]+) ([-+0-9.eE]+|NaN)$", text, re.M):
        out[m.group(1)] = float(m.group(2))
    return out


@pytest.fixture
def coordinator(bundle: Path, tmp_path: Path) -> Iterator[tuple[Container, Substitutions, dict[str, Any]]]:
    """The coordinator's container as the manifest says (with the test's channel), stopped and deleted after."""
    image_cfg = json.loads((bundle / "config.json").read_text())["process"]
    pod = "equilibrium-coordinator-eqtest-" + rand_tag(5)
    sub = Substitutions(config_dir="", cgroup="", pin_dir="", cgroups_path="/eqtest-ctr-" + rand_tag(8),
                        channel_dir=CHANNEL, coordinator_args=["--interval", str(INTERVAL), "--ttl", str(TTL)],
                        field_refs={**FIELD_REFS, "metadata.name": pod, "metadata.namespace": "equilibrium"})
    spec = runtime_config(load_coordinator(MANIFEST), image_cfg.get("env", []), image_cfg.get("cwd", "/"),
                          str(bundle / "rootfs"), sub)
    c = Container(bundle, spec, tmp_path / "coordinator.log")
    try:
        yield c, sub, spec
    finally:
        c.stop()


@pytest.mark.root
@pytest.mark.timeout(1800)   # the session's first container test builds the image
def test_the_image_runs_the_coordinator_with_exactly_the_deployments_privileges(
        coordinator: tuple[Container, Substitutions, dict[str, Any]]) -> None:
    c, sub, spec = coordinator
    t0 = time.monotonic()
    manifest = load_coordinator(MANIFEST)
    sc, pod_sc = manifest.security, manifest.pod["securityContext"]
    uid, gid = sc.get("runAsUser", pod_sc.get("runAsUser")), sc.get("runAsGroup", pod_sc.get("runAsGroup"))
    assert (uid, gid) == (65534, 65534), "the test's premise: the manifest runs it as nobody"
    c.wait_event("coordinator_starting", timeout=60)
    assert spec["process"]["args"][:6] == ["equilibriumd", "coordinate", "--dir", CHANNEL, "--interval", "0.5"]

    # least privilege, from the host: nobody, no capability at all, no new privileges, seccomp filtering
    st = proc_status(c.pid())
    assert st["Uid"].split() == [str(uid)] * 4 and st["Gid"].split() == [str(gid)] * 4, (st["Uid"], st["Gid"])
    assert set(st["Groups"].split()) <= {str(gid)}, st["Groups"]   # no root group smuggled in
    for k in ("CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"):
        assert int(st[k], 16) == 0, (k, st[k])
    assert st["NoNewPrivs"].strip() == "1"
    assert st["Seccomp"].strip() == "2", st["Seccomp"]   # RuntimeDefault: a filter is installed
    # the manifest's limits, in the container's cgroup
    assert (Path("/sys/fs/cgroup/memory") / sub.cgroups_path.lstrip("/")).is_dir() or \
        (Path("/sys/fs/cgroup") / sub.cgroups_path.lstrip("/")).is_dir()
    mem, cpu = _cgroup_limits(sub.cgroups_path)
    assert (mem, cpu) == (256 << 20, "50000 100000"), (mem, cpu)

    # read-only root: writing fails because the filesystem is read-only, not for lack of
    # permission (root in the container, with no capability, owns / and still cannot)
    r = c.exec("sh", "-c", "touch /opt/eqtest-write")
    assert r.returncode != 0 and "Read-only file system" in r.stderr, r.stderr
    r = c.exec("sh", "-c", "touch /eqtest-write", user="0:0")
    assert r.returncode != 0 and "Read-only file system" in r.stderr, r.stderr
    # /tmp is the emptyDir: writable, a tmpfs of the manifest's sizeLimit
    r = c.exec("python3", "-c", "import os; s = os.statvfs('/tmp'); print(s.f_blocks * s.f_frsize)")
    assert r.returncode == 0 and int(r.stdout) == 16 << 20, r.stdout + r.stderr
    # the pod's network: loopback only
    r = c.exec("python3", "-c", "import socket; print(' '.join(n for _, n in socket.if_nameindex()))")
    assert r.returncode == 0 and r.stdout.split() == ["lo"], r.stdout + r.stderr

    # two nodes' agents publish summaries for the same service; the coordinator answers each
    r = c.exec("python3", "-c", WRITE_SUMMARIES, CHANNEL, ",".join(BES), *NODES)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(uid), NODES[0], "written", str(uid), NODES[1], "written"], r.stdout
    got: dict[str, recbundle.Unpacked] = {}
    end = time.monotonic() + 20
    while len(got) < len(NODES) and time.monotonic() < end:
        for n in NODES:
            r = c.exec("cat", "%s/equilibrium-recommendation-%s.json" % (CHANNEL, n))
            if r.returncode == 0 and n not in got:
                obj = json.loads(r.stdout)
                assert obj["channel"] == "recommendation", obj
                got[n] = recbundle.unpack(obj["payload"], n)
        time.sleep(0.2)
    assert sorted(got) == sorted(NODES), "no recommendations within 20 s:\n" + c.log.read_text()[-3000:]
    for n, u in got.items():
        assert u.errors == [] and list(u.recommendations) == ["web"], (n, u)
        rec = u.recommendations["web"]
        assert rec.backends == BES and sum(rec.weights) == pytest.approx(1.0, abs=1e-5), rec
        assert rec.expires - rec.issued == pytest.approx(TTL)     # the test's --ttl reached it
        # the identity is the downward API's pod name (POD_NAME), as with the Lease
        assert u.coordinator == sub.field_refs["metadata.name"] and u.epoch >= 1, (u.coordinator, u.epoch)
    r = c.exec("stat", "-c", "%u:%g %a", "%s/equilibrium-recommendation-%s.json" % (CHANNEL, NODES[0]))
    assert r.stdout.split()[0] == "%d:%d" % (uid, gid), r.stdout + r.stderr

    # /metrics, from inside the pod's network namespace, at the manifest's --metrics-addr
    host, port = metrics_addr(manifest.container["args"], 9501)
    assert (host, port) == ("127.0.0.1", 9501)
    m: dict[str, float] = {}
    end = time.monotonic() + 10
    while time.monotonic() < end:
        r = c.exec("python3", "-c", FETCH % (host, port))
        assert r.returncode == 0, r.stderr
        m = _samples(r.stdout)
        if m.get("equilibrium_coordinator_recommendations_published_total", 0) >= len(NODES):
            break
        time.sleep(0.3)
    assert m.get("equilibrium_coordinator_leader") == 1.0, m
    assert m.get("equilibrium_coordinator_rounds_total", 0) > 0, m
    assert m.get("equilibrium_coordinator_recommendations_published_total", 0) >= len(NODES), m
    assert m.get("equilibrium_coordinator_services_coordinated") == 1.0, m
    assert m.get("equilibrium_coordinator_publish_failures_total") == 0.0, m

    # the kubelet's SIGTERM: it stops within a few seconds, cleanly
    t_term = time.monotonic()
    r = c.exec("true")   # still alive right before
    assert r.returncode == 0
    run("runc", "kill", c.id, "TERM")
    assert c.proc.wait(timeout=5) == 0, c.log.read_text()[-3000:]
    stop_s = time.monotonic() - t_term
    events = c.events()
    stopped = [e for e in events if e.get("event") == "coordinator_stopped"]
    assert stopped and stopped[0].get("rounds", 0) > 0, events[-5:]
    bad = [e for e in events if e.get("level") in ("warning", "error", "critical")]
    assert not bad, bad
    # ...and everything is removed: the container, its bundle and its cgroup
    c.stop()
    assert run("runc", "state", c.id, check=False).returncode != 0
    assert not c.dir.exists()
    for d in ("", "unified", "memory", "cpu"):
        assert not (Path("/sys/fs/cgroup") / d / sub.cgroups_path.lstrip("/")).exists(), d
    print("coordinator: stopped %.2fs after SIGTERM; whole test %.1fs" % (stop_s, time.monotonic() - t0))


def test_the_coordinator_manifest_is_refused_where_the_test_could_not_reproduce_it() -> None:
    """ocispec refuses what it cannot run faithfully for the coordinator too."""
    sub = Substitutions(config_dir="", cgroup="", pin_dir="", cgroups_path="/eqtest-z", channel_dir=CHANNEL,
                        coordinator_args=["--interval", str(INTERVAL), "--ttl", str(TTL)])
    runtime_config(load_coordinator(MANIFEST), [], "/", "/nonexistent", sub)   # as it is: reproduced

    def refused(match: str, edit: Any) -> None:
        d = load_coordinator(MANIFEST)
        edit(d)
        with pytest.raises(UnsupportedManifest, match=match):
            runtime_config(d, [], "/", "/nonexistent", sub)

    refused("seccompProfile Localhost", lambda d: d.pod["securityContext"].update(
        seccompProfile={"type": "Localhost", "localhostProfile": "x.json"}))
    refused("fsGroup", lambda d: d.pod["securityContext"].update(fsGroup=2000))
    refused("runAsNonRoot", lambda d: (d.security.update(runAsUser=0), d.pod["securityContext"].update(runAsUser=0)))
    refused("drop", lambda d: d.security["capabilities"].update(drop=["NET_RAW"]))
    refused("ephemeral-storage", lambda d: d.container["resources"]["limits"].update({"ephemeral-storage": "1Gi"}))
    refused("emptyDir", lambda d: d.pod["volumes"][0]["emptyDir"].pop("medium"))
    refused("fieldRef", lambda d: d.container["env"].append(
        {"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}}))
    refused("--interval", lambda d: d.container["args"].append("--interval=5"))
    refused("--kubernetes", lambda d: d.container["args"].remove("--kubernetes"))
    refused("hostIPC", lambda d: d.pod.update(hostIPC=True))
