"""Prometheus /metrics for the agent, built at scrape time.

Nothing here runs on the control loop: a scrape reads (a) the agent's
snapshot (game state: probabilities, regret, status...), which the agent
builds when asked, at most once per tick, and (b) the cumulative per-backend
counters straight from the pinned maps.
Names follow `equilibrium_<subsystem>_<what>_<unit>`, base units, `_total` on
counters; the only labels are `service` and `backend` ("ip:port"), plus `le`
on histogram buckets and `reason` on the rebalancer's closes
(`equilibrium_rebalanced_connections_total`). A failing map read is logged, counted in
`equilibrium_agent_scrape_errors_total` and skipped: a scrape never raises.

Subsystems: `agent` (the process), `nash` and `convergence` (per service),
`routing` (the learner's view of each backend), `backend` (what the kernel
measured for each backend), `service` (translation failures in the kernel).
"""

from __future__ import annotations

import gc
import ipaddress
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterable, Iterator, Optional, Protocol

import numpy as np
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)

from . import logs
from .datapath.constants import MAX_REVNAT as REVNAT_CAPACITY
from .datapath.constants import RB_REASONS
from .datapath.structs import HIST_BUCKETS
from .datapath.telemetry import CONNECT_FAILED, COUNTER, FAILED, in_flight, total

DEFAULT_ADDR = "127.0.0.1:9500"
LABELS = ["service", "backend"]

#: Upper bounds (seconds) of the log2-µs histogram buckets: bucket i holds
#: [2^i, 2^(i+1)) µs. The kernel clamps the last bucket, so it goes to +Inf only.
LE_SECONDS = [2.0 ** (i + 1) * 1e-6 for i in range(HIST_BUCKETS - 1)]
_LE_TEXT = ["%.9g" % le for le in LE_SECONDS] + ["+Inf"]


class MetricsSource(Protocol):
    """What the collector reads from the agent (duck-typed: metrics sits below agent)."""

    def metrics_snapshot(self, max_backends: int) -> dict[str, Any]: ...
    dp: Any          #: datapath.maps.Datapath, or None before start
    telemetry: Any   #: datapath.telemetry.TelemetryReader, or None
    rec: Any         #: agent.reconcile.Reconciler (service ids), or None
    enforcer: Any    #: agent.enforce.Enforcer (the cooperation game), or None


#: backends with series of their own (the first services in config order, whole
#: services); every service has its own series whatever the node's size. About 80
#: samples a backend (counters, two histograms): at 16,384 backends one scrape of
#: them all took 8 s and 1 GB. Each scrape also leaves Python's small-object
#: arenas fragmented in proportion to its size (measured at 100 x 8: +5 MB of
#: RSS at 128 backends, +13 MB at 512). `--metrics-backends` sets it.
DEFAULT_MAX_BACKENDS = 128

#: per-caller series go out only for this many callers, those with the lowest
#: reputation: a node's callers are unbounded, a scrape must not be
WORST_CALLERS = 10


# --- address ------------------------------------------------------------------
def parse_addr(text: str) -> Optional[tuple[str, int]]:
    """"host:port" ("[v6]:port" for IPv6) -> (host, port); "" or "off" -> None.
    ValueError with the reason otherwise."""
    text = text.strip()
    if text.lower() in ("", "off"):
        return None
    host, sep, port_s = text.rpartition(":")
    if not sep or not host:
        raise ValueError("%r: expected HOST:PORT, e.g. 127.0.0.1:9500, [::1]:9500 or 0.0.0.0:9500 "
                         "(\"off\" disables /metrics)" % text)
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError("%r: unbalanced [ ] around the IPv6 address" % text)
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError("%r: %r is not an IPv6 address" % (text, host)) from None
    elif ":" in host:
        raise ValueError("%r: write an IPv6 address in brackets, e.g. [::1]:9500" % text)
    elif not all(c.isalnum() or c in ".-" for c in host):
        raise ValueError("%r: %r is not an IP address or host name" % (text, host))
    if not port_s.isdigit() or not 1 <= int(port_s) <= 65535:
        raise ValueError("%r: port must be 1..65535" % text)
    return host, int(port_s)


