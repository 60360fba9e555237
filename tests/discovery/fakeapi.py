"""A loopback HTTP server that speaks the Kubernetes API's list/watch wire protocol.

No API server can be installed on the machines these tests run on (no
container runtime, no etcd, no kind), so the tests point the real
`kubernetes` Python client at this server instead. It implements what the
client and the agent's reflectors use, the way kube-apiserver does it:

* GET /api/v1/services, /apis/discovery.k8s.io/v1/endpointslices,
  /api/v1/pods: a List with `metadata.resourceVersion`; `limit` and
  `continue` paging (a continue token is a snapshot; an expired one is 410);
  `fieldSelector=spec.nodeName=X` on pods.
* `?watch=true&resourceVersion=RV`: HTTP/1.1 chunked stream of one JSON
  event per line (`ADDED`, `MODIFIED`, `DELETED`, `BOOKMARK`, `ERROR`), every
  event after RV from the history, then new ones as they happen, until
  `timeoutSeconds` or a forced disconnect. An RV older than the compacted
  history gets an `ERROR` event with a 410 Status, as etcd compaction does.
* One resourceVersion counter for everything (like etcd's revision).

Test controls: put/delete objects, compact the history, send bookmarks,
drop every open watch, inject raw lines, make the next N requests fail,
and counters of list and watch requests.

Namespaced objects read and written one at a time (the coordinator's
plumbing: discovery.lease, discovery.channel), without watch:

* coordination.k8s.io/v1 Leases and v1 ConfigMaps under
  `/apis/coordination.k8s.io/v1/namespaces/NS/leases[/NAME]` and
  `/api/v1/namespaces/NS/configmaps[/NAME]`: GET one (404 NotFound), GET the
  list (`labelSelector` of `k=v` terms joined by commas), DELETE one (404
  if absent), POST (409 AlreadyExists), PUT (404 if absent; 409 Conflict when the body's
  `metadata.resourceVersion` is not the stored one: optimistic concurrency
  as kube-apiserver does it; no resourceVersion is an unconditional update).
* Controls: `outage` (every such request gets 503 while set), `write_barrier`
  (a `threading.Barrier` every POST/PUT waits on before it is applied, to
  line racing writers up), `writes` (count of POST/PUT applied per resource).
"""

from __future__ import annotations

import copy
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

PATHS = {
    "/api/v1/services": ("Service", "v1"),
    "/apis/discovery.k8s.io/v1/endpointslices": ("EndpointSlice", "discovery.k8s.io/v1"),
    "/api/v1/pods": ("Pod", "v1"),
}
KIND_PATH = {v[0]: k for k, v in PATHS.items()}
#: resource (plural) -> (URL prefix before /namespaces/, kind, apiVersion)
NAMESPACED = {
    "leases": ("/apis/coordination.k8s.io/v1", "Lease", "coordination.k8s.io/v1"),
    "configmaps": ("/api/v1", "ConfigMap", "v1"),
}


class _Kind:
    def __init__(self, kind: str, api_version: str) -> None:
        self.kind, self.api_version = kind, api_version
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.history: list[tuple[int, str]] = []  # (rv, JSON line)
        self.compacted = 0  # watches from an RV below this get 410
        self.lists = 0
        self.watches: list[str] = []  # resourceVersion asked by each watch
        self.fail_next: list[int] = []  # HTTP statuses for the next requests


