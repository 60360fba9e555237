"""Leader election on a coordination.k8s.io/v1 Lease, the way client-go's
`tools/leaderelection` does it, on the official Python client.

One coordinator among several replicas acts; the others wait. The Lease
holds the record (`holderIdentity`, `leaseDurationSeconds`, `acquireTime`,
`renewTime`, `leaseTransitions`); every write carries the resourceVersion
the writer read, so of two racing writers the API server accepts one and
answers the other 409 Conflict (or AlreadyExists on create).

    candidate: every retry period (jittered), read the Lease;
      absent -> create it holding it;
      held by another and not expired -> wait;
      expired or released (holder "") -> replace it (resourceVersion-checked).
    leader: every retry period, renew (replace with renewTime = now);
      no successful renewal for renew_deadline -> stop acting, back to candidate;
      someone else holds it -> stop acting at once.
    stop(): stop acting, then release (holder "", leaseDurationSeconds 1) so
      a successor takes over at its next retry instead of after the lease.

Expiry is judged by this process's own clock, as client-go does: it notes
(monotonic) when it last saw the record *change* and calls the lease expired
`leaseDurationSeconds` after that. The holder's `renewTime` (another node's
wall clock) is written for people and tools, never trusted.

Why never two leaders: the leader counts its deadline from the *start* of
its last successful renewal, which is before the write; a rival counts the
lease duration from when it *saw* that write, which is after it. With
renew_deadline < lease_duration the leader stops (`is_leader()` turns false
even while a request hangs) before any rival may take over, bar clock-rate
drift of (lease_duration - renew_deadline) / lease_duration (33 % at the
defaults).
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

from kubernetes.client.exceptions import ApiException

from .. import logs
from .channel_types import run_callback

#: the coordinator's Lease (in the agents' namespace); daemonset/coordinator/rbac.yaml grants it by name
DEFAULT_LEASE_NAME = "equilibrium-coordinator"
#: client-go's wait.JitterUntil factor for the candidate's retries: a random
#: extra up to 1.2 x retry_period, so candidates do not poll in lockstep
JITTER = 1.2


@dataclass(frozen=True)
class ElectionTiming:
    """Seconds. Defaults are client-go's and kube-controller-manager's
    (`--leader-elect-lease-duration=15s`, `--leader-elect-renew-deadline=10s`,
    `--leader-elect-retry-period=2s`)."""

    lease_duration: int = 15  #: how long a rival waits after the last change it saw (whole seconds: an int32 field)
    renew_deadline: float = 10.0  #: the leader stops acting after this long without a successful renewal
    retry_period: float = 2.0  #: between attempts to acquire or renew

    def __post_init__(self) -> None:
        # client-go's NewLeaderElector checks the same two orderings
        if not self.lease_duration > self.renew_deadline:
            raise ValueError("lease_duration must be greater than renew_deadline")
        if not self.renew_deadline > JITTER * self.retry_period:
            raise ValueError("renew_deadline must be greater than %.1f x retry_period" % JITTER)


def _micro_time(t: datetime) -> str:
    """A Kubernetes MicroTime: RFC 3339 with microseconds, UTC."""
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


Record = tuple[str, int, str, str, int]  # holder, duration, acquireTime, renewTime, transitions


def _record(spec: Any) -> Record:
    s = spec if isinstance(spec, dict) else {}

    def num(k: str, default: int) -> int:
        v = s.get(k)
        return v if isinstance(v, int) and not isinstance(v, bool) else default

    return (str(s.get("holderIdentity") or ""), num("leaseDurationSeconds", 0), str(s.get("acquireTime") or ""),
            str(s.get("renewTime") or ""), num("leaseTransitions", 0))


class LeaseElector:
    """Run an election for `identity` on Lease `namespace/name` in a thread.

    `is_leader()` is the answer to "may I act now?"; it turns false at the
    renew deadline even if the thread is stuck in a request. The callbacks
    run on the elector's thread: `on_started_leading` after the Lease is
    won, `on_stopped_leading` after leadership is lost or given up (never
    without a start before it). Keep them short.
    """

    def __init__(self, api_client: Any, namespace: str, name: str, identity: str, *,
                 timing: ElectionTiming | None = None,
                 on_started_leading: Callable[[], None] | None = None,
                 on_stopped_leading: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        from kubernetes import client

        if not identity:
            raise ValueError("an elector needs a non-empty identity")
        # Any: the calls pass JSON dicts and read raw responses (_preload_content=False)
        self.api: Any = client.CoordinationV1Api(api_client)
        self.namespace, self.name, self.identity = namespace, name, identity
        self.timing = timing or ElectionTiming()
        self.on_started_leading, self.on_stopped_leading = on_started_leading, on_stopped_leading
        self.clock = clock
        self.log = logs.get("discovery").bind(lease="%s/%s" % (namespace, name), identity=identity)
        self._lock = threading.Lock()
        self._leading = False
        self._renewed_at = 0.0  # clock() at the start of the last successful acquire/renew
        self._observed: Record | None = None
        self._observed_at = 0.0  # clock() when the record was last seen to change
        self._usurped = False
        self._stop = threading.Event()
        self._release = True
        self._thread: threading.Thread | None = None
        self.transitions_seen = 0  # times this elector became leader

    # --- public -----------------------------------------------------------------
    def is_leader(self) -> bool:
        with self._lock:
            return self._leading and self.clock() - self._renewed_at < self.timing.renew_deadline

    @property
    def epoch(self) -> int:
        """The leadership term: the Lease's leaseTransitions as last seen (a new
        holder bumps it, so a newer leader's word carries a larger epoch)."""
        with self._lock:
            return self._observed[4] if self._observed is not None else 0

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("elector already started")
        self._thread = threading.Thread(target=self._run, name="lease-elector-%s" % self.identity, daemon=True)
        self._thread.start()

    def stop(self, release: bool = True, timeout: float = 10.0) -> None:
        """Stop acting and campaigning. `release=False` leaves the Lease as is,
        as a killed process would: rivals wait for it to expire."""
        self._release = release
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # --- the loop ---------------------------------------------------------------
    def _run(self) -> None:
        t = self.timing
        self.log.info("leader_election_starting", lease_duration_seconds=t.lease_duration,
                      renew_deadline_seconds=t.renew_deadline, retry_period_seconds=t.retry_period)
        while not self._stop.is_set():
            started = self.clock()
            if not self._try_acquire_or_renew():
                self._stop.wait(t.retry_period + random.uniform(0, JITTER * t.retry_period))
                continue
            self._lead(started)
        self.log.info("leader_election_stopped")

    def _lead(self, started: float) -> None:
        t = self.timing
        with self._lock:
            self._leading, self._renewed_at, self._usurped = True, started, False
        self.transitions_seen += 1
        self.log.info("leadership_acquired")
        run_callback(self.log, self.on_started_leading)
        reason = "stopped"
        while not self._stop.wait(t.retry_period):
            started = self.clock()
            if self._try_acquire_or_renew():
                with self._lock:
                    self._renewed_at = started
                continue
            if self._usurped:
                reason = "lease taken by another holder"
                break
            if self.clock() - self._renewed_at >= t.renew_deadline:
                reason = "no renewal within the renew deadline"
                break
        with self._lock:
            self._leading = False  # stop acting before anything else
        if self._stop.is_set() and self._release:
            self._release_lease()
        if reason == "stopped":
            self.log.info("leadership_given_up", released=self._release)
        else:
            self.log.warning("leadership_lost", reason=reason)
        run_callback(self.log, self.on_stopped_leading)

    # --- one attempt: client-go's tryAcquireOrRenew ------------------------------
    def _timeout(self) -> float:
        # a hung call must leave room for another attempt before the deadline
        return max(0.5, self.timing.renew_deadline / 2)

    def _read(self) -> tuple[dict[str, Any] | None, bool]:
        """(the Lease as JSON or None if absent, ok)."""
        try:
            resp = self.api.read_namespaced_lease(self.name, self.namespace, _preload_content=False,
                                                  _request_timeout=self._timeout())
            obj = json.loads(resp.data)
        except ApiException as e:
            if e.status == 404:
                return None, True
            self.log.warning("lease_read_failed", status=e.status, error=e.reason)
            return None, False
        except Exception as e:  # urllib3 errors, timeouts, bad JSON
            self.log.warning("lease_read_failed", error=str(e))
            return None, False
        if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
            self.log.warning("lease_read_failed", error="not a Lease object")
            return None, False
        return obj, True

    def _write(self, create: bool, body: dict[str, Any]) -> bool:
        try:
            if create:
                self.api.create_namespaced_lease(self.namespace, body, _preload_content=False,
                                                 _request_timeout=self._timeout())
            else:
                self.api.replace_namespaced_lease(self.name, self.namespace, body, _preload_content=False,
                                                  _request_timeout=self._timeout())
        except ApiException as e:
            if e.status == 409:  # a rival wrote first: normal in a race, not a warning
                self.log.debug("lease_write_conflict", create=create)
            else:
                self.log.warning("lease_write_failed", status=e.status, error=e.reason)
            return False
        except Exception as e:  # urllib3 errors, timeouts
            self.log.warning("lease_write_failed", error=str(e))
            return False
        return True

    def _spec(self, acquire_time: str, transitions: int, now: str) -> dict[str, Any]:
        return {"holderIdentity": self.identity, "leaseDurationSeconds": self.timing.lease_duration,
                "acquireTime": acquire_time, "renewTime": now, "leaseTransitions": transitions}

    def _try_acquire_or_renew(self) -> bool:
        now = _micro_time(datetime.now(timezone.utc))
        obj, ok = self._read()
        if not ok:
            return False
        if obj is None:
            spec = self._spec(now, 0, now)
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace}, "spec": spec}
            if not self._write(True, body):
                return False
            self._saw(_record(spec))
            return True
        rec = _record(obj.get("spec"))
        self._saw(rec)
        holder, duration, acquired, _, transitions = rec
        with self._lock:
            leading = self._leading
        if holder and holder != self.identity:
            if leading:
                self._usurped = True
            if self._observed_at + duration > self.clock():
                return False  # held, and not expired by our own observation
        if holder == self.identity and leading:
            spec = self._spec(acquired or now, transitions, now)
        else:  # taking it over (or our own record from a previous life): a transition
            spec = self._spec(now, transitions + 1, now)
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace,
                             "resourceVersion": obj["metadata"].get("resourceVersion")},
                "spec": spec}
        if not self._write(False, body):
            return False
        self._saw(_record(spec))
        return True

    def _saw(self, rec: Record) -> None:
        if rec != self._observed:
            self._observed, self._observed_at = rec, self.clock()

    def _release_lease(self) -> None:
        """client-go's release(): holder "", leaseDurationSeconds 1, only if we hold it."""
        obj, ok = self._read()
        if not ok or obj is None:
            return
        holder, _, _, _, transitions = _record(obj.get("spec"))
        if holder != self.identity:
            return
        now = _micro_time(datetime.now(timezone.utc))
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace,
                             "resourceVersion": obj["metadata"].get("resourceVersion")},
                "spec": {"holderIdentity": "", "leaseDurationSeconds": 1, "acquireTime": now, "renewTime": now,
                         "leaseTransitions": transitions}}
        self._write(False, body)
