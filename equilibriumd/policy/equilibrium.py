"""The `equilibrium` policy: game-theoretic weights for many services at once.

Pure (numpy, the game engine; no I/O). The agent and the simulator call the
same `EquilibriumPolicy.update` with the same per-tick observations, shaped
(services x backends) with a mask for absent backends.

One tick, per service:

1. **Effective latency.** L_eff = (1 - e) * L + e * P: a failed request costs
   the error penalty P instead of its (often tiny) latency, so a backend that
   fails fast is never rewarded for being quick. L is an EWMA of this tick's
   exact mean latency (in log space, following a several-fold change fast);
   a backend that answered nothing in a tick while requests wait on it counts
   as at least a tick slow, so one that stops answering looks slow at once.
   With `tolls` (the potential-game variant) L is replaced by the marginal
   cost L + x * dL/dx from an online affine congestion fit, which moves the
   Wardrop split to the social optimum.
2. **Payoff.** u = -log((L_eff + L0) / (L_ref + L0)), L_ref the service's
   least effective latency: scale-free above the latency floor L0, 0 for the
   best backend; L0 keeps sub-millisecond jitter from looking like a signal. Differences within the
   deadband are set to 0: noise does not accumulate regret, and any split of
   equally fast backends is an ε-Wardrop equilibrium.
3. **Regret matching (RM+).** Q <- max(0, γQ + u - σ·u) with discount γ
   (forgetting, so the learner follows a changing world); the target strategy
   is σ ∝ Q + c·[u within the deadband of the best] (the prior regret c makes
   equally good backends share evenly, and lets a recovered backend win its
   share back as Q decays; a clearly worse backend gets no prior).
4. **Bayesian health.** Posterior over healthy / degraded / failing
   (game.bayesian) from the error counts. P(failing) above `quarantine_enter` quarantines the
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
7. **Exploration floor.** Every available backend keeps `floor` of the
   traffic so it keeps being measured.
8. **Status.** Wardrop gap (worst used effective latency minus the least),
   its ratio to L_ref as the distance to equilibrium, a convergence detector
   with hysteresis (converged / converging / diverging), and the regret
   potential Σ(Q⁺)² as the Lyapunov function of the learner.

Every constant is a field of `EquilibriumParams`, documented there and
settable from the config.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from ..types import EquilibriumParams
from ..game.bayesian import FAILING, BackendBelief
from ..game.convergence import CONVERGED, DIVERGING, ConvergenceDetector

STATUS_NAMES = {CONVERGED: "converged", DIVERGING: "diverging"}


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
class PolicyState:
    """What the policy decided and why, for metrics and `equilibriumctl explain`."""

    weights: np.ndarray
    target: np.ndarray
    payoff: np.ndarray
    regret: np.ndarray
    latency: np.ndarray          #: smoothed effective latency, seconds
    p_failing: np.ndarray
    quarantined: np.ndarray
    wardrop_gap: np.ndarray      #: (S,) seconds
    distance: np.ndarray         #: (S,)
    status: list[str] = field(default_factory=list)
    regret_potential: np.ndarray = field(default_factory=lambda: np.zeros(0))
    tolls: np.ndarray = field(default_factory=lambda: np.zeros(0))


class EquilibriumPolicy:
    """Weights for a (services x backends) matrix; rows are independent games."""

    def __init__(self, mask: np.ndarray, params: EquilibriumParams | None = None, now: float = 0.0) -> None:
        self.p = params or EquilibriumParams()
        self.mask = np.asarray(mask, dtype=bool).copy()
        shape = self.mask.shape
        self.q = np.zeros(shape)
        self.lat = np.full(shape, np.nan)
        self.weights = self._even(self.mask)
        self.belief = BackendBelief(shape)
        self.quarantined = np.zeros(shape, dtype=bool)
        self.since = np.full(shape, now)               # when each backend (re)joined
        self.detector = ConvergenceDetector((shape[0],), enter=self.p.converged_enter,
                                            exit=self.p.converged_exit, patience=self.p.patience)
        # affine congestion fit per backend for tolls: latency ≈ a + b * load share
        self._fit = np.zeros(shape + (5,))           # sums: n, x, y, xx, xy (discounted)
        self.state: PolicyState | None = None

    @staticmethod
    def _even(mask: np.ndarray) -> np.ndarray:
        n = mask.sum(axis=1, keepdims=True)
        return np.where(mask, 1.0 / np.maximum(n, 1), 0.0)

    def set_mask(self, mask: np.ndarray, now: float) -> None:
        """Backends appeared or left: new ones start fresh (and slow-start)."""
        m = np.asarray(mask, dtype=bool)
        new = m & ~self.mask
        gone = self.mask & ~m
        reset = new | gone
        self.q[reset] = 0.0
        self.lat[reset] = np.nan
        self.quarantined[reset] = False
        self.since[new] = now
        self.belief.reset(reset)
        self._fit[reset] = 0.0
        self.mask = m.copy()
        w = np.where(m, self.weights, 0.0)
        w[new] = self.p.floor
        self.weights = _normalize(w, m)

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

        erate = np.divide(err, req, out=np.zeros_like(req), where=req > 0)
        self._erate = getattr(self, "_erate", np.zeros_like(req))
        self._erate = np.where(req > 0, (1 - p.latency_smoothing) * self._erate + p.latency_smoothing * erate,
                               self._erate)
        tolls = np.zeros_like(req)
        base = self.lat
        if p.tolls:
            tolls = self._toll(lat_now, req)
            base = self.lat + tolls
        leff = (1 - self._erate) * base + self._erate * p.error_penalty
        known = m & np.isfinite(leff)
        lref = np.nanmin(np.where(known, leff, np.nan), axis=1, initial=np.inf)
        lref = np.where(np.isfinite(lref), lref, 1.0)

        # 2. payoff: -log((L + L0) / (L_ref + L0)), deadbanded; L0 keeps sub-ms jitter out
        l0 = p.latency_floor
        u = np.where(known, -np.log((np.maximum(leff, 0.0) + l0 + 1e-9) / (lref[:, None] + l0 + 1e-9)), 0.0)
        u_raw = u
        u = np.where(u > -p.deadband, 0.0, u)

        # 3. RM+ on discounted regrets against the current mixed strategy
        expected = (self.weights * u).sum(axis=1, keepdims=True)
        self.q = np.where(m, np.maximum(0.0, p.discount * self.q + u - expected), 0.0)
        # The prior regret goes to backends within the deadband of the best only: it
        # spreads traffic evenly over equally good backends, and a clearly worse one
        # falls to the floor instead of keeping a prior-sized share.
        prior = p.prior_regret * np.clip(1.0 + u_raw / max(p.prior_span, 1e-9), 0.0, 1.0)
        target = np.where(m, self.q + prior, 0.0)

        # 4. Bayesian health and quarantine (hysteresis)
        # Errors decide "failing"; slowness is the learner's business (a slow
        # backend keeps its floor and wins traffic back as soon as it is fast).
        self.belief.update(requests=np.where(measured, req, 0.0), errors=np.where(measured, err, 0.0),
                           latency=np.full(req.shape, np.nan), reference=np.maximum(lref[:, None], l0))
        pf = self.belief.probability(FAILING)
        enter = m & ~self.quarantined & (pf > p.quarantine_enter)
        leave = self.quarantined & (pf < p.quarantine_exit)
        self.quarantined = (self.quarantined | enter) & ~leave & m
        self.since[leave] = now  # restored: slow start again
        target = np.where(self.quarantined, 0.0, target)
        target = _normalize(target, m & ~self.quarantined)

        # 5. slow start: cap a young backend's share
        age = np.clip((now - self.since) / max(p.slow_start, 1e-9), 0.0, 1.0)
        cap = np.where(m, np.maximum(age * 1.0, p.floor), 0.0) if p.slow_start > 0 else np.ones_like(target)
        target = _cap(target, cap, m & ~self.quarantined)

        # 6. inertia and bounded steps: rise slowly (no herding onto the current best),
        # leave a collapsed backend fast
        gain = np.where(u < -p.escape_payoff, p.escape_inertia, p.inertia)
        step = gain * (target - self.weights)
        step = np.clip(step, -p.escape_step, p.max_step)
        w = np.where(m, self.weights + step, 0.0)
        if obs.served is not None:
            w = self._cap_rises(w, np.where(m, obs.served, 0.0), req, m & np.ones_like(w, dtype=bool),
                                u < -p.escape_payoff)

        # 7. floors: exploration for available backends, a trickle for quarantined ones
        w = _apply_floor(w, m, self.quarantined, p.floor, p.trickle)
        self.weights = w

        # 8. equilibrium status
        used = m & (w > 2 * p.floor + 1e-12) & np.isfinite(leff)
        worst = np.nanmax(np.where(used, leff, np.nan), axis=1, initial=-np.inf)
        gap = np.where(np.isfinite(worst), np.maximum(worst - lref, 0.0), 0.0)
        dist_raw = gap / lref
        status = self.detector.update(dist_raw)
        self.state = PolicyState(
            weights=w, target=target, payoff=u, regret=self.q.copy(), latency=leff, p_failing=pf,
            quarantined=self.quarantined.copy(), wardrop_gap=gap, distance=self.detector.distance.copy(),
            status=[STATUS_NAMES.get(int(x), "converging") for x in status],
            regret_potential=(self.q ** 2).sum(axis=1), tolls=tolls,
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
        share = np.divide(req, req.sum(axis=1, keepdims=True), out=np.zeros_like(req),
                          where=req.sum(axis=1, keepdims=True) > 0)
        ok = np.isfinite(lat_now) & (req > 0)
        self._fit *= 0.95
        for i, v in enumerate((np.ones_like(share), share, np.nan_to_num(lat_now), share * share,
                               share * np.nan_to_num(lat_now))):
            self._fit[..., i] += np.where(ok, v, 0.0)
        n, sx, sy, sxx, sxy = (self._fit[..., i] for i in range(5))
        var = n * sxx - sx * sx
        slope = np.divide(n * sxy - sx * sy, var, out=np.zeros_like(n), where=var > 1e-9 * np.maximum(n, 1) ** 2)
        return np.maximum(slope, 0.0) * self.weights


def _normalize(w: np.ndarray, where: np.ndarray) -> np.ndarray:
    w = np.where(where, np.maximum(w, 0.0), 0.0)
    s = w.sum(axis=1, keepdims=True)
    n = where.sum(axis=1, keepdims=True)
    even = np.where(where, 1.0 / np.maximum(n, 1), 0.0)
    return np.where(s > 0, w / np.where(s > 0, s, 1.0), even)


def _cap(target: np.ndarray, cap: np.ndarray, where: np.ndarray) -> np.ndarray:
    """Limit each weight to its cap and hand the excess to the uncapped (two passes suffice here)."""
    t = target.copy()
    for _ in range(3):
        over = where & (t > cap)
        excess = np.where(over, t - cap, 0.0).sum(axis=1, keepdims=True)
        t = np.where(over, cap, t)
        room = where & ~over & (t < cap)
        rs = np.where(room, t, 0.0).sum(axis=1, keepdims=True)
        add = np.divide(excess, rs, out=np.zeros_like(rs), where=rs > 0)
        t = np.where(room, t * (1 + add), t)
    return t


def _apply_floor(w: np.ndarray, mask: np.ndarray, quarantined: np.ndarray, floor: float, trickle: float) -> np.ndarray:
    """Give every present backend at least its floor (trickle when quarantined), scaling the rest."""
    low = np.where(quarantined, trickle, floor)
    low = np.where(mask, low, 0.0)
    # quarantined backends get exactly the trickle; the others share the rest with a floor each
    free = mask & ~quarantined
    w = np.where(free, np.maximum(w, 0.0), 0.0)
    rest = 1.0 - np.where(quarantined, trickle, 0.0).sum(axis=1, keepdims=True)
    n_free = free.sum(axis=1, keepdims=True)
    base = np.where(free, floor, 0.0)
    spare = np.maximum(rest - floor * n_free, 0.0)
    s = w.sum(axis=1, keepdims=True)
    share = np.divide(w, s, out=np.where(free, 1.0 / np.maximum(n_free, 1), 0.0), where=s > 0)
    out = np.where(free, base + spare * share, np.where(quarantined & mask, low, 0.0))
    all_q = (n_free == 0)[:, 0]
    if all_q.any():  # everything quarantined: keep probing all of them evenly
        out[all_q] = _normalize(np.where(mask[all_q], 1.0, 0.0), mask[all_q])
    return out
