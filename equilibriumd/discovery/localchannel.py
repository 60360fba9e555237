"""The coordinator's channel and election on one machine, without Kubernetes:
a directory shared by the agents and the coordinator (standalone mode, the
simulator's live twin, the tests).

    DIR/<name>.json    one object per file, what a ConfigMap holds in the cluster:
                       {"channel": "summary"|"recommendation", "published_at": ..., "payload": {...}}
    DIR/leader.lock    the coordinators' election: an exclusive flock(2)
    DIR/leader.epoch   the leadership term, bumped by each new leader

`DirChannel` has `Channel`'s interface and semantics (discovery/channel.py):
the same rate limit and size bound on publish, reads that never raise (a
missing or malformed file is a `Message` with an error), and a
`resource_version` that changes when the content changes (the file's
mtime_ns and size). A write is a new file renamed over the old one, so a
reader sees the old or the new object, never half of one.

`FlockElector` has `LeaseElector`'s interface. The kernel holds the lock for
the holder's open file and drops it when the process exits however it exits
(kill -9 included), so a successor takes over at its next retry: no lease to
expire, no clock to trust, and no consensus of our own to get wrong.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable

from .. import logs
from .channel_types import CONFIGMAP_DATA_LIMIT, Listing, Message, Outcome, encode, run_callback

LOCK_FILE = "leader.lock"
EPOCH_FILE = "leader.epoch"
SUFFIX = ".json"
#: a directory channel's files are this process's own or its peers': no more than this is read
MAX_FILE = 4 * 1024 * 1024


def _safe(name: str) -> str:
    if not name or "/" in name or name.startswith(".") or len(name) > 253:
        raise ValueError("bad object name for a directory channel: %r" % name)
    return name


class DirChannel:
    """Publish and read JSON payloads as files in `path` (created 0700 if absent)."""

    def __init__(self, path: str, *, min_interval: float = 10.0, max_bytes: int = 256 * 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 < max_bytes <= CONFIGMAP_DATA_LIMIT:
            raise ValueError("max_bytes must be in (0, %d]" % CONFIGMAP_DATA_LIMIT)
        if min_interval < 0:
            raise ValueError("min_interval must be >= 0")
        os.makedirs(path, mode=0o700, exist_ok=True)
        self.path = path
        self.min_interval, self.max_bytes, self.clock = min_interval, max_bytes, clock
        self.log = logs.get("discovery").bind(channel_dir=path)
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}

    def encode(self, name: str, payload: dict[str, Any]) -> str:
        return encode(name, payload, self.max_bytes)

    def publish(self, name: str, payload: dict[str, Any], channel: str) -> Outcome:
        text = self.encode(_safe(name), payload)
        now = self.clock()
        with self._lock:
            last = self._last.get(name)
            if last is not None and now - last < self.min_interval:
                return "rate_limited"
            self._last[name] = now
        body = '{"channel":%s,"published_at":%s,"payload":%s}' % (
            json.dumps(channel), json.dumps(datetime.now(timezone.utc).isoformat()), text)
        final = os.path.join(self.path, name + SUFFIX)
        tmp = "%s.%d.%d.tmp" % (final, os.getpid(), threading.get_ident())
        try:
            with open(tmp, "w") as f:
                f.write(body)
            os.replace(tmp, final)
        except OSError as e:
            self.log.warning("channel_publish_failed", name=name, error=str(e))
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return "failed"
        return "written"

    def delete(self, name: str) -> bool:
        try:
            os.unlink(os.path.join(self.path, _safe(name) + SUFFIX))
        except FileNotFoundError:
            pass
        except OSError as e:
            self.log.warning("channel_delete_failed", name=name, error=str(e))
            return False
        with self._lock:
            self._last.pop(name, None)
        return True

    def read(self, name: str) -> Message:
        return self._read_file(_safe(name), None)

    def read_all(self, channel: str) -> Listing:
        try:
            names = sorted(f[:-len(SUFFIX)] for f in os.listdir(self.path) if f.endswith(SUFFIX))
        except OSError as e:
            return Listing([], "dir: %s" % e)
        out = []
        for n in names:
            m = self._read_file(n, channel)
            if m is not None:
                out.append(m)
        return Listing(out)

    def _read_file(self, name: str, channel: str | None) -> Any:
        """The file's Message; with `channel`, None for a file of another channel."""
        try:
            with open(os.path.join(self.path, name + SUFFIX), "rb") as f:
                st = os.fstat(f.fileno())
                raw = f.read(MAX_FILE + 1)
        except FileNotFoundError:
            return Message(name, None, "not found") if channel is None else None
        except OSError as e:
            return Message(name, None, "dir: %s" % e)
        rv = "%d-%d" % (st.st_mtime_ns, st.st_size)
        try:
            if len(raw) > MAX_FILE:
                raise ValueError("over %d bytes" % MAX_FILE)
            obj = json.loads(raw)
            if not isinstance(obj, dict):
                raise ValueError("not an object")
        except ValueError as e:
            if channel is not None:
                return None   # not one of ours, or not readable as one: not in any listing
            self.log.warning("channel_object_malformed", name=name, problem=str(e))
            return Message(name, None, "malformed: %s" % e, rv)
        if channel is not None and obj.get("channel") != channel:
            return None
        payload = obj.get("payload")
        published = obj.get("published_at")
        if not isinstance(payload, dict):
            self.log.warning("channel_object_malformed", name=name, problem="payload is not a JSON object")
            return Message(name, None, "malformed: payload is not a JSON object", rv)
        return Message(name, payload, None, rv, str(published) if published is not None else None)


