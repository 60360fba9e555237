"""The correlated-equilibrium coordinator's pure core (issue 15): protocol and logic.

Nodes publish a `NodeSummary` (per service: backends, this node's offered load
per backend, its observed latency per backend); the coordinator turns the
summaries of every service with several calling nodes into one
`Recommendation` per node (`recommend`); a node follows it only while it is
fresh and obedient for that node given its own observations (`should_follow`).
No I/O here: the transport (ConfigMap, HTTP, the simulator) lives elsewhere.

The game (why it is shaped this way):

* Players are *groups* of nodes, at most `MAX_PLAYERS` (3): nodes sorted by
  name, node i in group i % G. A correlated-equilibrium LP has one variable
  per action profile, K^players of them; 20 nodes as players would be 9^20.
  Grouping keeps the LP at K^3 variables (729 for 8 backends) and ~G*K*(K-1)
  rows, a few milliseconds with HiGHS (measured in the tests' timing check).
  Nodes of one group get the same recommendation.
* Actions are load *splits*, not single backends: load is splittable (every
  connection is drawn from the weights), and a group sending all its load to
  one backend would overload it. The menu (`menu`) is the capacity-
  proportional split s0, plus for each backend b the split tilted toward b,
  (1 - TILT) s0 + TILT e_b. K = backends + 1.
* Payoff of a group = minus the load-weighted mean latency its traffic sees
  (seconds) when every group plays its split and each backend serves the sum:
  latency_b(x) = base / (1 - x / cap_b) (M/M/1-like), continued by its tangent
  beyond utilization RHO_MAX so that overload is costly but finite.
  `base` is the smallest observed latency of the service (the floor: the
  service time without queueing); cap_b is calibrated so the model passes
  through the observed (load, latency) point: cap = x / (1 - base / L). A
  backend without observation (NaN, or no load) gets the prior: the previous
  round's capacity if any, else the summaries' own capacity estimate, else
  the mean of the others'. A latency at the floor (within MIN_SLACK) only
  says cap >= x / MIN_SLACK: the prior stands if it is above that (taking the
  bound as the estimate starved a backend sent little: small capacity, so
  little load, so small capacity).
  One round's calibration is noisy (it amplifies latency noise near the
  floor), so with `previous` the model is averaged over rounds (SMOOTHING).
* Objective: welfare weighted by the players' loads, i.e. the mean latency of
  all the service's requests (`equilibrium`). In this model its maximum is the
  profile where every player plays the capacity-proportional split, which is
  also a Nash equilibrium (`_proportional`): `recommend` checks that profile
  (0.3 ms) and takes it without the LP; `lp=True` solves the LP regardless.
* Recommended weights = the group's *marginal* split: sum_k P(a_g = k) s_k.
  Since every connection is drawn from the weights, what a backend receives
  over a tick is the expected split; drawing one profile per tick and sending
  a whole group's load on one menu entry for 0.5 s would add variance for
  nothing. The joint distribution still matters: it is what makes obeying
  incentive-compatible (a correlated, not a Nash, equilibrium), and it is sent
  with the recommendation so the node can check obedience itself.

Obedience (`should_follow`): the node rebuilds the payoffs with capacities
calibrated from *its own* latency observations at the coordinator's backend
loads, zeroes the other players' payoffs (so only its own incentive
constraints can be violated) and asks `correlated.max_violation`. It follows
if the largest expected gain from deviating is at most `tolerance` seconds
(default 2 ms: below the noise of a node's per-tick latency means).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ..game import correlated

FloatArray = npt.NDArray[np.float64]

#: at most this many players in the coordinator's game (groups of nodes)
MAX_PLAYERS = 3
#: how far a tilted menu entry moves toward its backend
TILT = 0.25
#: beyond this utilization the latency model continues linearly (tangent)
RHO_MAX = 0.95
#: a latency within this fraction of the floor says little: capacity >= load / MIN_SLACK
MIN_SLACK = 0.05
#: weight of this round's calibration when the previous round's model is given, per
#: SMOOTHING_SECONDS between rounds (compounded for longer periods, at most SMOOTHING_MAX)
SMOOTHING = 0.05
SMOOTHING_SECONDS = 0.5
SMOOTHING_MAX = 0.3
#: obedience tolerance, seconds of expected latency
TOLERANCE = 0.002
#: bounds on what a message may carry (hostile input)
MAX_BACKENDS = 256
MAX_NAME = 253


# --------------------------------------------------------------------------- protocol


def _obj(x: object, name: str) -> Mapping[str, Any]:
    if not isinstance(x, Mapping):
        raise ValueError("%s: expected an object" % name)
    return x


def _str(d: Mapping[str, Any], key: str, ctx: str) -> str:
    v = d.get(key)
    if not isinstance(v, str) or not v or len(v) > MAX_NAME:
        raise ValueError("%s.%s: expected a non-empty string (at most %d chars)" % (ctx, key, MAX_NAME))
    return v


def _num(v: object, name: str, *, nan: bool = False, minimum: float | None = 0.0) -> float:
    if v is None and nan:
        return math.nan
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError("%s: expected a number" % name)
    f = float(v)
    if not math.isfinite(f) or (minimum is not None and f < minimum):
        raise ValueError("%s: expected a finite number >= %s" % (name, minimum))
    return f


def _nums(v: object, name: str, n: int | None, *, nan: bool = False) -> tuple[float, ...]:
    if not isinstance(v, list) or len(v) > MAX_BACKENDS ** 3:
        raise ValueError("%s: expected a list" % name)
    if n is not None and len(v) != n:
        raise ValueError("%s: expected %d entries, got %d" % (name, n, len(v)))
    return tuple(_num(x, "%s[%d]" % (name, i), nan=nan) for i, x in enumerate(v))


def _enc(xs: Sequence[float]) -> list[float | None]:
    return [None if math.isnan(x) else float(x) for x in xs]   # JSON has no NaN: null


@dataclass(frozen=True)
class ServiceSummary:
    """One node's view of one service over its last tick."""

    backends: tuple[str, ...]          #: backend addresses, in a fixed order
    load: tuple[float, ...]            #: this node's offered load per backend, req/s
    latency: tuple[float, ...]         #: observed mean latency per backend, s (NaN: none)
    capacity: tuple[float, ...] | None = None   #: this node's capacity estimates, req/s (optional)

    def __post_init__(self) -> None:
        n = len(self.backends)
        if not 0 < n <= MAX_BACKENDS or len(set(self.backends)) != n:
            raise ValueError("backends: expected 1..%d distinct addresses" % MAX_BACKENDS)
        for name, xs in (("load", self.load), ("latency", self.latency), ("capacity", self.capacity)):
            if xs is not None and len(xs) != n:
                raise ValueError("%s: expected %d entries, got %d" % (name, n, len(xs)))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"backends": list(self.backends), "load": list(self.load),
                             "latency": _enc(self.latency)}
        if self.capacity is not None:
            d["capacity"] = list(self.capacity)
        return d

    @classmethod
    def from_dict(cls, x: object, ctx: str = "service") -> "ServiceSummary":
        d = _obj(x, ctx)
        bes = d.get("backends")
        if not isinstance(bes, list) or not 0 < len(bes) <= MAX_BACKENDS or not all(
                isinstance(b, str) and 0 < len(b) <= MAX_NAME for b in bes) or len(set(bes)) != len(bes):
            raise ValueError("%s.backends: expected 1..%d distinct non-empty strings" % (ctx, MAX_BACKENDS))
        n = len(bes)
        cap = d.get("capacity")
        return cls(tuple(bes), _nums(d.get("load"), ctx + ".load", n),
                   _nums(d.get("latency"), ctx + ".latency", n, nan=True),
                   None if cap is None else _nums(cap, ctx + ".capacity", n))


