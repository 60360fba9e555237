"""Per-tick weights for every service: telemetry -> its policy -> weights.

Services on `equilibrium` (and `equilibrium-tolls`) share one vectorized
EquilibriumPolicy each: a service is a row, a backend keeps its column for
as long as it keeps its backend id, so learning survives config reloads.
Baselines keep small per-service state (PeakEWMA). Whatever the policy,
only `active` backends are routable; the reconciler applies states.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..config import Config, ServiceConfig
from ..datapath.telemetry import TelemetryDelta
from ..policy import baselines
from ..policy.equilibrium import EquilibriumParams, EquilibriumPolicy, Observation

EQUILIBRIUM_POLICIES = ("equilibrium", "equilibrium-tolls")


@dataclass
class ServiceSignals:
    """One service's per-backend signals this tick (config order)."""

    latency: np.ndarray
    requests: np.ndarray
    errors: np.ndarray
    inflight: np.ndarray
    open: np.ndarray
    http: bool
    served: np.ndarray  #: answered this tick (responses, or established connections)

    def subset(self, keep: list[int]) -> "ServiceSignals":
        """The same signals for the backends at positions `keep`."""
        k = np.asarray(keep, dtype=np.intp)
        return ServiceSignals(self.latency[k], self.requests[k], self.errors[k], self.inflight[k], self.open[k],
                              self.http, self.served[k])


def signals(delta: TelemetryDelta | None, ids: list[int]) -> ServiceSignals:
    n = len(ids)
    if delta is None or not ids or max(ids) >= delta.counters.shape[0]:
        z = np.zeros(n)
        return ServiceSignals(np.full(n, np.nan), z, z, z, z, False, z)
    idx = np.asarray(ids)
    req = delta["requests"][idx].astype(np.float64)
    refused = delta["refused"][idx].astype(np.float64)
    timed_out = delta["timed_out"][idx].astype(np.float64)
    http = bool(req.sum() > 0)
    if http:  # request level: latency to first byte, 5xx and unanswered requests fail
        lat = delta.mean_latency_seconds()[idx]
        tried = req + refused + timed_out
        failed = (delta["resp_5xx"][idx] + delta["req_errors"][idx]).astype(np.float64) + refused + timed_out
        served = sum(delta[k][idx].astype(np.float64) for k in
                     ("resp_1xx", "resp_2xx", "resp_3xx", "resp_4xx", "resp_5xx", "req_errors"))
    else:     # connection level (non-HTTP TCP): connect latency and connect failures
        lat = delta.mean_connect_seconds()[idx]
        tried = delta["attempts"][idx].astype(np.float64)
        failed = refused + timed_out + delta["reset"][idx].astype(np.float64)
        served = delta["established"][idx].astype(np.float64)
    return ServiceSignals(lat, tried, failed, delta.inflight[idx].astype(np.float64),
                          delta.open_connections[idx].astype(np.float64), http, served)


