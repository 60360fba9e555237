"""`KubernetesSource`: the cluster's opted-in Services as a stream of complete
`Config`s, for the agent to apply exactly as it applies a reloaded file.

Two reflectors (Services, EndpointSlices; all namespaces) keep raw stores.
Every change marks the state dirty; a debounce thread waits until the
stores have been quiet for `debounce` seconds (at most `max_delay` after the
first change of a burst), builds the whole Config from both stores
(`build.build_config`), and calls `on_change(config)` if it differs from the
last one delivered. A rolling update of 3 pods, which is dozens of
EndpointSlice events, so becomes one or two applies, and the last delivered
Config always reflects the latest state: a change that arrives while a
build runs marks the state dirty again.

Nothing is delivered before both kinds have been listed once: an agent that
adopts a pinned datapath after a restart must not apply an empty Config
(which would remove every service) while discovery is still catching up.
`on_change` runs on the debounce thread; the agent should hand the Config
to its own loop (see `wait_for_first`, and the wiring in the package doc).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from .. import config as cfg
from .. import logs
from . import trim
from .build import BuildResult, build_config
from .reflector import Backoff, Reflector


class KubernetesSource:
    def __init__(self, node_name: str, on_change: Callable[[cfg.Config], None], api_client: Any = None, *,
                 base: cfg.Config | None = None, debounce: float = 0.2, max_delay: float = 2.0,
                 watch_timeout: int = 300, page_size: int = 500, backoff: Callable[[], Backoff] = Backoff) -> None:
        """`node_name`: this node (logged; pods are mapped by `pods.PodIdentity`).
        `api_client`: a `kubernetes.client.ApiClient`; None -> `client.api_client_from_env()`.
        `base`: tick, policy, equilibrium constants and static services (the
        ConfigMap's file); discovered services are added to it.
        `debounce`, `max_delay`: seconds."""
        from kubernetes import client as k8s

        from .client import api_client_from_env

        self.node_name = node_name
        self.on_change = on_change
        self.api = api_client if api_client is not None else api_client_from_env()
        self.debounce = debounce
        self.max_delay = max_delay
        self.log = logs.get("discovery").bind(node=node_name)
        self._base = base or cfg.Config()
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._delivered = threading.Event()
        self._lock = threading.Lock()
        self._latest: cfg.Config | None = None
        self._reported: set[str] = set()
        self.deliveries = 0
        self.last_result: BuildResult | None = None
        #: the last build's admitted, then waiting services: they keep their place (admit)
        self._order: list[str] = []
        common: dict[str, Any] = dict(watch_timeout=watch_timeout, page_size=page_size)
        # only what build reads is stored (trim): memory follows what is used, not the cluster
        self.services = Reflector("services", k8s.CoreV1Api(self.api).list_service_for_all_namespaces,
                                  self._changed, backoff=backoff(), keep=trim.service, **common)
        self.slices = Reflector("endpointslices",
                                k8s.DiscoveryV1Api(self.api).list_endpoint_slice_for_all_namespaces,
                                self._changed, backoff=backoff(), keep=trim.endpoint_slice, **common)
        self._thread: threading.Thread | None = None

    # --- integration API ---------------------------------------------------------
    def start(self) -> None:
        """Start the watch and debounce threads (daemon threads; returns at once)."""
        self.log.info("discovery_starting", debounce_seconds=self.debounce)
        self.services.start()
        self.slices.start()
        self._thread = threading.Thread(target=self._run, name="eq-discovery", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._dirty.set()
        self.services.stop(timeout)
        self.slices.stop(timeout)
        if self._thread is not None:
            self._thread.join(timeout)

    def wait_for_first(self, timeout: float) -> cfg.Config:
        """Block until the first complete Config was built (and delivered);
        TimeoutError naming what has not synced otherwise."""
        if not self._delivered.wait(timeout):
            missing = [r.kind for r in (self.services, self.slices) if not r.synced.is_set()]
            raise TimeoutError("no state from the Kubernetes API after %gs (not listed yet: %s; last error: %s)"
                               % (timeout, ", ".join(missing) or "none",
                                  self.services.stats.last_error or self.slices.stats.last_error or "none"))
        latest = self.latest()
        assert latest is not None
        return latest

    def latest(self) -> cfg.Config | None:
        """The last Config delivered (None before the first)."""
        with self._lock:
            return self._latest

    def set_base(self, base: cfg.Config) -> None:
        """A new base (SIGHUP reloaded the file): rebuild and deliver if it changes anything."""
        with self._lock:
            self._base = base
        self._dirty.set()

    # --- internals -----------------------------------------------------------------
    def _changed(self) -> None:
        self._dirty.set()

    def synced(self) -> bool:
        return self.services.synced.is_set() and self.slices.synced.is_set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._dirty.wait()
            if self._stop.is_set():
                return
            first = time.monotonic()
            while True:  # wait for a quiet period, bounded by max_delay
                self._dirty.clear()
                left = self.max_delay - (time.monotonic() - first)
                if self._stop.wait(max(0.0, min(self.debounce, left))):
                    return
                if not self._dirty.is_set() or time.monotonic() - first >= self.max_delay:
                    break
            if not self.synced():
                continue  # the missing reflector's first list marks us dirty again
            try:
                self._build_and_deliver()
            except Exception as e:  # noqa: BLE001 - a bug here must not end discovery
                self.log.exception("discovery_build_failed", error=str(e))

    def _build_and_deliver(self) -> None:
        with self._lock:
            base = self._base
        res = build_config(self.services.items(), self.slices.items(), base, self._order, self.node_name)
        self._order = res.admitted + res.left_out
        self.last_result = res
        new_errors = set(res.errors) - self._reported
        for e in sorted(new_errors):
            self.log.error("kubernetes_object_skipped", problem=e)
        self._reported = set(res.errors)
        with self._lock:
            changed = res.config != self._latest
            if changed:
                self._latest = res.config
        if not changed:
            return
        self.deliveries += 1
        self.log.info("discovered", services=len(res.config.services),
                      backends=sum(len(s.backends) for s in res.config.services),
                      without_endpoints=len(res.empty), skipped=len(res.errors))
        try:
            self.on_change(res.config)
        finally:
            self._delivered.set()
