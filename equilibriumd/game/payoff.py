"""Payoffs for the routing game from per-tick telemetry.

Role in routing: the learners maximize a payoff per backend; this module turns
the agent's telemetry arrays (mean latency, errors, requests) into that
payoff, in [0, 1] so the regret bounds hold with ``Delta = 1``.

Contract: ``routing_payoff(latency, errors, requests, *, latency_budget,
error_weight=1.0) -> (payoff, observed)``, all arrays of one shape (e.g.
services x backends; ``latency_budget`` broadcasts, e.g. shape (services, 1)).
``payoff = clip(1 - latency / latency_budget, 0, 1) * (1 - min(error_weight *
errors / requests, 1))``; ``observed`` is ``requests > 0`` and ``payoff`` is
0 where nothing was observed. Guarantee: payoff in [0, 1]; non-increasing in
latency and in errors; 1 exactly for an error-free, zero-latency backend.
"""

from __future__ import annotations

import numpy as np

from .normal_form import ArrayLike, BoolArray, FloatArray


def routing_payoff(
    latency: ArrayLike,
    errors: ArrayLike,
    requests: ArrayLike,
    *,
    latency_budget: ArrayLike,
    error_weight: float = 1.0,
) -> tuple[FloatArray, BoolArray]:
    """Per-backend payoff in [0, 1] and the mask of backends measured this tick."""
    lat = np.asarray(latency, dtype=np.float64)
    err = np.asarray(errors, dtype=np.float64)
    req = np.asarray(requests, dtype=np.float64)
    budget = np.asarray(latency_budget, dtype=np.float64)
    if (budget <= 0).any() or error_weight < 0:
        raise ValueError("latency_budget must be positive and error_weight non-negative")
    observed = (req > 0) & np.isfinite(lat)
    safe_req = np.where(req > 0, req, 1.0)
    speed = np.clip(1.0 - np.where(observed, lat, 0.0) / budget, 0.0, 1.0)
    health = 1.0 - np.minimum(error_weight * np.maximum(err, 0.0) / safe_req, 1.0)
    return np.where(observed, speed * health, 0.0), observed
