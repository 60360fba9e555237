"""Per-tick weights for every service at once: telemetry -> signals -> engine -> weights.

A node's services are the rows of one (services x backends) matrix, laid
out once per configuration (`Layout`), not per tick. Each tick gathers every
backend's signals from the telemetry arrays in a few numpy operations, runs
the game engine (`game.engine.EquilibriumEngine`) over the rows of each
`equilibrium` policy and the vectorized baselines over theirs, and returns
one weights matrix. Nothing on the tick loops over services in Python, and
nothing builds a view: `explain` answers from the kept state when asked.

What was learned is keyed by (service name, backend address): when the
configuration changes, the engines move their state to the new layout
(`EquilibriumEngine.remap`), so adding a service never resets another's
weights, and a backend keeps its history for as long as its service keeps it.
The same keys carry it across a restart: `Router.learned` hands each engine's
state out as `LearnedPart`s and `Router.resume` takes them back through the
same `remap` (the agent's state file: `agent.persist`).
Whatever the policy, only `active` backends are routable; the reconciler
applies states.
"""

from __future__ import annotations

import copy as copy_module
import functools
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import numpy as np

from ..config import Config
from ..datapath.telemetry import ANSWERED, CONNECT_FAILED, COUNTER, FAILED, TRIED, TelemetryDelta, total
from ..game.engine import LEARNED_PER_SERVICE, EngineState, EquilibriumEngine, Observation
from ..policy import baselines
from ..policy.evidence import Verdict
from ..types import Addr, EquilibriumParams

EQUILIBRIUM_POLICIES = ("equilibrium", "equilibrium-tolls")
#: a service's routing probabilities moving this much in a tick are kept in its history ...
CHANGE_RECORDED = 0.05
#: ... of this many changes (explain's "changes")
CHANGES_KEPT = 10


@dataclass
class Layout:
    """Where each service and backend sits in the tick's matrices (config order)."""

    names: list[str]
    policies: list[str]            #: per row
    ids: np.ndarray                #: (S, B) backend ids, -1 where none (absent, or not yet applied)
    present: np.ndarray            #: (S, B) a backend exists at this position
    routable: np.ndarray           #: (S, B) ... and is `active`
    configured: np.ndarray         #: (S, B) configured weights
    keys: list[list[Addr]]         #: per row, the backends' addresses: what learning is keyed by
    row: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.row = {n: i for i, n in enumerate(self.names)}

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.ids.shape[0]), int(self.ids.shape[1]))

    def rows_of(self, policy: str) -> np.ndarray:
        return np.array([i for i, p in enumerate(self.policies) if p == policy], dtype=np.intp)


def build_layout(config: Config, ids: dict[str, list[int]]) -> Layout:
    """The matrices' layout for `config`; `ids[name]` are a service's backend ids in
    config order (a service without them yet gets -1: no telemetry until applied)."""
    s = len(config.services)
    b = max([len(x.backends) for x in config.services] + [1])
    bids = np.full((s, b), -1, dtype=np.int64)
    present = np.zeros((s, b), dtype=bool)
    routable = np.zeros((s, b), dtype=bool)
    configured = np.zeros((s, b))
    for r, svc in enumerate(config.services):
        n = len(svc.backends)
        present[r, :n] = True
        routable[r, :n] = [x.state == "active" for x in svc.backends]
        configured[r, :n] = [x.weight for x in svc.backends]
        got = ids.get(svc.name)
        if got is not None and len(got) == n:
            bids[r, :n] = got
    return Layout([x.name for x in config.services], [config.policy_of(x) for x in config.services], bids,
                  present, routable, configured, [[x.address for x in svc.backends] for svc in config.services])


