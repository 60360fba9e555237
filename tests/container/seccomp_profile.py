"""`seccompProfile: RuntimeDefault` for the container tests: the default profile of
CRI-O and podman, read at test time from Debian's golang-github-containers-common
(/usr/share/containers/seccomp.json), converted to an OCI `linux.seccomp` object.

It stands in for the node runtime's default: on a CRI-O node it is the profile;
containerd's default differs slightly (a few names, and which capability lets
bpf()/perf_event_open() through). The tests assert that a filter is installed and
that the process works under it, not the exact list.

The file's rules are conditional; a rule is kept when its `includes` match
(arch among includes.arches, every includes.caps in the container's set, the
running kernel >= includes.minKernel) and its `excludes` do not (arch among
excludes.arches, any excludes.caps in the set). Only this machine's architecture
and its sub-architectures (from archMap) are listed, as the runtimes do.
"""

from __future__ import annotations

import json
import platform
import re
from pathlib import Path
from typing import Any

import pytest

PROFILE = Path("/usr/share/containers/seccomp.json")
INSTALL_HINT = "apt-get install -y golang-github-containers-common (scripts/setup installs it)"

# uname -m -> (the profile's arch name, which is Go's GOARCH; libseccomp's native arch)
MACHINES = {
    "x86_64": ("amd64", "SCMP_ARCH_X86_64"),
    "aarch64": ("arm64", "SCMP_ARCH_AARCH64"),
    "s390x": ("s390x", "SCMP_ARCH_S390X"),
    "ppc64le": ("ppc64le", "SCMP_ARCH_PPC64LE"),
    "riscv64": ("riscv64", "SCMP_ARCH_RISCV64"),
}
# the OCI fields a syscall argument condition carries
ARG_FIELDS = ("index", "value", "valueTwo", "op")


def kernel_version(release: str) -> tuple[int, ...]:
    """'6.1.0-18-amd64' -> (6, 1, 0); the leading dotted numbers only."""
    m = re.match(r"\d+(?:\.\d+)*", release)
    if not m:
        raise ValueError("kernel release %r" % release)
    return tuple(int(x) for x in m.group(0).split("."))


def _pad(v: tuple[int, ...]) -> tuple[int, ...]:
    return (v + (0, 0, 0))[:3]


def _applies(rule: dict[str, Any], arch: str, caps: set[str], kernel: tuple[int, ...]) -> bool:
    inc, exc = rule.get("includes") or {}, rule.get("excludes") or {}
    if inc.get("arches") and arch not in inc["arches"]:
        return False
    if not set(inc.get("caps") or []) <= caps:
        return False
    if inc.get("minKernel") and _pad(kernel) < _pad(kernel_version(str(inc["minKernel"]))):
        return False
    if arch in (exc.get("arches") or []):
        return False
    return not set(exc.get("caps") or []) & caps


def _architectures(profile: dict[str, Any], native: str) -> list[str]:
    for entry in profile.get("archMap") or []:
        if entry.get("architecture") == native:
            return [native] + list(entry.get("subArchitectures") or [])
    return [native]


def convert(profile: dict[str, Any], caps: list[str], machine: str | None = None,
            kernel: tuple[int, ...] | None = None) -> dict[str, Any]:
    """The OCI `linux.seccomp` for a container with capability set `caps` ("CAP_..." names)
    on `machine` (uname -m; default: this one) running `kernel` (default: this one)."""
    machine = machine or platform.machine()
    if machine not in MACHINES:
        raise ValueError("no seccomp arch mapping for machine %r" % machine)
    arch, native = MACHINES[machine]
    kernel = kernel if kernel is not None else kernel_version(platform.release())
    have = set(caps)
    syscalls: list[dict[str, Any]] = []
    for rule in profile.get("syscalls") or []:
        if not _applies(rule, arch, have, kernel):
            continue
        out: dict[str, Any] = {"names": list(rule["names"]), "action": rule["action"]}
        if rule.get("args"):
            out["args"] = [{k: a[k] for k in ARG_FIELDS if k in a} for a in rule["args"]]
        if rule.get("errnoRet") is not None:
            out["errnoRet"] = int(rule["errnoRet"])
        syscalls.append(out)
    seccomp: dict[str, Any] = {"defaultAction": profile["defaultAction"],
                               "architectures": _architectures(profile, native),
                               "syscalls": syscalls}
    if profile.get("defaultErrnoRet") is not None:
        seccomp["defaultErrnoRet"] = int(profile["defaultErrnoRet"])
    return seccomp


def load(path: Path = PROFILE) -> dict[str, Any]:
    """The packaged profile; a missing file fails the test with the install hint."""
    if not path.is_file():
        pytest.fail("seccompProfile RuntimeDefault needs %s: %s" % (path, INSTALL_HINT))
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def runtime_default(caps: list[str]) -> dict[str, Any]:
    """RuntimeDefault for a container whose capability set is `caps`, on this machine."""
    return convert(load(), caps)