class _Group:
    """One EquilibriumPolicy over the services that use it."""

    def __init__(self, params: EquilibriumParams) -> None:
        self.params = params
        self.rows: dict[str, int] = {}
        self.cols: dict[str, dict[int, int]] = {}   # service -> backend id -> column
        self.policy: EquilibriumPolicy | None = None
        self.shape = (0, 0)

    def layout(self, services: list[tuple[str, list[int]]], now: float) -> None:
        need_b = max([len(ids) for _, ids in services] + [1])
        names = [n for n, _ in services]
        if self.policy is None or len(names) > self.shape[0] or need_b > self.shape[1] or \
                any(n not in self.rows for n in names):
            self._rebuild(services, now)
            return
        mask = np.zeros(self.shape, dtype=bool)
        for name, ids in services:
            cols = self.cols[name]
            for bid in [b for b in cols if b not in ids]:
                del cols[bid]
            free = [c for c in range(self.shape[1]) if c not in cols.values()]
            for bid in ids:
                if bid not in cols:
                    cols[bid] = free.pop(0)
            mask[self.rows[name], list(cols.values())] = True
        for name in [n for n in self.rows if n not in names]:
            del self.rows[name], self.cols[name]
        self.policy.set_mask(mask, now)

    def _rebuild(self, services: list[tuple[str, list[int]]], now: float) -> None:
        s = max(len(services), 1)
        b = max([len(ids) for _, ids in services] + [1])
        b = max(b, 4)
        self.shape = (s, b)
        self.rows = {name: i for i, (name, _) in enumerate(services)}
        self.cols = {name: {bid: j for j, bid in enumerate(ids)} for name, ids in services}
        mask = np.zeros(self.shape, dtype=bool)
        for name, ids in services:
            mask[self.rows[name], :len(ids)] = True
        self.policy = EquilibriumPolicy(mask, self.params, now=now - 3600)  # existing backends: no slow start

    def update(self, sig: dict[str, ServiceSignals], ids: dict[str, list[int]], dt: float, now: float) -> None:
        assert self.policy is not None
        shape = self.shape
        lat = np.full(shape, np.nan)
        req, err, infl, served = np.zeros(shape), np.zeros(shape), np.zeros(shape), np.zeros(shape)
        for name, row in self.rows.items():
            s, cols = sig[name], self.cols[name]
            c = [cols[b] for b in ids[name]]
            lat[row, c], req[row, c], err[row, c], infl[row, c] = s.latency, s.requests, s.errors, s.inflight
            served[row, c] = s.served
        self.policy.update(Observation(lat, req, err, infl, dt, served), now)

    def weights(self, name: str, ids: list[int]) -> np.ndarray:
        assert self.policy is not None
        return self.policy.weights[self.rows[name], [self.cols[name][b] for b in ids]]

    def explain(self, name: str, ids: list[int]) -> dict[str, Any]:
        assert self.policy is not None and self.policy.state is not None
        st, r = self.policy.state, self.rows[name]
        c = [self.cols[name][b] for b in ids]
        return {
            "status": st.status[r], "distance": float(st.distance[r]), "wardrop_gap_seconds": float(st.wardrop_gap[r]),
            "regret_potential": float(st.regret_potential[r]),
            "payoff": st.payoff[r, c].tolist(), "regret": st.regret[r, c].tolist(),
            "target": st.target[r, c].tolist(), "effective_latency_seconds": _clean(st.latency[r, c]),
            "p_failing": st.p_failing[r, c].tolist(), "quarantined": st.quarantined[r, c].tolist(),
            "tolls_seconds": st.tolls[r, c].tolist() if st.tolls.size else [0.0] * len(c),
        }


def _clean(a: np.ndarray) -> list[float | None]:
    return [None if not np.isfinite(x) else float(x) for x in a]


@dataclass
class Change:
    at: float  #: wall-clock time (unix seconds)
    weights: dict[str, float]
    why: str


@dataclass
class ServiceInfo:
    policy: str
    signals: ServiceSignals | None = None
    weights: list[float] = field(default_factory=list)
    changes: deque[Change] = field(default_factory=lambda: deque(maxlen=20))