@dataclass
class Signals:
    """Every service's per-backend signals this tick, (S, B) like the layout."""

    latency: np.ndarray
    requests: np.ndarray
    errors: np.ndarray
    inflight: np.ndarray
    open: np.ndarray
    served: np.ndarray    #: answered this tick (responses, or established connections)
    http: np.ndarray      #: (S,) the service spoke HTTP this tick (else connection-level signals)

    def row(self, r: int) -> "Signals":
        return Signals(self.latency[r], self.requests[r], self.errors[r], self.inflight[r], self.open[r],
                       self.served[r], self.http[r:r + 1])


#: a backend's latency is checked against its callers' evidence when it is this many
#: times its service's mean this tick: a caller that inflates a backend's latency
#: less than that moves its weight little (the engine's payoff is log latency), and
#: checking every backend would read the node's whole evidence map each tick
LATENCY_CHECKED_ABOVE = 2.0

#: judges backend ids from their callers' evidence (Agent: eq_tel_cb + policy.evidence.Judge)
JudgeIds = Callable[[np.ndarray], Verdict]


def gather_signals(delta: TelemetryDelta | None, ids: np.ndarray, judge: JudgeIds | None = None) -> Signals:
    """Signals for a matrix of backend ids (-1: none) from one tick's telemetry.

    Request level where the service sent HTTP requests this tick (latency to
    first byte; 5xx, unanswered requests and failed connects fail), else
    connection level (connect latency; refused, reset and timed-out connects
    fail). The counts are the telemetry's one definition (`FAILED`, ...).

    With a `judge`, the backends that failed this tick, or whose latency is
    LATENCY_CHECKED_ABOVE times their service's mean, have their failures and
    latency scaled by how much of them their other callers corroborate
    (policy.evidence): one caller cannot make a backend look worse than the
    others see it. Only those backends' evidence is read: a few per tick."""
    shape = ids.shape
    if delta is None:
        z = np.zeros(shape)
        return Signals(np.full(shape, np.nan), z, z, z, z, z, np.zeros(shape[0], dtype=bool))
    n = delta.counters.shape[0]
    ok = (ids >= 0) & (ids < n)
    idx = np.where(ok, ids, n)  # n: a padding entry of zeros / NaN

    def take(per_id: np.ndarray, fill: float = 0.0) -> np.ndarray:
        return np.append(per_id.astype(np.float64), fill)[idx]

    # per backend id first (one pass over the counters), then one gather per signal
    c = delta.counters
    req = take(c[:, COUNTER["requests"]])
    http = req.sum(axis=1) > 0
    h = http[:, None]
    lat = np.where(h, take(delta.mean_latency_seconds(), np.nan), take(delta.mean_connect_seconds(), np.nan))
    tried = np.where(h, take(total(c, TRIED)), take(c[:, COUNTER["attempts"]]))
    failed = np.where(h, take(total(c, FAILED)), take(total(c, CONNECT_FAILED)))
    served = np.where(h, take(total(c, ANSWERED)), take(c[:, COUNTER["established"]]))
    if judge is not None:
        seen = ok & ~np.isnan(lat)
        k = seen.sum(axis=1, keepdims=True)
        mean = np.divide(np.where(seen, lat, 0.0).sum(axis=1, keepdims=True), k, out=np.full(k.shape, np.inf),
                         where=k > 0)
        doubt = ok & ((failed > 0) | (seen & (lat > LATENCY_CHECKED_ABOVE * mean)))
        if doubt.any():
            which = np.unique(ids[doubt])
            v = judge(which)
            at = np.searchsorted(which, ids[doubt])
            hd = http[np.nonzero(doubt)[0]]     # each doubtful entry's service level
            kappa = np.where(hd, v.req_failed[at], v.conn_failed[at])
            lam = np.where(hd, v.req_latency[at], v.conn_latency[at])
            failed[doubt] = np.where(np.isnan(kappa), failed[doubt], failed[doubt] * kappa)
            lat[doubt] = np.where(np.isnan(lam), lat[doubt], lat[doubt] * lam)
    return Signals(lat, tried, failed, take(delta.inflight), take(delta.open_connections), served, http)