class FakeAPIServer:
    def __init__(self) -> None:
        self.rv = 100
        self.cond = threading.Condition()
        self.kinds = {k: _Kind(*v) for k, v in PATHS.items()}
        self.generation = 0  # bumped to drop every open watch
        self.snapshots: dict[str, tuple[int, list[dict[str, Any]]]] = {}
        self.stopping = False
        self._transient: dict[str, list[tuple[int, str]]] = {}
        # namespaced read/write resources: resource -> (namespace, name) -> object
        self.stored: dict[str, dict[tuple[str, str], dict[str, Any]]] = {r: {} for r in NAMESPACED}
        self.outage = False
        self.write_barrier: threading.Barrier | None = None
        self.writes: dict[str, int] = {r: 0 for r in NAMESPACED}
        handler = type("H", (_Handler,), {"api": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d" % self.httpd.server_address[1]

    def close(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.httpd.shutdown()
        self.httpd.server_close()

    # --- state -----------------------------------------------------------------
    def _k(self, kind: str) -> _Kind:
        return self.kinds[KIND_PATH[kind]]

    def _append(self, k: _Kind, rv: int, line: str) -> None:
        k.history.append((rv, line))
        self.cond.notify_all()

    def put(self, kind: str, obj: dict[str, Any]) -> int:
        """Create or replace an object (ADDED or MODIFIED); returns its new resourceVersion."""
        with self.cond:
            k = self._k(kind)
            self.rv += 1
            obj = copy.deepcopy(obj)
            obj.setdefault("kind", k.kind)
            obj.setdefault("apiVersion", k.api_version)
            md = obj.setdefault("metadata", {})
            if isinstance(md, dict):
                md["resourceVersion"] = str(self.rv)
            key = (md.get("namespace", ""), md.get("name", "")) if isinstance(md, dict) else ("", "?%d" % self.rv)
            typ = "MODIFIED" if key in k.objects else "ADDED"
            k.objects[key] = obj
            self._append(k, self.rv, json.dumps({"type": typ, "object": obj}))
            return self.rv

    def delete(self, kind: str, namespace: str, name: str) -> None:
        with self.cond:
            k = self._k(kind)
            obj = k.objects.pop((namespace, name))
            self.rv += 1
            obj = copy.deepcopy(obj)
            obj["metadata"]["resourceVersion"] = str(self.rv)
            self._append(k, self.rv, json.dumps({"type": "DELETED", "object": obj}))

    def raw_event(self, kind: str, line: str, bump: bool = True) -> None:
        """Send `line` verbatim to the watches open now (malformed input tests).
        Like a bookmark it is not stored: a later watch does not replay it."""
        with self.cond:
            if bump:
                self.rv += 1
            self._transient.setdefault(self._k(kind).kind, []).append((self.rv, line))
            self.cond.notify_all()

    def bookmark(self, kind: str) -> int:
        """A BOOKMARK at the current resourceVersion to every open watch of `kind`
        (not stored: a later watch does not replay it)."""
        with self.cond:
            k = self._k(kind)
            self.rv += 1  # other kinds moved the global revision on
            line = json.dumps({"type": "BOOKMARK", "object": {
                "kind": k.kind, "apiVersion": k.api_version, "metadata": {"resourceVersion": str(self.rv)}}})
            self._transient.setdefault(k.kind, []).append((self.rv, line))
            self.cond.notify_all()
            return self.rv

    def compact(self, kind: str | None = None) -> None:
        """Forget the history: a watch from an older resourceVersion gets 410 Gone."""
        with self.cond:
            for k in self.kinds.values():
                if kind is None or k.kind == kind:
                    k.history.clear()
                    k.compacted = self.rv
            self.snapshots.clear()  # continue tokens expire with it

    def disconnect(self) -> None:
        """End every open watch stream (as an API server restart or a load balancer would)."""
        with self.cond:
            self.generation += 1
            self.cond.notify_all()

    def fail(self, kind: str, *statuses: int) -> None:
        with self.cond:
            self._k(kind).fail_next.extend(statuses)

    def stats(self, kind: str) -> _Kind:
        return self._k(kind)

    def get_object(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        """A copy of a stored Lease/ConfigMap, or None."""
        with self.cond:
            o = self.stored[resource].get((namespace, name))
            return copy.deepcopy(o) if o is not None else None

    def put_object(self, resource: str, obj: dict[str, Any]) -> int:
        """Store a Lease/ConfigMap as is (no concurrency check); returns its resourceVersion."""
        with self.cond:
            self.rv += 1
            obj = copy.deepcopy(obj)
            _, kind, api_version = NAMESPACED[resource]
            obj.setdefault("kind", kind)
            obj.setdefault("apiVersion", api_version)
            md = obj.setdefault("metadata", {})
            md["resourceVersion"] = str(self.rv)
            self.stored[resource][(md.get("namespace", "default"), md["name"])] = obj
            return self.rv

    def wait_watching(self, kind: str, n: int = 1, timeout: float = 5.0) -> None:
        """Until `n` watch requests of `kind` have been made in total."""
        end = time.monotonic() + timeout
        while len(self._k(kind).watches) < n:
            if time.monotonic() > end:
                raise TimeoutError("%s: %d watches, wanted %d" % (kind, len(self._k(kind).watches), n))
            time.sleep(0.01)


class _Handler(BaseHTTPRequestHandler):
    api: FakeAPIServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:
        pass

    def _json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _status(self, code: int, reason: str, message: str) -> None:
        self._json(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                          "reason": reason, "code": code})

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        u = urlparse(self.path)
        q = {k: v[-1] for k, v in parse_qs(u.query).items()}
        api = self.api
        k = api.kinds.get(u.path)
        if k is None:
            self._namespaced("GET", u.path, q)
            return
        with api.cond:
            fail = k.fail_next.pop(0) if k.fail_next else None
        if fail:
            self._status(fail, "InternalError", "injected failure")
            return
        node = None
        fs = q.get("fieldSelector", "")
        if fs.startswith("spec.nodeName="):
            node = fs.split("=", 1)[1]
        if q.get("watch") in ("true", "1", "True"):
            self._watch(k, q, node)
        else:
            self._list(k, q, node)

    @staticmethod
    def _match(obj: Any, node: str | None) -> bool:
        if node is None:
            return True
        return isinstance(obj, dict) and isinstance(obj.get("spec"), dict) and obj["spec"].get("nodeName") == node

    def _list(self, k: _Kind, q: dict[str, str], node: str | None) -> None:
        api = self.api
        with api.cond:
            k.lists += 1
            cont = q.get("continue")
            if cont:
                snap = api.snapshots.get(cont)
                if snap is None:
                    self._status(410, "Expired", "The provided continue parameter is too old")
                    return
                rv, items = snap
            else:
                rv = api.rv
                items = [copy.deepcopy(o) for _, o in sorted(k.objects.items()) if self._match(o, node)]
            limit = int(q.get("limit") or 0)
            page, rest = (items[:limit], items[limit:]) if limit else (items, [])
            md: dict[str, Any] = {"resourceVersion": str(rv)}
            if rest:
                token = "c%d-%d" % (rv, len(api.snapshots))
                api.snapshots[token] = (rv, rest)
                md["continue"] = token
        self._json(200, {"kind": k.kind + "List", "apiVersion": k.api_version, "metadata": md, "items": page})

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _watch(self, k: _Kind, q: dict[str, str], node: str | None) -> None:
        api = self.api
        since = int(q.get("resourceVersion") or 0)
        timeout = float(q.get("timeoutSeconds") or 1800)
        with api.cond:
            k.watches.append(q.get("resourceVersion", ""))
            gen = api.generation
            gone = since < k.compacted
            sent_bm = len(api._transient.setdefault(k.kind, []))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        end = time.monotonic() + timeout
        try:
            if gone:
                self._chunk(json.dumps({"type": "ERROR", "object": {
                    "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Expired",
                    "message": "too old resource version: %d (%d)" % (since, k.compacted), "code": 410}}).encode()
                    + b"\n")
                return
            while True:
                with api.cond:
                    while True:
                        pending = [(rv, ln) for rv, ln in k.history if rv > since]
                        new_bm = api._transient[k.kind][sent_bm:]
                        done = api.generation != gen or api.stopping or time.monotonic() >= end
                        if pending or new_bm or done:
                            break
                        api.cond.wait(0.05)
                    if done:
                        break
                    sent_bm += len(new_bm)
                    if pending:
                        since = pending[-1][0]
                out = []
                for _, ln in pending:
                    try:
                        ev = json.loads(ln)
                        if not self._match(ev.get("object"), node):
                            continue
                    except (ValueError, AttributeError):
                        pass
                    out.append(ln)
                out += [ln for _, ln in new_bm]
                for ln in out:
                    self._chunk(ln.encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            return
        finally:
            try:
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except OSError:
                pass
            self.close_connection = True

    # --- namespaced objects, one at a time (Lease, ConfigMap) ----------------------
    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        u = urlparse(self.path)
        self._namespaced("POST", u.path, {k: v[-1] for k, v in parse_qs(u.query).items()})

    def do_PUT(self) -> None:  # noqa: N802 - http.server's name
        u = urlparse(self.path)
        self._namespaced("PUT", u.path, {k: v[-1] for k, v in parse_qs(u.query).items()})

    def do_DELETE(self) -> None:  # noqa: N802 - http.server's name
        u = urlparse(self.path)
        self._namespaced("DELETE", u.path, {})

    @staticmethod
    def _route(path: str) -> tuple[str, str, str | None] | None:
        """(resource, namespace, name or None) for a namespaced Lease/ConfigMap path."""
        for resource, (prefix, _, _) in NAMESPACED.items():
            if not path.startswith(prefix + "/namespaces/"):
                continue
            parts = path[len(prefix) + len("/namespaces/"):].split("/")
            if len(parts) in (2, 3) and parts[1] == resource and all(parts):
                return resource, parts[0], parts[2] if len(parts) == 3 else None
        return None

    @staticmethod
    def _labels_match(obj: dict[str, Any], selector: str) -> bool:
        labels = obj.get("metadata", {}).get("labels") or {}
        for term in filter(None, selector.split(",")):
            key, _, value = term.partition("=")
            if labels.get(key) != value:
                return False
        return True

    def _body(self) -> dict[str, Any] | None:
        n = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(n) or b"null")
        except ValueError:
            return None
        return body if isinstance(body, dict) else None

    def _namespaced(self, method: str, path: str, q: dict[str, str]) -> None:
        api = self.api
        route = self._route(path)
        body = self._body() if method in ("POST", "PUT") else None
        if route is None:
            self._status(404, "NotFound", "no such path %s" % path)
            return
        resource, ns, name = route
        _, kind, api_version = NAMESPACED[resource]
        if api.outage:
            self._status(503, "ServiceUnavailable", "injected outage")
            return
        if method == "GET":
            with api.cond:
                if name is None:
                    sel = q.get("labelSelector", "")
                    items = [copy.deepcopy(o) for (n_, _), o in sorted(api.stored[resource].items())
                             if n_ == ns and self._labels_match(o, sel)]
                    out: dict[str, Any] = {"kind": kind + "List", "apiVersion": api_version,
                                           "metadata": {"resourceVersion": str(api.rv)}, "items": items}
                else:
                    obj = api.stored[resource].get((ns, name))
                    if obj is None:
                        self._status(404, "NotFound", '%s "%s" not found' % (resource, name))
                        return
                    out = copy.deepcopy(obj)
            self._json(200, out)
            return
        if method == "DELETE":
            with api.cond:
                gone = api.stored[resource].pop((ns, name), None) if name else None
                if gone is not None:
                    api.rv += 1
                    api.writes[resource] += 1
            if gone is None:
                self._status(404, "NotFound", '%s "%s" not found' % (resource, name))
            else:
                self._status(200, "Success", "deleted")
            return
        if body is None or not isinstance(body.get("metadata"), dict):
            self._status(400, "BadRequest", "body is not an object with metadata")
            return
        md = body["metadata"]
        if method == "POST" and name is None:
            name = md.get("name")
        if not name or md.get("name", name) != name:
            self._status(400, "BadRequest", "the name of the object does not match the URL")
            return
        barrier = api.write_barrier
        if barrier is not None:
            try:
                barrier.wait(timeout=5)
            except threading.BrokenBarrierError:
                pass
        with api.cond:
            cur = api.stored[resource].get((ns, name))
            if method == "POST" and cur is not None:
                self._status(409, "AlreadyExists", '%s "%s" already exists' % (resource, name))
                return
            if method == "PUT":
                if cur is None:
                    self._status(404, "NotFound", '%s "%s" not found' % (resource, name))
                    return
                want = md.get("resourceVersion")
                if want and want != cur["metadata"]["resourceVersion"]:
                    self._status(409, "Conflict", 'Operation cannot be fulfilled on %s "%s": the object has been '
                                 "modified; please apply your changes to the latest version and try again"
                                 % (resource, name))
                    return
            api.rv += 1
            obj = copy.deepcopy(body)
            obj["kind"], obj["apiVersion"] = kind, api_version
            obj["metadata"].update(name=name, namespace=ns, resourceVersion=str(api.rv))
            api.stored[resource][(ns, name)] = obj
            api.writes[resource] += 1
            out = copy.deepcopy(obj)
        self._json(201 if method == "POST" else 200, out)
