"""The engine's escape from collapsed backends (step 6, `EquilibriumEngine._cap_rises`):
a few collapsed backends are left past the others' rise caps, but when most of a service's
backends look collapsed next to one, that one is not piled onto (issue 16's prequal-ramp: a
backend starved while the rest were overloaded drains its queue, looks fast, and took all
of the traffic in a tick)."""

from __future__ import annotations

import numpy as np

from equilibriumd.game.engine import EquilibriumEngine, Observation
from equilibriumd.types import EquilibriumParams


def tick(e: EquilibriumEngine, lat: list[float], now: float, rate: float = 500.0) -> np.ndarray:
    """One 0.5 s tick: each backend gets its share of `rate` requests, all answered, with as many
    in flight as Little's law says."""
    req = np.round(rate * e.weights)
    lats = np.array([lat])
    obs = Observation(latency=lats, requests=req, errors=np.zeros_like(req),
                      inflight=req / 0.5 * lats, seconds=0.5, served=req)
    return e.update(obs, now=now).copy()


def drained_outlier(params: EquilibriumParams) -> list[float]:
    """8 backends, 7 overloaded (2.4 s) and the last slower still (4 s) until its queue drains
    and it answers in 0.1 s: its weight over the 4 ticks after that."""
    e = EquilibriumEngine(np.ones((1, 8), dtype=bool), params, now=0.0)
    t = 0.0
    for _ in range(60):
        t += 0.5
        tick(e, [2.4] * 7 + [4.0], t)
    assert e.weights[0, 7] < 0.1
    out = []
    for _ in range(4):
        t += 0.5
        out.append(float(tick(e, [2.4] * 7 + [0.1], t)[0, 7]))
    return out


def test_a_drained_outlier_rises_by_its_caps_not_at_once() -> None:
    p = EquilibriumParams()
    w = drained_outlier(p)
    # each tick at most (1 + headroom) x its share + rise_floor, plus its part of the exploration
    # shares the 7 slow backends give up (their floors shrink with their latency: floor_min_ratio)
    freed = 7 * p.floor * (1 - p.floor_min_ratio)
    for a, b in zip(w, w[1:]):
        assert b <= a * (1 + p.rise_headroom) + p.rise_floor + freed + 1e-9, w
    assert w[-1] < 0.35, w
    # the rule it replaces (any collapse escapes past caps): 0.65, then 0.83 of the traffic
    unguarded = drained_outlier(EquilibriumParams(escape_max_share=1.0))
    assert unguarded[-1] > 0.6, unguarded


def test_one_collapsed_backend_of_four_still_escapes_past_the_caps() -> None:
    """The dominant backend of four collapses: it is left faster than the others' caps allow
    (they served little), as before the guard."""
    def run(params: EquilibriumParams) -> list[float]:
        e = EquilibriumEngine(np.ones((1, 4), dtype=bool), params, now=0.0)
        t = 0.0
        for _ in range(30):                   # backend 0 fast, the others slower: 0 takes most
            t += 0.5
            tick(e, [0.01, 0.04, 0.04, 0.04], t)
        out = [float(e.weights[0, 0])]
        for _ in range(3):
            t += 0.5
            out.append(float(tick(e, [0.5, 0.04, 0.04, 0.04], t)[0, 0]))
        return out
    guarded, capped = run(EquilibriumParams()), run(EquilibriumParams(escape_max_share=0.0))
    assert guarded[0] > 0.5, guarded
    assert guarded[-1] < capped[-1] - 0.05, (guarded, capped)
