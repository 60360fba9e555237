"""The channel between the agents and the coordinator: ConfigMaps in the
agents' namespace, written and read through the API server.

    agent on node N --publish--> ConfigMap equilibrium-summary-N          (label equilibrium.io/channel=summary)
    coordinator     --read_all(summary)-->  every node's summary
    leader          --publish--> ConfigMap equilibrium-recommendation-N   (label ...=recommendation), one per node
    agent on node N --read-->    its own recommendation

One recommendation object per node, not one for all: a node reads only what
concerns it, and no object grows with the cluster (a ConfigMap holds 1 MiB).

Why ConfigMaps (and not a CRD or a scraped HTTP endpoint):
* Nothing to install: a CRD is a cluster-scoped object that needs
  cluster-admin to install and to upgrade in step with the agent; a
  ConfigMap needs only a namespaced Role (daemonset/coordinator/rbac.yaml).
* The API server is already the one thing every agent can reach; a scraped
  endpoint would need the coordinator to reach every node's pod network (and
  a NetworkPolicy hole), and would lose the last summary of a node whose
  agent is restarting, where a ConfigMap keeps it (with its write time).
* `kubectl get cm -l equilibrium.io/channel=summary` shows the state; any
  client can list/watch it with a label selector.
What a CRD would give and this lacks: schema validation by the API server
and RBAC on its own resource type (an agent allowed to update ConfigMaps in
the namespace could update any of them; see the RBAC file's comments).
The payload is validated here instead, as opaque JSON, and the coordinator
must treat every summary as untrusted input.

Bounds: each publisher writes one object at most every `min_interval`
seconds (the API server and etcd see O(nodes / min_interval) writes per
second: 1000 nodes every 10 s is 100 small writes/s), and a payload larger
than `max_bytes` is refused before it is sent (a ConfigMap's data may hold at
most 1 MiB, and etcd objects should stay far below that).

The payload is an opaque JSON object under the data key `payload.json`; the
message types are the policy layer's business (policy/coordination.py), not
this module's. Reads never raise for a missing or malformed object: they
report it in `Message.error`, so one bad node cannot stop the coordinator.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable

from kubernetes.client.exceptions import ApiException

from .. import logs
from .channel_types import (  # noqa: F401 - re-exported: the channel's names
    ANNOTATION_PUBLISHED,
    CONFIGMAP_DATA_LIMIT,
    DATA_KEY,
    LABEL_CHANNEL,
    MAX_NAME,
    RECOMMENDATION_PREFIX,
    SUMMARY_PREFIX,
    Listing,
    Message,
    Outcome,
    PayloadTooLarge,
    encode,
    recommendation_name,
    summary_name,
)


class Channel:
    """Publish and read JSON payloads as ConfigMaps in `namespace`."""

    def __init__(self, api_client: Any, namespace: str, *, min_interval: float = 10.0,
                 max_bytes: int = 256 * 1024, clock: Callable[[], float] = time.monotonic,
                 request_timeout: float = 10.0) -> None:
        from kubernetes import client

        if not 0 < max_bytes <= CONFIGMAP_DATA_LIMIT:
            raise ValueError("max_bytes must be in (0, %d]" % CONFIGMAP_DATA_LIMIT)
        if min_interval < 0:
            raise ValueError("min_interval must be >= 0")
        # Any: the calls pass JSON dicts and read raw responses (_preload_content=False)
        self.api: Any = client.CoreV1Api(api_client)
        self.namespace = namespace
        self.min_interval, self.max_bytes = min_interval, max_bytes
        self.clock = clock
        self.request_timeout = request_timeout
        self.log = logs.get("discovery").bind(namespace=namespace)
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}  # name -> clock() of the last attempt

    # --- writing --------------------------------------------------------------------
    def encode(self, name: str, payload: dict[str, Any]) -> str:
        """The payload as compact JSON; PayloadTooLarge over `max_bytes`, ValueError if not JSON."""
        return encode(name, payload, self.max_bytes)

    def publish(self, name: str, payload: dict[str, Any], channel: str) -> Outcome:
        """Write `payload` to ConfigMap `name` labelled `equilibrium.io/channel=<channel>`.

        At most one attempt per `min_interval` per name: a call sooner is
        dropped ("rate_limited"), so call it on your own period with the
        latest state. Size and JSON are checked first, before the rate
        limit (raises PayloadTooLarge / ValueError). An API failure is
        logged and returned as "failed", not raised.
        """
        text = self.encode(name, payload)
        now = self.clock()
        with self._lock:
            last = self._last.get(name)
            if last is not None and now - last < self.min_interval:
                return "rate_limited"
            self._last[name] = now
        body = {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": name, "namespace": self.namespace,
                             "labels": {"app.kubernetes.io/name": "equilibrium", LABEL_CHANNEL: channel},
                             "annotations": {ANNOTATION_PUBLISHED: datetime.now(timezone.utc).isoformat()}},
                "data": {DATA_KEY: text}}
        # One writer per object, so last-write-wins is right: an update without a
        # resourceVersion (one request in the steady state), create when absent.
        try:
            try:
                self._replace(name, body)
            except ApiException as e:
                if e.status != 404:
                    raise
                try:
                    self.api.create_namespaced_config_map(self.namespace, body, _preload_content=False,
                                                          _request_timeout=self.request_timeout)
                except ApiException as e2:
                    if e2.status != 409:  # created meanwhile (a restart racing itself): update it
                        raise
                    self._replace(name, body)
        except ApiException as e:
            self.log.warning("channel_publish_failed", name=name, status=e.status, error=e.reason)
            return "failed"
        except Exception as e:  # urllib3 errors, timeouts
            self.log.warning("channel_publish_failed", name=name, error=str(e))
            return "failed"
        return "written"

    def _replace(self, name: str, body: dict[str, Any]) -> None:
        self.api.replace_namespaced_config_map(name, self.namespace, body, _preload_content=False,
                                               _request_timeout=self.request_timeout)

    def delete(self, name: str) -> bool:
        """Delete ConfigMap `name` (gone already counts as done); False if the call failed."""
        try:
            self.api.delete_namespaced_config_map(name, self.namespace, _preload_content=False,
                                                  _request_timeout=self.request_timeout)
        except ApiException as e:
            if e.status == 404:
                return True
            self.log.warning("channel_delete_failed", name=name, status=e.status, error=e.reason)
            return False
        except Exception as e:  # urllib3 errors, timeouts
            self.log.warning("channel_delete_failed", name=name, error=str(e))
            return False
        with self._lock:
            self._last.pop(name, None)
        return True

    # --- reading --------------------------------------------------------------------
    def read(self, name: str) -> Message:
        """ConfigMap `name`'s payload, or a Message saying why there is none."""
        try:
            resp = self.api.read_namespaced_config_map(name, self.namespace, _preload_content=False,
                                                       _request_timeout=self.request_timeout)
            obj = json.loads(resp.data)
        except ApiException as e:
            if e.status == 404:
                return Message(name, None, "not found")
            return Message(name, None, "api: %s %s" % (e.status, e.reason))
        except ValueError as e:
            return Message(name, None, "api: response is not JSON (%s)" % e)
        except Exception as e:  # urllib3 errors, timeouts
            return Message(name, None, "api: %s" % e)
        return self._decode(obj, name)

    def read_all(self, channel: str) -> Listing:
        """Every ConfigMap labelled `equilibrium.io/channel=<channel>`, each
        decoded on its own (a malformed one is a Message with an error)."""
        try:
            resp = self.api.list_namespaced_config_map(
                self.namespace, label_selector="%s=%s" % (LABEL_CHANNEL, channel),
                _preload_content=False, _request_timeout=self.request_timeout)
            items = json.loads(resp.data).get("items")
        except ApiException as e:
            return Listing([], "api: %s %s" % (e.status, e.reason))
        except Exception as e:  # urllib3 errors, timeouts, bad JSON
            return Listing([], "api: %s" % e)
        if not isinstance(items, list):
            return Listing([], "api: list has no items")
        return Listing([self._decode(o, None) for o in items])

    def _decode(self, obj: Any, name: str | None) -> Message:
        md = obj.get("metadata") if isinstance(obj, dict) else None
        md = md if isinstance(md, dict) else {}
        name = name or str(md.get("name") or "?")
        rv = md.get("resourceVersion")
        ann = md.get("annotations")
        published = ann.get(ANNOTATION_PUBLISHED) if isinstance(ann, dict) else None
        data = obj.get("data") if isinstance(obj, dict) else None
        raw = data.get(DATA_KEY) if isinstance(data, dict) else None
        err: str | None = None
        payload: Any = None
        if not isinstance(raw, str):
            err = "malformed: no %s in data" % DATA_KEY
        else:
            try:
                payload = json.loads(raw)
            except ValueError as e:
                err = "malformed: %s is not JSON (%s)" % (DATA_KEY, e)
            else:
                if not isinstance(payload, dict):
                    err, payload = "malformed: %s is not a JSON object" % DATA_KEY, None
        if err:
            self.log.warning("channel_object_malformed", name=name, problem=err)
        return Message(name, payload, err, str(rv) if rv is not None else None,
                       str(published) if published is not None else None)