def signals(delta: TelemetryDelta | None, ids: list[int]) -> Signals:
    """One service's signals (vectors over its backends)."""
    return gather_signals(delta, np.asarray([ids], dtype=np.int64).reshape(1, -1)).row(0)


class ChangeLog:
    """Each service's last CHANGES_KEPT big moves of its routing probabilities, in
    fixed arrays (a ring per layout row): recording a tick's moves is one
    vectorized write, whatever the number of services, and holds no Python
    object per change. The dicts `explain` shows are built when asked."""

    def __init__(self, shape: tuple[int, int]) -> None:
        s, b = shape
        self.shares = np.zeros((s, CHANGES_KEPT, b), dtype=np.uint16)   #: ten-thousandths
        self.at = np.zeros((s, CHANGES_KEPT))                            #: wall-clock time (unix seconds)
        self.count = np.zeros(s, dtype=np.int64)                         #: changes recorded per row

    def record(self, rows: np.ndarray, shares: np.ndarray, at: float) -> None:
        slot = self.count[rows] % CHANGES_KEPT
        self.shares[rows, slot] = np.rint(shares * 10000).astype(np.uint16)
        self.at[rows, slot] = at
        self.count[rows] += 1

    def carry(self, old: "ChangeLog", new_rows: np.ndarray, old_rows: np.ndarray) -> None:
        """Rows of `old` become rows of this log (the same service, same backends)."""
        b = min(self.shares.shape[2], old.shares.shape[2])
        self.shares[new_rows, :, :b] = old.shares[old_rows, :, :b]
        self.at[new_rows] = old.at[old_rows]
        self.count[new_rows] = old.count[old_rows]

    def of(self, r: int, keys: list[Addr], why: str) -> list[dict[str, Any]]:
        """Row r's changes, oldest first."""
        n = int(self.count[r])
        out = []
        for k in range(max(n - CHANGES_KEPT, 0), n):
            slot = k % CHANGES_KEPT
            bp = self.shares[r, slot, :len(keys)]
            out.append({"at": float(self.at[r, slot]), "why": why,
                        "weights": {str(a): round(float(x) / 10000, 4) for a, x in zip(keys, bp)}})
        return out


@dataclass
class LearnedPart:
    """What one equilibrium policy's engine learned, keyed by (service, backend
    address) instead of matrix positions: one entry per routable backend, so its
    size follows the backends, not services x the widest service."""

    params: dict[str, Any]          #: the engine's constants: learning is not carried across a change
    services: list[str]             #: the part's services, one per row of `rows`
    rows: dict[str, np.ndarray]     #: per service (R,): game.engine.LEARNED_PER_SERVICE
    entry_row: np.ndarray           #: (N,) each entry's index into `services`
    addresses: list[Addr | str]     #: (N,) each entry's backend address (its str in a file)
    cells: dict[str, np.ndarray]    #: per entry (..., N): the rest of EquilibriumEngine.learned

    def dense(self) -> tuple[dict[str, np.ndarray], dict[tuple[str, str], int]]:
        """The engine arrays (a row per service, its entries from column 0) and, per
        (service, address), the entry's flat index in them; ValueError if inconsistent."""
        n, r = len(self.addresses), len(self.services)
        er = np.asarray(self.entry_row)
        if er.shape != (n,) or er.dtype.kind not in "iu" or (n and (er.min() < 0 or er.max() >= r)):
            raise ValueError("entry_row does not index the %d services" % r)
        if len(set(self.services)) != r:
            raise ValueError("a service is named twice")
        er = er.astype(np.intp)
        counts = np.bincount(er, minlength=r)
        width = max(int(counts.max(initial=0)), 1)
        order = np.argsort(er, kind="stable")
        col = np.empty(n, dtype=np.intp)
        col[order] = np.arange(n) - (np.cumsum(counts) - counts)[er[order]]
        mask = np.zeros((r, width), dtype=bool)
        mask[er, col] = True
        out: dict[str, np.ndarray] = {"mask": mask}
        for name, v in self.cells.items():
            v = np.asarray(v)
            if v.shape[-1:] != (n,):
                raise ValueError("%s: %s values for %d entries" % (name, v.shape, n))
            d = np.zeros(v.shape[:-1] + (r, width), dtype=v.dtype)
            d[..., er, col] = v
            out[name] = d
        out.update(self.rows)
        flat = {(self.services[i], str(a)): int(i * width + c)
                for i, c, a in zip(er.tolist(), col.tolist(), self.addresses)}
        if len(flat) != n:
            raise ValueError("a (service, backend) entry is there twice")
        return out, flat


