"""seccomp_profile.convert: the containers/common JSON format to an OCI `linux.seccomp`,
on a small hand-written profile (no root, no runc)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from seccomp_profile import convert, kernel_version, load

ARCH_MAP = [{"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]},
            {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]}]


def _rule(name: str, action: str = "SCMP_ACT_ALLOW", **extra: Any) -> dict[str, Any]:
    return {"names": [name], "action": action, "comment": "", "includes": {}, "excludes": {}, **extra}


PROFILE: dict[str, Any] = {
    "defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38, "archMap": ARCH_MAP,
    "syscalls": [
        _rule("read", args=None),
        _rule("personality", args=[{"index": 0, "value": 8, "valueTwo": 0, "op": "SCMP_CMP_EQ"}]),
        _rule("kexec_load", "SCMP_ACT_ERRNO", errnoRet=1, errno="EPERM"),
        _rule("arch_prctl", includes={"arches": ["amd64", "x32"]}),
        _rule("cacheflush", includes={"arches": ["arm", "arm64"]}),
        _rule("no_on_arm64", excludes={"arches": ["arm64"]}),
        _rule("bpf", includes={"caps": ["CAP_SYS_ADMIN"]}),
        _rule("bpf", "SCMP_ACT_ERRNO", excludes={"caps": ["CAP_SYS_ADMIN"]}, errnoRet=1),
        _rule("both_caps", includes={"caps": ["CAP_BPF", "CAP_PERFMON"]}),
        _rule("unless_any", excludes={"caps": ["CAP_BPF", "CAP_NET_ADMIN"]}),
        _rule("new_call", includes={"minKernel": "5.8"}),
        _rule("patch_call", includes={"minKernel": "4.14.3"}),
    ],
}


def _names(seccomp: dict[str, Any]) -> list[tuple[str, str]]:
    return [(n, s["action"]) for s in seccomp["syscalls"] for n in s["names"]]


def test_amd64_without_caps() -> None:
    s = convert(PROFILE, [], machine="x86_64", kernel=(6, 1, 0))
    assert s["defaultAction"] == "SCMP_ACT_ERRNO" and s["defaultErrnoRet"] == 38
    assert s["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    assert _names(s) == [("read", "SCMP_ACT_ALLOW"), ("personality", "SCMP_ACT_ALLOW"),
                         ("kexec_load", "SCMP_ACT_ERRNO"), ("arch_prctl", "SCMP_ACT_ALLOW"),
                         ("no_on_arm64", "SCMP_ACT_ALLOW"), ("bpf", "SCMP_ACT_ERRNO"),
                         ("unless_any", "SCMP_ACT_ALLOW"), ("new_call", "SCMP_ACT_ALLOW"),
                         ("patch_call", "SCMP_ACT_ALLOW")]
    by_name = {r["names"][0]: r for r in s["syscalls"]}
    # only OCI fields: args as given, errnoRet kept; comment/includes/excludes/errno dropped
    assert by_name["personality"] == {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                                      "args": [{"index": 0, "value": 8, "valueTwo": 0, "op": "SCMP_CMP_EQ"}]}
    assert by_name["kexec_load"] == {"names": ["kexec_load"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}
    assert by_name["read"] == {"names": ["read"], "action": "SCMP_ACT_ALLOW"}   # args: null -> none


def test_arm64_arches_and_subarches() -> None:
    s = convert(PROFILE, [], machine="aarch64", kernel=(6, 1, 0))
    assert s["architectures"] == ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]
    names = [n for n, _ in _names(s)]
    assert "cacheflush" in names and "arch_prctl" not in names and "no_on_arm64" not in names


def test_a_native_arch_missing_from_archmap_is_listed_alone() -> None:
    s = convert(PROFILE, [], machine="s390x", kernel=(6, 1, 0))
    assert s["architectures"] == ["SCMP_ARCH_S390X"]
    with pytest.raises(ValueError, match="sparc"):
        convert(PROFILE, [], machine="sparc", kernel=(6, 1, 0))


def test_caps_includes_need_all_excludes_need_any() -> None:
    admin = _names(convert(PROFILE, ["CAP_SYS_ADMIN"], machine="x86_64", kernel=(6, 1, 0)))
    assert ("bpf", "SCMP_ACT_ALLOW") in admin and ("bpf", "SCMP_ACT_ERRNO") not in admin
    one = _names(convert(PROFILE, ["CAP_BPF"], machine="x86_64", kernel=(6, 1, 0)))
    assert "both_caps" not in [n for n, _ in one]        # includes: CAP_PERFMON missing
    assert "unless_any" not in [n for n, _ in one]       # excludes: CAP_BPF present
    both = _names(convert(PROFILE, ["CAP_BPF", "CAP_PERFMON"], machine="x86_64", kernel=(6, 1, 0)))
    assert ("both_caps", "SCMP_ACT_ALLOW") in both
    net = [n for n, _ in _names(convert(PROFILE, ["CAP_NET_ADMIN"], machine="x86_64", kernel=(6, 1, 0)))]
    assert "unless_any" not in net and "both_caps" not in net


def test_min_kernel() -> None:
    def names(k: tuple[int, ...]) -> list[str]:
        return [n for n, _ in _names(convert(PROFILE, [], machine="x86_64", kernel=k))]
    assert "new_call" not in names((5, 7, 19)) and "new_call" in names((5, 8)) and "new_call" in names((5, 10, 2))
    assert "patch_call" not in names((4, 14)) and "patch_call" not in names((4, 14, 2))
    assert "patch_call" in names((4, 14, 3)) and "patch_call" in names((4, 15))
    assert kernel_version("6.18.44-fc-v657") == (6, 18, 44) and kernel_version("6.1") == (6, 1)
    with pytest.raises(ValueError):
        kernel_version("unknown")


def test_a_missing_profile_fails_with_the_install_hint(tmp_path: Path) -> None:
    with pytest.raises(pytest.fail.Exception, match="apt-get install -y golang-github-containers-common"):
        load(tmp_path / "seccomp.json")


def test_the_packaged_profile_gates_bpf_on_cap_sys_admin() -> None:
    """The Debian file itself (scripts/setup installs it): what the agent would get."""
    p = load()
    none = _names(convert(p, [], machine="x86_64", kernel=(6, 1, 0)))
    assert ("bpf", "SCMP_ACT_ERRNO") in none and ("bpf", "SCMP_ACT_ALLOW") not in none
    assert ("perf_event_open", "SCMP_ACT_ERRNO") in none and ("read", "SCMP_ACT_ALLOW") in none
    admin = _names(convert(p, ["CAP_SYS_ADMIN"], machine="x86_64", kernel=(6, 1, 0)))
    assert ("bpf", "SCMP_ACT_ALLOW") in admin and ("perf_event_open", "SCMP_ACT_ALLOW") in admin
    assert ("bpf", "SCMP_ACT_ERRNO") not in admin