class Router:
    """Decides every service's weights each tick."""

    def __init__(self, params: EquilibriumParams | None = None) -> None:
        self.params = params or EquilibriumParams()
        self.groups = {"equilibrium": _Group(self.params),
                       "equilibrium-tolls": _Group(_with_tolls(self.params))}
        self.ewma: dict[tuple[str, int], baselines.PeakEwma] = {}
        self.info: dict[str, ServiceInfo] = {}
        self._last = time.monotonic()

    def set_params(self, params: EquilibriumParams) -> None:
        if params != self.params:  # new constants: learning starts over
            self.__init__(params)  # type: ignore[misc]

    def weights(self, config: Config, ids: dict[str, list[int]], delta: TelemetryDelta | None,
                now: float | None = None) -> dict[str, list[float]]:
        now = time.monotonic() if now is None else now
        dt = delta.seconds if delta is not None and delta.seconds > 0 else config.tick
        out: dict[str, list[float]] = {}
        sig = {s.name: signals(delta, ids.get(s.name, [])) for s in config.services}  # config order
        # the policies see routable (active) backends only: the same signals, subset
        sig_r = {s.name: sig[s.name].subset([i for i, b in enumerate(s.backends) if b.state == "active"])
                 for s in config.services if ids.get(s.name)}
        for pname, group in self.groups.items():
            members = [(s.name, _routable(s, ids.get(s.name, []))) for s in config.services
                       if config.policy_of(s) == pname and ids.get(s.name)]
            if not members:
                group.policy = None
                continue
            group.layout(members, now)
            if delta is not None:
                group.update(sig_r, dict(members), dt, now)
        for s in config.services:
            pol = config.policy_of(s)
            all_ids = ids.get(s.name, [])
            routable = _routable(s, all_ids)
            w = np.zeros(len(s.backends))
            if pol in self.groups and all_ids:
                pos = {bid: i for i, bid in enumerate(all_ids)}
                w[[pos[b] for b in routable]] = self.groups[pol].weights(s.name, routable)
            elif pol == "static" or not all_ids:
                w = baselines.static(np.array([b.weight for b in s.backends]))
            elif pol in ("round-robin", "random"):
                w = baselines.even(len(s.backends))
            elif pol == "least-connections":
                w = baselines.least_connections(sig[s.name].open)
            elif pol == "p2c-ewma":
                w = self._p2c(s, all_ids, delta, dt)
            out[s.name] = [float(x) for x in w]
            self._record(s, pol, sig[s.name], out[s.name], now)
        for gone in [n for n in self.info if n not in out]:
            del self.info[gone]
        return out

    def _p2c(self, s: ServiceConfig, ids: list[int], delta: TelemetryDelta | None, dt: float) -> np.ndarray:
        sig = signals(delta, ids)
        vals = np.empty(len(ids))
        for i, bid in enumerate(ids):
            e = self.ewma.setdefault((s.name, bid), baselines.PeakEwma(1))
            if delta is not None:
                e.observe(sig.latency[i:i + 1], dt)
            vals[i] = e.value[0]
        return baselines.p2c_probabilities(vals * (np.maximum(sig.inflight, 0) + 1))

    def _record(self, s: ServiceConfig, pol: str, sig: ServiceSignals, w: list[float], now: float) -> None:
        info = self.info.setdefault(s.name, ServiceInfo(pol))
        info.policy, info.signals = pol, sig
        total = sum(w) or 1.0
        shares = [x / total for x in w]
        if not info.weights or len(info.weights) != len(shares) or \
                max(abs(a - b) for a, b in zip(shares, info.weights)) > 0.05:
            info.changes.append(Change(time.time(), {str(b.address): round(x, 4) for b, x in zip(s.backends, shares)},
                                       "policy %s" % pol))
        info.weights = shares

    def explain(self, s: ServiceConfig, config: Config, ids: list[int]) -> dict[str, Any]:
        pol = config.policy_of(s)
        info = self.info.get(s.name)
        out: dict[str, Any] = {"policy": pol}
        group = self.groups.get(pol)
        if group is not None and group.policy is not None and group.policy.state is not None:
            routable = _routable(s, ids)
            ex = group.explain(s.name, routable)
            pos = {bid: i for i, bid in enumerate(ids)}
            for k, v in list(ex.items()):
                if isinstance(v, list):  # widen to config order (non-routable: None)
                    full: list[Any] = [None] * len(ids)
                    for bid, x in zip(routable, v):
                        full[pos[bid]] = x
                    ex[k] = full
            out.update(ex)
        if info is not None:
            out["changes"] = [{"at": c.at, "weights": c.weights, "why": c.why} for c in info.changes]
        return out


def _routable(s: ServiceConfig, ids: list[int]) -> list[int]:
    return [bid for b, bid in zip(s.backends, ids) if b.state == "active"]


def _with_tolls(p: EquilibriumParams) -> EquilibriumParams:
    return replace(p, tolls=True)
