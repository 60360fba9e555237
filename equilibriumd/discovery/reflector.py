"""List-then-watch one kind of object into a local store (client-go's
reflector, on the official Python client).

    list (paged)  -> store := items, rv := list's resourceVersion
    watch from rv -> ADDED/MODIFIED/DELETED update the store, BOOKMARK moves rv
    stream ends (server timeout, connection reset) -> watch again from rv
    410 Gone (on the watch or a list page) -> list again from scratch
    any other failure -> exponential backoff with jitter, then watch from rv
    (or list, if no list has succeeded yet or watching keeps failing)

Because a watch always resumes from the last resourceVersion seen (an
event's or a bookmark's), nothing that happened while disconnected is
missed; when the server no longer has that history it says 410 and the
relist replaces the store wholesale, so deletions in the gap are seen too.

Objects are kept as JSON dicts (after `keep`, which trims each one to the
fields its user reads: discovery.trim), not as the client's models: one
malformed object must cost a logged error, not the stream (the client's
`Watch` deserializes every event into a model and raises inside its
generator on a bad one). The API calls, authentication, TLS and
timeouts are the official client's; only the line framing of the watch
stream is read here.
"""

from __future__ import annotations

import json
import random
import socket
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from kubernetes.client.exceptions import ApiException

from .. import logs

Key = tuple[str, str]  # (namespace, name); namespace "" for cluster-scoped objects


class Gone(Exception):
    """The server no longer has the requested resourceVersion (HTTP 410)."""


@dataclass
class Backoff:
    """Delays between failed attempts, seconds: base * 2^n, capped, +-jitter."""

    base: float = 0.5
    cap: float = 30.0
    jitter: float = 0.2  #: fraction of the delay, both ways
    failures: int = 0

    def next(self) -> float:
        d = min(self.cap, self.base * (2 ** self.failures))
        self.failures += 1
        return float(d * (1 + random.uniform(-self.jitter, self.jitter)))

    def reset(self) -> None:
        self.failures = 0


@dataclass
class ReflectorStats:
    lists: int = 0
    watches: int = 0
    events: int = 0
    bookmarks: int = 0
    gone: int = 0              #: 410s answered by a relist
    errors: int = 0            #: failed calls (then backoff)
    failing: int = 0           #: failed calls in a row now (0 once the API server answers a call)
    malformed: int = 0         #: lines or objects ignored
    last_error: str = ""


def _key(obj: Any) -> Key | None:
    if not isinstance(obj, dict):
        return None
    md = obj.get("metadata")
    if not isinstance(md, dict) or not isinstance(md.get("name"), str) or not md["name"]:
        return None
    ns = md.get("namespace") or ""
    return (ns, md["name"]) if isinstance(ns, str) else None


def _rv(obj: Any) -> str | None:
    md = obj.get("metadata") if isinstance(obj, dict) else None
    rv = md.get("resourceVersion") if isinstance(md, dict) else None
    return rv if isinstance(rv, str) and rv else None


