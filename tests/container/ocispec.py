"""An OCI runtime config (runc's config.json) derived from daemonset/daemonset.yaml.

What a kubelet + containerd would give the agent's container, from the same
fields: capabilities (drop ALL + add), privileged, allowPrivilegeEscalation,
readOnlyRootFilesystem, runAsUser, hostNetwork/hostPID, the volumes and their
mounts (propagation, readOnly), the emptyDir for /tmp, the memory limit, the
seccomp profile, the command, args and env. A field the test cannot reproduce
faithfully is refused (UnsupportedManifest), never silently dropped: if the
manifest is wrong, the container is wrong, and the test sees it.

Test-only substitutions (each said where it is made): the ConfigMap becomes a
directory holding the test's config; `--kubernetes` and `--coordinator=kubernetes`
are dropped (no API server here); `--cgroup` and `--pin-dir` point at the test's child cgroup and pin
directory; EQUILIBRIUM_PIN_DIR likewise, so nothing can touch a real node's pins.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

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


def load_agent(path: Path) -> Agent:
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") == "DaemonSet":
            pod = doc["spec"]["template"]["spec"]
            (c,) = [c for c in pod["containers"] if c["name"] == "agent"]
            return Agent(pod, c)
    raise UnsupportedManifest("%s: no DaemonSet" % path)


def cap_mask(caps: list[str]) -> int:
    return sum(1 << CAP_BITS[c] for c in caps)


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


def _env(agent: Agent, image_env: list[str], sub: Substitutions) -> dict[str, str]:
    env = dict(e.split("=", 1) for e in image_env)
    for e in agent.container.get("env") or []:
        if "value" in e:
            env[e["name"]] = str(e["value"])
        elif "fieldRef" in e.get("valueFrom", {}):
            fp = e["valueFrom"]["fieldRef"]["fieldPath"]
            if fp not in FIELD_REFS:
                raise UnsupportedManifest("env %s: fieldRef %s" % (e["name"], fp))
            env[e["name"]] = FIELD_REFS[fp]
        else:
            raise UnsupportedManifest("env %s: %r" % (e["name"], e.get("valueFrom")))
    env["EQUILIBRIUM_PIN_DIR"] = sub.pin_dir   # test-only: never the node's real pins
    return env


def _expand(s: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command and args."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), s)


def _args(agent: Agent, env: dict[str, str], sub: Substitutions) -> list[str]:
    argv = [_expand(a, env) for a in (agent.container.get("command") or []) + (agent.container.get("args") or [])]
    if not argv:
        raise UnsupportedManifest("the container has no command (the image's CMD would run --kubernetes)")
    for flag in ("--cgroup", "--pin-dir"):
        if any(a == flag or a.startswith(flag + "=") for a in argv):
            raise UnsupportedManifest("%s is set in the manifest; the test sets its own" % flag)
    # test-only: no API server, so neither discovery nor the coordinator's channel through it
    argv = [a for a in argv if a not in ("--kubernetes", "--coordinator=kubernetes")]
    if "--coordinator" in argv:
        raise UnsupportedManifest("write --coordinator=VALUE as one argument (the test drops =kubernetes)")
    return argv + ["--cgroup", sub.cgroup, "--pin-dir", sub.pin_dir]


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
    pod_sc = agent.pod.get("securityContext") or {}
    if sc.get("privileged"):
        raise UnsupportedManifest("privileged: true (the claim under test is least privilege)")
    seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type", "RuntimeDefault")
    if seccomp != "Unconfined":
        raise UnsupportedManifest("seccompProfile %s: only Unconfined is reproduced here" % seccomp)
    uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
    if uid is None:
        raise UnsupportedManifest("runAsUser unset: the image's user would apply")
    caps = ["CAP_" + c for c in agent.caps()]
    env = _env(agent, image_env, sub)
    namespaces = [{"type": t} for t in ("mount", "ipc", "uts", "cgroup")]
    if not agent.pod.get("hostPID"):
        namespaces.append({"type": "pid"})
    if not agent.pod.get("hostNetwork"):
        namespaces.append({"type": "network"})   # runc brings its loopback up, as the pod sandbox has
    resources: dict[str, Any] = {"devices": [{"allow": False, "access": "rwm"}]}
    limit = ((agent.container.get("resources") or {}).get("limits") or {}).get("memory")
    if limit:
        resources["memory"] = {"limit": _memory(limit)}
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": int(uid), "gid": int(sc.get("runAsGroup", 0))},
            "args": _args(agent, env, sub),
            "env": ["%s=%s" % kv for kv in env.items()],
            "cwd": cwd or "/",
            # containerd: bounding = effective = permitted = the set; inheritable and ambient empty
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": not sc.get("allowPrivilegeEscalation", True),
        },
        "root": {"path": rootfs, "readonly": bool(sc.get("readOnlyRootFilesystem"))},
        "hostname": "equilibrium-agent",
        "mounts": _mounts(agent, sub),
        "linux": {
            "cgroupsPath": sub.cgroups_path,
            "namespaces": namespaces,
            "resources": resources,
            "maskedPaths": MASKED,
            "readonlyPaths": READONLY,
        },
    }