# --- collector ------------------------------------------------------------------
def _num(v: Any) -> Optional[float]:
    if v is None or isinstance(v, str):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


class EquilibriumCollector:
    """A prometheus_client custom collector over one agent."""

    def __init__(self, agent: MetricsSource, max_backends: int = DEFAULT_MAX_BACKENDS) -> None:
        self.agent = agent
        self.max_backends = max_backends
        self.log = logs.get("metrics")
        self.scrape_errors = 0
        self._last_error: dict[str, str] = {}  #: per part: log a new problem once, not every scrape
        self._lock = threading.Lock()  # scrapes are threaded; keep the error bookkeeping sane
        self._reader: Any = None       #: datapath.telemetry.TelemetryReader of the scrapes

    def _failed(self, what: str, e: BaseException) -> None:
        with self._lock:
            self.scrape_errors += 1
            if self._last_error.get(what) != str(e):
                self._last_error[what] = str(e)
                self.log.warning("metrics_read_failed", what=what, error=str(e))

    def collect(self) -> Iterator[Metric]:
        """Family by family: the exposition holds one family's samples at a time."""
        snap = self.agent.metrics_snapshot(self.max_backends)
        for part, fn in (("agent", self._agent), ("services", self._services), ("backends", self._backends),
                         ("backend counters", self._telemetry), ("service counters", self._service_errors),
                         ("callers", self._callers), ("admission", self._admission), ("revnat", self._revnat)):
            try:
                yield from fn(snap)
            except Exception as e:  # noqa: BLE001 - a scrape must never raise (a part may end early)
                self._failed(part, e)
        yield CounterMetricFamily("equilibrium_agent_scrape_errors_total",
                                  "Failures while building /metrics (a map read failed; that part was "
                                  "skipped).", value=self.scrape_errors)

    # agent ---------------------------------------------------------------------
    def _agent(self, snap: dict[str, Any]) -> Iterable[Metric]:
        a = snap.get("agent") or {}
        out: list[Metric] = []

        def gauge(name: str, doc: str, v: Any) -> None:
            if _num(v) is not None:
                out.append(GaugeMetricFamily(name, doc, value=float(v)))

        def counter(name: str, doc: str, v: Any) -> None:
            if _num(v) is not None:
                out.append(CounterMetricFamily(name, doc, value=float(v)))

        counter("equilibrium_agent_ticks_total", "Control-loop ticks completed.", a.get("ticks"))
        counter("equilibrium_agent_map_errors_total", "Ticks whose map writes failed (last weights kept).",
                a.get("map_errors_total"))
        counter("equilibrium_agent_tick_errors_total", "Ticks that raised (logged with a traceback; the loop "
                "went on, the tables kept their last weights).", a.get("tick_errors_total"))
        if isinstance(a.get("services_not_admitted"), list):
            gauge("equilibrium_discovery_services_not_admitted", "Discovered services left out: the maps are "
                  "full (they are admitted as room frees up; equilibriumctl status names them).",
                  len(a["services_not_admitted"]))
            gauge("equilibrium_discovery_services_capped", "Discovered services routing to fewer than their "
                  "endpoints: the node's backend slots are shared fairly.", len(a.get("services_capped") or {}))
        counter("equilibrium_discovery_errors_total", "Failed list/watch calls to the Kubernetes API server "
                "(retried with backoff; routing goes on over the last listed objects).",
                a.get("discovery_errors_total"))
        gauge("equilibrium_discovery_consecutive_failures", "Failed list/watch calls in a row now (0: the API "
              "server answers).", a.get("discovery_failing_for"))
        errs = a.get("service_errors_total")
        if isinstance(errs, dict):
            fam = CounterMetricFamily("equilibrium_service_errors_total", "Times a service's policy step raised "
                                      "(the service kept its last tables; the others went on).", labels=["service"])
            for name, n in sorted(errs.items()):
                fam.add_metric([str(name)], float(n))
            out.append(fam)
        gauge("equilibrium_agent_tick_duration_seconds", "Duration of the last tick (read telemetry, run the "
              "policy, write weights).", a.get("last_tick_duration_seconds"))
        gauge("equilibrium_agent_tick_interval_seconds", "Configured control-loop period.", a.get("tick_seconds"))
        counter("equilibrium_agent_tick_overruns_total", "Ticks that took longer than the period (the next one "
                "started on the next grid point; the period is never stretched).", a.get("tick_overruns_total"))
        counter("equilibrium_agent_tables_written_total", "Slot-table halves written by the per-tick path.",
                a.get("tables_written_total"))
        if a.get("last_success_unix"):
            gauge("equilibrium_agent_last_successful_tick_timestamp_seconds",
                  "Unix time of the last tick that completed.", a.get("last_success_unix"))
        gauge("equilibrium_agent_start_time_seconds", "Unix time the agent started.", a.get("started_unix"))
        gauge("equilibrium_agent_resident_memory_bytes", "Agent resident set size at the last tick.",
              a.get("rss_bytes"))
        gauge("equilibrium_agent_services", "Services in the configuration.", a.get("services"))
        if a.get("rebalance") is not None:
            gauge("equilibrium_agent_rebalance_available", "1 when the rebalancer (closing pooled connections "
                  "so they follow the weights) is loaded, else 0 (the agent's log says why).",
                  1 if a.get("rebalance") == "on" else 0)
            counter("equilibrium_agent_rebalance_walks_total", "Socket walks the rebalancer ran (ticks with "
                    "something to move).", a.get("rebalance_walks_total"))
        out.extend(_coordination(a.get("coordination")))
        gauge("equilibrium_agent_metrics_backends_omitted", "Backends without series of their own in /metrics "
              "(over --metrics-backends; their services' series are there, equilibriumctl shows them).",
              a.get("backends_without_series"))
        return out

    # the cooperation game: bounded ----------------------------------------------------
    def _callers(self, snap: dict[str, Any]) -> Iterable[Metric]:
        enf = getattr(self.agent, "enforcer", None)
        if enf is None:
            return []
        standings = enf.standings()
        punished = GaugeMetricFamily("equilibrium_callers_punished", "Callers held to an admission budget for "
                                     "flooding the service (folk-theorem punishment); services with any.",
                                     labels=["service"])
        by_svc: dict[str, int] = {}
        for st in standings:
            if st.state == "punished":
                by_svc[st.service] = by_svc.get(st.service, 0) + 1
        for name, n in sorted(by_svc.items()):
            punished.add_metric([name], n)
        worst = GaugeMetricFamily("equilibrium_caller_reputation", "Reputation (0..1) of the %d callers with the "
                                  "lowest, per (service, caller cgroup id): the only per-caller series."
                                  % WORST_CALLERS, labels=["service", "cgroup"])
        for st in sorted(standings, key=lambda s: s.reputation)[:WORST_CALLERS]:
            worst.add_metric([st.service, str(st.cgroup)], st.reputation)
        return [punished, worst,
                CounterMetricFamily("equilibrium_callers_punishments_total", "Punishments started (a caller "
                                    "flooded an overloaded service beyond its fair share).",
                                    value=enf.punished_total),
                CounterMetricFamily("equilibrium_callers_forgiven_total", "Punished callers forgiven (they "
                                    "kept within their share long enough).", value=enf.forgiven_total)]

    # admission: shedding and the flood defence (agent.enforce); bounded, always present
    def _admission(self, snap: dict[str, Any]) -> Iterable[Metric]:
        enf = getattr(self.agent, "enforcer", None)
        counts = enf.budget_counts() if enf is not None else {"punished": 0, "defended": 0, "shed": 0}
        budgets = GaugeMetricFamily("equilibrium_admission_budgets", "Callers (per caller and service) held to "
                                    "an admission budget now, by the reason that binds: punished (cooperation), "
                                    "shed (the load is over capacity), defended (zero-sum flood defence).",
                                    labels=["reason"])
        for reason in sorted(counts):
            budgets.add_metric([reason], counts[reason])
        return [budgets,
                GaugeMetricFamily("equilibrium_admission_shed_services", "Services whose offered load is over "
                                  "their estimated capacity now (their callers over a fair share are shed).",
                                  value=len(enf.infeasible) if enf is not None else 0),
                GaugeMetricFamily("equilibrium_admission_watched_services", "Services admission watches now "
                                  "(overloaded lately, or holding budgets): the ones with a capacity estimate.",
                                  value=len(enf.admission.watched) if enf is not None else 0)]

    # per service and per backend, from the snapshot -------------------------------
    def _services(self, snap: dict[str, Any]) -> Iterable[Metric]:
        f = {
            "nash": GaugeMetricFamily("equilibrium_nash_status", "1 when the service's routing has converged to "
                                      "equilibrium (detector says converged), else 0.", labels=["service"]),
            "div": GaugeMetricFamily("equilibrium_convergence_diverging", "1 when the convergence detector says "
                                     "the service is diverging, else 0.", labels=["service"]),
            "dist": GaugeMetricFamily("equilibrium_convergence_distance", "Distance to equilibrium (smoothed, "
                                      "dimensionless; 0 at equilibrium).", labels=["service"]),
            "lyap": GaugeMetricFamily("equilibrium_convergence_regret_potential", "Lyapunov regret potential "
                                      "sum of squared positive regrets.", labels=["service"]),
            "gap": GaugeMetricFamily("equilibrium_nash_wardrop_gap_seconds", "Wardrop gap: effective latency of "
                                     "the used backends above the best one.", labels=["service"]),
            "nbe": GaugeMetricFamily("equilibrium_service_backends", "Backends configured.", labels=["service"]),
            "nav": GaugeMetricFamily("equilibrium_service_backends_available", "Backends taking new connections "
                                     "(active, not quarantined).", labels=["service"]),
        }
        for s in snap.get("services", []):
            name = [str(s["name"])]
            status = s.get("status")
            if status in ("converged", "converging", "diverging"):  # policies without a learner say "n/a"
                f["nash"].add_metric(name, 1.0 if status == "converged" else 0.0)
                f["div"].add_metric(name, 1.0 if status == "diverging" else 0.0)
            for key, fam in (("distance", "dist"), ("regret_potential", "lyap"), ("wardrop_gap_seconds", "gap")):
                v = _num(s.get(key))
                if v is not None:
                    f[fam].add_metric(name, v)
            bes = s.get("backends", [])
            f["nbe"].add_metric(name, float(s.get("n_backends", len(bes))))
            f["nav"].add_metric(name, float(s.get("n_available", sum(1 for b in bes if b.get("state") == "active"))))
        return f.values()

    def _backends(self, snap: dict[str, Any]) -> Iterable[Metric]:
        def g(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=LABELS)

        fams = {  # snapshot key -> family
            "probability": g("equilibrium_routing_probability", "Share of new connections sent to the backend "
                             "(the mixed strategy written to the slot table)."),
            "configured_weight": g("equilibrium_routing_configured_weight", "Weight from the configuration "
                                   "(static weight or prior)."),
            "regret": g("equilibrium_routing_regret", "Regret of not having played this backend (learner's "
                        "current cumulative regret)."),
            "payoff": g("equilibrium_routing_payoff", "Payoff of the backend in the last tick."),
            "effective_latency_seconds": g("equilibrium_routing_effective_latency_seconds", "Latency the policy "
                                           "plays against (measured, with failure and load penalties)."),
            "toll_seconds": g("equilibrium_routing_toll_seconds", "Marginal-cost (congestion) toll added to the "
                              "backend's latency."),
            "latency_seconds": g("equilibrium_routing_observed_latency_seconds", "Request latency signal of the "
                                 "last tick, as the policy saw it."),
            "p_failing": g("equilibrium_backend_failing_probability", "Posterior probability that the backend "
                           "is failing (Bayesian belief)."),
        }
        quarantined = g("equilibrium_backend_quarantined", "1 while the backend is quarantined, else 0.")
        draining = g("equilibrium_backend_draining", "1 while the backend is draining, else 0.")
        for s in snap.get("services", []):
            for b in s.get("backends", []):
                lv = [str(s["name"]), str(b["address"])]
                for key, fam in fams.items():
                    v = _num(b.get(key))
                    if v is not None:
                        fam.add_metric(lv, v)
                quarantined.add_metric(lv, 1.0 if b.get("quarantined") else 0.0)
                draining.add_metric(lv, 1.0 if b.get("state") == "draining" else 0.0)
        return [*fams.values(), quarantined, draining]

    # cumulative counters, from the pinned maps ------------------------------------
    def _telemetry(self, snap: dict[str, Any]) -> Iterator[Metric]:
        dp = self.agent.dp
        if dp is not None and self._reader is None:
            # a reader of its own: the tick's reader reuses one buffer, and a scrape
            # runs on its own thread, beside a tick
            self._reader = dp.telemetry()
        reader = self._reader
        rows = [(str(s["name"]), str(b["address"]), int(b["id"]))
                for s in snap.get("services", []) for b in s.get("backends", []) if b.get("id") is not None]
        if dp is None or reader is None or not rows:
            return
        n = max(r[2] for r in rows) + 1  # ids are handed out lowest first: read only that far
        # the counters as the agent's last tick read them: a scrape copies no per-CPU
        # map (at 128 CPUs a full read is ~1.5 MB a backend group); before the first tick, one read
        tick_reader = getattr(self.agent, "telemetry", None)
        c = tick_reader.last_counters(n) if tick_reader is not None else None
        if c is None:
            c = reader.totals(n)[0]
        conn_hist, req_hist = reader.hists(n)   # shared (not per CPU), 256 B an id
        sel = dp.selections(n)

        def col(name: str) -> np.ndarray:
            return c[:, COUNTER[name]]

        def ctr(name: str, doc: str, values: np.ndarray) -> CounterMetricFamily:
            fam = CounterMetricFamily(name, doc, labels=LABELS)
            for svc, addr, i in rows:
                fam.add_metric([svc, addr], float(values[i]))
            return fam

        def gauge(name: str, doc: str, values: np.ndarray) -> GaugeMetricFamily:
            fam = GaugeMetricFamily(name, doc, labels=LABELS)
            for svc, addr, i in rows:
                fam.add_metric([svc, addr], float(values[i]))
            return fam

        i64 = lambda k: col(k).astype(np.int64)  # noqa: E731
        yield from (
            ctr("equilibrium_backend_selections_total", "Connections the kernel steered to the backend.", sel),
            ctr("equilibrium_backend_connect_attempts_total", "TCP connects started (SYN sent).", col("attempts")),
            ctr("equilibrium_backend_connections_total", "TCP connections established.", col("established")),
            ctr("equilibrium_backend_connect_errors_total", "Connections refused, reset or timed out.",
                total(c, CONNECT_FAILED)),
            ctr("equilibrium_backend_connect_refused_total", "Connects answered with a RST.", col("refused")),
            ctr("equilibrium_backend_connect_timeouts_total", "Connects closed in SYN_SENT without a RST "
                "(timed out or abandoned).", col("timed_out")),
            ctr("equilibrium_backend_connection_resets_total", "Established connections reset by a RST.",
                col("reset")),
            gauge("equilibrium_backend_open_connections", "Established minus closed connections.",
                  np.maximum(i64("established") - i64("closed"), 0)),
            gauge("equilibrium_backend_active_connections", "Connections this node holds open to the backend, "
                  "counted by the kernel at connect and close (what balance p2c compares).", dp.active(n)),
            ctr("equilibrium_backend_requests_total", "HTTP/1.x requests sent to the backend.", col("requests")),
            gauge("equilibrium_backend_inflight_requests", "Connections with an HTTP request sent and not yet "
                  "answered (a connection that closes leaves it).", in_flight(c)),
            ctr("equilibrium_backend_requests_unanswered_total", "Requests whose connection closed before a "
                "response.", col("req_errors")),
            ctr("equilibrium_backend_errors_total", "Failed requests and connects: 5xx responses, unanswered "
                "requests, refused and timed-out connects.",
                total(c, FAILED)),
            ctr("equilibrium_backend_retransmits_total", "TCP retransmits (added when a connection closes).",
                col("retrans")),
            ctr("equilibrium_backend_sent_bytes_total", "Bytes sent to the backend and acknowledged (added when "
                "a connection closes).", col("bytes_sent")),
            ctr("equilibrium_backend_received_bytes_total", "Bytes received from the backend (added when a "
                "connection closes).", col("bytes_recv")),
        )
        moved = [(str(s["name"]), str(b["address"]), b["rebalanced"]) for s in snap.get("services", [])
                 for b in s.get("backends", []) if b.get("rebalanced") is not None]
        if moved:   # the snapshot read them (none: the rebalancer is not loaded)
            fam = CounterMetricFamily("equilibrium_rebalanced_connections_total", "Connections the rebalancer "
                                      "closed so that their pool reconnects by the current weights, by reason: "
                                      "excess (the backend held more than its share), drain (the backend is "
                                      "draining or was removed), max_age.", labels=LABELS + ["reason"])
            for svc, addr, by in moved:
                for reason in RB_REASONS:
                    fam.add_metric([svc, addr, reason], float(by.get(reason, 0)))
            yield fam
        for cls in ("1xx", "2xx", "3xx", "4xx", "5xx"):
            yield ctr("equilibrium_backend_responses_%s_total" % cls, "HTTP responses with a %s status."
                      % cls, col("resp_" + cls))
        rtt = SummaryMetricFamily("equilibrium_backend_rtt_seconds", "Smoothed TCP RTT, one sample per closed "
                                  "connection (rate of _sum over rate of _count is the mean).", labels=LABELS)
        for svc, addr, i in rows:
            rtt.add_metric([svc, addr], count_value=int(col("rtt_samples")[i]),
                           sum_value=float(col("rtt_sum_us")[i]) * 1e-6)
        yield rtt
        yield self._histogram("equilibrium_backend_request_latency_seconds", "Time from a request's first "
                              "byte to the response's first byte (log2 buckets from the kernel).",
                              rows, req_hist, col("req_ns_sum"))
        yield self._histogram("equilibrium_backend_connect_latency_seconds", "TCP connect latency, SYN to "
                              "established (log2 buckets from the kernel).", rows, conn_hist,
                              col("conn_ns_sum"))

    @staticmethod
    def _histogram(name: str, doc: str, rows: list[tuple[str, str, int]], hist: np.ndarray,
                   ns_sum: np.ndarray) -> HistogramMetricFamily:
        fam = HistogramMetricFamily(name, doc, labels=LABELS)
        cum = np.cumsum(hist, axis=1)
        for svc, addr, i in rows:
            # cumulative counts at each finite bound, then +Inf = everything
            values = [float(x) for x in cum[i, :HIST_BUCKETS - 1]] + [float(cum[i, -1])]
            fam.add_metric([svc, addr], list(zip(_LE_TEXT, values)), sum_value=float(ns_sum[i]) * 1e-9)
        return fam

    def _revnat(self, snap: dict[str, Any]) -> Iterable[Metric]:
        """Unconnected-UDP reverse entries: how full the map is, and replies that lost
        theirs (evicted: shown from the backend's address; resolvers drop them)."""
        read = getattr(self.agent.dp, "revnat_stats", None)
        if read is None:
            return []
        st = read()
        return [GaugeMetricFamily("equilibrium_revnat_entries", "Unconnected-UDP reverse entries held for "
                                  "live sockets (deleted with their socket).", value=st["live"]),
                GaugeMetricFamily("equilibrium_revnat_capacity", "Entries the reverse map holds before the "
                                  "least recently used are evicted.", value=REVNAT_CAPACITY),
                CounterMetricFamily("equilibrium_revnat_evicted_total", "Reverse entries evicted while their "
                                    "socket was open (its replies from that backend show the backend's "
                                    "address): the map is too small for the node's live UDP sockets.",
                                    value=st["evicted"]),
                CounterMetricFamily("equilibrium_revnat_untracked_total", "Reverse entries not owned by their "
                                    "socket (one sending to more than 4 backends, or the owner map full): "
                                    "left to the LRU.",
                                    value=st["untracked"])]

    def _service_errors(self, snap: dict[str, Any]) -> Iterable[Metric]:
        dp, rec = self.agent.dp, self.agent.rec
        if dp is None or rec is None:
            return []
        ids: list[tuple[str, int]] = []
        for s in snap.get("services", []):
            applied = rec.services.get(s["name"])
            if applied is not None:
                ids.append((str(s["name"]), int(applied.id)))
        if not ids:
            return []
        errs = dp.service_errors(max(i for _, i in ids) + 1)
        out = []
        for col, name, doc in ((0, "equilibrium_service_no_backend_total", "Connects failed at once "
                                "(EHOSTUNREACH): no backend available."),
                               (1, "equilibrium_service_stale_slot_total", "Slots that pointed at a backend no "
                                "longer in the service (connect failed)."),
                               (2, "equilibrium_service_revnat_update_errors_total", "Reverse-translation "
                                "entries that could not be stored (map full).")):
            fam = CounterMetricFamily(name, doc, labels=["service"])
            for svc, i in ids:
                fam.add_metric([svc], float(errs[i, col]))
            out.append(fam)
        return out