class Reflector:
    """Keeps `store` equal to the server's set of objects for one list call.

    `list_fn` is a generated list method of the official client, e.g.
    `CoreV1Api(api).list_service_for_all_namespaces`; `on_change()` is called
    (from this reflector's thread) after every change to the store.
    """

    def __init__(self, kind: str, list_fn: Callable[..., Any], on_change: Callable[[], None], *,
                 field_selector: str | None = None, label_selector: str | None = None,
                 page_size: int = 500, watch_timeout: int = 300, connect_timeout: float = 10.0,
                 backoff: Backoff | None = None, relist_after_failures: int = 5,
                 keep: Callable[[Any], Any] | None = None) -> None:
        self.kind = kind
        self.list_fn = list_fn
        self.on_change = on_change
        self.selectors = {k: v for k, v in (("field_selector", field_selector),
                                            ("label_selector", label_selector)) if v}
        self.page_size = page_size
        self.watch_timeout = watch_timeout  #: asked of the server, seconds; a read timeout guards a silent peer
        self.connect_timeout = connect_timeout
        self.backoff = backoff or Backoff()
        self.relist_after_failures = relist_after_failures
        #: what is stored of each object (discovery.trim); None: the object as sent
        self.keep = keep
        self.log = logs.get("discovery").bind(kind=kind)
        self.stats = ReflectorStats()
        self.synced = threading.Event()  #: set once the first list has been stored
        self.resource_version = ""
        self._store: dict[Key, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._resp: Any = None
        self._thread: threading.Thread | None = None

    # --- store -----------------------------------------------------------------
    def items(self) -> list[dict[str, Any]]:
        """A consistent copy of the current objects."""
        with self._lock:
            return list(self._store.values())

    # --- thread ----------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="eq-reflector-%s" % self.kind, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._abort_stream()
        if self._thread is not None:
            self._thread.join(timeout)

    def _abort_stream(self) -> None:
        """Unblock a read in progress: shut the socket down under it."""
        resp = self._resp
        if resp is None:
            return
        try:
            if hasattr(resp, "shutdown"):  # urllib3 >= 2.3
                resp.shutdown()
                return
            sock = getattr(getattr(resp, "connection", None), "sock", None)
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _run(self) -> None:
        need_list = True
        while not self._stop.is_set():
            try:
                if need_list:
                    self._list()
                    need_list = False
                self._watch()  # returns when the stream ends normally
            except Gone as e:
                self.stats.gone += 1
                self.log.info("watch_expired_relisting", error=str(e), resource_version=self.resource_version)
                need_list = True
            except Exception as e:  # noqa: BLE001 - a reflector must outlive anything the network does
                if self._stop.is_set():
                    break
                self.stats.errors += 1
                self.stats.failing += 1
                self.stats.last_error = "%s: %s" % (type(e).__name__, e)
                delay = self.backoff.next()
                if not self.synced.is_set() or self.backoff.failures >= self.relist_after_failures:
                    need_list = True
                self.log.error("watch_failed", error=self.stats.last_error, retry_in_seconds=round(delay, 2),
                               failures=self.backoff.failures, relist=need_list)
                self._stop.wait(delay)

    # --- list ------------------------------------------------------------------
    def _call(self, **kw: Any) -> Any:
        try:
            return self.list_fn(_preload_content=False, **self.selectors, **kw)
        except ApiException as e:
            if e.status == 410:
                raise Gone("%s %s" % (e.status, e.reason)) from None
            raise

    def _list(self) -> None:
        items: dict[Key, dict[str, Any]] = {}
        cont: str | None = None
        rv = ""
        while True:
            kw: dict[str, Any] = {"limit": self.page_size,
                                  "_request_timeout": (self.connect_timeout, 60)}
            if cont:
                kw["_continue"] = cont
            resp = self._call(**kw)
            try:
                body = json.loads(resp.data)
            finally:
                resp.release_conn()
            if not isinstance(body, dict) or not isinstance(body.get("items", []), list):
                raise ValueError("list response is not a List object")
            for obj in body.get("items") or []:
                k = _key(obj)
                if k is None:
                    self._malformed("list item without metadata.name", obj)
                    continue
                items[k] = self._kept(obj)
            md = body.get("metadata") or {}
            rv = md.get("resourceVersion") or rv
            cont = md.get("continue") or None
            if not cont:
                break
        if not rv:
            raise ValueError("list response carries no resourceVersion")
        with self._lock:
            self._store = items
            self.resource_version = rv
        self.stats.lists += 1
        self.stats.failing = 0
        self.backoff.reset()
        self.synced.set()
        self.log.info("listed", objects=len(items), resource_version=rv)
        self.on_change()

    # --- watch -----------------------------------------------------------------
    def _lines(self, resp: Any) -> Iterator[bytes]:
        buf = b""
        for chunk in resp.stream(amt=None, decode_content=True):
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    yield line
            if self._stop.is_set():
                return
        if buf.strip():
            yield buf

    def _watch(self) -> None:
        self.stats.watches += 1
        resp = self._call(watch=True, resource_version=self.resource_version, allow_watch_bookmarks=True,
                          timeout_seconds=self.watch_timeout,
                          _request_timeout=(self.connect_timeout, self.watch_timeout + 30))
        self._resp = resp
        self.stats.failing = 0   # the server answered (the backoff resets only at an event: no hot loop)
        try:
            for line in self._lines(resp):
                self._event(line)
                self.backoff.reset()
        finally:
            self._resp = None
            resp.release_conn()

    def _event(self, line: bytes) -> None:
        try:
            ev = json.loads(line)
        except ValueError:
            self._malformed("watch line is not JSON", line[:200].decode(errors="replace"))
            return
        if not isinstance(ev, dict) or not isinstance(ev.get("type"), str):
            self._malformed("watch event without a type", ev)
            return
        typ, obj = ev["type"], ev.get("object")
        if typ == "ERROR":
            code = obj.get("code") if isinstance(obj, dict) else None
            msg = obj.get("message") if isinstance(obj, dict) else obj
            if code == 410:
                raise Gone("watch: %s" % msg)
            raise RuntimeError("watch error event: code %s: %s" % (code, msg))
        rv = _rv(obj)
        if typ == "BOOKMARK":
            if rv is None:
                self._malformed("bookmark without resourceVersion", obj)
                return
            self.stats.bookmarks += 1
            with self._lock:
                self.resource_version = rv
            return
        k = _key(obj)
        if typ in ("ADDED", "MODIFIED") and k is not None:
            obj = self._kept(obj)
        if typ not in ("ADDED", "MODIFIED", "DELETED") or k is None or rv is None:
            self._malformed("unusable %s event" % typ, obj)
            if rv is not None:  # still a valid point to resume from
                with self._lock:
                    self.resource_version = rv
            return
        with self._lock:
            if typ == "DELETED":
                self._store.pop(k, None)
            else:
                self._store[k] = obj  # type: ignore[assignment]  # _key() checked it is a dict
            self.resource_version = rv
        self.stats.events += 1
        self.on_change()

    def _kept(self, obj: Any) -> Any:
        """What to store of `obj`; a trim that fails keeps the object whole (and says so)."""
        if self.keep is None:
            return obj
        try:
            return self.keep(obj)
        except Exception as e:  # noqa: BLE001 - one odd object must not cost the stream
            self._malformed("cannot trim (%s: %s); kept whole" % (type(e).__name__, e), obj)
            return obj

    def _malformed(self, what: str, obj: Any) -> None:
        self.stats.malformed += 1
        self.log.error("malformed_object_ignored", problem=what, object=_short(obj))


def _short(obj: Any) -> str:
    text = obj if isinstance(obj, str) else json.dumps(obj, default=str)
    return text if len(text) <= 300 else text[:300] + "..."