@dataclass
class Resumed:
    """What `Router.resume` took from a saved state."""

    services: int = 0                                        #: services whose state was restored
    dropped: list[str] = field(default_factory=list)         #: saved services no longer configured
    skipped: dict[str, str] = field(default_factory=dict)    #: policy -> why its state was not taken


class _Rows:
    """The layout rows that one policy computes, with the learned state it keeps."""

    def __init__(self, rows: np.ndarray, width: int) -> None:
        self.rows = rows
        self.width = width
        self.engine: EquilibriumEngine | None = None
        self.ewma: baselines.PeakEwma | None = None


class Router:
    """Decides every service's weights each tick."""

    def __init__(self, params: EquilibriumParams | None = None) -> None:
        self.params = params or EquilibriumParams()
        self.layout: Layout | None = None
        self.parts: dict[str, _Rows] = {}
        self.weights_now = np.zeros((0, 0))   #: (S, B) the last weights, layout order
        self.shares = np.zeros((0, 0))        #: the same, each row summing to 1 (0 rows: nothing routable)
        self.signals = gather_signals(None, np.zeros((0, 0), dtype=np.int64))
        self.changes = ChangeLog((0, 0))
        self._config: Config | None = None
        self._ids: dict[str, list[int]] = {}
        #: benched services: their policy step raised; they keep their last weights
        #: until the next layout (a reload) tries them again. name -> the error
        self.failed: dict[str, str] = {}
        #: what the last computation benched or could not compute: (service or "policy P", error)
        self.errors: list[tuple[str, Exception]] = []

    def set_params(self, params: EquilibriumParams) -> None:
        if params != self.params:  # new constants: learning starts over
            self.__init__(params)  # type: ignore[misc]

    # --- layout -------------------------------------------------------------------
    def set_layout(self, layout: Layout, now: float | None = None) -> None:
        """Move to a new layout, carrying what was learned by (service, backend address)."""
        now = time.monotonic() if now is None else now
        old, old_parts = self.layout, self.parts
        parts: dict[str, _Rows] = {}
        self.failed = {}   # a new layout tries benched services again
        for pol in set(layout.policies):
            rows = layout.rows_of(pol)
            width = max(int(layout.present[rows].sum(axis=1).max()), 1)
            part = _Rows(rows, max(width, 4) if pol in EQUILIBRIUM_POLICIES else width)
            prev = old_parts.get(pol)
            src, row_src = _sources(old, prev, layout, part)
            if pol in EQUILIBRIUM_POLICIES:
                mask = _pad(layout.routable[rows], part.width)
                if prev is not None and prev.engine is not None:
                    part.engine = prev.engine
                    part.engine.remap(mask, src, row_src, now)
                else:  # the first layout: every backend counts as established
                    part.engine = EquilibriumEngine(mask, self._params_for(pol), now=now - 3600)
            elif pol == "p2c-ewma":
                part.ewma = baselines.PeakEwma((len(rows), part.width))
                if prev is not None and prev.ewma is not None:
                    flat = prev.ewma.value.reshape(-1)
                    part.ewma.value = np.where(src >= 0, flat[np.maximum(src, 0)] if flat.size else 0.0,
                                               part.ewma.value)
            parts[pol] = part
        # routing probabilities and history follow the services by name
        s, b = layout.shape
        shares = np.zeros((s, b))
        if old is not None and self.shares.size:
            for name, r in layout.row.items():
                o = old.row.get(name)
                if o is not None and old.keys[o] == layout.keys[r]:
                    shares[r] = self.shares[o, :b] if self.shares.shape[1] >= b else \
                        np.pad(self.shares[o], (0, b - self.shares.shape[1]))
        self.shares = shares
        changes = ChangeLog(layout.shape)
        if old is not None:   # a service keeps its history while its backends and policy stay
            pairs = [(r, old.row[name]) for name, r in layout.row.items()
                     if name in old.row and old.keys[old.row[name]] == layout.keys[r]
                     and old.policies[old.row[name]] == layout.policies[r]]
            if pairs:
                nr, orow = np.array(pairs, dtype=np.intp).T
                changes.carry(self.changes, nr, orow)
        self.changes = changes
        self.layout, self.parts = layout, parts
        self.weights_now = shares   # each service's last weights, by name: what a failing step keeps
        self.weights_now = self._compute(None, 0.0, now)

    def _params_for(self, policy: str) -> EquilibriumParams:
        return replace(self.params, tolls=True) if policy == "equilibrium-tolls" else self.params

    # --- what was learned, by (service, backend address) -----------------------------
    def learned(self, now: float | None = None) -> dict[str, LearnedPart]:
        """Every equilibrium engine's state, keyed by policy (copies: it can be written
        out while the next tick runs)."""
        lay = self.layout
        now = time.monotonic() if now is None else now
        out: dict[str, LearnedPart] = {}
        if lay is None:
            return out
        for pol, part in self.parts.items():
            if part.engine is None:
                continue
            a = part.engine.learned(now)
            m = a.pop("mask")
            er, ec = np.nonzero(m)
            keys = [lay.keys[r] for r in part.rows.tolist()]
            # the Addr objects, not their text: formatting 65,536 of them takes ~15 ms,
            # which the writer thread spends, not the loop holding the lock
            addresses: list[Addr | str] = [keys[i][j] for i, j in zip(er.tolist(), ec.tolist())]
            rows = {k: a.pop(k) for k in LEARNED_PER_SERVICE}
            out[pol] = LearnedPart(asdict(part.engine.p), [lay.names[r] for r in part.rows], rows,
                                   er.astype(np.int32), addresses, {k: v[..., m] for k, v in a.items()})
        return out

    def resume(self, saved: dict[str, LearnedPart], now: float | None = None) -> Resumed:
        """Take back what `learned` gave (e.g. before a restart) for the services and
        backends of the current layout, through `EquilibriumEngine.remap`: a service
        not saved starts fresh, a saved one no longer configured is dropped, a
        backend new to a saved service slow-starts. All or nothing: ValueError (and
        nothing changed) if a part does not hold together."""
        lay = self.layout
        assert lay is not None
        now = time.monotonic() if now is None else now
        got = Resumed()
        engines: dict[str, EquilibriumEngine] = {}
        configured = set(lay.names)
        for pol, p in saved.items():
            got.dropped += [n for n in p.services if n not in configured]
            part = self.parts.get(pol)
            if part is None or part.engine is None:
                continue
            params = self._params_for(pol)
            if p.params != asdict(params):
                got.skipped[pol] = "the equilibrium constants changed"
                continue
            try:
                arrays, flat = p.dense()
                old = EquilibriumEngine.from_learned(arrays, params, now)
            except ValueError as e:
                raise ValueError("policy %s: %s" % (pol, e)) from None
            src = np.full((len(part.rows), part.width), -1, dtype=np.intp)
            row_src = np.full(len(part.rows), -1, dtype=np.intp)
            saved_row = {n: i for i, n in enumerate(p.services)}
            for i, r in enumerate(part.rows.tolist()):
                name = lay.names[r]
                o = saved_row.get(name)
                if o is None:
                    continue
                row_src[i] = o
                got.services += 1
                for j, key in enumerate(lay.keys[r][:part.width]):
                    src[i, j] = flat.get((name, str(key)), -1)
            old.remap(part.engine.mask, src, row_src, now)
            engines[pol] = old
        for pol, engine in engines.items():
            self.parts[pol].engine = engine
        self.weights_now = self._compute(None, 0.0, now)
        return got

    # --- the tick -------------------------------------------------------------------
    def tick(self, delta: TelemetryDelta | None, dt: float, now: float | None = None,
             judge: JudgeIds | None = None) -> np.ndarray:
        """Every service's weights for this tick, (S, B) in layout order (rows of
        non-routable backends hold 0 for equilibrium policies); `judge`: weighs the
        callers' evidence about doubtful backends (gather_signals)."""
        assert self.layout is not None
        now = time.monotonic() if now is None else now
        self.signals = gather_signals(delta, self.layout.ids, judge)
        self.weights_now = self._compute(delta, dt, now)
        self._record(self.weights_now)
        return self.weights_now

    def current(self) -> np.ndarray:
        """The weights now, without an update (what a config apply writes)."""
        return self.weights_now

    def _compute(self, delta: TelemetryDelta | None, dt: float, now: float) -> np.ndarray:
        """Every row's weights. Each policy's rows run as one vectorized step inside one
        try (a handful per tick, whatever the number of services): when a step raises,
        `_isolate` finds the services that make it raise and benches them; they and,
        for this tick, the rest of that policy's rows keep their last weights."""
        lay = self.layout
        assert lay is not None
        sig = self.signals if delta is not None else gather_signals(None, lay.ids)
        w = np.zeros(lay.shape)
        self.errors = []
        for pol, part in list(self.parts.items()):
            try:
                w[part.rows] = self._step(pol, part.rows, part.width, part.engine, part.ewma, sig, delta, dt, now)
            except Exception as e:  # noqa: BLE001 - one policy's fault must not stop the others
                self._isolate(pol, part, sig, delta, dt, now, e)
                w[part.rows] = self._last(part.rows)
        benched = [lay.row[n] for n in self.failed if n in lay.row]
        if benched:   # a benched service keeps the table it had
            w[benched] = self._last(np.asarray(benched, dtype=np.intp))
        # a service not applied yet has no telemetry: its first table is the configured split
        unapplied = (lay.ids < 0).all(axis=1)
        w[unapplied] = lay.configured[unapplied]
        return np.where(lay.present, w, 0.0)

    def _last(self, rows: np.ndarray) -> np.ndarray:
        """Rows' last weights (layout order; set_layout carries them by name), or the
        configured split where there are none yet."""
        lay = self.layout
        assert lay is not None
        last = self.weights_now[rows] if self.weights_now.shape == lay.shape else lay.configured[rows]
        return np.where(last.any(axis=1, keepdims=True), last, lay.configured[rows])

    def _step(self, pol: str, r: np.ndarray, k: int, engine: EquilibriumEngine | None,
              ewma: baselines.PeakEwma | None, sig: Signals, delta: TelemetryDelta | None, dt: float,
              now: float) -> np.ndarray:
        """Weights of layout rows `r` (one policy, `k` columns) at the layout's width."""
        lay = self.layout
        assert lay is not None
        out = np.zeros((len(r), lay.shape[1]))
        if engine is not None:
            if delta is not None:
                obs = Observation(_pad(sig.latency[r], k, np.nan), _pad(sig.requests[r], k),
                                  _pad(sig.errors[r], k), _pad(sig.inflight[r], k), dt, _pad(sig.served[r], k))
                engine.update(obs, now)
            out[:] = engine.weights[:, :lay.shape[1]] if k >= lay.shape[1] else \
                np.pad(engine.weights, ((0, 0), (0, lay.shape[1] - k)))
        elif pol == "static":
            out[:] = baselines.static(lay.configured[r])
        elif pol in ("round-robin", "random"):
            out[:] = lay.present[r].astype(np.float64)
        elif pol == "least-connections":
            out[:] = np.where(lay.present[r], baselines.least_connections(sig.open[r]), 0.0)
        elif pol == "p2c-ewma":
            assert ewma is not None
            present = lay.present[r, :k]
            if delta is not None:
                ewma.observe(np.where(present, sig.latency[r, :k], np.nan), dt)
            cost = ewma.value * (np.maximum(sig.inflight[r, :k], 0) + 1)
            out[:, :k] = baselines.p2c_probability_rows(cost, present)
        return out

    def _isolate(self, pol: str, part: _Rows, sig: Signals, delta: TelemetryDelta | None, dt: float,
                 now: float, error: Exception) -> None:
        """Find the rows of `part` whose step raises by bisection over trial runs on copies
        of its learned state (the failure path only: ~2 log2(rows) trials), bench them
        (`failed`, `errors`) and take them out of the policy's engine. A failure no
        single service explains is reported for the policy as a whole."""
        def raises(sub: np.ndarray) -> Exception | None:
            engine, ewma = _subset(part, sub, now)
            try:
                self._step(pol, part.rows[sub], part.width, engine, ewma, sig, delta, dt, now)
            except Exception as e:  # noqa: BLE001 - a trial: what it raises is the answer
                return e
            return None

        found: list[tuple[int, Exception]] = []

        def bisect(sub: np.ndarray, e: Exception) -> None:
            if len(sub) == 1:
                found.append((int(sub[0]), e))
                return
            for half in np.array_split(sub, 2):
                got = raises(half)
                if got is not None:
                    bisect(half, got)

        bisect(np.arange(len(part.rows)), error)
        lay = self.layout
        assert lay is not None
        if not found:
            self.errors.append(("policy " + pol, error))
            return
        for i, e in found:
            name = lay.names[int(part.rows[i])]
            self.failed[name] = "%s: %s" % (type(e).__name__, e)
            self.errors.append((name, e))
        keep = np.setdiff1d(np.arange(len(part.rows)), [i for i, _ in found])
        if keep.size == 0:
            del self.parts[pol]
            return
        engine, ewma = _subset(part, keep, now, copy=False)
        part.rows, part.engine, part.ewma = part.rows[keep], engine, ewma

    def _record(self, w: np.ndarray) -> None:
        """Keep each service's last big moves (for `equilibriumctl explain`): vectorized,
        Python only for the rows that moved."""
        assert self.layout is not None
        tot = w.sum(axis=1, keepdims=True)
        shares = np.divide(w, tot, out=np.zeros_like(w), where=tot > 0)
        moved = np.abs(shares - self.shares).max(axis=1, initial=0.0) > CHANGE_RECORDED
        first = ~self.shares.any(axis=1) & shares.any(axis=1)
        rows = np.nonzero(moved | first)[0]
        if rows.size:
            self.changes.record(rows, shares[rows], time.time())
        self.shares = shares

    # --- views (built when asked) -------------------------------------------------------
    def engine_state(self, name: str) -> tuple[EngineState, int, int] | None:
        """(state, engine row, width) of a service run by an equilibrium engine."""
        lay = self.layout
        if lay is None or name not in lay.row:
            return None
        r = lay.row[name]
        part = self.parts.get(lay.policies[r])
        if part is None or part.engine is None or part.engine.state is None:
            return None
        er = int(np.searchsorted(part.rows, r))
        if er >= len(part.rows) or part.rows[er] != r:   # benched: not in its policy's engine
            return None
        return part.engine.state, er, part.width

    def explain(self, name: str) -> dict[str, Any]:
        """Why a service's weights are what they are (config order; None: not routable)."""
        lay = self.layout
        assert lay is not None
        r = lay.row[name]
        n = int(lay.present[r].sum())
        out: dict[str, Any] = {"policy": lay.policies[r]}
        got = self.engine_state(name)
        if got is not None:
            st, er, _ = got
            routable = lay.routable[r, :n]

            def col(a: np.ndarray, clean: bool = False) -> list[Any]:
                vals = a[er, :n]
                return [(_clean(x) if clean else _py(x)) if ok else None for x, ok in zip(vals, routable)]

            out.update({
                "status": st.status_name(er), "distance": float(st.distance[er]),
                "wardrop_gap_seconds": float(st.wardrop_gap[er]), "regret_potential": float(st.regret_potential[er]),
                "payoff": col(st.payoff), "regret": col(st.regret), "target": col(st.target),
                "effective_latency_seconds": col(st.latency, clean=True), "p_failing": col(st.p_failing),
                "quarantined": col(st.quarantined),
                "tolls_seconds": col(st.tolls) if st.tolls.size else [0.0 if ok else None for ok in routable],
            })
        out["changes"] = self.changes.of(r, lay.keys[r], _why(lay.policies[r]))
        return out

    # --- one call for callers that hold a config, not a layout (the simulator) ---------
    def weights(self, config: Config, ids: dict[str, list[int]], delta: TelemetryDelta | None,
                now: float | None = None) -> dict[str, list[float]]:
        now = time.monotonic() if now is None else now
        if config is not self._config or ids != self._ids or self.layout is None:
            self.set_layout(build_layout(config, ids), now)
            self._config, self._ids = config, {k: list(v) for k, v in ids.items()}
        assert self.layout is not None
        if delta is not None:
            dt = delta.seconds if delta.seconds > 0 else config.tick
            self.tick(delta, dt, now)
        w = self.weights_now
        return {name: [float(x) for x in w[r, :int(self.layout.present[r].sum())]]
                for name, r in self.layout.row.items()}


