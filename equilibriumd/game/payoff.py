"""Payoffs for the routing game from per-tick telemetry.

Role in routing: the learners maximize a payoff per backend; this module turns
telemetry arrays (mean latency, errors, requests) into that payoff. The agent's
engine uses ``log_latency_payoff`` (scale-free, against each service's best
backend); ``routing_payoff`` gives payoffs in [0, 1] so the textbook regret
bounds hold with ``Delta = 1`` (library; not run by the agent).

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


def log_latency_payoff(
    latency: FloatArray, known: BoolArray, *, floor: float, deadband: float
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Scale-free payoffs against each row's best backend: what the live engine uses.

    ``u = -log((L + L0) / (L_ref + L0))`` with ``L_ref`` the row's least known
    latency (1 s when none is known) and ``L0 = floor``: 0 for the best
    backend, -log 2 for one twice as slow, and sub-``L0`` jitter is no signal.
    Differences within ``deadband`` of the best are set to 0, so noise does not
    accumulate regret and any split of equally fast backends is an
    epsilon-Wardrop equilibrium. Returns ``(u, u_raw, L_ref)``: the deadbanded
    payoff, the raw one (both 0 where not ``known``) and ``L_ref`` per row.
    """
    lref = np.nanmin(np.where(known, latency, np.nan), axis=1, initial=np.inf)
    lref = np.where(np.isfinite(lref), lref, 1.0)
    u_raw = np.where(known, -np.log((np.maximum(latency, 0.0) + floor + 1e-9) / (lref[:, None] + floor + 1e-9)), 0.0)
    u = np.where(u_raw > -deadband, 0.0, u_raw)
    return u, u_raw, lref


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
