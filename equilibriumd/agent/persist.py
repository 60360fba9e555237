"""The agent's learned state on disk, so that a restarted agent resumes from what
it learned instead of even weights.

What: `Router.learned` (every equilibrium engine's regrets, latency and error
estimates, beliefs, quarantine, weights, slow-start ages, toll fits and
convergence detectors, keyed by (service, backend address)), written every
`every` seconds and at a clean shutdown, read once at start after the pinned
datapath is adopted (`Router.resume`). A kill -9 loses at most `every` seconds.

Where: bpffs holds only BPF objects, so not next to the pins. The default is
next to the agent's lock, `/run/equilibrium/agent-<pin dir hash>.state`
(`default_path`): the DaemonSet already mounts /run/equilibrium from the host,
so the file outlives a container restart, a pod replacement and an upgrade;
and /run is a tmpfs, so it lives exactly as long as the pins (a reboot empties
both: a new boot starts from even weights on a new datapath), and a save costs
no disk I/O. `--state-file` moves it (e.g. under /var/lib to keep it across
reboots); `off` disables it.

Format (VERSION 1): an uncompressed .npz, read without pickle: `meta` is
UTF-8 JSON (format, version, save time, per policy its constants, services and
entry addresses); the arrays are `p<k>.cell.<name>` (one value per entry, the
entry axis last) and `p<k>.row.<name>` (one per service). A write is atomic
(temporary file in the same directory, fsync, rename, fsync of the directory):
a crash leaves the old file or the new one, never half of one. A file that
is larger than MAX_BYTES, truncated, corrupt, of another format or version,
or inconsistent is logged (`state_ignored`) and ignored: the agent starts
fresh, and what it learns in memory is never touched by a bad file.
"""

from __future__ import annotations

import io
import json
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .lock import lock_path
from .routing import LearnedPart, Router

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

FORMAT = "equilibriumd-learned-state"
VERSION = 1
#: a state file is refused above this size (a node's limit of 65,536 backends
#: takes ~6 MB; this bounds what a foreign file can make the agent read)
MAX_BYTES = 64 << 20
#: seconds between saves: what a kill -9 can lose
SAVE_EVERY = 10.0


class StateError(ValueError):
    """A state file that cannot be used (says why)."""


@dataclass
class Saved:
    """A decoded state file."""

    saved_unix: float
    parts: dict[str, LearnedPart]


def default_path(pin_dir: str) -> str:
    """Next to the pin directory's lock (same hash): /run/equilibrium/agent-<hash>.state."""
    return os.path.splitext(lock_path(pin_dir))[0] + ".state"


