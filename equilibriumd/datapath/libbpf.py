"""Thin ctypes binding to libbpf.so.1: the agent's only way into the kernel.

The agent must not import bcc (70 MB+ with LLVM); libbpf's low-level
`bpf_*` syscall wrappers are all it needs to open pinned objects, read and
write maps, and manage links. Every failure raises `BpfError` naming the
call, the object and errno.
"""

from __future__ import annotations

import ctypes as ct
import errno as _errno
import os
import platform
import struct
from functools import lru_cache
from typing import Any, Iterator, TypeVar

K = TypeVar("K", bound=ct.Structure | ct.c_uint64 | ct.c_uint32)


class BpfError(OSError):
    """A libbpf call failed; carries errno and says which call on what."""


@lru_cache(maxsize=1)
def lib() -> ct.CDLL:
    try:
        so = ct.CDLL("libbpf.so.1", use_errno=True)
    except OSError as e:  # pragma: no cover - set-up problem, reported clearly
        raise BpfError(_errno.ENOENT, "libbpf.so.1 not found: install Debian's libbpf1 (scripts/setup)") from e
    so.bpf_obj_get.argtypes = [ct.c_char_p]
    so.bpf_obj_pin.argtypes = [ct.c_int, ct.c_char_p]
    so.bpf_map_lookup_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
    so.bpf_map_update_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_uint64]
    so.bpf_map_delete_elem.argtypes = [ct.c_int, ct.c_void_p]
    so.bpf_map_get_next_key.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
    so.bpf_map_update_batch.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.POINTER(ct.c_uint32), ct.c_void_p]
    so.bpf_map_lookup_batch.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_void_p, ct.c_void_p,
                                        ct.POINTER(ct.c_uint32), ct.c_void_p]
    so.bpf_obj_get_info_by_fd.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)]
    so.bpf_link_create.argtypes = [ct.c_int, ct.c_int, ct.c_int, ct.c_void_p]
    so.bpf_link_detach.argtypes = [ct.c_int]
    so.bpf_link_update.argtypes = [ct.c_int, ct.c_int, ct.c_void_p]
    so.bpf_enable_stats.argtypes = [ct.c_int]
    so.bpf_iter_create.argtypes = [ct.c_int]
    so.libbpf_num_possible_cpus.argtypes = []
    return so


def _check(rc: int, what: str) -> int:
    if rc < 0:
        # libbpf 1.x returns -errno (and sets errno).
        err = -rc if rc < -1 else (ct.get_errno() or 1)
        raise BpfError(err, "%s: %s" % (what, os.strerror(err)))
    return rc


def obj_get(path: str) -> int:
    """Open a pinned object; returns an fd the caller closes."""
    return _check(lib().bpf_obj_get(path.encode()), "bpf_obj_get(%s)" % path)


def obj_pin(fd: int, path: str) -> None:
    _check(lib().bpf_obj_pin(fd, path.encode()), "bpf_obj_pin(%s)" % path)


def map_lookup(fd: int, key: ct._CData, value: ct._CData) -> bool:
    """Fill `value` for `key`; False when the key is absent."""
    rc = lib().bpf_map_lookup_elem(fd, ct.byref(key), ct.byref(value))
    if rc < 0:
        err = -rc if rc < -1 else ct.get_errno()
        if err == _errno.ENOENT:
            return False
        raise BpfError(err, "bpf_map_lookup_elem(fd %d): %s" % (fd, os.strerror(err)))
    return True


def map_update(fd: int, key: ct._CData, value: ct._CData, flags: int = 0) -> None:
    _check(lib().bpf_map_update_elem(fd, ct.byref(key), ct.byref(value), flags), "bpf_map_update_elem(fd %d)" % fd)


def map_delete(fd: int, key: ct._CData) -> bool:
    """Delete `key`; False when it was already absent."""
    rc = lib().bpf_map_delete_elem(fd, ct.byref(key))
    if rc < 0:
        err = -rc if rc < -1 else ct.get_errno()
        if err == _errno.ENOENT:
            return False
        raise BpfError(err, "bpf_map_delete_elem(fd %d): %s" % (fd, os.strerror(err)))
    return True


