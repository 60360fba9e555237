"""What a test backend does with each request: the behaviour record, its
validation, and the latency distributions.

Pure (no I/O), so the server, the control client and the unit tests share one
definition. A behaviour is changed by `Behaviour.updated(changes)`, which
validates every key first and returns a new record, so a bad change leaves the
one in force untouched.

Units: seconds for latency, bytes per second for bandwidth, bytes for bodies,
ratios in [0, 1] for fractions of requests.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Mapping
from typing import Any

#: Parameters each latency distribution takes (all in seconds, except sigma,
#: which is the standard deviation of the underlying normal, dimensionless).
DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "fixed": ("value",),
    "uniform": ("low", "high"),
    "exponential": ("mean",),
    "lognormal": ("median", "sigma"),
    "normal": ("mean", "std"),
}


@dataclasses.dataclass(frozen=True)
class Latency:
    """Added delay before a response's first byte, drawn per request.

    `dist` names one of DISTRIBUTIONS; `params` holds its parameters in
    seconds. Samples are never negative (the normal is clipped at 0).
    """

    dist: str = "fixed"
    params: tuple[tuple[str, float], ...] = (("value", 0.0),)

    @classmethod
    def parse(cls, spec: object) -> "Latency":
        """From a number of seconds, None (no delay) or a mapping such as
        {"dist": "uniform", "low": 0.01, "high": 0.05}."""
        if spec is None:
            return cls()
        if isinstance(spec, bool):
            raise ValueError("latency: expected seconds or a distribution, got a boolean")
        if isinstance(spec, (int, float)):
            return cls("fixed", (("value", _non_negative("latency", spec)),))
        if not isinstance(spec, Mapping):
            raise ValueError("latency: expected seconds or a mapping with 'dist', got %r" % (spec,))
        dist = spec.get("dist", "fixed")
        if dist not in DISTRIBUTIONS:
            raise ValueError("latency: unknown dist %r; known: %s" % (dist, ", ".join(DISTRIBUTIONS)))
        names = DISTRIBUTIONS[dist]
        extra = sorted(set(spec) - set(names) - {"dist"})
        if extra:
            raise ValueError("latency: %s takes %s, not %s" % (dist, ", ".join(names), ", ".join(extra)))
        missing = [n for n in names if n not in spec]
        if missing:
            raise ValueError("latency: %s needs %s" % (dist, ", ".join(missing)))
        values = {n: _non_negative("latency.%s" % n, spec[n]) for n in names}
        if dist == "uniform" and values["low"] > values["high"]:
            raise ValueError("latency: uniform needs low <= high, got low=%g high=%g"
                             % (values["low"], values["high"]))
        return cls(dist, tuple((n, values[n]) for n in names))

    def sample(self, rng: random.Random) -> float:
        """One delay in seconds (>= 0). Draws exactly one variate from `rng`
        whatever the distribution, so streams stay aligned across changes."""
        p = dict(self.params)
        if self.dist == "fixed":
            rng.random()
            return p["value"]
        if self.dist == "uniform":
            return rng.uniform(p["low"], p["high"])
        if self.dist == "exponential":
            u = rng.random()
            return -p["mean"] * math.log(1.0 - u) if p["mean"] > 0 else 0.0
        if self.dist == "lognormal":
            z = rng.normalvariate(0.0, 1.0)
            return p["median"] * math.exp(p["sigma"] * z)
        if self.dist == "normal":
            return max(0.0, p["mean"] + p["std"] * rng.normalvariate(0.0, 1.0))
        raise AssertionError(self.dist)  # parse() admits nothing else

    def to_json(self) -> dict[str, Any]:
        return {"dist": self.dist, **dict(self.params)}


@dataclasses.dataclass(frozen=True)
class Behaviour:
    """Per-backend behaviour, all changeable at run time.

    latency            added delay before the first response byte (Latency)
    error_ratio        fraction of requests answered with `error_status`, in [0, 1]
    error_status       status of those answers, 400..599 (default 503)
    refuse             True: the listener is closed, connects get ECONNREFUSED
    close_mid_request  fraction of requests read and then answered by closing
                       the connection without a byte, in [0, 1]
    bandwidth          bytes/s pacing of each response body in user space,
                       None for unlimited (a shared link limit is a tbf qdisc:
                       see testbed.hosts)
    body_bytes         size of a 200 response body in bytes ("ok" by default)
    capacity           requests per second the backend serves, one at a time in
                       arrival order (a FIFO queue: beyond it, latency grows as the
                       queue does), None for unlimited
    """

    latency: Latency = Latency()
    error_ratio: float = 0.0
    error_status: int = 503
    refuse: bool = False
    close_mid_request: float = 0.0
    bandwidth: float | None = None
    body_bytes: int = 2
    capacity: float | None = None

    def updated(self, changes: Mapping[str, Any]) -> "Behaviour":
        """A new Behaviour with `changes` applied; ValueError naming the key
        and the problem if any change is invalid (self is never modified)."""
        known = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(changes) - set(known))
        if unknown:
            raise ValueError("unknown behaviour key%s %s; known: %s"
                             % ("s" if len(unknown) > 1 else "", ", ".join(map(repr, unknown)), ", ".join(known)))
        new: dict[str, Any] = {}
        for key, value in changes.items():
            new[key] = _CHECK[key](value)
        return dataclasses.replace(self, **new)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["latency"] = self.latency.to_json()
        return d


def _non_negative(what: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("%s: expected a number, got %r" % (what, value))
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise ValueError("%s: expected a finite number >= 0, got %r" % (what, value))
    return v


def _ratio(what: str) -> Any:
    def check(value: object) -> float:
        v = _non_negative(what, value)
        if v > 1:
            raise ValueError("%s: expected a ratio in [0, 1], got %r" % (what, value))
        return v
    return check


def _status(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 400 <= value <= 599:
        raise ValueError("error_status: expected an integer in 400..599, got %r" % (value,))
    return value


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError("refuse: expected true or false, got %r" % (value,))
    return value


def _rate_or_unlimited(what: str, unit: str) -> Any:
    """A check for a rate > 0 in `unit`, or None for unlimited."""
    def check(value: object) -> float | None:
        if value is None:
            return None
        v = _non_negative(what, value)
        if v == 0:
            raise ValueError("%s: expected %s > 0, or None for unlimited, got 0" % (what, unit))
        return v
    return check


def _body_bytes(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1 << 30:
        raise ValueError("body_bytes: expected an integer in 0..2**30, got %r" % (value,))
    return value


_CHECK: dict[str, Any] = {
    "latency": Latency.parse,
    "error_ratio": _ratio("error_ratio"),
    "error_status": _status,
    "refuse": _flag,
    "capacity": _rate_or_unlimited("capacity", "requests/s"),
    "close_mid_request": _ratio("close_mid_request"),
    "bandwidth": _rate_or_unlimited("bandwidth", "bytes/s"),
    "body_bytes": _body_bytes,
}
