"""Bayesian game: beliefs over backend types from telemetry signals.

Role in routing: a backend's type (healthy, degraded, failing) is private
information; the agent holds a belief per backend, updates it each tick from
errors, latency and health checks, and routes on the expected payoff under
the posterior (the Bayesian-game best response).

Model (``SignalModel``, per type t in HEALTHY, DEGRADED, FAILING):

- prior ``P(t)``; between ticks the type may change by the Markov matrix
  ``transition[t, t']`` (so beliefs never freeze and a recovered backend is
  noticed);
- errors: ``k ~ Binomial(n, error_rate[t])`` out of ``n`` requests;
- latency: ``z = max(log(latency / reference), 0)`` for the tick's mean
  latency, where ``reference`` is the latency the service considers normal
  (e.g. its SLO); ``z`` is a normal ``N(log_latency_mean[t],
  log_latency_sd[t])`` rectified at 0, so every latency at or below the
  reference is the same evidence (probability mass ``Phi(-mean / sd)``) and
  a backend is never suspected for being fast;
- health checks: pass with probability ``health_pass[t]``;
- payoff of routing to a backend of type t: ``type_payoff[t]``.

Contracts:

- ``BackendBelief(shape, model=SignalModel())`` holds ``posterior`` shaped
  ``shape + (3,)`` (e.g. services x backends x 3), initialised to the prior.
- ``update(requests=None, errors=None, latency=None, reference=None,
  health=None)`` runs one step of the HMM forward filter: predict with
  ``transition``, then multiply by the likelihood of the signals present
  (missing ones, NaN latency, and ``health == -1`` contribute nothing) and
  normalize. Guarantee: the result is the exact posterior under the model
  (Bayes' rule, computed in log space so it never underflows); each entry is a
  probability vector; with an identity transition, updating with signals one
  tick at a time equals updating once with their product likelihood.
- ``expected_payoff()``: ``posterior @ type_payoff``, shape ``shape``.
- ``probability(type_index)``: the posterior probability of one type.
- ``reset(where)``: back to the prior for the selected entries.

Reference: J. Harsanyi, "Games with incomplete information played by
'Bayesian' players", Management Science 14 (1967-68); L. Rabiner, "A tutorial
on hidden Markov models", Proc. IEEE 77 (1989) for the forward filter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .normal_form import ArrayLike, FloatArray

HEALTHY = 0
DEGRADED = 1
FAILING = 2
TYPE_NAMES = ("healthy", "degraded", "failing")


def _vec(*values: float) -> FloatArray:
    return np.array(values, dtype=np.float64)


def _sticky(stay: float) -> FloatArray:
    move = (1.0 - stay) / 2.0
    return np.full((3, 3), move) + np.eye(3) * (stay - move)


@dataclass(frozen=True)
class SignalModel:
    """Per-type parameters of the signal likelihoods (see module docstring)."""

    prior: FloatArray = field(default_factory=lambda: _vec(0.90, 0.08, 0.02))
    transition: FloatArray = field(default_factory=lambda: _sticky(0.98))
    error_rate: FloatArray = field(default_factory=lambda: _vec(0.002, 0.05, 0.5))
    # A failing backend may fail fast (refused) or slowly (timeouts): its
    # latency is centred on normal with a wide spread, so errors, not speed,
    # identify it; a degraded one is typically ~3x slower.
    log_latency_mean: FloatArray = field(default_factory=lambda: _vec(0.0, float(np.log(3.0)), 0.0))
    log_latency_sd: FloatArray = field(default_factory=lambda: _vec(0.5, 0.7, 1.5))
    health_pass: FloatArray = field(default_factory=lambda: _vec(0.999, 0.9, 0.2))
    type_payoff: FloatArray = field(default_factory=lambda: _vec(1.0, 0.5, 0.0))

    def __post_init__(self) -> None:
        for name in (
            "prior",
            "error_rate",
            "log_latency_mean",
            "log_latency_sd",
            "health_pass",
            "type_payoff",
        ):
            v = np.asarray(getattr(self, name), dtype=np.float64)
            if v.shape != (3,):
                raise ValueError(f"{name} needs one value per type")
            object.__setattr__(self, name, v)
        T = np.asarray(self.transition, dtype=np.float64)
        if T.shape != (3, 3) or (T < 0).any() or not np.allclose(T.sum(axis=1), 1.0):
            raise ValueError("transition must be a 3x3 row-stochastic matrix")
        object.__setattr__(self, "transition", T)
        if (self.prior < 0).any() or not np.isclose(self.prior.sum(), 1.0):
            raise ValueError("prior must be a probability vector")
        if ((self.error_rate <= 0) | (self.error_rate >= 1)).any():
            raise ValueError("error rates must be in (0, 1)")
        if ((self.health_pass <= 0) | (self.health_pass >= 1)).any():
            raise ValueError("health_pass must be in (0, 1)")
        if (self.log_latency_sd <= 0).any():
            raise ValueError("log_latency_sd must be positive")


class BackendBelief:
    """Posterior over backend types for every entry of ``shape``."""

    def __init__(self, shape: tuple[int, ...], model: SignalModel | None = None) -> None:
        self.model = model if model is not None else SignalModel()
        self._shape = tuple(shape)
        # Stored type-first, (3, entries): per-type planes make every step an
        # elementwise operation over contiguous arrays, several times faster
        # than reducing over a trailing axis of length 3.
        n = int(np.prod(self._shape))
        self._post = np.repeat(self.model.prior[:, None], n, axis=1)
        m = self.model
        self._log_err = np.log(m.error_rate)
        self._log_ok = np.log1p(-m.error_rate)
        self._log_pass = np.log(m.health_pass)
        self._log_fail = np.log1p(-m.health_pass)
        self._inv_sd = 1.0 / m.log_latency_sd
        self._log_sd = np.log(m.log_latency_sd)
        # Log of the rectified normal's point mass at 0: log Phi(-mean / sd).
        self._log_at_zero = _log_ndtr(-m.log_latency_mean / m.log_latency_sd)
        self._trans_t = np.ascontiguousarray(m.transition.T)

    @property
    def posterior(self) -> FloatArray:
        """Posterior probabilities, shaped ``shape + (3,)``."""
        return np.moveaxis(self._post.reshape((3,) + self._shape), 0, -1).copy()

    def reset(self, where: ArrayLike) -> None:
        sel = np.broadcast_to(np.asarray(where, dtype=bool), self._shape).reshape(-1)
        self._post[:, sel] = self.model.prior[:, None]

    def remap(self, source: np.ndarray, shape: tuple[int, ...]) -> None:
        """Carry beliefs to a new layout: entry i of the new (flattened) shape takes
        old entry ``source[i]``, or the prior where ``source[i] < 0``."""
        src = np.asarray(source, dtype=np.intp).reshape(-1)
        post = np.repeat(self.model.prior[:, None], src.size, axis=1)
        have = src >= 0
        post[:, have] = self._post[:, src[have]]
        self._post, self._shape = post, tuple(shape)

    def _flat(self, a: ArrayLike) -> FloatArray:
        return np.broadcast_to(np.asarray(a, dtype=np.float64), self._shape).reshape(-1)

    def update(
        self,
        requests: ArrayLike | None = None,
        errors: ArrayLike | None = None,
        latency: ArrayLike | None = None,
        reference: ArrayLike | None = None,
        health: ArrayLike | None = None,
    ) -> FloatArray:
        """One forward-filter step; returns the new posterior (``shape + (3,)``)."""
        n_entries = self._post.shape[1]
        loglik = np.zeros((3, n_entries))
        if errors is not None:
            if requests is None:
                raise ValueError("errors need requests")
            n = self._flat(requests)
            k = self._flat(errors)
            if (k < 0).any() or (k > n).any():
                raise ValueError("need 0 <= errors <= requests")
            loglik += np.multiply.outer(self._log_err, k)
            loglik += np.multiply.outer(self._log_ok, n - k)
        if latency is not None:
            ref = 1.0 if reference is None else reference
            ratio = self._flat(np.asarray(latency, dtype=np.float64) / np.asarray(ref))
            ok = np.isfinite(ratio) & (ratio > 0.0)
            slow = ok & (ratio > 1.0)
            z = np.log(np.where(slow, ratio, 1.0))
            for t in range(3):
                dev = (z - self.model.log_latency_mean[t]) * self._inv_sd[t]
                # The density constant -log(sqrt(2 pi)) is shared by all types and cancels.
                density = -0.5 * dev * dev - self._log_sd[t]
                loglik[t] += np.where(slow, density, np.where(ok, self._log_at_zero[t], 0.0))
        if health is not None:
            h = np.broadcast_to(np.asarray(health), self._shape).reshape(-1)
            passed, failed = h == 1, h == 0
            for t in range(3):
                loglik[t] += np.where(
                    passed, self._log_pass[t], np.where(failed, self._log_fail[t], 0.0)
                )
        predicted = self._trans_t @ self._post
        # Work in log space and shift by the max so strong evidence never
        # underflows to 0/0; a type with zero predicted mass stays at zero.
        with np.errstate(divide="ignore"):
            logpost = np.log(predicted) + loglik
        logpost -= np.maximum(np.maximum(logpost[0], logpost[1]), logpost[2])
        post = np.exp(logpost)
        post /= post[0] + post[1] + post[2]
        self._post = post
        return self.posterior

    def expected_payoff(self) -> FloatArray:
        """Expected routing payoff under the posterior, shaped ``shape``."""
        return np.asarray(self.model.type_payoff @ self._post).reshape(self._shape)

    def probability(self, type_index: int) -> FloatArray:
        """Posterior probability of one type, shaped ``shape``."""
        return np.array(self._post[type_index].reshape(self._shape), dtype=np.float64)


def _log_ndtr(x: ArrayLike) -> FloatArray:
    """log Φ(x), the standard normal CDF, without scipy (the agent keeps scipy
    out of memory). erfc is exact to double precision down to x ≈ -37; below
    that the asymptotic series takes over."""
    a = np.asarray(x, dtype=np.float64)
    out = np.empty_like(a)
    flat, res = a.reshape(-1), out.reshape(-1)
    for i, v in enumerate(flat):
        if v > -37.0:
            res[i] = math.log(0.5 * math.erfc(-v / math.sqrt(2.0)))
        else:  # log φ(v) - log(-v) + log(1 - 1/v² + 3/v⁴)
            res[i] = -0.5 * v * v - math.log(-v) - 0.5 * math.log(2 * math.pi) + math.log1p(-1 / v**2 + 3 / v**4)
    return out