def map_keys(fd: int, key_type: type[K]) -> Iterator[K]:
    """Iterate a hash map's keys (snapshot semantics are the kernel's: best effort)."""
    prev = None
    while True:
        nxt = key_type()
        rc = lib().bpf_map_get_next_key(fd, None if prev is None else ct.byref(prev), ct.byref(nxt))
        if rc < 0:
            err = -rc if rc < -1 else ct.get_errno()
            if err == _errno.ENOENT:
                return
            raise BpfError(err, "bpf_map_get_next_key(fd %d): %s" % (fd, os.strerror(err)))
        yield nxt
        prev = nxt


def map_update_batch(fd: int, keys: Any, values: Any, count: int) -> None:
    """Write `count` entries in one syscall (arrays support it since Linux 5.6)."""
    n = ct.c_uint32(count)
    _check(lib().bpf_map_update_batch(fd, keys, values, ct.byref(n), None), "bpf_map_update_batch(fd %d)" % fd)
    if n.value != count:
        raise BpfError(_errno.EIO, "bpf_map_update_batch(fd %d): wrote %d of %d" % (fd, n.value, count))


def array_read(fd: int, value_size: int, n: int, start: int = 0) -> bytes:
    """Values of array keys [start, start + n) (per-CPU: value_size already times
    CPUs) in one batch syscall."""
    keys = (ct.c_uint32 * n)()
    values = ct.create_string_buffer(value_size * n)
    array_read_into(fd, keys, values, n, start)
    return values.raw


def array_read_into(fd: int, keys: Any, values: Any, n: int, start: int = 0) -> None:
    """Like `array_read`, into caller-owned buffers (`keys`: n u32, `values`: n values):
    what a reader that runs every tick uses, so nothing is allocated or zeroed per read."""
    out_batch = ct.c_uint32()
    count = ct.c_uint32(n)
    # the batch token is the last key already read: the kernel starts after it
    in_batch = ct.byref(ct.c_uint32(start - 1)) if start else None
    rc = lib().bpf_map_lookup_batch(fd, in_batch, ct.byref(out_batch), keys, values, ct.byref(count), None)
    if rc < 0:
        err = -rc if rc < -1 else ct.get_errno()
        if err != _errno.ENOENT:  # ENOENT: the batch reached the end of the map
            raise BpfError(err, "bpf_map_lookup_batch(fd %d): %s" % (fd, os.strerror(err)))
    if count.value != n:
        raise BpfError(_errno.EIO, "bpf_map_lookup_batch(fd %d): read %d of %d" % (fd, count.value, n))


def hash_batches(fd: int, key_size: int, value_size: int, chunk: int = 4096) -> Iterator[tuple[bytes, bytes, int]]:
    """A hash map's entries, `chunk` at a time (keys, values, count): one syscall a
    chunk, the buffers bounded by `chunk` whatever the map's size. The kernel walks
    buckets: entries added or deleted meanwhile may or may not be seen."""
    token = ct.c_uint32()   # hash maps: the batch token is a bucket index
    first = True
    while True:
        keys = ct.create_string_buffer(key_size * chunk)
        values = ct.create_string_buffer(value_size * chunk)
        count = ct.c_uint32(chunk)
        out = ct.c_uint32()
        rc = lib().bpf_map_lookup_batch(fd, None if first else ct.byref(token), ct.byref(out), keys, values,
                                        ct.byref(count), None)
        err = 0
        if rc < 0:
            err = -rc if rc < -1 else ct.get_errno()
            if err == _errno.ENOSPC and count.value == 0:   # one bucket holds more than `chunk`
                chunk *= 2
                continue
            if err != _errno.ENOENT:
                raise BpfError(err, "bpf_map_lookup_batch(fd %d): %s" % (fd, os.strerror(err)))
        if count.value:
            yield keys.raw[:key_size * count.value], values.raw[:value_size * count.value], count.value
        if err == _errno.ENOENT:
            return
        token, first = out, False


def obj_info(fd: int, size: int = 256) -> bytes:
    """Raw bpf_*_info for an fd (callers pick the fields they know)."""
    buf = ct.create_string_buffer(size)
    ln = ct.c_uint32(size)
    _check(lib().bpf_obj_get_info_by_fd(fd, buf, ct.byref(ln)), "bpf_obj_get_info_by_fd(fd %d)" % fd)
    return buf.raw[: ln.value]