# --- the format -----------------------------------------------------------------
def encode(parts: dict[str, LearnedPart], saved_unix: float) -> bytes:
    arrays: dict[str, np.ndarray] = {}
    meta_parts = []
    for k, (pol, p) in enumerate(sorted(parts.items())):
        meta_parts.append({"policy": pol, "params": p.params, "services": p.services,
                           "addresses": [str(a) for a in p.addresses],
                           "cells": sorted(p.cells), "rows": sorted(p.rows)})
        arrays["p%d.entry_row" % k] = p.entry_row
        arrays.update({"p%d.cell.%s" % (k, n): v for n, v in p.cells.items()})
        arrays.update({"p%d.row.%s" % (k, n): v for n, v in p.rows.items()})
    meta = {"format": FORMAT, "version": VERSION, "saved_unix": saved_unix, "parts": meta_parts}
    arrays["meta"] = np.frombuffer(json.dumps(meta, separators=(",", ":")).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    # uncompressed: savez_compressed takes ~8x as long (9 ms at 1,024 x 16) for a 5x smaller file
    np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub types ** as its allow_pickle
    return buf.getvalue()


def decode(data: bytes) -> Saved:
    """The state in `data`; StateError on anything but a well-formed file of this version."""
    if not data.startswith(b"PK\x03\x04"):   # an .npz is a zip archive
        raise StateError("not a state file (%s)" % ("empty" if not data else "no zip header"))
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise StateError("not an equilibriumd state file")
            if meta.get("version") != VERSION:
                raise StateError("format version %r, this agent reads %d" % (meta.get("version"), VERSION))
            parts = {}
            for k, m in enumerate(meta["parts"]):
                services, addresses = m["services"], m["addresses"]
                if not (isinstance(services, list) and isinstance(addresses, list) and isinstance(m["params"], dict)
                        and all(isinstance(x, str) for x in services + addresses)):
                    raise StateError("part %d: services, addresses or constants malformed" % k)
                parts[str(m["policy"])] = LearnedPart(
                    m["params"], services, {n: z["p%d.row.%s" % (k, n)] for n in m["rows"]},
                    z["p%d.entry_row" % k], addresses, {n: z["p%d.cell.%s" % (k, n)] for n in m["cells"]})
            saved_unix = float(meta["saved_unix"])
            if not math.isfinite(saved_unix):
                raise StateError("save time %r" % saved_unix)
            return Saved(saved_unix, parts)
    except StateError:
        raise
    except Exception as e:  # noqa: BLE001 - zip, npy and JSON parsers each fail their own way on damage
        raise StateError("damaged: %s: %.200s" % (type(e).__name__, e)) from None


def write_atomic(path: str, data: bytes) -> None:
    """Replace `path` with `data`: a crash at any point leaves the old file or the new."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, mode=0o755, exist_ok=True)
    tmp = "%s.tmp-%d" % (path, os.getpid())
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)   # the rename itself survives a crash
    finally:
        os.close(dfd)


def read(path: str, now_unix: float | None = None) -> Saved | None:
    """The saved state, with every age advanced by the time since it was saved (the
    backends kept living while no agent ran); None if there is no file; StateError
    if it cannot be used."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_BYTES:
                raise StateError("%d bytes, more than the %d a state file may hold" % (size, MAX_BYTES))
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StateError("cannot read: %s" % e) from None
    saved = decode(data)
    elapsed = max((time.time() if now_unix is None else now_unix) - saved.saved_unix, 0.0)
    for p in saved.parts.values():
        if "age" in p.cells and p.cells["age"].dtype.kind == "f":
            p.cells["age"] = p.cells["age"] + elapsed
    return saved


def load(path: str, log: FilteringBoundLogger) -> Saved | None:
    """`read`, never raising: a missing file is a first start, an unusable one is
    logged and ignored (the agent starts from even weights)."""
    try:
        return read(path)
    except StateError as e:
        log.warning("state_ignored", file=path, reason=str(e), hint="learning starts over; the next save replaces it")
    except Exception as e:  # noqa: BLE001 - a bug here must not keep the agent from starting
        log.warning("state_ignored", file=path, reason="%s: %s" % (type(e).__name__, e))
    return None


# --- saving off the tick ------------------------------------------------------------
class Saver:
    """Saves every `every` seconds and at shutdown. The caller takes the copy
    (`Router.learned`, under its lock: never half a tick); encoding and writing
    run on a thread, so a slow disk never delays a tick. One write at a time: a
    save that comes due while one is in flight waits for the next period."""

    def __init__(self, path: str, log: FilteringBoundLogger, every: float = SAVE_EVERY) -> None:
        self.path = path
        self.log = log
        self.every = every
        self.next_at = time.monotonic() + every
        self.saves = 0
        self.failures = 0
        self.last_bytes = 0
        self.last_seconds = 0.0
        self._thread: threading.Thread | None = None

    def due(self, now: float) -> bool:
        return now >= self.next_at and not (self._thread is not None and self._thread.is_alive())

    def start(self, router: Router, lock: threading.Lock) -> None:
        """Take the copy now (under `lock`), write it on a thread."""
        with lock:
            parts = router.learned()
        self.next_at = time.monotonic() + self.every
        self._thread = threading.Thread(target=self._write_quietly, args=(parts,), name="eq-state", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def write(self, parts: dict[str, LearnedPart]) -> bool:
        """Encode and write (on the caller's thread); a failure is logged, the old file stays."""
        t0 = time.perf_counter()
        try:
            data = encode(parts, time.time())
            if len(data) > MAX_BYTES:
                raise StateError("%d bytes, more than MAX_BYTES (%d)" % (len(data), MAX_BYTES))
            write_atomic(self.path, data)
        except (OSError, StateError) as e:
            if not self.failures:   # once per failing streak: a full disk would log every period
                self.log.warning("state_save_failed", file=self.path, error=str(e),
                                 hint="the previous state file, if any, is kept")
            self.failures += 1
            return False
        if self.failures:
            self.log.info("state_save_recovered", file=self.path, failed=self.failures)
        self.failures = 0
        self.saves += 1
        self.last_bytes, self.last_seconds = len(data), time.perf_counter() - t0
        return True

    def _write_quietly(self, parts: dict[str, LearnedPart]) -> None:
        if self.write(parts):   # every few seconds: a debug line, not an info one
            self.log.debug("state_saved", file=self.path, bytes=self.last_bytes, seconds=round(self.last_seconds, 4))