def _coordination(c: Any) -> list[Metric]:
    """The agent's side of the cross-node coordinator (agent.follow), when it is on."""
    if not isinstance(c, dict):
        return []
    state = GaugeMetricFamily("equilibrium_coordination_state", "1 while the service follows the cross-node "
                              "coordinator's recommendation, 0 while it learns on its own (equilibriumctl status "
                              "says why).", labels=["service"])
    for name, why in sorted((c.get("services") or {}).items()):
        state.add_metric([str(name)], 1.0 if why == "following" else 0.0)
    fall = CounterMetricFamily("equilibrium_coordination_fallbacks_total", "Times a followed service went back "
                               "to its own learning, by reason.", labels=["reason"])
    for reason, n in sorted((c.get("fallbacks") or {}).items()):
        fall.add_metric([str(reason)], float(n))
    age = c.get("recommendation_age_seconds")
    return [state, fall,
            GaugeMetricFamily("equilibrium_coordination_following", "Services following the coordinator now.",
                              value=float(len(c.get("following") or []))),
            GaugeMetricFamily("equilibrium_coordination_recommendation_age_seconds", "Age of the newest "
                              "recommendation read (NaN: none yet).", value=float("nan") if age is None else age),
            CounterMetricFamily("equilibrium_coordination_summaries_published_total", "Summaries of this node "
                                "written to the coordinator's channel.", value=float(c.get("published") or 0))]


