"""An OCI runtime config (runc's config.json) derived from daemonset/daemonset.yaml
(the agent) or daemonset/coordinator/deployment.yaml (the coordinator).

What a kubelet + containerd would give the agent's container, from the same
fields: capabilities (drop ALL + add), privileged, allowPrivilegeEscalation,
readOnlyRootFilesystem, runAsUser, hostNetwork/hostPID, the volumes and their
mounts (propagation, readOnly), the emptyDir for /tmp, the memory and cpu limits,
runAsGroup, runAsNonRoot, the seccomp profile (Unconfined, or RuntimeDefault: CRI-O/podman's
default profile from Debian's golang-github-containers-common as the stand-in, see
seccomp_profile.py; containerd's default differs slightly), the command, args and env. A field the test cannot reproduce
faithfully is refused (UnsupportedManifest), never silently dropped: if the
manifest is wrong, the container is wrong, and the test sees it.

Test-only substitutions (each said where it is made): the ConfigMap becomes a
directory holding the test's config; `--kubernetes` and `--coordinator=kubernetes`
are dropped (no API server here); `--cgroup` and `--pin-dir` point at the test's child cgroup and pin
directory; EQUILIBRIUM_PIN_DIR likewise, so nothing can touch a real node's pins. The
coordinator's `--kubernetes` becomes `--dir` a directory plus the test's `coordinator_args`
(its standalone mode: the same rounds over files and a flock instead of ConfigMaps and a Lease).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from seccomp_profile import runtime_default

# containerd's defaults for an unprivileged container (oci.WithDefaultSpec /
# WithMaskedPaths, WithReadonlyPaths): what the kubelet's pods get.
MASKED = ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
          "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
          "/sys/firmware", "/sys/devices/virtual/powercap"]
READONLY = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
PROPAGATION = {None: "rprivate", "None": "rprivate", "HostToContainer": "rslave", "Bidirectional": "rshared"}
CAP_BITS = {"CHOWN": 0, "DAC_OVERRIDE": 1, "DAC_READ_SEARCH": 2, "FOWNER": 3, "FSETID": 4, "KILL": 5,
            "SETGID": 6, "SETUID": 7, "SETPCAP": 8, "LINUX_IMMUTABLE": 9, "NET_BIND_SERVICE": 10,
            "NET_BROADCAST": 11, "NET_ADMIN": 12, "NET_RAW": 13, "IPC_LOCK": 14, "IPC_OWNER": 15,
            "SYS_MODULE": 16, "SYS_RAWIO": 17, "SYS_CHROOT": 18, "SYS_PTRACE": 19, "SYS_PACCT": 20,
            "SYS_ADMIN": 21, "SYS_BOOT": 22, "SYS_NICE": 23, "SYS_RESOURCE": 24, "SYS_TIME": 25,
            "SYS_TTY_CONFIG": 26, "MKNOD": 27, "LEASE": 28, "AUDIT_WRITE": 29, "AUDIT_CONTROL": 30,
            "SETFCAP": 31, "MAC_OVERRIDE": 32, "MAC_ADMIN": 33, "SYSLOG": 34, "WAKE_ALARM": 35,
            "BLOCK_SUSPEND": 36, "AUDIT_READ": 37, "PERFMON": 38, "BPF": 39, "CHECKPOINT_RESTORE": 40}
# The downward API values this test can stand in for.
FIELD_REFS = {"spec.nodeName": "eqtest-node", "status.podIP": "127.0.0.1", "metadata.name": "equilibrium-agent-eqtest",
              "metadata.namespace": "equilibrium"}
# What this test reproduces of a securityContext; anything else set is refused.
POD_SECURITY = {"runAsNonRoot", "runAsUser", "runAsGroup", "seccompProfile"}
CONTAINER_SECURITY = POD_SECURITY | {"privileged", "allowPrivilegeEscalation", "readOnlyRootFilesystem", "capabilities"}


class UnsupportedManifest(ValueError):
    """A manifest field this test cannot reproduce faithfully."""


@dataclass
class Agent:
    """The agent's container and pod spec, as the manifest says."""

    pod: dict[str, Any]
    container: dict[str, Any]

    @property
    def security(self) -> dict[str, Any]:
        sc: dict[str, Any] = self.container.get("securityContext") or {}
        return sc

    def caps(self) -> list[str]:
        c = self.security.get("capabilities") or {}
        if c.get("drop") != ["ALL"]:
            raise UnsupportedManifest("capabilities.drop must be [ALL] (got %r)" % c.get("drop"))
        added = [str(a).upper().removeprefix("CAP_") for a in c.get("add") or []]
        for a in added:
            if a not in CAP_BITS:
                raise UnsupportedManifest("capabilities.add: unknown capability %r" % a)
        return added