class FlockElector:
    """`LeaseElector`'s interface on an exclusive flock of DIR/leader.lock."""

    def __init__(self, path: str, identity: str, *, retry_period: float = 1.0,
                 on_started_leading: Callable[[], None] | None = None,
                 on_stopped_leading: Callable[[], None] | None = None) -> None:
        if not identity:
            raise ValueError("an elector needs a non-empty identity")
        os.makedirs(path, mode=0o700, exist_ok=True)
        self.path, self.identity, self.retry_period = path, identity, retry_period
        self.on_started_leading, self.on_stopped_leading = on_started_leading, on_stopped_leading
        self.log = logs.get("discovery").bind(lock=os.path.join(path, LOCK_FILE), identity=identity)
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.epoch = 0
        self.transitions_seen = 0

    def is_leader(self) -> bool:
        return self._fd is not None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("elector already started")
        self._thread = threading.Thread(target=self._run, name="flock-elector", daemon=True)
        self._thread.start()

    def stop(self, release: bool = True, timeout: float = 10.0) -> None:
        """Stop campaigning and release the lock (`release` is accepted for
        LeaseElector's interface: a flock cannot outlive its holder anyway)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        fd = os.open(os.path.join(self.path, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            while not self._stop.is_set():
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    self._stop.wait(self.retry_period)
                    continue
                self.epoch = self._bump_epoch()
                self._fd = fd
                self.transitions_seen += 1
                self.log.info("leadership_acquired", epoch=self.epoch)
                run_callback(self.log, self.on_started_leading)
                self._stop.wait()
                self._fd = None
                fcntl.flock(fd, fcntl.LOCK_UN)
                self.log.info("leadership_given_up")
                run_callback(self.log, self.on_stopped_leading)
        finally:
            os.close(fd)

    def _bump_epoch(self) -> int:
        p = os.path.join(self.path, EPOCH_FILE)
        try:
            with open(p) as f:
                prev = int(f.read().strip() or 0)
        except (OSError, ValueError):
            prev = 0
        nxt = max(prev, 0) + 1
        tmp = p + ".tmp"
        with open(tmp, "w") as f:
            f.write("%d\n" % nxt)
        os.replace(tmp, p)
        return nxt
