"""The agent's side of the cross-node coordinator (issue 15): publish this
node's summary, read its recommendations, and follow one only while it is
fresh and obeying it pays for this node by its own observations.

Per tick (on the agent's loop, vectorized over the services, no I/O):
* smooth each backend's offered load (req/s) and latency (over a decaying
  window of responses: a tick sees few responses per backend);
* for each followed service: still fresh (by the coordinator's expiry *and*
  by this node's clock since it was read, so a skewed clock can only shorten
  it)? Then its row of the weights is the recommendation's split over the
  backends this node can route to. A service that stops being followed eases
  back to its own learned weights over a few ticks (HANDOVER) instead of
  jumping: the engine has kept learning all along, so nothing restarts.

On its own thread, every `period` seconds (no tick ever waits for the API
server): publish the summary of the most loaded learning services (at most
`max_services`, each with at most `MAX_BACKENDS` backends), read this node's
recommendations, and judge each one with `coordination.should_follow` against
the node's latest own summary (the obedience check is an LP-sized piece of
work, not a per-tick one).

What is followed and why not is in `status()` (equilibriumctl status) and in
the metrics (`equilibrium_coordination_*`).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from ..discovery.channel_types import Message, Outcome, recommendation_name, summary_name
from ..policy import bundle
from ..policy import coordination as co
from .routing import Layout, Signals

#: services with more backends are not summarised (the coordinator would not take them)
MAX_BACKENDS = 16
#: a node publishes at most this many services (the most loaded): bounded object size
MAX_SERVICES = 64
#: the window of the published load and latency: weights decay by (1 - this) per tick;
#: latency is a mean over the window's responses, so a backend this node stopped sending
#: to fades out (no estimate) instead of keeping a stale one (the simulator found that a
#: stale latency kept small backends looking slow: lab/sim/coordinated.py)
EWMA = 0.3
#: the same, longer, for this node's own obedience check (few responses a tick)
OBEY_EWMA = 0.1
#: a latency estimate needs this many (decayed) responses, else none
MIN_SAMPLES = 1.0
#: after a service stops being followed, the last followed weights' share falls by this
#: factor per tick (the simulator's choice, lab/sim/coordinated.py: abrupt switches herd)
HANDOVER = 0.93
#: below this share of the last followed weights, the row is its own again
HANDOVER_DONE = 0.02
REASONS = ("expired", "not_incentive_compatible", "backends_differ", "no_recommendation")


class ChannelLike(Protocol):
    def publish(self, name: str, payload: dict[str, Any], channel: str) -> Outcome: ...
    def read(self, name: str) -> Message: ...


def _reason_key(why: str) -> str:
    if why.startswith("not incentive"):
        return "not_incentive_compatible"
    if why.startswith("backends"):
        return "backends_differ"
    if why == "expired":
        return "expired"
    return "no_recommendation"


@dataclass
class Verdict:
    rec: co.Recommendation
    follow: bool
    why: str                 #: "following", or why not (should_follow's words)
    read_at: float           #: this node's monotonic clock when it was read


@dataclass
class Stats:
    published: int = 0
    publish_failures: int = 0
    reads: int = 0
    read_failures: int = 0
    refused: int = 0                      #: recommendation entries refused as malformed
    fallbacks: dict[str, int] = field(default_factory=lambda: {r: 0 for r in REASONS})
    newest_issued: float | None = None    #: unix time the newest recommendation read was issued


class Follower:
    def __init__(self, channel: ChannelLike, node: str, log: Any, *, period: float = 10.0,
                 max_services: int = MAX_SERVICES, clock: Callable[[], float] = time.time,
                 mono: Callable[[], float] = time.monotonic) -> None:
        self.channel, self.node, self.log = channel, node, log
        self.period, self.max_services = period, max_services
        self.clock, self.mono = clock, mono
        self.stats = Stats()
        self._lock = threading.Lock()
        self._layout: Layout | None = None
        #: decayed sums, updated in place each tick (under _lock; the thread copies them):
        #: requests (and seconds) over the short window, latency x responses and responses
        #: over the short and the long (obedience) window
        self._sent = np.zeros((0, 0))
        self._secs = 0.0
        self._ls, self._ns = np.zeros((0, 0)), np.zeros((0, 0))
        self._ll, self._nl = np.zeros((0, 0)), np.zeros((0, 0))
        self._verdicts: dict[str, Verdict] = {}         # service -> the thread's latest verdict
        self.state: dict[str, str] = {}                 # service -> "following" or why not (this tick)
        self._followed: dict[str, np.ndarray] = {}      # service -> last followed row (layout width)
        self._easing: dict[str, tuple[np.ndarray, float]] = {}   # service -> (row, its share now)
        self._summarised: set[str] = set()             # services in the last summary
        #: service -> (recommendation, layout, its row): built once, not every tick
        self._rows: dict[str, tuple[co.Recommendation, Layout, np.ndarray | None]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the tick (agent loop) ----------------------------------------------------
    def set_layout(self, layout: Layout) -> None:
        with self._lock:
            self._layout = layout
            self._sent = np.zeros(layout.shape)
            self._secs = 0.0
            self._ls, self._ns = np.zeros(layout.shape), np.zeros(layout.shape)
            self._ll, self._nl = np.zeros(layout.shape), np.zeros(layout.shape)
            self._followed.clear()
            self._easing.clear()
            self._rows.clear()

    def tick(self, sig: Signals, w: np.ndarray, dt: float) -> np.ndarray:
        """This tick's weights with followed services' rows replaced; `w` is not modified."""
        lay = self._layout
        if lay is None or w.shape != lay.shape or sig.latency.shape != lay.shape:
            return w
        seen = np.isfinite(sig.latency)
        n = np.where(seen, sig.served, 0.0)
        ln = np.where(seen, sig.latency, 0.0) * n
        with self._lock:   # in place: the estimates (a division) are the thread's, once a period
            for acc, add, keep in ((self._sent, sig.requests, 1 - EWMA), (self._ls, ln, 1 - EWMA),
                                   (self._ns, n, 1 - EWMA), (self._ll, ln, 1 - OBEY_EWMA),
                                   (self._nl, n, 1 - OBEY_EWMA)):
                acc *= keep
                acc += add
            self._secs = (1 - EWMA) * self._secs + dt
            verdicts = dict(self._verdicts)
        out = w
        now, mono = self.clock(), self.mono()
        state: dict[str, str] = {}
        for name, v in verdicts.items():
            r = lay.row.get(name)
            if r is None:
                continue
            follow, why = v.follow, v.why
            if follow and not (now < v.rec.expires and mono - v.read_at < v.rec.expires - v.rec.issued):
                follow, why = False, "expired"
            row = self._cached_row(lay, r, name, v.rec) if follow else None
            if follow and row is None:
                follow, why = False, "backends differ from the recommendation's"
            if row is not None:
                if out is w:
                    out = w.copy()
                out[r] = row
                self._followed[name] = row
                self._easing.pop(name, None)
            elif name in self._followed:
                self._stop_following(name, why)
            state[name] = "following" if row is not None else why
        for name in list(self._followed):
            if name not in verdicts and name in lay.row:
                self._stop_following(name, "no recommendation")
        out = self._ease(lay, out, w)
        for name in self._summarised - set(state):
            state[name] = "no recommendation"
        self.state = state
        return out

    def _stop_following(self, name: str, why: str) -> None:
        row = self._followed.pop(name)
        self._easing[name] = (row, 1.0)
        self.stats.fallbacks[_reason_key(why)] += 1
        self.log.info("coordination_fallback", service=name, reason=why)

    def _ease(self, lay: Layout, out: np.ndarray, w: np.ndarray) -> np.ndarray:
        for name, (row, share) in list(self._easing.items()):
            r = lay.row.get(name)
            share *= HANDOVER
            if r is None or share < HANDOVER_DONE:
                del self._easing[name]
                continue
            self._easing[name] = (row, share)
            own = w[r] / w[r].sum() if w[r].sum() > 0 else w[r]
            if out is w:
                out = w.copy()
            out[r] = share * row + (1 - share) * own
        return out

    def _cached_row(self, lay: Layout, r: int, name: str, rec: co.Recommendation) -> np.ndarray | None:
        """`_row`, computed once per recommendation and layout (the tick then only copies it)."""
        got = self._rows.get(name)
        if got is not None and got[0] is rec and got[1] is lay:
            return got[2]
        row = self._row(lay, r, rec)
        self._rows[name] = (rec, lay, row)
        return row

    @staticmethod
    def _row(lay: Layout, r: int, rec: co.Recommendation) -> np.ndarray | None:
        """The recommendation's split in layout order, over what this node can route to."""
        col = {str(k): i for i, k in enumerate(lay.keys[r])}
        row = np.zeros(lay.shape[1])
        for b, x in zip(rec.backends, rec.weights):
            i = col.get(b)
            if i is None:
                return None
            row[i] = x
        row = np.where(lay.routable[r], row, 0.0)
        s = row.sum()
        return row / s if s > 0 else None

    def _view_now(self) -> tuple[Layout, np.ndarray, np.ndarray, np.ndarray] | None:
        """(layout, load, latency, latency for obedience) from the sums as the last tick left them."""
        with self._lock:
            lay = self._layout
            if lay is None or self._secs <= 0:
                return None
            load = self._sent / self._secs
            ls, ns, ll, nl = self._ls.copy(), self._ns.copy(), self._ll.copy(), self._nl.copy()
        with np.errstate(invalid="ignore", divide="ignore"):
            return (lay, load, np.where(ns >= MIN_SAMPLES, ls / ns, np.nan),
                    np.where(nl >= MIN_SAMPLES, ll / nl, np.nan))

    def _build_summary(self, lay: Layout, load_sb: np.ndarray, lat_sb: np.ndarray,
                       lat_long: np.ndarray) -> tuple[co.NodeSummary, dict[str, co.ServiceSummary]]:
        """What this node publishes, and its own view for the obedience check (longer window)."""
        learning = np.array([p.startswith("equilibrium") for p in lay.policies], dtype=bool)
        nb = lay.present.sum(axis=1)
        ok = learning & (nb > 0) & (nb <= MAX_BACKENDS) & (lay.ids >= 0).any(axis=1)
        load = load_sb.sum(axis=1)
        rows = np.nonzero(ok)[0]
        rows = rows[np.argsort(-load[rows], kind="stable")][:self.max_services]
        svcs, mine = {}, {}
        for r in rows:
            n = int(nb[r])
            bes, load_r = tuple(str(k) for k in lay.keys[r][:n]), tuple(float(x) for x in load_sb[r, :n])
            svcs[lay.names[r]] = co.ServiceSummary(bes, load_r, tuple(float(x) for x in lat_sb[r, :n]))
            mine[lay.names[r]] = co.ServiceSummary(bes, load_r, tuple(float(x) for x in lat_long[r, :n]))
        return co.NodeSummary(self.node, self.clock(), svcs), mine

    # --- the channel thread -----------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="coordination", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.exchange()
            except Exception:  # noqa: BLE001 - the channel must never stop the agent
                self.log.exception("coordination_exchange_failed")
            self._stop.wait(self.period)

    def exchange(self) -> None:
        """Publish the latest summary, read this node's recommendations, judge them."""
        view = self._view_now()
        summary, own = self._build_summary(*view) if view is not None else (None, {})
        if summary is not None:
            self._summarised = set(summary.services)
        if summary is not None and summary.services:
            out = self.channel.publish(summary_name(self.node), _payload(summary), "summary")
            if out == "written":
                self.stats.published += 1
            elif out == "failed":
                self.stats.publish_failures += 1
        m = self.channel.read(recommendation_name(self.node))
        self.stats.reads += 1
        if m.payload is None:
            if m.error and m.error != "not found":
                self.stats.read_failures += 1
                return                   # keep what we have: each verdict still expires on its own
            with self._lock:
                self._verdicts = {}
            return
        got = bundle.unpack(m.payload, self.node)
        if got.errors:
            self.stats.refused += len(got.errors)
            self.log.warning("recommendations_refused", count=len(got.errors), first=got.errors[0][:200])
        now, mono = self.clock(), self.mono()
        verdicts = {}
        for svc, rec in got.recommendations.items():
            follow, why = co.should_follow(rec, own.get(svc), now)
            verdicts[svc] = Verdict(rec, follow, why, mono)
            self.stats.newest_issued = max(self.stats.newest_issued or 0.0, rec.issued)
        with self._lock:
            self._verdicts = verdicts

    # --- views -------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        following = sorted(n for n, s in self.state.items() if s == "following")
        age = None if self.stats.newest_issued is None else max(0.0, self.clock() - self.stats.newest_issued)
        return {"node": self.node, "following": following, "services": dict(sorted(self.state.items())),
                "published": self.stats.published, "publish_failures": self.stats.publish_failures,
                "read_failures": self.stats.read_failures, "refused": self.stats.refused,
                "fallbacks": dict(self.stats.fallbacks), "recommendation_age_seconds": age}


def _payload(s: co.NodeSummary) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(s.to_json())
    return out