def obj_id(fd: int) -> int:
    """Kernel id of a prog, map or link (second u32 in every info struct)."""
    return int.from_bytes(obj_info(fd)[4:8], "little")


def link_cgroup_id(fd: int) -> int:
    """cgroup id a cgroup bpf_link is attached to (bpf_link_info.cgroup.cgroup_id)."""
    info = obj_info(fd)
    # struct bpf_link_info { u32 type; u32 id; u32 prog_id;
    #                        union { struct { u64 cgroup_id; u32 attach_type; } cgroup; ... } }
    # The union is 8-byte aligned, so it starts at offset 16.
    return int.from_bytes(info[16:24], "little")


def link_prog_id(fd: int) -> int:
    return int.from_bytes(obj_info(fd)[8:12], "little")


def link_create(prog_fd: int, cgroup_fd: int, attach_type: int) -> int:
    return _check(lib().bpf_link_create(prog_fd, cgroup_fd, attach_type, None), "bpf_link_create")


def link_update(link_fd: int, prog_fd: int) -> None:
    """Swap the program behind a link atomically (no window without a program)."""
    _check(lib().bpf_link_update(link_fd, prog_fd, None), "bpf_link_update")


def link_detach(link_fd: int) -> None:
    """Detach now, even if other fds hold the link. Perf-event links cannot be
    detached (EOPNOTSUPP): they go when their last fd and pin are gone."""
    rc = lib().bpf_link_detach(link_fd)
    if rc == -_errno.EOPNOTSUPP:
        return
    _check(rc, "bpf_link_detach")


def iter_create(link_fd: int) -> int:
    """A new iterator instance of a pinned iterator link: reading the fd runs the
    program over the objects (sockets: of the caller's network namespace)."""
    return _check(lib().bpf_iter_create(link_fd), "bpf_iter_create")


def enable_stats() -> int:
    """Turn on BPF run-time stats (BPF_STATS_RUN_TIME) while the fd stays open."""
    return _check(lib().bpf_enable_stats(0), "bpf_enable_stats")


@lru_cache(maxsize=1)
def possible_cpus() -> int:
    """Per-CPU map values hold one slot per *possible* CPU."""
    return _check(lib().libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")


_PERF_TYPE_TRACEPOINT = 2
_PERF_ATTR_SIZE = 112  # PERF_ATTR_SIZE_VER5: every field we set is in it
_NR_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}


def tracepoint_link(prog_fd: int, tracepoint: str, tracefs: str = "/sys/kernel/tracing") -> int:
    """Attach a tracepoint program through a bpf_link (pinnable, unlike bcc's
    perf-event attachment, which dies with the loader). Returns the link fd."""
    id_path = os.path.join(tracefs, "events", tracepoint, "id")
    try:
        with open(id_path) as f:
            tp_id = int(f.read())
    except OSError as e:
        raise BpfError(e.errno or _errno.ENOENT, "tracepoint %s: %s (is tracefs mounted at %s?)"
                       % (tracepoint, e.strerror, tracefs)) from None
    attr = ct.create_string_buffer(_PERF_ATTR_SIZE)
    # type, size, config, sample_period; wakeup_events at offset 48
    struct.pack_into("=IIQQ", attr, 0, _PERF_TYPE_TRACEPOINT, _PERF_ATTR_SIZE, tp_id, 1)
    struct.pack_into("=I", attr, 48, 1)
    libc = ct.CDLL(None, use_errno=True)
    nr = _NR_PERF_EVENT_OPEN.get(platform.machine())
    if nr is None:
        raise BpfError(_errno.ENOSYS, "perf_event_open: unknown syscall number on %s" % platform.machine())
    libc.syscall.restype = ct.c_long
    # pid -1 (any), cpu 0, no group, PERF_FLAG_FD_CLOEXEC; longs: syscall() is variadic
    pfd = libc.syscall(ct.c_long(nr), attr, ct.c_long(-1), ct.c_long(0), ct.c_long(-1), ct.c_ulong(8))
    if pfd < 0:
        err = ct.get_errno()
        raise BpfError(err, "perf_event_open(%s): %s" % (tracepoint, os.strerror(err)))
    try:
        return link_create(prog_fd, pfd, 41)  # BPF_PERF_EVENT; the link keeps the event alive
    finally:
        os.close(pfd)
