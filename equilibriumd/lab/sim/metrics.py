"""Metrics of one run, the social optimum, and aggregation over seeds.

Per run (requests counted by arrival time, after the scenario's warm-up):

* `p50/p99/p999_seconds`: latency percentiles of the requests answered
  without a 5xx (their true latency, beyond the timeout too: nothing is
  cancelled). 5xx answers are counted by the success ratio, not here.
* `success_ratio`: 2xx within the 1 s timeout / all requests.
* `shift_seconds`: for scenarios with a bad backend, from the onset until its
  share of new requests (0.5 s windows) first falls to 10 % of its share in
  the 5 s before the onset; None if it never does before the bad period ends.
* `oscillation`: in the steady window, the standard deviation of each
  backend's share over 1 s windows, averaged over backends. Sampling noise
  alone gives ~sqrt(p(1-p)/n) (about 0.01-0.03 here), for every policy.
* `external_regret_seconds`: mean cost of the requests minus the mean cost of
  the best single backend in hindsight (per 1 s window, the backend's mean
  cost, averaged over windows; backends present all along only). Cost of a
  request: its latency, or the 1 s timeout if it failed.
* `wardrop_gap_seconds`: in the steady window, per 1 s window, the worst
  mean cost of a backend carrying >= 2 % of the requests minus the least mean
  cost of any backend, averaged over windows.
* `cost_ratio`: mean cost in the steady window / the social optimum's: the
  least mean cost any static split of the steady load can reach, from the
  exact M/M/c (Erlang C) response times of the steady state (M/D/inf for
  pure delays). Dynamic policies with instant queue knowledge (the oracle,
  per-request least-connections) can go below 1.

Scenarios with callers only (scenarios.CALLERS; `CALLER_METRICS`, from
`caller_metrics`, which bench.routing adds): per caller, success ratio and
throughput in the steady window; success of the callers within / above their
max-min fair share; Jain's index of throughput / fair share (uncapped: a caller
served more than its share lowers it too; requests refused at admission count
as failures). Scenarios with an attacker add `FLOOD_METRICS` (`flood_metrics`):
the honest callers' p99 and success, the same for the calm twin (no flood,
same policy and seed) and the p99 ratio; the flooder's offered and admitted
rates. Aggregated, these also get medians over seeds (`median`).

Issue 16's peer suite only (`PEER_METRICS`, from `peer_metrics`: success within
1 s, mean latency, throughput, external regret per node, the load at which the
p99 doubles in a ramp; see there).

Pooled runs only (`POOL_METRICS`; absent otherwise):

* `pool_wait_ratio`: share of the requests that waited for a connection
  (their pool was at its size with none idle).
* `connections`: open pooled connections in the steady window, summed over
  nodes (mean of the agents' samples after each tick's rebalance; None for
  proxies and the oracle, which have no agent).
* `closes_per_second`: the rebalancer's closes in the steady window, per
  second; `close_fraction_per_second`: that over `connections` (issue: at
  most 5 % with equal backends).
* `opened_per_second`: connections the pools opened, per second of the run;
  `excess_closes` and `drain_closes`: the rebalancer's closes by reason over
  the whole run.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from .engine import Run
from .scenarios import Scenario, caller_labels  # caller_labels: here before, the engine draws callers too

METRICS = ("p50_seconds", "p99_seconds", "p999_seconds", "success_ratio", "shift_seconds", "oscillation",
           "cost_ratio", "external_regret_seconds", "wardrop_gap_seconds")
#: scenarios with callers (scenarios.CALLERS) only; absent otherwise
CALLER_METRICS = ("jain_index", "success_steady", "success_within_fair_share", "success_above_fair_share")
#: scenarios with an attacker (Scenario.attack) only
FLOOD_METRICS = ("honest_p99_seconds", "honest_success", "honest_p99_no_flood_seconds", "honest_success_no_flood",
                 "honest_p99_ratio_no_flood", "flooder_offered_per_second", "flooder_admitted_per_second")
POOL_METRICS = ("pool_wait_ratio", "connections", "closes_per_second", "close_fraction_per_second",
                "opened_per_second", "excess_closes", "drain_closes")
#: issue 16 (peer_metrics; bench.routing adds them in the peer scenarios and with `--suite peers` only)
PEER_METRICS = ("success_within_1s", "mean_latency_seconds", "throughput_per_second", "node_regret_seconds",
                "p99_doubling_load")
#: issue 16's success deadline, fixed whatever a scenario's timeout (every scenario's is 1 s today)
SUCCESS_DEADLINE = 1.0
#: p99_doubling_load: load bins (fraction of capacity) and the fewest answers a bin's p99 is read from
RAMP_BIN = 0.025
RAMP_MIN_ANSWERS = 200


def _cost(run: Run, timeout: float) -> np.ndarray:
    return np.where(run.error, timeout, run.latency)


def _window_stats(run: Run, sc: Scenario, lo: float, hi: float, width: float,
                  cost: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(shares (W, B), mean cost per backend (W, B) NaN if none, mean cost (W,)) over windows."""
    sel = (run.arrival >= lo) & (run.arrival < hi)
    if run.refused is not None:     # refused at admission: they reached no backend
        sel &= ~run.refused
    w = ((run.arrival[sel] - lo) // width).astype(np.int64)
    nw = max(int(math.ceil((hi - lo) / width - 1e-9)), 1)
    w = np.minimum(w, nw - 1)
    b = run.backend[sel]
    nb = run.n_backends
    idx = w * nb + b
    cnt = np.bincount(idx, minlength=nw * nb).reshape(nw, nb).astype(np.float64)
    csum = np.bincount(idx, weights=cost[sel], minlength=nw * nb).reshape(nw, nb)
    tot = cnt.sum(axis=1)
    shares = cnt / np.maximum(tot, 1)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        per_b = np.where(cnt > 0, csum / cnt, np.nan)
        mean = csum.sum(axis=1) / np.maximum(tot, 1)
    return shares, per_b, mean


def social_optimum(sc: Scenario, t: float | None = None) -> float:
    """Least mean cost (seconds per request) of a static split of the load at time t."""
    from scipy.optimize import minimize

    t = sum(sc.steady) / 2 if t is None else t
    lam = sc.rate_at(t)
    st = sc.state_at(t)
    idx = [i for i, s in enumerate(st) if s["present"]]
    fixed, queues = [], []
    for i in idx:
        s, b = st[i], sc.backends[i]
        if s["failing"]:
            fixed.append(sc.timeout)                  # a failed request costs the timeout
        elif b.servers is None:
            fixed.append(float(s["delay"]) + b.mean * float(s["mult"]))  # type: ignore[arg-type]
        else:
            # the wait's factor (1 + cs^2) / 2 (Pollaczek-Khinchine, exact for one server; the Allen-Cunneen
            # approximation for c): 1 for exponential service, so the exp scenarios' optimum is unchanged
            cs2 = (b.std / b.mean) ** 2 if b.dist == "normal" else 1.0
            queues.append((b.servers, b.mean * float(s["mult"]), float(s["delay"]),  # type: ignore[arg-type]
                           (1.0 + cs2) / 2))
    best_fixed = min(fixed) if fixed else math.inf

    def resp(x: float, c: int, m: float, d: float, g: float) -> float:
        if x <= 0:
            return d + m
        a = x * m
        if a >= c:
            return 1e6
        return d + m + erlang_c(c, a) * m / (c - a) * g

    if not queues:
        return best_fixed
    caps = np.array([c / m for c, m, *_ in queues])

    def total(x: np.ndarray, rest: float) -> float:
        return float(sum(xi * resp(xi, *q) for xi, q in zip(x, queues)) + (rest * best_fixed if rest > 0 else 0.0))

    best = math.inf
    # all load on the queues (and, if a cheap fixed-cost backend exists, the rest on it)
    for frac_q in np.linspace(0.0, 1.0, 21) if math.isfinite(best_fixed) else [1.0]:
        lq = lam * frac_q
        if lq >= caps.sum() * 0.999:
            continue
        x0 = caps / caps.sum() * lq
        # default arguments bind this iteration's lq (minimize calls them before the loop moves on anyway)
        res = minimize(lambda x, rest=lam - lq: total(x, rest), x0, method="SLSQP",
                       bounds=[(0.0, c * 0.999) for c in caps],
                       constraints=[{"type": "eq", "fun": lambda x, lq=lq: x.sum() - lq}],
                       options={"ftol": 1e-12, "maxiter": 500})
        best = min(best, total(res.x, lam - lq) if res.success else total(x0, lam - lq))
    return best / lam


def erlang_c(c: int, a: float) -> float:
    """P(wait) in M/M/c with offered load a = lambda * mean service (a < c)."""
    s, term = 1.0, 1.0
    for k in range(1, c):
        term *= a / k
        s += term
    term *= a / c
    top = term * c / (c - a)
    return top / (s + top)


def run_metrics(run: Run, sc: Scenario, optimum: float | None = None) -> dict[str, Any]:
    cost = _cost(run, sc.timeout)
    m = run.arrival >= sc.warmup
    ok = m & ~run.error
    lat = run.latency[ok]
    out: dict[str, Any] = {}
    if lat.size:
        p = np.percentile(lat, [50, 99, 99.9])
        out.update(p50_seconds=float(p[0]), p99_seconds=float(p[1]), p999_seconds=float(p[2]))
    else:
        out.update(p50_seconds=None, p99_seconds=None, p999_seconds=None)
    out["success_ratio"] = float(np.mean(~run.error[m] & (run.latency[m] <= sc.timeout))) if m.any() else None

    # shift time off the bad backend
    out["shift_seconds"] = None
    if sc.bad is not None:
        b, onset, end = sc.bad
        pre = (run.arrival >= onset - 5) & (run.arrival < onset)
        s0 = float(np.mean(run.backend[pre] == b)) if pre.any() else 0.0
        if s0 > 0:
            shares, _, _ = _window_stats(run, sc, onset, end, 0.5, cost)
            below = np.nonzero(shares[:, b] <= 0.1 * s0)[0]
            if below.size:
                out["shift_seconds"] = float((below[0] + 1) * 0.5)

    lo, hi = sc.steady
    shares, per_b, mean = _window_stats(run, sc, lo, hi, 1.0, cost)
    st = sc.state_at((lo + hi) / 2)
    present = [i for i, s in enumerate(st) if s["present"]]
    out["oscillation"] = float(np.mean(shares[:, present].std(axis=0)))
    used = shares >= 0.02
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # windows without traffic
        worst = np.nanmax(np.where(used, per_b, np.nan), axis=1)
        least = np.nanmin(per_b, axis=1)
        gap = worst - least
        out["wardrop_gap_seconds"] = float(np.nanmean(gap)) if np.isfinite(gap).any() else None
    sel = (run.arrival >= lo) & (run.arrival < hi)
    opt = social_optimum(sc) if optimum is None else optimum
    # overload: no static split carries the load (social_optimum is infinite), so no ratio
    out["cost_ratio"] = float(cost[sel].mean() / opt) if sel.any() and 0 < opt < math.inf else None

    # external regret over the whole measured period
    states = [sc.state_at(x) for x in np.arange(sc.warmup, sc.duration, 1.0)]
    always = [i for i in range(run.n_backends) if all(s[i]["present"] for s in states)]
    _, per_b_all, mean_all = _window_stats(run, sc, sc.warmup, sc.duration, 1.0, cost)
    if always:
        cols = per_b_all[:, always].copy()
        for j in range(cols.shape[1]):        # carry the last known cost over empty windows
            col = cols[:, j]
            last = np.nan
            for w in range(col.size):
                if np.isnan(col[w]):
                    col[w] = last
                else:
                    last = col[w]
        with warnings.catch_warnings():   # a backend never chosen has no cost at all: NaN, left out
            warnings.simplefilter("ignore", RuntimeWarning)
            fixed = np.nanmean(cols, axis=0)
        out["external_regret_seconds"] = float(np.nanmean(mean_all) - np.nanmin(fixed)) \
            if np.isfinite(fixed).any() else None
    else:
        out["external_regret_seconds"] = None
    if run.pools is not None:
        out.update(pool_metrics(run, sc))
    return out


def caller_metrics(run: Run, sc: Scenario, demands: tuple[float, ...], seed: int) -> dict[str, Any]:
    """Per caller, in the steady window: success ratio (2xx within the timeout / its requests) and
    throughput (such answers per second); the max-min fair share of the backends' capacity of each
    caller's demand (game.capacity.fair_admission); Jain's index of throughput / fair share across
    callers (1 when every caller gets its fair share, or the same fraction of it); and the success
    ratio of all callers (`success_steady`), of those whose demand is within their fair share and
    of those above it, pooled over their requests. Jain's index is scale-free: every caller at a
    quarter of its fair share scores 1, so read it with the success ratios."""
    from equilibriumd.game.capacity import fair_admission, jain_index

    caller = run.caller if run.caller is not None else caller_labels(run.arrival.size, demands, seed)
    lo, hi = sc.steady
    sel = (run.arrival >= lo) & (run.arrival < hi)
    good = sel & ~run.error & (run.latency <= sc.timeout)
    k = len(demands)
    n = np.bincount(caller[sel], minlength=k).astype(np.float64)
    g = np.bincount(caller[good], minlength=k).astype(np.float64)
    succ = np.where(n > 0, g / np.maximum(n, 1), np.nan)
    thr = g / (hi - lo)
    capacity = sum(b.capacity for b in sc.backends)   # all backends, all along (no events with callers)
    fair = fair_admission(np.asarray(demands), capacity)
    within = np.asarray(demands) <= fair + 1e-9

    def pooled(mask: np.ndarray) -> float | None:
        return float(g[mask].sum() / n[mask].sum()) if n[mask].sum() > 0 else None

    # no caller served at all: "equally served" (jain_index's 1.0) would hide a collapse, so undefined
    out = flood_metrics(run, sc, seed) if sc.attack is not None and not sc.attack.silent else {}
    return {**out, "jain_index": jain_index(thr / fair) if g.sum() > 0 else None,
            "success_steady": pooled(np.ones(k, dtype=bool)),
            "success_within_fair_share": pooled(within), "success_above_fair_share": pooled(~within),
            "caller_success": [None if np.isnan(x) else float(x) for x in succ],
            "caller_throughput": [float(x) for x in thr],
            "caller_demand": [float(x) for x in demands], "caller_fair_share": [float(x) for x in fair]}


def honest_p99(run: Run, sc: Scenario) -> tuple[float | None, float | None]:
    """(p99 of the honest callers' answered requests, their success ratio) in the steady window:
    the honest callers are all but the attacker's (Scenario.attack)."""
    assert run.caller is not None and sc.attack is not None
    lo, hi = sc.steady
    m = (run.arrival >= lo) & (run.arrival < hi) & (run.caller != sc.attack.caller)
    ok = m & ~run.error
    p99 = float(np.percentile(run.latency[ok], 99)) if ok.any() else None
    return p99, float((ok & (run.latency <= sc.timeout)).sum() / m.sum()) if m.any() else None


def calm_twin(sc: Scenario) -> Scenario:
    """The scenario with the same random streams and a silent attacker (the no-flood reference)."""
    from .scenarios import SCENARIOS
    for t in SCENARIOS.values():
        if t.twin == sc.stream and t.attack is not None and t.attack.silent:
            return t if t.duration == sc.duration else t.scaled(sc.duration / t.duration)
    raise KeyError("no calm twin of %s" % sc.name)


def flood_metrics(run: Run, sc: Scenario, seed: int) -> dict[str, Any]:
    """Scenarios with an attacker: the honest callers' p99 and success, and the same of the calm
    twin (no flood: the same honest requests) run with the same policy and seed, and their ratio
    (issue 15's target: honest p99 within 1.2x of no flood); the flooder's offered and admitted
    rates in the steady window."""
    from .engine import simulate
    assert run.caller is not None and sc.attack is not None
    p99, ok = honest_p99(run, sc)
    calm = calm_twin(sc)
    c99, cok = honest_p99(simulate(calm, run.policy, seed), calm)
    lo, hi = sc.steady
    fl = (run.caller == sc.attack.caller) & (run.arrival >= lo) & (run.arrival < hi)
    adm = fl & ~run.refused if run.refused is not None else fl
    return {"honest_p99_seconds": p99, "honest_success": ok, "honest_p99_no_flood_seconds": c99,
            "honest_success_no_flood": cok,
            "honest_p99_ratio_no_flood": p99 / c99 if p99 is not None and c99 else None,
            "flooder_offered_per_second": float(fl.sum()) / (hi - lo),
            "flooder_admitted_per_second": float(adm.sum()) / (hi - lo)}


def pool_metrics(run: Run, sc: Scenario) -> dict[str, Any]:
    """The pools' and the rebalancer's figures of a pooled run (see the module doc)."""
    log = run.pools
    assert log is not None and run.wait is not None
    m = run.arrival >= sc.warmup
    lo, hi = sc.steady
    ct = np.asarray(log.close_t)
    st, so = np.asarray(log.sample_t), np.asarray(log.sample_open, dtype=np.float64)
    in_st = (st >= lo) & (st < hi)
    # samples are per node tick: the mean per node times the nodes is the service's total
    conns = float(so[in_st].mean()) * sc.nodes if in_st.any() else None
    closes = float(((ct >= lo) & (ct < hi)).sum()) / (hi - lo)
    reasons = np.asarray(log.close_reason)
    return {"pool_wait_ratio": float(np.mean(run.wait[m] > 0)) if m.any() else None,
            "connections": conns,
            "closes_per_second": closes if conns is not None else None,
            "close_fraction_per_second": closes / conns if conns else None,
            "opened_per_second": log.opened / max(sc.duration, 1e-9),
            "excess_closes": float((reasons == "excess").sum()), "drain_closes": float((reasons == "drain").sum())}


def peer_metrics(run: Run, sc: Scenario) -> dict[str, Any]:
    """Issue 16's figures of one run (requests arriving after the warm-up):

    * `success_within_1s`: 2xx answered within SUCCESS_DEADLINE (1 s) / all requests.
    * `mean_latency_seconds`: mean cost, a request's latency or the scenario's timeout if it
      failed (a fast 5xx must not look fast). Over the oracle's of the same seed, in the benchmark:
      the empirical price of anarchy.
    * `throughput_per_second`: 2xx within the deadline per second of the measured period.
    * `node_regret_seconds`: external regret per node, averaged over nodes weighted by their
      requests. For node k with n_kw requests in 1 s window w: its mean cost minus
      min_b sum_w n_kw c_bw / sum_w n_kw, where c_bw is backend b's mean cost in w over every
      node's requests (carried over windows where b got none), b among the backends present all
      along: what k would have paid sending each request to the best single backend, at the costs
      that backend delivered (the usual oblivious counterfactual: moving k's load is not modelled).
    * `p99_doubling_load` (scenarios.RAMPS only): the load, as a fraction of capacity, of the first
      RAMP_BIN-wide load bin of the ramp (>= RAMP_MIN_ANSWERS answers) whose p99 is at least twice
      the p99 of the hold before the ramp (the baseline, from the warm-up to the ramp's start);
      the bin's mean load. None if it never doubles.
    """
    from .scenarios import RAMPS

    m = run.arrival >= sc.warmup
    span = max(sc.duration - sc.warmup, 1e-9)
    good = m & ~run.error & (run.latency <= SUCCESS_DEADLINE)
    cost = _cost(run, sc.timeout)
    out: dict[str, Any] = {
        "success_within_1s": float(good.sum() / m.sum()) if m.any() else None,
        "mean_latency_seconds": float(cost[m].mean()) if m.any() else None,
        "throughput_per_second": float(good.sum()) / span,
        "node_regret_seconds": node_regret(run, sc, cost),
        "p99_doubling_load": None}
    if sc.name in RAMPS:
        out["p99_doubling_load"] = p99_doubling_load(run, sc, RAMPS[sc.name])
    return out


def node_regret(run: Run, sc: Scenario, cost: np.ndarray) -> float | None:
    """Request-weighted mean over nodes of each node's external regret (peer_metrics)."""
    states = [sc.state_at(x) for x in np.arange(sc.warmup, sc.duration, 1.0)]
    always = [i for i in range(run.n_backends) if all(s[i]["present"] for s in states)]
    sel = run.arrival >= sc.warmup
    if run.refused is not None:
        sel &= ~run.refused
    if not always or not sel.any():
        return None
    _, per_b, _ = _window_stats(run, sc, sc.warmup, sc.duration, 1.0, cost)
    cols = per_b[:, always]
    nw = cols.shape[0]
    for j in range(cols.shape[1]):            # carry the last known cost forward, the first one back
        col = cols[:, j]
        known = np.nonzero(~np.isnan(col))[0]
        if not known.size:
            col[:] = np.inf                   # never used: no evidence it is any good
            continue
        idx = np.maximum.accumulate(np.where(~np.isnan(col), np.arange(nw), -1))
        col[:] = col[np.where(idx < 0, known[0], idx)]
    w = np.minimum(((run.arrival[sel] - sc.warmup) // 1.0).astype(np.int64), nw - 1)
    node = run.node[sel]
    nn = sc.nodes
    n_kw = np.bincount(node * nw + w, minlength=nn * nw).reshape(nn, nw).astype(np.float64)
    paid = np.bincount(node, weights=cost[sel], minlength=nn)       # each node's summed cost
    fixed = n_kw @ np.where(np.isfinite(cols), cols, 1e9)   # (nodes, backends): cost had k used b only
    n_k = n_kw.sum(axis=1)
    regret = paid - fixed.min(axis=1)         # summed over the node's requests
    return float(regret[n_k > 0].sum() / n_k.sum())


def ramp_p99(run: Run, sc: Scenario, capacity: float) -> tuple[float, list[tuple[float, float]]] | None:
    """(p99 of the pre-ramp hold, [(mean load, p99) per RAMP_BIN-wide load bin of the ramp with
    >= RAMP_MIN_ANSWERS answers]), loads as fractions of `capacity`; None without a ramp."""
    start = next((t for (t, r), (_, r1) in zip(sc.rate, sc.rate[1:]) if r1 != r), None)
    if start is None or start <= sc.warmup:
        return None
    ok = ~run.error
    base = ok & (run.arrival >= sc.warmup) & (run.arrival < start)
    if base.sum() < RAMP_MIN_ANSWERS:
        return None
    p0 = float(np.percentile(run.latency[base], 99))
    ramp = ok & (run.arrival >= start)
    grid = np.array([p[0] for p in sc.rate] + [sc.duration])
    vals = np.array([p[1] for p in sc.rate] + [sc.rate[-1][1]])
    load = np.interp(run.arrival[ramp], grid, vals) / capacity
    lat = run.latency[ramp]
    l0 = sc.rate_at(start) / capacity
    b = ((load - l0) / RAMP_BIN).astype(np.int64)
    curve = []
    for k in range(int(b.max()) + 1 if b.size else 0):
        inb = b == k
        if inb.sum() >= RAMP_MIN_ANSWERS:
            curve.append((float(load[inb].mean()), float(np.percentile(lat[inb], 99))))
    return p0, curve


def p99_doubling_load(run: Run, sc: Scenario, capacity: float) -> float | None:
    """The load (fraction of `capacity`) at which the p99 doubles over the pre-ramp hold (peer_metrics)."""
    r = ramp_p99(run, sc, capacity)
    if r is None:
        return None
    p0, curve = r
    return next((load for load, p99 in curve if p99 >= 2 * p0), None)


_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 25: 2.060, 30: 2.042}


def mean_ci(values: list[float | None]) -> tuple[float | None, float | None, float | None, int]:
    """(mean, lo, hi, n) with a Student-t 95 % interval; None-valued seeds are left out."""
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    n = v.size
    if n == 0:
        return None, None, None, 0
    mu = float(v.mean())
    if n == 1:
        return mu, None, None, 1
    df = n - 1
    t = _T975.get(df) or (_T975[max(k for k in _T975 if k <= df)] if df < 30 else 1.96)
    h = t * float(v.std(ddof=1)) / math.sqrt(n)
    return mu, mu - h, mu + h, n


def aggregate(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds of every metric (None when missing in more than half the
    seeds: e.g. a policy that never shifts off the bad backend), with a 95 %
    interval under "ci95" and the number of seeds that had a value under "n"."""
    out: dict[str, Any] = {}
    ci: dict[str, Any] = {}
    ns: dict[str, int] = {}
    pooled = any(k in r for r in per_seed for k in POOL_METRICS)
    callers = any(k in r for r in per_seed for k in CALLER_METRICS)
    flood = any(k in r for r in per_seed for k in FLOOD_METRICS)
    peer = any(k in r for r in per_seed for k in PEER_METRICS)
    for k in METRICS + (POOL_METRICS if pooled else ()) + (CALLER_METRICS if callers else ()) + \
            (FLOOD_METRICS if flood else ()) + (PEER_METRICS if peer else ()):
        vals = [r.get(k) for r in per_seed]
        mu, lo, hi, n = mean_ci(vals)
        if n * 2 < len(per_seed):
            mu = None
        out[k] = mu
        ci[k] = [lo, hi]
        ns[k] = n
    if callers:   # per caller, mean over seeds (demands and fair shares are the same in every seed)
        for k in ("caller_success", "caller_throughput", "caller_demand", "caller_fair_share"):
            cols = list(zip(*[r[k] for r in per_seed if k in r]))
            out[k] = [mean_ci(list(c))[0] for c in cols]
        # medians over seeds of the caller (and flood) figures: issue 15's tables compare medians
        med: dict[str, float | None] = {}
        for k in ("p99_seconds",) + CALLER_METRICS + (FLOOD_METRICS if flood else ()):
            v = [r[k] for r in per_seed if r.get(k) is not None]
            med[k] = float(np.median(v)) if v and len(v) * 2 >= len(per_seed) else None
        out["median"] = med
    out["ci95"] = ci
    out["n"] = ns
    out["seeds"] = len(per_seed)
    return out
