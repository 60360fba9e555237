"""`equilibriumd coordinate`: the correlated-equilibrium coordinator's rounds.

Every `interval` seconds, while this process leads (a Lease in the cluster,
a flock on one machine; followers only wait):

1. read every node's summary from the channel (one list call);
2. keep the fresh ones: a summary whose object has not changed for
   `stale_after` seconds, *by this process's clock*, is stale (its agent is
   gone or cut off). A node's own clock is never trusted for this, nor is its
   summary trusted for another node: a summary must sit in the object named
   after the node it describes;
3. solve one correlated equilibrium per service with several calling nodes
   (`policy.coordination.recommend`, the model averaged over rounds);
4. write each node its bundle of recommendations (`policy.bundle`), which
   expire `ttl` seconds after they are issued; a node that had
   recommendations last round and has none now gets an empty bundle, and a
   node whose summary object is gone has its recommendation object deleted;
5. check obedience from each node's own summary for up to `checks` of the
   recommendations (rotating through them): how often following would not
   pay for a node by its own observations is what
   `equilibrium_coordinator_obedience_violations_total` counts.

Every input is untrusted: a malformed or oversized summary is counted and
skipped; a round that raises is logged and counted and the next one runs.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from .. import logs
from ..discovery.channel_types import Listing, Outcome, PayloadTooLarge, recommendation_name, summary_name
from ..policy import bundle
from ..policy import coordination as co

#: services with more backends than this are not coordinated: the game's joint
#: distribution has (backends + 1)^players entries (17^3 = 4,913 at 16)
MAX_BACKENDS = 16
#: obedience checks per round (each rebuilds one service's game for one node)
CHECKS_PER_ROUND = 200
#: services solved per round, the most loaded (one LP each, ~10 ms at 8 backends:
#: `scripts/bench coordinator`); the others are left to learn alone
MAX_SERVICES = 256


class ChannelLike(Protocol):
    def publish(self, name: str, payload: dict[str, Any], channel: str) -> Outcome: ...
    def read_all(self, channel: str) -> Listing: ...
    def delete(self, name: str) -> bool: ...


class ElectorLike(Protocol):
    identity: str

    def is_leader(self) -> bool: ...
    @property
    def epoch(self) -> int: ...


@dataclass
class Stats:
    """What /metrics and the logs report (cumulative unless said)."""

    leader: bool = False
    rounds: int = 0
    round_errors: int = 0
    list_failures: int = 0
    last_round_seconds: float = 0.0
    last_round_unix: float = 0.0
    summaries: dict[str, int] = field(default_factory=lambda: {"fresh": 0, "stale": 0, "malformed": 0})
    services: int = 0               #: services coordinated in the last round
    services_left_out: int = 0      #: shared services over max_services in the last round (least loaded)
    published: int = 0              #: recommendations written (one per node and service)
    publish_failures: int = 0
    cut: int = 0                    #: recommendations left out of a node's bundle to fit the size bound
    violations: int = 0             #: obedience checks a node's own summary failed
    checks: int = 0


@dataclass
class Report:
    fresh: int
    stale: int
    malformed: int
    recommendations: int
    nodes_written: int
    violations: int
    seconds: float


class Coordinator:
    def __init__(self, channel: ChannelLike, elector: ElectorLike, *, interval: float = 10.0, ttl: float = 30.0,
                 stale_after: float | None = None, max_backends: int = MAX_BACKENDS,
                 max_services: int = MAX_SERVICES, checks: int = CHECKS_PER_ROUND,
                 clock: Callable[[], float] = time.time, mono: Callable[[], float] = time.monotonic) -> None:
        if not interval > 0 or not ttl > 0:
            raise ValueError("interval and ttl must be > 0")
        self.channel, self.elector = channel, elector
        self.interval, self.ttl = interval, ttl
        self.stale_after = stale_after if stale_after is not None else max(30.0, 3 * interval)
        self.max_backends, self.max_services, self.checks = max_backends, max_services, checks
        self.clock, self.mono = clock, mono
        self.log = logs.get("coordinator").bind(identity=elector.identity)
        self.stats = Stats()
        self.previous: dict[str, co.Recommendation] = {}
        self._seen: dict[str, tuple[str | None, float]] = {}   # summary object -> (version, first seen)
        self._had: set[str] = set()          # nodes given recommendations last round
        self._written: set[str] = set()      # nodes with a recommendation object of ours
        self._check_from = 0
        self._stop = threading.Event()

    # --- one round -------------------------------------------------------------
    def round(self) -> Report | None:
        """One round if this process leads (None otherwise)."""
        self.stats.leader = self.elector.is_leader()
        if not self.stats.leader:
            self.previous, self._had = {}, set()   # a new term starts its model afresh
            return None
        t0 = time.perf_counter()
        listing = self.channel.read_all("summary")
        if listing.error:
            self.stats.list_failures += 1
            self.log.warning("summaries_unreadable", error=listing.error)
            return None
        fresh, stale, malformed, present = self._fresh(listing)
        self.stats.services_left_out = 0
        fresh = self._most_loaded(fresh)
        now = self.clock()
        recs = co.recommend(fresh, now, self.ttl, coordinator=self.elector.identity, epoch=self.elector.epoch,
                            previous=self.previous)
        self.previous = {r.service: r for r in recs}
        by_node: dict[str, list[co.Recommendation]] = {}
        for r in recs:
            by_node.setdefault(r.node, []).append(r)
        written = self._write(by_node, now)
        self._forget(present)
        violations = self._check(recs, fresh)
        st = self.stats
        st.rounds += 1
        st.summaries = {"fresh": len(fresh), "stale": stale, "malformed": malformed}
        st.services = len(self.previous)
        st.last_round_seconds = time.perf_counter() - t0
        st.last_round_unix = now
        rep = Report(len(fresh), stale, malformed, len(recs), written, violations, st.last_round_seconds)
        self.log.debug("coordinator_round", **rep.__dict__)
        return rep

    def _fresh(self, listing: Listing) -> tuple[list[co.NodeSummary], int, int, set[str]]:
        now = self.mono()
        fresh: list[co.NodeSummary] = []
        stale = malformed = 0
        present: set[str] = set()
        for m in listing.messages:
            seen = self._seen.get(m.name)
            if seen is None or seen[0] != m.resource_version:
                self._seen[m.name] = seen = (m.resource_version, now)
            try:
                if m.payload is None:
                    raise ValueError(m.error or "no payload")
                s = co.NodeSummary.from_json(json.dumps(m.payload))
                if summary_name(s.node) != m.name:
                    raise ValueError("describes node %s, not the object's own" % s.node)
            except ValueError as e:
                malformed += 1
                self.log.warning("summary_refused", object=m.name, error=str(e)[:200])
                continue
            present.add(s.node)
            if now - seen[1] > self.stale_after:
                stale += 1
                continue
            svcs = {k: v for k, v in s.services.items() if len(v.backends) <= self.max_backends}
            fresh.append(co.NodeSummary(s.node, s.time, svcs))
        names = {m.name for m in listing.messages}
        for gone in set(self._seen) - names:
            del self._seen[gone]
        return fresh, stale, malformed, present

    def _most_loaded(self, fresh: list[co.NodeSummary]) -> list[co.NodeSummary]:
        """Only the `max_services` services with the most load over their several callers."""
        load: dict[str, float] = {}
        callers: dict[str, int] = {}
        for s in fresh:
            for name, v in s.services.items():
                load[name] = load.get(name, 0.0) + sum(v.load)
                callers[name] = callers.get(name, 0) + 1
        shared = [n for n in load if callers[n] >= 2]
        if len(shared) <= self.max_services:
            return fresh
        keep = set(sorted(shared, key=lambda n: (-load[n], n))[:self.max_services])
        self.stats.services_left_out = len(shared) - len(keep)
        return [co.NodeSummary(s.node, s.time, {k: v for k, v in s.services.items() if k in keep}) for s in fresh]

    def _write(self, by_node: dict[str, list[co.Recommendation]], now: float) -> int:
        written = 0
        # nodes that had recommendations and have none now get an empty bundle (they stop
        # following at once rather than at expiry)
        for node in sorted(set(by_node) | self._had):
            # the node's most loaded services first: what is cut to fit the size bound is the least
            recs = sorted(by_node.get(node, []), key=lambda r: -r.loads[r.player])
            while True:
                payload = bundle.pack(node, recs, coordinator=self.elector.identity, epoch=self.elector.epoch,
                                      issued=now)
                try:
                    out = self.channel.publish(recommendation_name(node), payload, "recommendation")
                    break
                except PayloadTooLarge as e:   # over the size bound: the least loaded services learn alone
                    if len(recs) <= 1:
                        out = "failed"
                        self.log.warning("recommendation_not_written", node=node, error=str(e))
                        break
                    self.stats.cut += len(recs) - len(recs) // 2
                    recs = recs[:len(recs) // 2]
            if out == "written":
                written += 1
                self.stats.published += len(recs)
                self._written.add(node)
            elif out == "failed":
                self.stats.publish_failures += 1
        self._had = {n for n, r in by_node.items() if r}
        return written

    def _forget(self, present: set[str]) -> None:
        """Delete the recommendation objects of nodes whose summary object is gone."""
        for node in sorted(self._written - present):
            if self.channel.delete(recommendation_name(node)):
                self._written.discard(node)
                self.log.info("recommendation_deleted", node=node, reason="its summary is gone")

    def _check(self, recs: list[co.Recommendation], fresh: list[co.NodeSummary]) -> int:
        if not recs or self.checks <= 0:
            return 0
        own = {s.node: s for s in fresh}
        n = min(self.checks, len(recs))
        start = self._check_from % len(recs)
        violations = 0
        for i in range(n):
            r = recs[(start + i) % len(recs)]
            mine = own[r.node].services.get(r.service) if r.node in own else None
            if co.obedience_gain(r, mine) > co.TOLERANCE:
                violations += 1
        self._check_from = start + n
        self.stats.checks += n
        self.stats.violations += violations
        return violations

    # --- the loop --------------------------------------------------------------
    def run(self) -> None:
        """Rounds on a fixed grid until `stop()`; a round that raises is logged and counted."""
        next_at = self.mono()
        while not self._stop.is_set():
            try:
                self.round()
            except Exception:  # noqa: BLE001 - one bad round must not end coordination
                self.stats.round_errors += 1
                self.log.exception("coordinator_round_failed")
            next_at += self.interval
            now = self.mono()
            if next_at < now:       # overran: skip to the next grid point, never stretch
                next_at = now + self.interval - (now - next_at) % self.interval
            self._stop.wait(next_at - now)

    def stop(self) -> None:
        self._stop.set()
