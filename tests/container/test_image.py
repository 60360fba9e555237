"""The DaemonSet's image, built here by daemonset/build-image.sh, run by runc with
exactly the DaemonSet's security context (derived from daemonset.yaml by ocispec.py):
it loads, steers real connections, serves /metrics, and equilibriumctl works inside.

What differs from Kubernetes, and why:
  * runc instead of containerd + kubelet: the same OCI runtime spec, built from the
    manifest's fields with containerd's defaults for an unprivileged container.
  * The pod's network namespace is a fresh one with only loopback (hostNetwork: false,
    as in the manifest); /metrics is read from inside it (`runc exec`), as the kubelet's
    probe would from the pod's address.
  * The programs attach to a child cgroup of this test (never the node's root), and the
    clients run in it, in the host's network namespace, against backends on 127.0.0.0/8.
  * The ConfigMap is a directory with the test's config; no --kubernetes (no API server).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from ocispec import Substitutions, UnsupportedManifest, cap_mask, load_agent, runtime_config
from runcbox import CACHE, DS, TAG, Container
from runcbox import metrics_addr as _metrics_addr
from runcbox import proc_status as _status
from runcbox import run as _run

from equilibriumd.agent.admin import socket_path
from equilibriumd.datapath import lifecycle

from helpers import Cgroup, rand_tag, write_config

# The first test builds the image (minutes on a fresh machine: mmdebstrap, pip, umoci):
# the `image` and `bundle` fixtures are in conftest.py, shared with test_coordinator_image.py.
pytestmark = [pytest.mark.root, pytest.mark.timeout(1800)]


@pytest.fixture
def container(bundle: Path, cgroup: Cgroup, pin_dir: str, tmp_path: Path) -> Iterator[Any]:
    """A factory: container(config_path, caps=None) runs the agent as the manifest says."""
    made: list[Container] = []
    subs: list[Substitutions] = []
    image_cfg = json.loads((bundle / "config.json").read_text())["process"]

    def make(config: Path, caps: list[str] | None = None) -> Container:
        agent = load_agent(DS / "daemonset.yaml")
        if caps is not None:   # an experiment: the manifest with other capabilities
            agent.container["securityContext"]["capabilities"]["add"] = caps
        cfg_dir = tmp_path / ("configmap-" + rand_tag(4))
        cfg_dir.mkdir()
        shutil.copy(config, cfg_dir / "equilibrium.yaml")
        sub = Substitutions(config_dir=str(cfg_dir), cgroup=cgroup.path, pin_dir=pin_dir,
                            cgroups_path="/eqtest-ctr-" + rand_tag(8))
        subs.append(sub)
        spec = runtime_config(agent, image_cfg.get("env", []), image_cfg.get("cwd", "/"),
                              str(bundle / "rootfs"), sub)
        c = Container(bundle, spec, tmp_path / ("container-%d.log" % len(made)))
        made.append(c)
        return c

    try:
        yield make
    finally:
        for c in made:
            c.stop()
        if os.path.exists(socket_path(pin_dir)):   # the agent's admin socket, on the host's /run
            os.unlink(socket_path(pin_dir))
        for s in subs:
            for d in s.created:
                try:
                    os.rmdir(d)
                except OSError:
                    pass


def _cgroup_progs(path: str) -> set[str]:
    out = _run("bpftool", "-j", "cgroup", "show", path).stdout
    return {p["attach_type"] for p in json.loads(out or "[]")}


def test_the_image_runs_the_agent_with_exactly_the_daemonsets_privileges(
        container: Any, cgroup: Cgroup, pin_dir: str, tmp_path: Path, frontend_ip: str, testbed: Any) -> None:
    tb = testbed(3)   # HTTP backends: the telemetry programs count HTTP/1.x requests
    cfg = write_config(tmp_path / "c.yaml", [{"name": "web", "frontend": frontend_ip + ":80",
                                              "backends": [{"address": a} for a in tb.addrs]}])
    agent = load_agent(DS / "daemonset.yaml")
    c = container(cfg)
    c.wait_event("running", timeout=240)   # bcc compiles the programs at start, in the container

    # loads: the programs are attached to the test's child cgroup, and pinned
    assert {"cgroup_inet4_connect", "cgroup_udp4_sendmsg"} <= _cgroup_progs(cgroup.path)
    assert os.path.isdir(pin_dir) and os.listdir(pin_dir)

    # steers: real connections from a client in the child cgroup reach the backends
    # (nothing listens on the frontend: an answer means the connect was rewritten)
    with cgroup.enter():
        for _ in range(30):
            with socket.create_connection((frontend_ip, 80), timeout=5) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                reply = b""
                while chunk := s.recv(4096):
                    reply += chunk
                assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    time.sleep(0.6)  # a few ticks

    # least privilege: the agent's capabilities are exactly the manifest's, nothing more
    st = _status(c.pid())
    want = cap_mask(agent.caps())
    assert int(st["CapEff"], 16) == want and int(st["CapPrm"], 16) == want, (st["CapEff"], hex(want))
    assert int(st["CapBnd"], 16) == want and int(st["CapInh"], 16) == 0 and int(st["CapAmb"], 16) == 0
    assert st["NoNewPrivs"].strip() == ("0" if agent.security.get("allowPrivilegeEscalation", True) else "1")
    assert st["Uid"].split()[0] == str(agent.security["runAsUser"])
    # ...and a process exec'd into the container gets the same (runc exec keeps the spec's)
    r = c.exec("sh", "-c", "grep CapEff /proc/self/status")
    assert r.returncode == 0 and int(r.stdout.split()[1], 16) == want, r.stdout + r.stderr
    # read-only root: writing to / fails; /tmp (the emptyDir) and /run/equilibrium are writable
    r = c.exec("sh", "-c", "touch /eqtest-write")
    assert r.returncode != 0 and "Read-only file system" in r.stderr, r.stderr
    assert c.exec("sh", "-c", "touch /tmp/x && rm /tmp/x").returncode == 0
    # the host's read-only mounts stay read-only inside
    r = c.exec("sh", "-c", "mkdir /sys/fs/cgroup/unified/eqtest-nope || mkdir /sys/fs/cgroup/eqtest-nope")
    assert r.returncode != 0, "the cgroup hierarchy must be read-only in the container"

    # /metrics, from inside the pod's network namespace (where the kubelet's probe goes)
    host, port = _metrics_addr(agent.container["args"])
    r = c.exec("python3", "-c", "import urllib.request,sys; sys.stdout.write(urllib.request.urlopen("
               "'http://%s:%d/metrics', timeout=10).read().decode())" % (host, port))
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("equilibrium_")]
    assert lines and any('service="web"' in ln for ln in lines), r.stdout[:2000]

    # equilibriumctl inside the container: the agent through its admin socket, the pins
    r = c.exec("equilibriumctl", "status", "-o", "json", "--pin-dir", pin_dir)
    assert r.returncode == 0, r.stderr
    st_json = json.loads(r.stdout)
    assert st_json["services"][0]["name"] == "web" and st_json["agent"]["map_errors_total"] == 0
    r = c.exec("equilibriumctl", "backends", "web", "-o", "json", "--pin-dir", pin_dir)
    assert r.returncode == 0, r.stderr
    bes = json.loads(r.stdout)["backends"]
    assert sum(b["requests_total"] for b in bes) == 30, bes   # the telemetry programs work too
    assert sum(1 for b in bes if b["requests_total"]) >= 2, bes  # spread over the backends

    # the agent stops cleanly on the kubelet's SIGTERM
    _run("runc", "kill", c.id, "TERM")
    assert c.proc.wait(timeout=30) == 0, c.log.read_text()[-3000:]
    # nothing failed on the way, and the image could build and load the rebalancer
    # (clang, libbpf-dev, bpftool and the node's BTF, with this capability set)
    bad = [e for e in c.events() if e.get("level") == "error" or e.get("event") == "rebalance_unavailable"]
    assert not bad, bad


def test_the_manifest_is_refused_where_the_test_could_not_reproduce_it() -> None:
    """ocispec refuses what it cannot run faithfully, instead of dropping it."""
    agent = load_agent(DS / "daemonset.yaml")
    sub = Substitutions(config_dir="/nonexistent", cgroup="/x", pin_dir="/y", cgroups_path="/eqtest-z")
    agent.container["securityContext"]["privileged"] = True
    with pytest.raises(UnsupportedManifest, match="privileged"):
        runtime_config(agent, [], "/", "/nonexistent", sub)
    agent = load_agent(DS / "daemonset.yaml")
    agent.container["securityContext"]["capabilities"]["drop"] = []
    with pytest.raises(UnsupportedManifest, match="drop"):
        runtime_config(agent, [], "/", "/nonexistent", sub)


def test_each_listed_capability_is_needed(container: Any, tmp_path: Path, frontend_ip: str, pin_dir: str) -> None:
    """Least privilege, the other way round: without any one of the manifest's
    capabilities the agent does not start (a listed one that is not needed fails here)."""
    listed = load_agent(DS / "daemonset.yaml").caps()
    cfg = write_config(tmp_path / "c.yaml", [{"name": "web", "frontend": frontend_ip + ":80",
                                              "backends": [{"address": "127.0.0.1:9"}]}])
    for cap in listed:
        c = container(cfg, caps=[x for x in listed if x != cap])
        with pytest.raises(AssertionError, match="exited"):
            c.wait_event("running", timeout=240)
        failed = [e for e in c.events() if e.get("event") == "start_failed"]
        assert failed, "without %s: no start_failed\n%s" % (cap, c.log.read_text()[-3000:])
        c.stop()
        lifecycle.teardown(pin_dir)   # whatever the failed start pinned


def test_pin_writes_the_built_images_digest(image: tuple[str, str], tmp_path: Path) -> None:
    """build-image.sh --pin turns a tag (or an older digest) into this build's digest."""
    (tmp_path / "daemonset.yaml").write_text("      containers:\n        - name: agent\n"
                                             "          image: equilibrium/equilibriumd:0.1.0\n")
    (tmp_path / "kustomization.yaml").write_text("images:\n  - name: equilibrium/equilibriumd\n    newTag: 0.1.0\n")
    r = subprocess.run([str(DS / "build-image.sh"), "--cache", CACHE, "--pin", str(tmp_path)],
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    digest = r.stdout.split()[-1]
    # the layout's own manifest digest (not image[0]: a source edited since then rebuilds)
    index = json.loads((Path(CACHE) / "current" / "oci" / "index.json").read_text())
    refs = {m["annotations"]["org.opencontainers.image.ref.name"]: m["digest"] for m in index["manifests"]}
    assert refs == {TAG: digest}
    assert "image: equilibrium/equilibriumd@%s\n" % digest in (tmp_path / "daemonset.yaml").read_text()
    assert "    digest: %s\n" % digest in (tmp_path / "kustomization.yaml").read_text()