def load_agent(path: Path, kind: str = "DaemonSet", container: str = "agent") -> Agent:
    """The pod spec of the manifest's `kind` and its container named `container`."""
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") == kind:
            pod = doc["spec"]["template"]["spec"]
            (c,) = [c for c in pod["containers"] if c["name"] == container]
            return Agent(pod, c)
    raise UnsupportedManifest("%s: no %s" % (path, kind))


def load_coordinator(path: Path) -> Agent:
    return load_agent(path, "Deployment", "coordinator")


def cap_mask(caps: list[str]) -> int:
    return sum(1 << CAP_BITS[c] for c in caps)


def _cpu_millis(q: str) -> int:
    m = re.fullmatch(r"(\d+)(m)?", q)
    if not m:
        raise UnsupportedManifest("cpu quantity %r" % q)
    return int(m.group(1)) * (1 if m.group(2) else 1000)


def _memory(q: str) -> int:
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi)?", q)
    if not m:
        raise UnsupportedManifest("memory quantity %r" % q)
    return int(m.group(1)) * {None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}[m.group(2)]


@dataclass
class Substitutions:
    """What the test puts in place of the cluster."""

    config_dir: str          # stands in for the ConfigMap volume
    cgroup: str              # the test's child cgroup (--cgroup)
    pin_dir: str             # the test's pin directory (--pin-dir, EQUILIBRIUM_PIN_DIR)
    cgroups_path: str        # the container's own cgroup (runc creates and removes it)
    created: list[str] = field(default_factory=list)   # DirectoryOrCreate dirs made on the host
    channel_dir: str = ""    # the coordinator: its `--kubernetes` becomes `--dir channel_dir`
    coordinator_args: list[str] = field(default_factory=list)   # ...followed by these (e.g. --interval)
    field_refs: dict[str, str] = field(default_factory=lambda: dict(FIELD_REFS))   # the downward API


def _env(agent: Agent, image_env: list[str], sub: Substitutions) -> dict[str, str]:
    env = dict(e.split("=", 1) for e in image_env)
    for e in agent.container.get("env") or []:
        if "value" in e:
            env[e["name"]] = str(e["value"])
        elif "fieldRef" in e.get("valueFrom", {}):
            fp = e["valueFrom"]["fieldRef"]["fieldPath"]
            if fp not in sub.field_refs:
                raise UnsupportedManifest("env %s: fieldRef %s" % (e["name"], fp))
            env[e["name"]] = sub.field_refs[fp]
        else:
            raise UnsupportedManifest("env %s: %r" % (e["name"], e.get("valueFrom")))
    if sub.pin_dir:
        env["EQUILIBRIUM_PIN_DIR"] = sub.pin_dir   # test-only: never the node's real pins
    return env