@functools.lru_cache(maxsize=None)
def _why(policy: str) -> str:
    """What moved a service's weights, as `explain` says it."""
    return "policy %s" % policy


def _subset(part: _Rows, sub: np.ndarray, now: float,
            copy: bool = True) -> tuple[EquilibriumEngine | None, baselines.PeakEwma | None]:
    """`part`'s learned state for its rows `sub` only (copies unless `copy` is False:
    then the part's own engine is cut down to them)."""
    k = part.width
    engine = part.engine
    if engine is not None:
        if copy:
            engine = copy_module.deepcopy(engine)
        src = sub[:, None] * k + np.arange(k)[None, :]
        engine.remap(engine.mask[sub], src, sub, now)
    ewma = None
    if part.ewma is not None:
        ewma = copy_module.copy(part.ewma)
        ewma.value = part.ewma.value[sub].copy()
    return engine, ewma


def _pad(a: np.ndarray, width: int, fill: float = 0.0) -> np.ndarray:
    """Columns cut or padded to `width`."""
    if a.shape[1] >= width:
        return a[:, :width]
    return np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=fill)


def _sources(old: Layout | None, prev: _Rows | None, new: Layout, part: _Rows) -> tuple[np.ndarray, np.ndarray]:
    """For each cell of `part` in the new layout, the flat index of the same
    (service, backend address) in the previous part, or -1; and for each row the
    previous row of the same service, or -1."""
    src = np.full((len(part.rows), part.width), -1, dtype=np.intp)
    row_src = np.full(len(part.rows), -1, dtype=np.intp)
    if old is None or prev is None:
        return src, row_src
    prev_row = {old.names[r]: i for i, r in enumerate(prev.rows)}
    for i, r in enumerate(part.rows):
        name = new.names[r]
        o = prev_row.get(name)
        if o is None:
            continue
        row_src[i] = o
        old_cols = {k: j for j, k in enumerate(old.keys[prev.rows[o]])}
        for j, key in enumerate(new.keys[r][:part.width]):
            c = old_cols.get(key)
            if c is not None and c < prev.width:
                src[i, j] = o * prev.width + c
    return src, row_src


def _py(x: Any) -> Any:
    return x.item() if hasattr(x, "item") else x


def _clean(x: Any) -> float | None:
    v = float(x)
    return v if np.isfinite(v) else None
