"""Latency (congestion) models per backend and their online fit from telemetry.

Role in routing: each backend's latency as a function of the load sent to it;
``potential`` uses these models to compute the Wardrop and optimal splits and
the tolls that move one to the other.

Models (parameters are arrays; every method broadcasts over them, so one model
object describes all backends of one service or of many services at once):

- ``Affine(free_flow, slope)``: ``l(x) = free_flow + slope * x``, slope >= 0.
- ``MM1(alpha, beta, offset=0)``: ``l(x) = offset + 1 / (alpha - beta * x)``
  for ``x < alpha / beta`` (+inf beyond), the M/M/1 sojourn time when
  ``alpha = beta * capacity = service rate``; beta >= 0, alpha > 0.

Each model provides ``latency``, ``marginal`` (``d/dx [x l(x)]``, the cost a
unit of flow imposes on everyone), ``derivative``, ``integral`` (``int_0^x
l``, the Beckmann term), their inverses ``flow_at_latency`` and
``flow_at_marginal`` (the largest flow whose latency or marginal cost does
not exceed a level, clipped to [0, capacity)), ``constant`` (links whose
latency does not depend on flow) and ``tolled(tau)`` (the same model with a
constant toll added).
Guarantee: latency, marginal and both inverses are non-decreasing and exact
closed forms; ``flow_at_latency(latency(x)) == x`` for 0 <= x < capacity on
non-constant links.

``CongestionFit(shape, kind, forgetting)`` fits one model per entry of
``shape`` (e.g. services x backends) from (load, latency) samples by
exponentially weighted least squares on a linearizing transform (``l`` for
affine, ``1 / l`` for M/M/1). Guarantee: on noise-free samples from a model
of its kind with two or more distinct loads, the fit recovers the model's
parameters (up to the ridge term, 1e-9 relative); the fitted model is always
valid (non-negative slope, positive alpha).

Reference: L. Kleinrock, *Queueing Systems* vol. 1 (1975) for M/M/1;
T. Roughgarden, *Selfish Routing and the Price of Anarchy* (2005) for
the latency-function conventions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from .normal_form import ArrayLike, BoolArray, FloatArray


class LatencyModel(Protocol):
    """What ``potential`` needs from a latency model."""

    def latency(self, x: ArrayLike) -> FloatArray: ...
    def marginal(self, x: ArrayLike) -> FloatArray: ...
    def derivative(self, x: ArrayLike) -> FloatArray: ...
    def integral(self, x: ArrayLike) -> FloatArray: ...
    def flow_at_latency(self, level: ArrayLike) -> FloatArray: ...
    def flow_at_marginal(self, level: ArrayLike) -> FloatArray: ...
    def constant(self) -> BoolArray: ...
    def capacity(self) -> FloatArray: ...
    def tolled(self, tau: ArrayLike) -> LatencyModel: ...


def _f(a: ArrayLike) -> FloatArray:
    return np.asarray(a, dtype=np.float64)


@dataclass(frozen=True)
class Affine:
    """``l(x) = free_flow + slope * x`` per link."""

    free_flow: FloatArray
    slope: FloatArray

    def __post_init__(self) -> None:
        a, b = np.broadcast_arrays(_f(self.free_flow), _f(self.slope))
        if (b < 0).any():
            raise ValueError("affine slopes must be non-negative")
        object.__setattr__(self, "free_flow", a)
        object.__setattr__(self, "slope", b)

    def latency(self, x: ArrayLike) -> FloatArray:
        return self.free_flow + self.slope * _f(x)

    def marginal(self, x: ArrayLike) -> FloatArray:
        return self.free_flow + 2.0 * self.slope * _f(x)

    def derivative(self, x: ArrayLike) -> FloatArray:
        return np.broadcast_to(self.slope, np.broadcast(self.slope, _f(x)).shape).copy()

    def integral(self, x: ArrayLike) -> FloatArray:
        xf = _f(x)
        return self.free_flow * xf + 0.5 * self.slope * xf * xf

    def flow_at_latency(self, level: ArrayLike) -> FloatArray:
        return self._inverse(_f(level), self.slope)

    def flow_at_marginal(self, level: ArrayLike) -> FloatArray:
        return self._inverse(_f(level), 2.0 * self.slope)

    def _inverse(self, level: FloatArray, slope: FloatArray) -> FloatArray:
        safe = np.where(slope > 0.0, slope, 1.0)
        x = np.maximum((level - self.free_flow) / safe, 0.0)
        # Constant links have no finite inverse; callers treat them separately.
        return np.where(slope > 0.0, x, 0.0)

    def constant(self) -> BoolArray:
        return np.asarray(self.slope == 0.0)

    def capacity(self) -> FloatArray:
        return np.full(self.slope.shape, np.inf)

    def tolled(self, tau: ArrayLike) -> Affine:
        return Affine(self.free_flow + _f(tau), self.slope)


@dataclass(frozen=True)
class MM1:
    """``l(x) = offset + 1 / (alpha - beta * x)`` per link (M/M/1-like)."""

    alpha: FloatArray
    beta: FloatArray
    offset: FloatArray = field(default_factory=lambda: np.zeros(()))

    def __post_init__(self) -> None:
        a, b, o = np.broadcast_arrays(_f(self.alpha), _f(self.beta), _f(self.offset))
        if (a <= 0).any() or (b < 0).any():
            raise ValueError("MM1 needs alpha > 0 and beta >= 0")
        object.__setattr__(self, "alpha", a)
        object.__setattr__(self, "beta", b)
        object.__setattr__(self, "offset", o)

    def _room(self, x: ArrayLike) -> FloatArray:
        return self.alpha - self.beta * _f(x)

    def latency(self, x: ArrayLike) -> FloatArray:
        room = self._room(x)
        with np.errstate(divide="ignore"):
            return np.where(room > 0.0, self.offset + 1.0 / np.where(room > 0, room, 1.0), np.inf)

    def marginal(self, x: ArrayLike) -> FloatArray:
        room = self._room(x)
        safe = np.where(room > 0.0, room, 1.0)
        return np.where(room > 0.0, self.offset + self.alpha / (safe * safe), np.inf)

    def derivative(self, x: ArrayLike) -> FloatArray:
        room = self._room(x)
        safe = np.where(room > 0.0, room, 1.0)
        return np.where(room > 0.0, self.beta / (safe * safe), np.inf)

    def integral(self, x: ArrayLike) -> FloatArray:
        xf = _f(x)
        room = self._room(xf)
        safe_b = np.where(self.beta > 0.0, self.beta, 1.0)
        log_term = np.log(self.alpha / np.where(room > 0.0, room, 1.0)) / safe_b
        queue = np.where(self.beta > 0.0, log_term, xf / self.alpha)
        return np.where(room > 0.0, self.offset * xf + queue, np.inf)

    def flow_at_latency(self, level: ArrayLike) -> FloatArray:
        q = _f(level) - self.offset  # the queueing part of the latency
        # At or below the zero-load latency no flow is admitted (inverse = -inf).
        inv = np.where(q > 0.0, 1.0 / np.where(q > 0.0, q, 1.0), np.inf)
        return self._clip((self.alpha - inv) / self._safe_beta())

    def flow_at_marginal(self, level: ArrayLike) -> FloatArray:
        q = _f(level) - self.offset
        root = np.where(q > 0.0, np.sqrt(self.alpha / np.where(q > 0.0, q, 1.0)), np.inf)
        return self._clip((self.alpha - root) / self._safe_beta())

    def _safe_beta(self) -> FloatArray:
        return np.where(self.beta > 0.0, self.beta, 1.0)

    def _clip(self, x: FloatArray) -> FloatArray:
        x = np.clip(x, 0.0, self.capacity())
        return np.where(self.beta > 0.0, x, 0.0)

    def constant(self) -> BoolArray:
        return np.asarray(self.beta == 0.0)

    def capacity(self) -> FloatArray:
        with np.errstate(divide="ignore"):
            return np.where(self.beta > 0.0, self.alpha / self._safe_beta(), np.inf)

    def tolled(self, tau: ArrayLike) -> MM1:
        return MM1(self.alpha, self.beta, self.offset + _f(tau))


Kind = Literal["affine", "mm1"]


class CongestionFit:
    """Online, exponentially weighted fit of one latency model per entry of ``shape``.

    ``update(load, latency, weight=None, mask=None)`` folds in one sample per
    entry (entries where ``mask`` is False or latency is not positive and
    finite are skipped); ``model()`` returns the current fit.
    ``forgetting`` in (0, 1] is the per-update decay of old samples, so the
    effective memory is about ``1 / (1 - forgetting)`` updates.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        kind: Kind = "affine",
        forgetting: float = 0.98,
        ridge: float = 1e-9,
    ) -> None:
        if kind not in ("affine", "mm1"):
            raise ValueError(f"kind must be 'affine' or 'mm1', got {kind!r}")
        if not 0.0 < forgetting <= 1.0:
            raise ValueError("forgetting must be in (0, 1]")
        self.kind: Kind = kind
        self.forgetting = forgetting
        self.ridge = ridge
        # Weighted sufficient statistics of (x, y): sum w, w x, w y, w x^2, w x y.
        self._s = np.zeros((5,) + tuple(shape))

    def update(
        self,
        load: ArrayLike,
        latency: ArrayLike,
        weight: ArrayLike | None = None,
        mask: ArrayLike | None = None,
    ) -> None:
        shape = self._s.shape[1:]
        x = np.broadcast_to(_f(load), shape)
        lat = np.broadcast_to(_f(latency), shape)
        ok = np.isfinite(lat) & (lat > 0.0) & np.isfinite(x)
        if mask is not None:
            ok &= np.broadcast_to(np.asarray(mask, dtype=bool), shape)
        w = np.ones(shape) if weight is None else np.broadcast_to(_f(weight), shape)
        w = np.where(ok, w, 0.0)
        y = np.where(ok, lat if self.kind == "affine" else 1.0 / np.where(ok, lat, 1.0), 0.0)
        xs = np.where(ok, x, 0.0)
        self._s *= self.forgetting
        self._s[0] += w
        self._s[1] += w * xs
        self._s[2] += w * y
        self._s[3] += w * xs * xs
        self._s[4] += w * xs * y

    def remap(self, source: np.ndarray, shape: tuple[int, ...]) -> None:
        """Carry fits to a new layout: new (flattened) entry i takes old entry
        ``source[i]``, or starts with no samples where ``source[i] < 0``."""
        src = np.asarray(source, dtype=np.intp).reshape(-1)
        old = self._s.reshape(5, -1)
        new = np.zeros((5, src.size))
        have = src >= 0
        new[:, have] = old[:, src[have]]
        self._s = new.reshape((5,) + tuple(shape))

    def samples(self) -> FloatArray:
        """The decayed weight of the samples seen, per entry."""
        return np.array(self._s[0], dtype=np.float64)

    def model(self) -> Affine | MM1:
        n, sx, sy, sxx, sxy = self._s
        safe_n = np.where(n > 0.0, n, 1.0)
        mx, my = sx / safe_n, sy / safe_n
        var = sxx / safe_n - mx * mx
        cov = sxy / safe_n - mx * my
        # The ridge keeps the slope at 0 when the load never varied.
        slope = cov / (np.maximum(var, 0.0) + self.ridge * (1.0 + mx * mx))
        if self.kind == "affine":
            b = np.maximum(slope, 0.0)
            a = np.maximum(my - b * mx, 0.0)
            return Affine(np.where(n > 0, a, 0.0), np.where(n > 0, b, 0.0))
        beta = np.maximum(-slope, 0.0)
        alpha = my + beta * mx
        # With no usable sample, fall back to "1 s at any load", which is valid and inert.
        alpha = np.where((n > 0) & (alpha > 0.0), alpha, 1.0)
        beta = np.where((n > 0) & (my > 0.0), beta, 0.0)
        return MM1(alpha, beta)