def _expand(s: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command and args."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), s)


def _args(agent: Agent, env: dict[str, str], sub: Substitutions) -> list[str]:
    argv = [_expand(a, env) for a in (agent.container.get("command") or []) + (agent.container.get("args") or [])]
    if not argv:
        raise UnsupportedManifest("the container has no command (the image's CMD would run --kubernetes)")
    if "coordinate" in argv:
        return _coordinator_args(argv, sub)
    for flag in ("--cgroup", "--pin-dir"):
        if any(a == flag or a.startswith(flag + "=") for a in argv):
            raise UnsupportedManifest("%s is set in the manifest; the test sets its own" % flag)
    # test-only: no API server, so neither discovery nor the coordinator's channel through it
    argv = [a for a in argv if a not in ("--kubernetes", "--coordinator=kubernetes")]
    if "--coordinator" in argv:
        raise UnsupportedManifest("write --coordinator=VALUE as one argument (the test drops =kubernetes)")
    return argv + ["--cgroup", sub.cgroup, "--pin-dir", sub.pin_dir]


def _coordinator_args(argv: list[str], sub: Substitutions) -> list[str]:
    """test-only: the standalone channel (a directory) in place of the API server's."""
    if argv.count("--kubernetes") != 1 or not sub.channel_dir:
        raise UnsupportedManifest("the coordinator: expected one --kubernetes and a channel_dir to put in its place")
    extra = ["--dir", sub.channel_dir] + sub.coordinator_args
    for flag in (a.split("=", 1)[0] for a in extra if a.startswith("--")):
        if any(a == flag or a.startswith(flag + "=") for a in argv):
            raise UnsupportedManifest("%s is set in the manifest; the test sets its own" % flag)
    i = argv.index("--kubernetes")
    return argv[:i] + extra + argv[i + 1:]


def _resources(agent: Agent) -> dict[str, Any]:
    """The limits as the kubelet writes them to the container's cgroup."""
    resources: dict[str, Any] = {"devices": [{"allow": False, "access": "rwm"}]}
    limits = (agent.container.get("resources") or {}).get("limits") or {}
    unknown = set(limits) - {"memory", "cpu"}
    if unknown:
        raise UnsupportedManifest("resources.limits: %s" % sorted(unknown))
    if limits.get("memory"):
        resources["memory"] = {"limit": _memory(str(limits["memory"]))}
    if limits.get("cpu"):
        # the kubelet: CFS quota = millicores x period / 1000, period 100 ms
        resources["cpu"] = {"quota": _cpu_millis(str(limits["cpu"])) * 100, "period": 100000}
    return resources


def _seccomp(agent: Agent, caps: list[str]) -> dict[str, Any] | None:
    sc, pod_sc = agent.security, agent.pod.get("securityContext") or {}
    # unset is the kubelet's --seccomp-default, a node setting: not reproduced
    seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type", "(unset)")
    if seccomp == "Unconfined":
        return None
    if seccomp == "RuntimeDefault":
        try:
            return runtime_default(caps)
        except ValueError as e:
            raise UnsupportedManifest("seccompProfile RuntimeDefault: %s" % e) from None
    raise UnsupportedManifest("seccompProfile %s: only Unconfined and RuntimeDefault are reproduced here" % seccomp)


def _identity(agent: Agent) -> tuple[int, int]:
    sc, pod_sc = agent.security, agent.pod.get("securityContext") or {}
    for where, d, known in (("pod", pod_sc, POD_SECURITY), ("container", sc, CONTAINER_SECURITY)):
        if set(d) - known:
            raise UnsupportedManifest("%s securityContext: %s" % (where, sorted(set(d) - known)))
    for f, default in (("hostIPC", False), ("shareProcessNamespace", False), ("hostUsers", True)):
        if agent.pod.get(f, default) != default:
            raise UnsupportedManifest("%s: %r" % (f, agent.pod[f]))
    uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
    if uid is None:
        raise UnsupportedManifest("runAsUser unset: the image's user would apply")
    # unset runAsGroup is the image's group for the user (containerd): the test uses 0
    gid = sc.get("runAsGroup", pod_sc.get("runAsGroup", 0))
    if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) and int(uid) == 0:
        raise UnsupportedManifest("runAsNonRoot with runAsUser 0: the kubelet would not start it")
    return int(uid), int(gid)


