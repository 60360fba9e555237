"""One engine tick for many services at once: telemetry in, slot counts out.

Role in routing: the agent calls ``BatchEngine.tick`` every period with the
per-backend telemetry of all its services, as (services x backends) arrays,
and writes the returned slot counts into the slot tables.

What one tick does, in order, all vectorized:

1. ``payoff.routing_payoff``: latency, errors and requests to payoffs in [0, 1].
2. ``regret.BatchRegret.observe``: RM+ update (measured backends use this
   tick's payoff, unmeasured ones their last estimate). The engine routes on
   the learner's linearly weighted, discounted average strategy: RM+'s last
   iterate oscillates around the Wardrop split, its average settles on it.
3. ``bayesian.BackendBelief.update``: posterior over healthy / degraded /
   failing from errors and latency (relative to the service's budget) and
   optional health checks.
4. Weights: the learner's average strategy times the posterior probability that the
   backend is not failing (a safety filter that acts before the learner has
   unlearned a backend that just failed), then ``strategy.with_floor``.
5. ``nash.wardrop_gap_batch`` on the measured latencies and request shares;
   backends carrying no more than twice the floor count as unused, so
   exploration traffic does not count as a routing choice.
6. ``convergence.ConvergenceDetector.update`` with the gap relative to the
   latency budget as the distance to equilibrium.
7. ``strategy.to_slot_counts`` with the same floor.

Contract: ``BatchEngine(n_services, n_backends, *, latency_budget, floor,
n_slots, discount, average_discount, seed, model, enter, exit, patience)``; ``set_mask(mask)``
declares which backends exist (entries that change are reset);
``tick(latency, errors, requests, health=None) -> TickResult``. Guarantees:
every row with a present backend gets slot counts summing to ``n_slots`` with
at least ``ceil(floor * n_slots)`` per present backend and none for absent
ones; weights are probability vectors over present backends; the learner's
own strategy keeps ``BatchRegret``'s regret bound; deterministic for a seed.
Measured (``tests/game/test_tick.py``): on simulated affine services the
split reaches a Wardrop gap under 5% of the least latency and every service
reports converged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bayesian import FAILING, BackendBelief, SignalModel
from .convergence import ConvergenceDetector
from .nash import wardrop_gap_batch
from .normal_form import ArrayLike, BoolArray, FloatArray, IntArray
from .payoff import routing_payoff
from .regret import BatchRegret
from .strategy import to_slot_counts, with_floor


@dataclass(frozen=True)
class TickResult:
    """Outputs of one tick; arrays are (services, backends) or (services,)."""

    weights: FloatArray  # final routing probabilities
    slot_counts: IntArray  # slots per backend, rows sum to n_slots
    wardrop_gap: FloatArray  # seconds: worst used latency - least latency
    distance: FloatArray  # smoothed gap / latency budget
    state: np.ndarray  # convergence.CONVERGING / CONVERGED / DIVERGING
    regret_potential: FloatArray  # sum (R^+)^2 per service
    p_failing: FloatArray  # posterior probability of the failing type


class BatchEngine:
    """The per-tick game engine over a (services x backends) matrix."""

    def __init__(
        self,
        n_services: int,
        n_backends: int,
        *,
        latency_budget: ArrayLike = 0.25,
        floor: float = 0.005,
        n_slots: int = 1024,
        discount: float = 1.0,
        average_discount: float = 0.99,
        seed: int | None = None,
        model: SignalModel | None = None,
        enter: float = 0.02,
        exit: float = 0.06,
        patience: int = 6,
    ) -> None:
        shape = (n_services, n_backends)
        if n_backends * floor > 1.0:
            raise ValueError("floor * n_backends must be <= 1")
        budget = np.asarray(latency_budget, dtype=np.float64)
        self._budget = np.broadcast_to(
            budget.reshape(-1, 1) if budget.ndim else budget, (n_services, 1)
        )
        self.floor = floor
        self.n_slots = n_slots
        self.regret = BatchRegret(
            n_services,
            n_backends,
            plus=True,
            discount=discount,
            average="linear",
            average_discount=average_discount,
            seed=seed,
        )
        self.belief = BackendBelief(shape, model)
        self.detector = ConvergenceDetector(
            (n_services,), enter=enter, exit=exit, patience=patience
        )
        self._mask = np.ones(shape, dtype=bool)

    @property
    def mask(self) -> BoolArray:
        return self._mask.copy()

    def set_mask(self, mask: ArrayLike) -> None:
        """Declare present backends; changed entries and their services start afresh."""
        m = np.asarray(mask, dtype=bool)
        if m.shape != self._mask.shape:
            raise ValueError(f"mask must have shape {self._mask.shape}")
        changed = m != self._mask
        self.regret.set_mask(m)
        self.belief.reset(changed)
        self.detector.reset(changed.any(axis=1))
        self._mask = m.copy()

    def tick(
        self,
        latency: ArrayLike,
        errors: ArrayLike,
        requests: ArrayLike,
        health: ArrayLike | None = None,
    ) -> TickResult:
        """Run one tick on this period's telemetry (mean latency in seconds, counts)."""
        lat = np.asarray(latency, dtype=np.float64)
        req = np.asarray(requests, dtype=np.float64)
        err = np.asarray(errors, dtype=np.float64)
        payoff, observed = routing_payoff(lat, err, req, latency_budget=self._budget)
        observed &= self._mask
        self.regret.observe(payoff, observed)
        self.belief.update(
            requests=np.where(observed, req, 0.0),
            errors=np.where(observed, np.minimum(err, req), 0.0),
            latency=np.where(observed, lat, np.nan),
            reference=self._budget,
            health=health,
        )
        p_fail = self.belief.probability(FAILING)
        weights = with_floor(
            self.regret.average_strategy() * (1.0 - p_fail), self.floor, self._mask
        )
        gap = wardrop_gap_batch(lat, np.where(observed, req, 0.0), observed, 2.0 * self.floor)
        state = self.detector.update(gap / self._budget[:, 0])
        counts = to_slot_counts(weights, self.n_slots, self.floor, self._mask)
        return TickResult(
            weights=weights,
            slot_counts=counts,
            wardrop_gap=gap,
            distance=self.detector.distance,
            state=state,
            regret_potential=self.regret.regret_potential(),
            p_failing=p_fail,
        )
