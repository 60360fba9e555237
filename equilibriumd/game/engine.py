"""The engine the agent runs: one tick computes every service at once.

Pure (numpy and the game modules; no I/O). The agent (``agent.routing``) and
the simulator call the same ``EquilibriumEngine.update`` with one
``Observation`` per tick, shaped (services x backends) with a mask for absent
backends: a node's thousands of services are one matrix, not a Python loop.
Policies ``equilibrium`` and ``equilibrium-tolls`` are this engine (the
latter with ``EquilibriumParams.tolls``).

One tick, for every row (service) at once, and the game module each step uses:

1. **Effective latency.** L_eff = (1 - e) * L + e * P: a failed request costs
   the error penalty P instead of its (often tiny) latency, so a backend that
   fails fast is never rewarded for being quick. L is an EWMA of this tick's
   exact mean latency (in log space, following a several-fold change fast);
   a backend that answered nothing in a tick while requests wait on it counts
   as at least a tick slow, so one that stops answering looks slow at once.
   With `tolls` (the potential-game variant) L is replaced by the marginal
   cost L + x * dL/dx from an online affine congestion fit
   (``congestion.CongestionFit``), which moves the Wardrop split to the
   social optimum.
2. **Payoff** (``payoff.log_latency_payoff``). u = -log((L_eff + L0) / (L_ref + L0)), L_ref the service's
   least effective latency: scale-free above the latency floor L0, 0 for the
   best backend; L0 keeps sub-millisecond jitter from looking like a signal. Differences within the
   deadband are set to 0: noise does not accumulate regret, and any split of
   equally fast backends is an ε-Wardrop equilibrium.
3. **Regret matching (RM+,** ``regret.regret_step``**).** Q <- max(0, γQ + u - σ·u) with discount γ
   (forgetting, so the learner follows a changing world); the target strategy
   is σ ∝ Q + c·[u within the deadband of the best] (the prior regret c makes
   equally good backends share evenly, and lets a recovered backend win its
   share back as Q decays; a clearly worse backend gets no prior).
4. **Bayesian health.** Posterior over healthy / degraded / failing
   (``bayesian.BackendBelief``) from the error counts. P(failing) above `quarantine_enter` quarantines the
   backend: it keeps only a trickle of traffic that re-probes it, until
   P(failing) falls below `quarantine_exit` (hysteresis).
5. **Slow start.** A new or restored backend's weight is capped, rising
   linearly to its full share over `slow_start` seconds.
6. **Oscillation control.** No weight rises past what the backend answered
   last tick (plus headroom): no herding onto a backend beyond what it shows
   it can serve. Inertia (move a fraction `inertia` of the way to
   the target each tick) and a bound `max_step` on any weight's change per
   tick; faster moves away from a backend whose payoff collapsed
   (`escape_step`), because leaving a bad backend late costs more than
   joining a good one late.
7. **Exploration floor** (``strategy.floor_rows``). Every available backend keeps `floor` of the
   traffic so it keeps being measured; one collapsed `patience` ticks in a row keeps
   floor x (L_best + L0) / (L + L0), at
   least `floor_min_ratio` x floor, so each backend's probes cost about the same latency.
   Then, opt-in, the **panic threshold** (``panic_rows``, `panic_threshold`, Envoy's healthy panic threshold): a
   service with too few healthy backends spreads evenly over all of them.
8. **Status.** Wardrop gap (worst used effective latency minus the least),
   its ratio to L_ref as the distance to equilibrium, a convergence detector
   (``convergence.ConvergenceDetector``) with hysteresis (converged / converging / diverging), and the regret
   potential Σ(Q⁺)² as the Lyapunov function of the learner.

Every constant is a field of ``equilibriumd.types.EquilibriumParams``,
documented there and settable from the config. ``remap`` carries everything
learned to a new layout when services or backends come and go, so a config
reload or a new service never resets what the others learned. ``learned``
and ``from_learned`` hand the same state out as plain arrays and take it
back (the agent's state file, ``agent.persist``), so a restarted agent
resumes instead of starting from even weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..types import EquilibriumParams
from .bayesian import FAILING, BackendBelief
from .congestion import Affine, CongestionFit
from .convergence import CONVERGED, CONVERGING, DIVERGING, ConvergenceDetector
from .payoff import log_latency_payoff
from .regret import regret_step
from .strategy import cap_rows, floor_rows, normalize_rows

STATUS_NAMES = {CONVERGED: "converged", DIVERGING: "diverging"}
#: the arrays of `EquilibriumEngine.learned` that hold one value per service, not per entry
LEARNED_PER_SERVICE = ("distance", "status", "below", "rising")
#: how long ago backends present when an engine is first built "joined": no slow start
ESTABLISHED = 3600.0
#: A latency estimate no answer has refreshed for this long is forgotten (update()).
STALE_SECONDS = 15.0


@dataclass
class Observation:
    """One tick of telemetry for S services x B backend slots (absent: mask False)."""

    latency: np.ndarray      #: mean latency this tick, seconds; NaN if nothing answered
    requests: np.ndarray     #: requests (or connects) tried this tick
    errors: np.ndarray       #: of which failed
    inflight: np.ndarray     #: requests outstanding now
    seconds: float           #: length of the tick
    served: np.ndarray | None = None  #: requests answered this tick (None: no capacity cap)


@dataclass
class EngineState:
    """What the engine decided and why, for metrics and `equilibriumctl explain`."""

    weights: np.ndarray
    target: np.ndarray
    payoff: np.ndarray
    regret: np.ndarray
    latency: np.ndarray          #: smoothed effective latency, seconds
    p_failing: np.ndarray
    quarantined: np.ndarray
    wardrop_gap: np.ndarray      #: (S,) seconds
    distance: np.ndarray         #: (S,)
    status: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int8))  #: convergence codes (S,)
    regret_potential: np.ndarray = field(default_factory=lambda: np.zeros(0))
    tolls: np.ndarray = field(default_factory=lambda: np.zeros(0))
    panic: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  #: (S,) rows in panic (step 7b)

    def status_name(self, row: int) -> str:
        return STATUS_NAMES.get(int(self.status[row]), "converging")


class EquilibriumEngine:
    """Weights for a (services x backends) matrix; rows are independent games."""

    #: per-entry state carried by `remap`, with the value a new entry starts from
    _CELLS = (("q", 0.0), ("lat", np.nan), ("erate", 0.0), ("quarantined", False), ("unseen", 0.0),
              ("down", 0.0))

    def __init__(self, mask: np.ndarray, params: EquilibriumParams | None = None, now: float = 0.0) -> None:
        self.p = params or EquilibriumParams()
        self.mask = np.asarray(mask, dtype=bool).copy()
        shape = self.mask.shape
        self.q = np.zeros(shape)
        self.lat = np.full(shape, np.nan)
        self.erate = np.zeros(shape)
        self.unseen = np.zeros(shape)                  # seconds since each backend last answered
        self.down = np.zeros(shape)                    # ticks in a row each backend has looked collapsed
        self.weights = normalize_rows(np.ones(shape), self.mask)
        self.belief = BackendBelief(shape)
        self.quarantined = np.zeros(shape, dtype=bool)
        self.since = np.full(shape, now)               # when each backend (re)joined
        self.detector = ConvergenceDetector((shape[0],), enter=self.p.converged_enter,
                                            exit=self.p.converged_exit, patience=self.p.patience)
        # affine congestion fit per backend for tolls: latency ≈ a + b * load share
        self.fit = CongestionFit(shape, "affine", forgetting=0.95) if self.p.tolls else None
        self.state: EngineState | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.mask.shape[0]), int(self.mask.shape[1]))

    def remap(self, mask: np.ndarray, source: np.ndarray, row_source: np.ndarray, now: float) -> None:
        """Move to a new layout keeping what was learned.

        ``mask`` is the new (S', B') presence matrix; ``source[s, b]`` the flat
        index (row * B + col) of the same backend in the current layout, or -1
        for a backend that is new (it starts fresh and slow-starts); and
        ``row_source[s]`` the current row of the same service, or -1 for a new
        service (its backends count as established: nothing to protect them
        from). Weights of kept backends keep their proportions.
        """
        m = np.asarray(mask, dtype=bool)
        src = np.where(m, np.asarray(source, dtype=np.intp), -1)
        src = np.where(src >= 0, src, -1)
        have = src >= 0
        pick = np.where(have, src, 0)
        old_mask = self.mask.reshape(-1)
        if old_mask.size:
            have &= old_mask[pick]        # absent before (e.g. draining): a new entry
        pick = np.where(have, pick, 0)

        def take(a: np.ndarray, fresh: float | bool) -> np.ndarray:
            flat = a.reshape(-1)
            out = flat[pick] if flat.size else np.zeros(m.shape, dtype=a.dtype)
            return np.where(have, out, fresh).astype(a.dtype)

        for name, fresh in self._CELLS:
            setattr(self, name, take(getattr(self, name), fresh))
        rows = np.asarray(row_source, dtype=np.intp)
        new_row = (rows < 0)[:, None] & m
        since = take(self.since, now)
        self.since = np.where(new_row, now - ESTABLISHED, since)
        w = np.where(have, take(self.weights, 0.0), 0.0)
        w = np.where(m & ~have & ~new_row, self.p.floor, w)    # a backend joining a running service
        self.weights = normalize_rows(np.where(new_row, 1.0, w), m)
        self.belief.remap(np.where(have, src, -1), m.shape)
        if self.fit is not None:
            self.fit.remap(np.where(have, src, -1), m.shape)
        self.detector.remap(rows)
        self.mask = m.copy()
        self.state = None

    def learned(self, now: float) -> dict[str, np.ndarray]:
        """Everything `remap` carries, as plain arrays (copies): per entry (S, B)
        `mask`, `q`, `lat`, `erate`, `quarantined`, `weights` and `age` (seconds since
        the backend (re)joined, at `now`: the monotonic clock does not outlive a
        boot, an age does); `belief` (3, S, B) the posterior over backend types;
        with tolls `fit` (5, S, B) the congestion fit's statistics; per service
        (S,) the convergence detector's `distance`, `status`, `below`, `rising`."""
        s, b = self.shape
        d = self.detector
        out = {"mask": self.mask.copy(), "q": self.q.copy(), "lat": self.lat.copy(), "erate": self.erate.copy(),
               "quarantined": self.quarantined.copy(), "weights": self.weights.copy(),
               "age": np.maximum(now - self.since, 0.0),
               # the game objects' state, read in place: they are the engine's own
               "belief": self.belief._post.reshape(3, s, b).copy(),
               "distance": d._distance.copy(), "status": d._state.copy(), "below": d._below.copy(),
               "rising": d._rising.copy()}
        if self.fit is not None:
            out["fit"] = self.fit._s.copy()
        return out

    @classmethod
    def from_learned(cls, arrays: dict[str, np.ndarray], params: EquilibriumParams,
                     now: float) -> EquilibriumEngine:
        """An engine holding `arrays` (what `learned` returned, maybe from an older
        process); `remap` then moves it to the current layout. Raises ValueError on
        anything that is not a state `learned` could have produced: a damaged file
        must never put a NaN weight into a table."""
        missing = {"mask", "q", "lat", "erate", "quarantined", "weights", "age", "belief",
                   *LEARNED_PER_SERVICE} - set(arrays)
        if missing:
            raise ValueError("missing %s" % ", ".join(sorted(missing)))
        mask = np.asarray(arrays["mask"])
        if mask.dtype != bool or mask.ndim != 2:
            raise ValueError("mask: want a 2-d bool array, got %s %s" % (mask.dtype, mask.shape))
        shape = (int(mask.shape[0]), int(mask.shape[1]))
        e = cls(mask, params, now)

        def get(name: str, lead: tuple[int, ...] = (), dtype: type = np.float64) -> np.ndarray:
            a = np.asarray(arrays[name])
            want = lead + (shape[:1] if name in LEARNED_PER_SERVICE else shape)
            if a.shape != want:
                raise ValueError("%s: shape %s, want %s" % (name, a.shape, want))
            if dtype is bool:
                if a.dtype != bool:
                    raise ValueError("%s: dtype %s, want bool" % (name, a.dtype))
                return a.copy()
            if a.dtype.kind not in "fiu":
                raise ValueError("%s: dtype %s is not numeric" % (name, a.dtype))
            return a.astype(dtype)

        q, lat, erate, w, age = (get(n) for n in ("q", "lat", "erate", "weights", "age"))
        quarantined, belief = get("quarantined", dtype=bool), get("belief", (3,))
        m = mask

        def check(ok: np.ndarray, what: str) -> None:
            if not np.all(ok | ~m):
                raise ValueError("%s out of range" % what)

        check(np.isfinite(q) & (q >= 0), "q")
        check(np.isnan(lat) | (np.isfinite(lat) & (lat >= 0)), "lat")
        check(np.isfinite(erate) & (erate >= 0) & (erate <= 1), "erate")
        check(np.isfinite(w) & (w >= 0), "weights")
        check(np.isfinite(age), "age")
        check(np.isfinite(belief).all(axis=0) & (belief >= 0).all(axis=0) & (belief.sum(axis=0) > 0), "belief")
        e.q, e.lat, e.erate = np.where(m, q, 0.0), np.where(m, lat, np.nan), np.where(m, erate, 0.0)
        e.quarantined = quarantined & m
        e.weights = normalize_rows(w, m)
        e.since = now - np.where(m, np.maximum(age, 0.0), 0.0)
        post = np.where(m, belief / np.where(m, belief.sum(axis=0), 1.0), e.belief._post.reshape(3, *shape))
        e.belief._post = np.ascontiguousarray(post.reshape(3, -1))
        if e.fit is not None and "fit" in arrays:
            fit = get("fit", (5,))
            check(np.isfinite(fit).all(axis=0), "fit")
            e.fit._s = np.where(m, fit, 0.0)
        d = e.detector
        dist, below, rising, status = (get(n) for n in ("distance", "below", "rising", "status"))
        if not (np.isin(status, (CONVERGING, CONVERGED, DIVERGING)).all() and (below >= 0).all()
                and (rising >= 0).all() and not np.isinf(dist).any() and np.isfinite(below + rising).all()):
            raise ValueError("convergence detector state out of range")
        d._distance, d._state = dist, status.astype(np.int8)
        d._below, d._rising = below.astype(np.int64), rising.astype(np.int64)
        return e

    def set_mask(self, mask: np.ndarray, now: float) -> None:
        """Backends appeared or left in the same layout: new ones start fresh and slow-start."""
        s, b = self.shape
        self.remap(mask, np.arange(s * b).reshape(s, b), np.arange(s), now)

    def update(self, obs: Observation, now: float) -> np.ndarray:
        """One tick; returns the new weights (rows sum to 1 over present backends)."""
        p, m = self.p, self.mask
        req = np.where(m, obs.requests, 0.0)
        err = np.minimum(np.where(m, obs.errors, 0.0), req)
        measured = m & (req > 0) & np.isfinite(obs.latency)

        # 1. latency estimate: EWMA of the tick mean. A backend that answered
        # nothing this tick while requests wait on it is at least a tick slow.
        lat_now = np.where(measured, obs.latency, np.nan)
        # Little's law leads the completed-request mean: a queue that builds up shows
        # in the in-flight count a tick before it shows in answered latencies.
        rate = req / max(obs.seconds, 1e-9)
        little = np.where(m & (obs.inflight >= p.little_min_inflight) & (rate > 0),
                          obs.inflight / np.maximum(rate, 1e-9), np.nan)
        lat_now = np.where(np.isfinite(little) & np.isfinite(lat_now), np.maximum(lat_now, little), lat_now)
        stuck = m & ~measured & (obs.inflight > 0)
        lat_now = np.where(stuck, np.maximum(np.nan_to_num(self.lat), obs.seconds), lat_now)
        have = np.isfinite(lat_now)
        fresh = have & ~np.isfinite(self.lat)
        self.lat = np.where(fresh, lat_now, self.lat)
        upd = have & ~fresh
        # EWMA in log space (latency changes are multiplicative); a regime change
        # (a tick `regime_change` times off) gets the larger weight `jump`.
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.log(np.maximum(lat_now, 1e-7) / np.maximum(self.lat, 1e-7))
        # A lone sample is weak evidence (one draw of a heavy-tailed latency):
        # it moves the estimate half as much and never counts as a regime change.
        alpha = np.where((np.abs(ratio) > np.log(p.regime_change)) & (req >= 2), p.jump,
                         np.where(req >= 2, p.latency_smoothing, p.latency_smoothing / 2))
        self.lat = np.where(upd, self.lat * np.exp(alpha * np.nan_to_num(ratio)), self.lat)
        # An estimate nothing has refreshed for STALE_SECONDS is forgotten: the backend is
        # unknown again and comes back as a new one does, through slow start, so it is
        # tried with a small share first. Per-connection clients keep every backend
        # measured through the floor; pooled clients do not (their connections stay
        # where they are), and without this a backend that was slow would keep its old
        # estimate, and its floor share, after it recovered.
        self.unseen = np.where(measured | ~m | stuck, 0.0, self.unseen + max(obs.seconds, 0.0))
        stale = m & ~self.quarantined & (self.unseen >= STALE_SECONDS) & np.isfinite(self.lat)
        self.lat = np.where(stale, np.nan, self.lat)
        self.unseen = np.where(stale, 0.0, self.unseen)
        self.since = np.where(stale, now, self.since)

        erate = np.divide(err, req, out=np.zeros_like(req), where=req > 0)
        self.erate = np.where(req > 0, (1 - p.latency_smoothing) * self.erate + p.latency_smoothing * erate,
                              self.erate)
        tolls = np.zeros_like(req)
        base = self.lat
        if self.fit is not None:
            tolls = self._toll(lat_now, req)
            base = self.lat + tolls
        leff = (1 - self.erate) * base + self.erate * p.error_penalty
        known = m & np.isfinite(leff)

        # 2. payoff: -log((L + L0) / (L_ref + L0)), deadbanded; L0 keeps sub-ms jitter out
        u, u_raw, lref = log_latency_payoff(leff, known, floor=p.latency_floor, deadband=p.deadband)

        # 3. RM+ on discounted regrets against the mixed strategy played
        self.q = np.where(m, regret_step(self.q, u, self.weights, discount=p.discount, where=m), 0.0)
        # The prior regret goes to backends within the deadband of the best only: it
        # spreads traffic evenly over equally good backends, and a clearly worse one
        # falls to the floor instead of keeping a prior-sized share.
        prior = p.prior_regret * np.clip(1.0 + u_raw / max(p.prior_span, 1e-9), 0.0, 1.0)
        target = np.where(m, self.q + prior, 0.0)

        # 4. Bayesian health and quarantine (hysteresis)
        # Errors decide "failing"; slowness is the learner's business (a slow
        # backend keeps its floor and wins traffic back as soon as it is fast).
        self.belief.update(requests=np.where(measured, req, 0.0), errors=np.where(measured, err, 0.0))
        pf = self.belief.probability(FAILING)
        enter = m & ~self.quarantined & (pf > p.quarantine_enter)
        leave = self.quarantined & (pf < p.quarantine_exit)
        self.quarantined = (self.quarantined | enter) & ~leave & m
        self.since[leave] = now  # restored: slow start again
        target = np.where(self.quarantined, 0.0, target)
        target = normalize_rows(target, m & ~self.quarantined)

        # 5. slow start: cap a young backend's share
        age = np.clip((now - self.since) / max(p.slow_start, 1e-9), 0.0, 1.0)
        cap = np.where(m, np.maximum(age * 1.0, p.floor), 0.0) if p.slow_start > 0 else np.ones_like(target)
        target = cap_rows(target, cap, m & ~self.quarantined)

        # 6. inertia and bounded steps: rise slowly (no herding onto the current best),
        # leave a collapsed backend fast
        gain = np.where(u < -p.escape_payoff, p.escape_inertia, p.inertia)
        step = gain * (target - self.weights)
        step = np.clip(step, -p.escape_step, p.max_step)
        w = np.where(m, self.weights + step, 0.0)
        # when most of a service's backends look collapsed, the service is overloaded and the odd one
        # out is an outlier (starved while the rest were overloaded, its queue drained), not a refuge
        collapsed = m & (u < -p.escape_payoff)
        heavy = collapsed.sum(axis=1, keepdims=True) > p.escape_max_share * m.sum(axis=1, keepdims=True)
        self.down = np.where(collapsed, self.down + 1, 0.0)
        if obs.served is not None:
            # leaving collapsed backends past the others' caps is for a few failing ones: piling onto
            # a heavy service's outlier in one tick is herding (prequal-ramp); the caps hold, and
            # traffic moves as fast as it is served
            w = self._cap_rises(w, np.where(m, obs.served, 0.0), req, m, collapsed & ~heavy)

        # 7. floors: exploration for available backends, a trickle for quarantined ones. A backend
        # collapsed for `patience` ticks in a row gets a floor shrunk by its latency ratio to the best
        # (exp(u_raw)), so probing it costs about what probing the best does. Not in a heavy service,
        # whose "best" is an outlier, nor for a passing collapse: under overload the slowest backend
        # changes from tick to tick, and starving each in turn herds (prequal-ramp)
        slow = collapsed & ~heavy & (self.down >= p.patience)
        floor = p.floor * np.where(slow, np.clip(np.exp(u_raw), p.floor_min_ratio, 1.0), 1.0) \
            if slow.any() else p.floor     # most ticks: no backend stays slow, one floor for all
        w = floor_rows(w, m, self.quarantined, floor, p.trickle)
        # 7b. panic threshold (opt-in; off, this step does not run and nothing changes)
        panic = np.zeros(m.shape[0], dtype=bool)
        if p.panic_threshold > 0:
            w, panic = panic_rows(w, m, self.quarantined, p.panic_threshold)
        self.weights = w

        # 8. equilibrium status
        used = m & (w > 2 * p.floor + 1e-12) & np.isfinite(leff)
        worst = np.nanmax(np.where(used, leff, np.nan), axis=1, initial=-np.inf)
        gap = np.where(np.isfinite(worst), np.maximum(worst - lref, 0.0), 0.0)
        status = self.detector.update(gap / lref)
        self.state = EngineState(
            weights=w, target=target, payoff=u, regret=self.q, latency=leff, p_failing=pf,
            quarantined=self.quarantined, wardrop_gap=gap, distance=self.detector.distance,
            status=status, regret_potential=(self.q ** 2).sum(axis=1), tolls=tolls, panic=panic,
        )
        return w

    def _cap_rises(self, w: np.ndarray, served: np.ndarray, req: np.ndarray, m: np.ndarray,
                   collapsed: np.ndarray) -> np.ndarray:
        """No weight rises past (1 + headroom) x the share of the service's requests the
        backend answered last tick, plus a little: when many agents (or one, at high
        load) all see the same fast backend, they cannot pile onto it faster than it
        shows it can serve. What a capped backend cannot take stays, pro rata, on the
        backends that were being left."""
        total = req.sum(axis=1, keepdims=True)
        if not (total > 0).any():
            return w
        share = np.divide(served, total, out=np.zeros_like(served), where=total > 0)
        cap = share * (1 + self.p.rise_headroom) + self.p.rise_floor
        old = self.weights
        capped = np.where(m & (w > old), np.minimum(w, np.maximum(old, cap)), w)
        # Rises and falls must balance (weights stay a distribution). What the
        # capped backends cannot take stays on the backends being left, pro rata,
        # except a collapsed backend's: leaving it cannot wait, so its share is
        # spread over the others even past their caps.
        rise = np.where(m, np.maximum(capped - old, 0.0), 0.0)
        fall = np.where(m, np.maximum(old - capped, 0.0), 0.0)
        fc = np.where(collapsed, fall, 0.0)
        fn = fall - fc
        r = rise.sum(axis=1, keepdims=True)
        sc, sn = fc.sum(axis=1, keepdims=True), fn.sum(axis=1, keepdims=True)
        # normal falls shrink to what the rises (beyond the collapsed share) can take
        keep_n = np.clip(np.divide(r - sc, sn, out=np.ones_like(sn), where=sn > 0), 0.0, 1.0)
        moved_out = sc + sn * keep_n
        # rises scale to what actually moves out (up when a collapse forces more)
        rk = np.divide(moved_out, r, out=np.zeros_like(r), where=r > 0)
        out = old + rise * rk - fc - fn * keep_n
        # nobody could rise yet a collapsed backend must be left: spread it evenly
        stuck = (r <= 0) & (sc > 0)
        if stuck.any():
            others = m & ~collapsed
            n_o = others.sum(axis=1, keepdims=True)
            out = np.where(stuck & others, out + sc / np.maximum(n_o, 1), out)
        return np.where(m, out, 0.0)

    def _toll(self, lat_now: np.ndarray, req: np.ndarray) -> np.ndarray:
        """Marginal-cost toll x * dL/dx from a discounted least-squares affine fit of
        latency against this backend's share of the service's requests."""
        assert self.fit is not None
        share = np.divide(req, req.sum(axis=1, keepdims=True), out=np.zeros_like(req),
                          where=req.sum(axis=1, keepdims=True) > 0)
        self.fit.update(share, lat_now, mask=req > 0)
        model = self.fit.model()
        assert isinstance(model, Affine)
        return np.asarray(model.slope) * self.weights