def _mounts(agent: Agent, sub: Substitutions) -> list[dict[str, Any]]:
    sc = agent.security
    privileged = bool(sc.get("privileged"))
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        # kubelet/containerd: sysfs read-only unless privileged
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "rw" if privileged else "ro"]},
    ]
    volumes = {v["name"]: v for v in agent.pod.get("volumes") or []}
    for vm in agent.container.get("volumeMounts") or []:
        v = volumes.get(vm["name"])
        if v is None:
            raise UnsupportedManifest("volumeMount %s: no such volume" % vm["name"])
        if vm.get("subPath"):
            raise UnsupportedManifest("volumeMount %s: subPath" % vm["name"])
        ro = bool(vm.get("readOnly"))
        prop = vm.get("mountPropagation")
        if prop not in PROPAGATION:
            raise UnsupportedManifest("volumeMount %s: mountPropagation %r" % (vm["name"], prop))
        if prop == "Bidirectional" and not privileged:
            raise UnsupportedManifest("volumeMount %s: Bidirectional needs privileged" % vm["name"])
        dest = vm["mountPath"]
        if "hostPath" in v:
            src = v["hostPath"]["path"]
            kind = v["hostPath"].get("type", "")
            if kind == "DirectoryOrCreate" and not os.path.exists(src):
                os.makedirs(src, mode=0o755)
                sub.created.append(src)
            elif kind in ("Directory", "DirectoryOrCreate") and not os.path.isdir(src):
                raise UnsupportedManifest("hostPath %s (%s) is not a directory on this host" % (src, kind))
            elif kind not in ("Directory", "DirectoryOrCreate"):
                raise UnsupportedManifest("hostPath %s: type %r" % (src, kind))
            opts = ["rbind", PROPAGATION[prop]] + (["ro"] if ro else [])
            mounts.append({"destination": dest, "type": "bind", "source": src, "options": opts})
        elif "configMap" in v:
            # test-only: the ConfigMap's files, from a directory the test wrote (kubelet mounts them ro)
            mounts.append({"destination": dest, "type": "bind", "source": sub.config_dir,
                           "options": ["rbind", "rprivate", "ro"]})
        elif "emptyDir" in v:
            ed = v["emptyDir"] or {}
            if ed.get("medium") != "Memory":
                raise UnsupportedManifest("emptyDir %s: only medium Memory (a tmpfs) is reproduced" % vm["name"])
            opts = ["nosuid", "nodev", "mode=1777"] + (["ro"] if ro else [])
            if ed.get("sizeLimit"):
                opts.append("size=%d" % _memory(ed["sizeLimit"]))
            mounts.append({"destination": dest, "type": "tmpfs", "source": "tmpfs", "options": opts})
        else:
            raise UnsupportedManifest("volume %s: kind %s" % (vm["name"], sorted(v)))
    return mounts


def runtime_config(agent: Agent, image_env: list[str], cwd: str, rootfs: str, sub: Substitutions) -> dict[str, Any]:
    sc = agent.security
    if sc.get("privileged"):
        raise UnsupportedManifest("privileged: true (the claim under test is least privilege)")
    uid, gid = _identity(agent)
    caps = ["CAP_" + c for c in agent.caps()]
    seccomp = _seccomp(agent, caps)
    env = _env(agent, image_env, sub)
    namespaces = [{"type": t} for t in ("mount", "ipc", "uts", "cgroup")]
    if not agent.pod.get("hostPID"):
        namespaces.append({"type": "pid"})
    if not agent.pod.get("hostNetwork"):
        namespaces.append({"type": "network"})   # runc brings its loopback up, as the pod sandbox has
    linux: dict[str, Any] = {
        "cgroupsPath": sub.cgroups_path,
        "namespaces": namespaces,
        "resources": _resources(agent),
        "maskedPaths": MASKED,
        "readonlyPaths": READONLY,
    }
    if seccomp is not None:
        linux["seccomp"] = seccomp
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": uid, "gid": gid},
            "args": _args(agent, env, sub),
            "env": ["%s=%s" % kv for kv in env.items()],
            "cwd": cwd or "/",
            # containerd: bounding = effective = permitted = the set; inheritable and ambient empty
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": not sc.get("allowPrivilegeEscalation", True),
        },
        "root": {"path": rootfs, "readonly": bool(sc.get("readOnlyRootFilesystem"))},
        "hostname": sub.field_refs["metadata.name"],   # the kubelet: the pod's name
        "mounts": _mounts(agent, sub),
        "linux": linux,
    }