@dataclass(frozen=True)
class NodeSummary:
    """What a node's agent publishes (at a bounded rate)."""

    node: str
    time: float                                  #: unix seconds
    services: Mapping[str, ServiceSummary] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"node": self.node, "time": self.time,
                           "services": {k: v.to_dict() for k, v in sorted(self.services.items())}},
                          allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> "NodeSummary":
        d = _obj(_loads(text), "summary")
        svcs = _obj(d.get("services"), "services")
        if len(svcs) > MAX_BACKENDS:
            raise ValueError("services: too many")
        out = {}
        for k, v in svcs.items():
            if not k or len(k) > MAX_NAME:
                raise ValueError("services: bad service name")
            out[k] = ServiceSummary.from_dict(v, "services.%s" % k)
        return cls(_str(d, "node", "summary"), _num(d.get("time"), "time"), out)


@dataclass(frozen=True)
class Recommendation:
    """The coordinator's word to one node for one service, with what the node
    needs to check obedience itself (the game's joint distribution and model)."""

    service: str
    node: str
    backends: tuple[str, ...]
    weights: tuple[float, ...]         #: recommended split over `backends` (sums to 1)
    issued: float                      #: unix seconds
    expires: float                     #: unix seconds; follow only while now < expires
    coordinator: str                   #: the coordinator's identity (its Lease holder)
    epoch: int                         #: its leadership term: a newer epoch wins
    player: int                        #: this node's group in the game
    loads: tuple[float, ...]           #: each player's total offered load, req/s
    menu: tuple[tuple[float, ...], ...]   #: the K splits every player chooses from
    joint: tuple[float, ...]           #: the correlated equilibrium, flattened (K^players)
    base: float                        #: latency floor of the model, s
    capacity: tuple[float, ...]        #: the coordinator's capacity estimates, req/s
    observed_load: tuple[float, ...]   #: total load per backend the capacities were calibrated at

    def __post_init__(self) -> None:
        n, k, g = len(self.backends), len(self.menu), len(self.loads)
        if not 0 < n <= MAX_BACKENDS:
            raise ValueError("backends: expected 1..%d" % MAX_BACKENDS)
        if len(self.weights) != n or len(self.capacity) != n or len(self.observed_load) != n:
            raise ValueError("weights/capacity/observed_load: expected %d entries" % n)
        if not 0 < g <= MAX_PLAYERS or not 0 <= self.player < g:
            raise ValueError("player: expected 0 <= player < %d players (at most %d)" % (g, MAX_PLAYERS))
        if not 0 < k <= MAX_BACKENDS + 1 or any(len(m) != n for m in self.menu):
            raise ValueError("menu: expected 1..%d splits of %d entries" % (MAX_BACKENDS + 1, n))
        if len(self.joint) != k ** g:
            raise ValueError("joint: expected %d entries" % k ** g)
        if not self.expires >= self.issued:
            raise ValueError("expires: before issued")

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.menu),) * len(self.loads)

    def to_json(self) -> str:
        d = {f: getattr(self, f) for f in self.__dataclass_fields__}
        d["menu"] = [list(m) for m in self.menu]
        return json.dumps({k: list(v) if isinstance(v, tuple) and k != "menu" else v for k, v in d.items()},
                          allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Recommendation":
        d = _obj(_loads(text), "recommendation")
        bes = d.get("backends")
        if not isinstance(bes, list) or not 0 < len(bes) <= MAX_BACKENDS or not all(
                isinstance(b, str) and 0 < len(b) <= MAX_NAME for b in bes):
            raise ValueError("backends: expected 1..%d non-empty strings" % MAX_BACKENDS)
        n = len(bes)
        menu = d.get("menu")
        if not isinstance(menu, list) or not 0 < len(menu) <= MAX_BACKENDS + 1:
            raise ValueError("menu: expected a list of splits")
        epoch, player = d.get("epoch"), d.get("player")
        for name, v in (("epoch", epoch), ("player", player)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0 or v > 2 ** 63:
                raise ValueError("%s: expected a non-negative integer" % name)
        assert isinstance(epoch, int) and isinstance(player, int)
        loads = _nums(d.get("loads"), "loads", None)
        if not 0 < len(loads) <= MAX_PLAYERS:
            raise ValueError("loads: expected 1..%d players" % MAX_PLAYERS)
        joint = _nums(d.get("joint"), "joint", len(menu) ** len(loads))
        return cls(
            _str(d, "service", "recommendation"), _str(d, "node", "recommendation"), tuple(bes),
            _nums(d.get("weights"), "weights", n), _num(d.get("issued"), "issued"),
            _num(d.get("expires"), "expires"), _str(d, "coordinator", "recommendation"), epoch, player,
            loads, tuple(_nums(m, "menu[%d]" % i, n) for i, m in enumerate(menu)), joint,
            _num(d.get("base"), "base"), _nums(d.get("capacity"), "capacity", n),
            _nums(d.get("observed_load"), "observed_load", n))


def _loads(text: str | bytes) -> object:
    if not isinstance(text, (str, bytes)) or len(text) > 1 << 22:
        raise ValueError("message: expected JSON text (at most 4 MiB)")
    try:
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:   # JSONDecodeError is a ValueError
        raise ValueError("message: not JSON (%s)" % str(e)[:80]) from None


def _no_constant(name: str) -> float:
    raise ValueError("message: %s is not JSON" % name)


# --------------------------------------------------------------------------- the model


def latency(load: FloatArray, cap: FloatArray, base: float) -> FloatArray:
    """latency(x) = base / (1 - x/cap), continued by its tangent beyond RHO_MAX."""
    rho = load / cap
    r = np.minimum(rho, RHO_MAX)
    out = base / (1.0 - r) + base / (1.0 - RHO_MAX) ** 2 * np.maximum(rho - RHO_MAX, 0.0)
    return np.asarray(out, dtype=np.float64)


def calibrate(load: npt.ArrayLike, lat: npt.ArrayLike, base: float,
              prior: npt.ArrayLike | None = None) -> FloatArray:
    """Capacities that put the model through each observed (load, latency) point."""
    x = np.asarray(load, dtype=np.float64)
    L = np.asarray(lat, dtype=np.float64)
    cap = np.full(x.shape, np.nan)
    ok = np.isfinite(L) & (x > 0)
    slack = np.where(ok, 1.0 - base / np.where(ok & (L > 0), L, np.inf), 0.0)
    cap[ok] = x[ok] / np.maximum(slack[ok], MIN_SLACK)
    if prior is not None:
        p = np.asarray(prior, dtype=np.float64)
        good = np.isfinite(p) & (p > 0)
        # latency at the floor (lightly loaded) only bounds the capacity from below (x / MIN_SLACK):
        # keep the prior when it is above that bound. Taking the bound as the estimate was a trap:
        # a backend sent little gets a small capacity, so it is sent little (starved for good).
        low = ok & (slack < MIN_SLACK) & good
        cap = np.where(low, np.maximum(cap, p), cap)
        cap = np.where(np.isnan(cap) & good, p, cap)
    known = cap[np.isfinite(cap)]
    fill = float(known.mean()) if known.size else max(float(x.sum()), 1.0) * len(x)
    return np.where(np.isfinite(cap), cap, fill)


def menu(cap: FloatArray) -> FloatArray:
    """(K, B): the capacity-proportional split, then one tilted toward each backend."""
    s0 = cap / cap.sum()
    n = len(cap)
    return np.vstack([s0[None, :], (1.0 - TILT) * s0[None, :] + TILT * np.eye(n)])


def game(loads: npt.ArrayLike, splits: FloatArray, cap: FloatArray, base: float) -> list[FloatArray]:
    """Each player's payoff: minus the load-weighted mean latency of its traffic."""
    L = np.asarray(loads, dtype=np.float64)
    g, k = len(L), splits.shape[0]
    shape = (k,) * g
    prof = np.indices(shape).reshape(g, -1).T                     # (profiles, players)
    per_be = np.einsum("pgb,g->pb", splits[prof], L)             # backend loads per profile
    lat = latency(per_be, cap[None, :], base)                    # (profiles, B)
    pay = -np.einsum("pgb,pb->pg", splits[prof], lat)            # (profiles, players)
    return [np.ascontiguousarray(pay[:, i].reshape(shape)) for i in range(g)]


# --------------------------------------------------------------------------- coordinator


def equilibrium(payoffs: Sequence[FloatArray], loads: npt.ArrayLike | None = None) -> FloatArray:
    """The coordinator's choice among correlated equilibria: the welfare-maximizing one.

    With `loads`, welfare weighs each player's payoff (its traffic's mean latency) by its
    load: the mean latency of all the service's requests. Scaling a player's payoff by a
    positive constant leaves its incentive constraints as they are: only the objective moves."""
    if loads is None:
        return correlated.solve(payoffs, "welfare")
    w = np.asarray(loads, dtype=np.float64)
    w = w / w.sum() * len(w) if w.sum() > 0 else np.ones(len(payoffs))
    return correlated.solve([u * x for u, x in zip(payoffs, w)], "welfare")


def groups(nodes: Sequence[str], players: int = MAX_PLAYERS) -> dict[str, int]:
    """Node -> player: sorted by name, round-robin over min(nodes, players) groups."""
    order = sorted(set(nodes))
    g = max(1, min(len(order), players))
    return {n: i % g for i, n in enumerate(order)}


def round_weight(seconds: float) -> float:
    """The weight of a round's calibration `seconds` after the previous round: SMOOTHING
    per SMOOTHING_SECONDS compounded, at most SMOOTHING_MAX (whatever the period, one
    round's observations cover only the nodes' last few ticks)."""
    return min(SMOOTHING_MAX, 1.0 - (1.0 - SMOOTHING) ** (max(seconds, 0.0) / SMOOTHING_SECONDS))


def recommend(summaries: Sequence[NodeSummary], now: float, ttl: float, *, coordinator: str = "coordinator",
              epoch: int = 0, players: int = MAX_PLAYERS, previous: Mapping[str, Recommendation] | None = None,
              smoothing: float | None = None, lp: bool = False) -> list[Recommendation]:
    """One recommendation per (service, calling node) for services with >= 2 callers.

    `previous` (service -> one of the last round's recommendations): the model
    (base, capacities) is then an average over rounds, weight `smoothing` on
    this round's calibration (1: no averaging; None: `round_weight` of the time
    since the previous round's, SMOOTHING at a 0.5 s period), and where this
    round's observation says nothing (latency at the floor) the previous
    capacity stands (`calibrate`'s prior).

    `lp`: always solve the LP (by default the all-proportional profile is checked
    first and, being then the welfare-maximizing correlated equilibrium, taken
    as is: see `_proportional`).

    Nodes whose backend list differs from the majority's are left out (they
    see another membership; they learn alone until they agree)."""
    if ttl <= 0:
        raise ValueError("ttl: expected > 0")
    by_svc: dict[str, list[tuple[str, ServiceSummary]]] = {}
    for s in sorted(summaries, key=lambda s: s.node):
        for name, v in s.services.items():
            by_svc.setdefault(name, []).append((s.node, v))
    out: list[Recommendation] = []
    for svc in sorted(by_svc):
        entries = by_svc[svc]
        sets: dict[tuple[str, ...], int] = {}
        for _, v in entries:
            sets[v.backends] = sets.get(v.backends, 0) + 1
        bes = max(sets, key=lambda b: (sets[b], b))
        members = [(n, v) for n, v in entries if v.backends == bes]
        if len(members) < 2:
            continue
        grp = groups([n for n, _ in members], players)
        g = max(grp.values()) + 1
        loads = np.zeros(g)
        be_load = np.zeros(len(bes))
        lat_w = np.zeros(len(bes))
        priors = []
        for n, v in members:
            x = np.asarray(v.load)
            loads[grp[n]] += x.sum()
            be_load += x
            L = np.asarray(v.latency)
            ok = np.isfinite(L)
            lat_w[ok] += (x * L)[ok] if x.sum() > 0 else 0.0
            if v.capacity is not None:
                priors.append(np.asarray(v.capacity))
        with np.errstate(invalid="ignore", divide="ignore"):
            obs_lat = np.where(be_load > 0, lat_w / be_load, np.nan)
        obs_lat[obs_lat <= 0] = np.nan
        base = float(np.nanmin(obs_lat)) if np.isfinite(obs_lat).any() else 0.001
        prev = (previous or {}).get(svc)
        prior = np.mean(priors, axis=0) if priors else None
        if prev is not None and prev.backends == bes:
            prior = np.asarray(prev.capacity)
        cap = calibrate(be_load, obs_lat, base, prior)
        a = smoothing if smoothing is not None or prev is None else round_weight(now - prev.issued)
        if prev is not None and prev.backends == bes and a is not None and 0 < a < 1:
            # one tick's latency means are noisy and the calibration amplifies noise near the
            # floor: average the model over rounds (capacities geometrically, they span decades)
            base = (1 - a) * prev.base + a * base
            cap = np.exp((1 - a) * np.log(np.asarray(prev.capacity)) + a * np.log(cap))
        splits = menu(cap)
        if loads.sum() <= 0:
            loads[:] = 1.0                                         # nothing to split: the model still ranks
        pay = game(loads, splits, cap, base)
        p = None if lp else _proportional(pay)
        if p is None:
            p = equilibrium(pay, loads)
        # one tuple of each shared field per service, one split per group (a round makes thousands)
        shared = (tuple(float(x) for x in loads), tuple(tuple(float(x) for x in m) for m in splits),
                  tuple(float(x) for x in p.ravel()), base, tuple(float(x) for x in cap),
                  tuple(float(x) for x in be_load))
        split: dict[int, tuple[float, ...]] = {}
        for i in range(g):
            w = p.sum(axis=tuple(ax for ax in range(g) if ax != i)) @ splits
            split[i] = tuple(float(x) for x in w / w.sum())
        for n, _ in members:
            i = grp[n]
            out.append(Recommendation(svc, n, bes, split[i], now, now + ttl, coordinator, epoch, i, *shared))
    return out


def _proportional(pay: Sequence[FloatArray]) -> FloatArray | None:
    """The welfare-maximizing correlated equilibrium without the LP, when it is the obvious one.

    In this model every backend's latency is base * f(x / cap) with one base and f convex
    and increasing, so the total cost sum_b x_b f(x_b / cap_b) is least when every backend
    has the same utilization: when every player plays the capacity-proportional split s0
    (menu entry 0). That profile is then the best any distribution over profiles can do
    for welfare, and a player's best response to the others' s0 is s0 (the same argument
    on its own cost). So (s0, ..., s0) is a Nash equilibrium, hence a correlated one, of
    the highest welfare: the LP's answer, up to ties (there are none unless the tilts of
    different players cancel out exactly). Checked here rather than assumed (0.3 ms
    against ~6 ms for the LP); None if the check fails (then the LP decides)."""
    p = np.zeros(pay[0].shape)
    p[(0,) * p.ndim] = 1.0
    return p if correlated.max_violation(pay, p) <= 1e-12 else None


def obedience_gain(rec: Recommendation, own: ServiceSummary | None) -> float:
    """The most this node gains in expected latency (s) by deviating, by its own estimates."""
    cap = np.asarray(rec.capacity)
    if own is not None:
        cap = calibrate(rec.observed_load, own.latency, rec.base, rec.capacity)
    pay = game(rec.loads, np.asarray(rec.menu), cap, rec.base)
    # only this node's incentive constraints: the others' payoffs are zero (their rows are 0 <= 0)
    mine = [u if i == rec.player else np.zeros_like(u) for i, u in enumerate(pay)]
    return correlated.max_violation(mine, np.asarray(rec.joint).reshape(rec.shape))


def should_follow(rec: Recommendation | None, own: ServiceSummary | None, now: float,
                  tolerance: float = TOLERANCE) -> tuple[bool, str]:
    """Follow while fresh and obedient for this node; otherwise say why not."""
    if rec is None:
        return False, "no recommendation"
    if not now < rec.expires:
        return False, "expired"
    if own is not None and own.backends != rec.backends:
        return False, "backends differ from the recommendation's"
    gain = obedience_gain(rec, own)
    if gain > tolerance:
        return False, "not incentive-compatible: gain %.1f ms" % (gain * 1e3)
    return True, "following"