# --- server ---------------------------------------------------------------------
@dataclass
class MetricsServer:
    """The /metrics HTTP server (a daemon thread); `close()` stops it."""

    addr: str
    httpd: Any
    thread: threading.Thread
    registry: CollectorRegistry

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def make_registry(agent: MetricsSource, process: bool = True,
                  max_backends: int = DEFAULT_MAX_BACKENDS) -> CollectorRegistry:
    """A private registry: the agent's collector and (cheap, /proc) the process collector."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(EquilibriumCollector(agent, max_backends))  # type: ignore[arg-type]
    if process:
        ProcessCollector(registry=reg)
    return reg


class _One:
    """A registry of one family (what generate_latest renders)."""

    def __init__(self, metric: Metric) -> None:
        self.metric = metric

    def collect(self) -> Iterator[Metric]:
        yield self.metric


#: seconds a scrape connection may sit idle (reading the request, or sending)
#: before the server drops it: an idle client must not hold a thread for ever
SCRAPE_SOCKET_TIMEOUT = 10.0
#: scrapes built at once (each walks the maps); more wait up to SCRAPE_SOCKET_TIMEOUT,
#: then get a 503 (Prometheus scrapes one at a time)
SCRAPES_AT_ONCE = 4
#: connections held at once (a thread each, most of them idle until they send a
#: request); one more is closed at once. Idle connections do not take a scrape's
#: slot: the slot is taken when a GET arrives, so they cannot block a real scrape.
CONNECTIONS_AT_ONCE = 32


class _Handler(BaseHTTPRequestHandler):
    """GET /metrics: the text format, written family by family as each is built
    (chunked), so a scrape holds one family's lines at a time, not the whole
    page (prometheus_client's own server builds the whole page first), with
    an idle timeout and a bound on scrapes at once."""

    protocol_version = "HTTP/1.1"
    timeout = SCRAPE_SOCKET_TIMEOUT
    registry: CollectorRegistry   # set on the subclass start_metrics_server makes

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self.send_error(404, "only /metrics is served here")
            return
        slots = self.server.scrapes   # type: ignore[attr-defined]
        if not slots.acquire(timeout=SCRAPE_SOCKET_TIMEOUT):
            self.send_error(503, "%d scrapes are being served; try again" % SCRAPES_AT_ONCE)
            return
        try:
            self._page()
        finally:
            slots.release()

    def _page(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_PLAIN_0_0_4)   # what generate_latest writes
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for metric in self.registry.collect():
            chunk = generate_latest(_One(metric))  # type: ignore[arg-type]
            if chunk:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.wfile.write(b"0\r\n\r\n")
        # the page's young garbage includes a few reference cycles (16 objects a
        # scrape at 100 x 8) that keep its memory until the collector's next pass:
        # collect the young generations now (measured: 2 MB less RSS, ~1 ms)
        gc.collect(1)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - scrapes are not logged
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], handler: type[BaseHTTPRequestHandler], family: int) -> None:
        self.address_family = family
        self._slots = threading.BoundedSemaphore(CONNECTIONS_AT_ONCE)
        self.scrapes = threading.BoundedSemaphore(SCRAPES_AT_ONCE)
        super().__init__(addr, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        # never wait here: this is the accepting thread, and a wait would hold up
        # every connection behind it (a real scrape behind idle ones)
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)   # too many at once: dropped, not queued
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A scraper that hangs up mid-page (or times out) is not the agent's error:
        nothing on stderr; the next scrape starts afresh."""

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def start_metrics_server(agent: MetricsSource, addr: str = DEFAULT_ADDR,
                         max_backends: int = DEFAULT_MAX_BACKENDS) -> Optional[MetricsServer]:
    """Serve /metrics on `addr` ("host:port"); None when addr is "" or "off".
    OSError naming the address if it cannot listen (e.g. the port is taken)."""
    if parse_addr(addr) is None:
        return None
    return serve_registry(make_registry(agent, max_backends=max_backends), addr)


def serve_registry(reg: CollectorRegistry, addr: str) -> MetricsServer:
    """Serve `reg` as /metrics on `addr` (the coordinator has its own registry).
    ValueError for an address that does not parse; OSError if it cannot listen."""
    parsed = parse_addr(addr)
    if parsed is None:
        raise ValueError("no address to serve /metrics on")
    host, port = parsed
    handler = type("MetricsHandler", (_Handler,), {"registry": reg})
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        httpd = _Server((host, port), handler, family)
    except OSError as e:
        raise OSError(e.errno, "cannot serve /metrics on %s: %s" % (addr, e.strerror or e)) from None
    thread = threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True)
    thread.start()
    return MetricsServer(addr, httpd, thread, reg)
