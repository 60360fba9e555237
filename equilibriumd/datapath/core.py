"""Build and load the CO-RE programs (clang + libbpf), in the loader process only.

bcc builds the translation and telemetry programs from the kernel headers on
disk, which do not match the running kernel's struct layouts. The rebalancer
(bpf/rebalance.bpf.c) reads struct tcp_sock, so it is compiled by clang
against a `vmlinux.h` generated from the running kernel's BTF and relocated by
libbpf at load time (CO-RE). libbpf's object API opens its maps by pin name
under the same pin directory as bcc's, so both groups share eq_tel_sock and
eq_lb_be.

Everything here raises `CoreUnavailable` with the reason when a part is
missing (clang, bpftool, kernel BTF, the bpf_sock_destroy kfunc): the loader
then goes on without rebalancing and says why.
"""

from __future__ import annotations

import ctypes as ct
import os
import shutil
import subprocess
import tempfile

from . import constants, libbpf, pins

BTF = "/sys/kernel/btf/vmlinux"


class CoreUnavailable(RuntimeError):
    """The CO-RE group cannot be built or loaded here; the message says why."""


class _OpenOpts(ct.Structure):  # struct bpf_object_open_opts, libbpf 1.x (only the fields we set matter)
    _fields_ = [("sz", ct.c_size_t), ("object_name", ct.c_char_p), ("relaxed_maps", ct.c_bool),
                ("pin_root_path", ct.c_char_p), ("_attach_prog_fd", ct.c_uint32), ("kconfig", ct.c_char_p),
                ("btf_custom_path", ct.c_char_p), ("kernel_log_buf", ct.c_char_p),
                ("kernel_log_size", ct.c_size_t), ("kernel_log_level", ct.c_uint32)]


def _objlib() -> ct.CDLL:
    so = libbpf.lib()
    so.bpf_object__open_file.restype = ct.c_void_p
    so.bpf_object__open_file.argtypes = [ct.c_char_p, ct.POINTER(_OpenOpts)]
    so.bpf_object__load.argtypes = [ct.c_void_p]
    so.bpf_object__close.argtypes = [ct.c_void_p]
    so.bpf_object__find_program_by_name.restype = ct.c_void_p
    so.bpf_object__find_program_by_name.argtypes = [ct.c_void_p, ct.c_char_p]
    so.bpf_program__attach_iter.restype = ct.c_void_p
    so.bpf_program__attach_iter.argtypes = [ct.c_void_p, ct.c_void_p]
    so.bpf_program__fd.argtypes = [ct.c_void_p]
    so.bpf_link__pin.argtypes = [ct.c_void_p, ct.c_char_p]
    so.bpf_link__destroy.argtypes = [ct.c_void_p]
    so.libbpf_get_error.restype = ct.c_long
    so.libbpf_get_error.argtypes = [ct.c_void_p]
    return so


def _tool(name: str) -> str:
    path = shutil.which(name) or next((p for p in ("/usr/sbin/" + name, "/sbin/" + name) if os.path.exists(p)), None)
    if not path:
        raise CoreUnavailable("%s not found (Debian package %s; scripts/setup installs it)"
                              % (name, {"clang": "clang", "bpftool": "bpftool"}[name]))
    return path


def _run(cmd: list[str], what: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if r.returncode != 0:
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-8:])
        raise CoreUnavailable("%s failed: %s" % (what, tail))


def build(source: str, pin_dir: str, out_dir: str) -> str:
    """Compile bpf/<source> for the running kernel; returns the object's path."""
    if not os.path.exists(BTF):
        raise CoreUnavailable("the kernel exposes no BTF (%s): CONFIG_DEBUG_INFO_BTF is off" % BTF)
    if not os.path.exists("/usr/include/bpf/bpf_helpers.h"):
        raise CoreUnavailable("libbpf's headers are missing (Debian package libbpf-dev; scripts/setup installs it)")
    clang, bpftool = _tool("clang"), _tool("bpftool")
    header = os.path.join(out_dir, "vmlinux.h")
    with open(header, "w") as f:
        r = subprocess.run([bpftool, "btf", "dump", "file", BTF, "format", "c"], stdout=f,
                           stderr=subprocess.PIPE, text=True, timeout=120)
    if r.returncode != 0:
        raise CoreUnavailable("bpftool btf dump failed: %s" % r.stderr.strip()[-300:])
    obj = os.path.join(out_dir, source.replace(".c", ".o"))
    # -mcpu=v3: the atomics (fetch-and-or) and 32-bit jumps the program uses
    _run([clang, "-O2", "-g", "-target", "bpf", "-mcpu=v3", "-I", out_dir, *constants.cflags(pin_dir),
          "-c", str(constants.bpf_dir() / source), "-o", obj], "clang " + source)
    return obj


def load_iter(obj_path: str, pin_dir: str, progs: tuple[str, ...]) -> dict[str, int]:
    """Load an object of iterator programs (maps opened or created by pin name under
    pin_dir), attach each and pin its link as link_<prog>, replacing older ones.
    Returns each program's kernel id."""
    so = _objlib()
    opts = _OpenOpts(sz=ct.sizeof(_OpenOpts), pin_root_path=pin_dir.encode())
    obj = so.bpf_object__open_file(obj_path.encode(), ct.byref(opts))
    err = so.libbpf_get_error(obj)
    if err or not obj:
        raise CoreUnavailable("opening %s: %s" % (obj_path, os.strerror(-err if err else 22)))
    try:
        rc = so.bpf_object__load(obj)
        if rc:
            raise CoreUnavailable("loading %s: %s (libbpf's messages above say which part: a kfunc the "
                                  "kernel lacks needs Linux 6.5+ for bpf_sock_destroy)"
                                  % (os.path.basename(obj_path), os.strerror(-rc)))
        ids = {}
        for prog in progs:
            p = so.bpf_object__find_program_by_name(obj, prog.encode())
            if not p:
                raise CoreUnavailable("%s has no program %s" % (obj_path, prog))
            link = so.bpf_program__attach_iter(p, None)
            err = so.libbpf_get_error(link)
            if err or not link:
                raise CoreUnavailable("attaching iterator %s: %s" % (prog, os.strerror(-err if err else 22)))
            try:
                lpin = pins.link_pin(pin_dir, prog)
                if os.path.exists(lpin):   # an iterator link holds no attachment: replacing it is seamless
                    os.unlink(lpin)
                rc = so.bpf_link__pin(link, lpin.encode())
                if rc:
                    raise CoreUnavailable("pinning %s: %s" % (lpin, os.strerror(-rc)))
            finally:
                so.bpf_link__destroy(link)   # the pin keeps it
            ids[prog] = libbpf.obj_id(so.bpf_program__fd(p))
        return ids
    finally:
        so.bpf_object__close(obj)


def load_rebalancer(pin_dir: str) -> dict[str, object]:
    """Build and load bpf/rebalance.bpf.c; raises CoreUnavailable."""
    with tempfile.TemporaryDirectory(prefix="equilibrium-core-") as tmp:
        obj = build(constants.REBALANCE_SOURCE, pin_dir, tmp)
        return {"programs": load_iter(obj, pin_dir, constants.REBALANCE_PROGS)}