def panic_rows(w: np.ndarray, mask: np.ndarray, quarantined: np.ndarray,
               threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Envoy's panic threshold over (services x backends) rows: (weights, rows in panic).

    Envoy (https://www.envoyproxy.io/docs/envoy/latest/intro/arch_overview/
    upstream/load_balancing/panic_threshold; cluster option
    ``common_lb_config.healthy_panic_threshold``, default 50 %) normally
    balances over healthy hosts only; when the share of healthy hosts falls too
    low it disregards health and balances over all hosts, so that host failures
    do not cascade as the load on the few healthy ones grows. 0 % disables it. Here "healthy" is
    present and not quarantined, and a row in panic gets even weights over its
    present backends; other rows are returned bit for bit. Envoy's rule is
    strict (panic when healthy < threshold), so 2 of 4 at 50 % is no panic.
    `floor_rows` already spreads evenly when every backend is quarantined: this
    is the same step from a threshold on.

    Off by default, unlike Envoy's: the engine quarantines on errors seen on
    live traffic, not on a health check that may be wrong, so a panic sends
    requests to backends known to fail them; it pays only when the healthy
    remainder cannot carry the load (see game.capacity.feasible). Under the
    kernel's p2c balance a backend that fails fast looks idle and draws more
    than its even share (simulated, 3 of 4 failing: the healthy one got ~12 %).
    """
    n = mask.sum(axis=1)
    healthy = (mask & ~quarantined).sum(axis=1)
    panic = (n > 0) & (healthy < threshold * n)
    if not panic.any():
        return w, panic
    even = np.where(mask, 1.0 / np.maximum(n, 1)[:, None], 0.0)
    return np.where(panic[:, None], even, w), panic
