"""Weight policies: what share of new connections each backend should get.

A policy maps a service's configuration (and, later, its telemetry) to one
non-negative weight per backend. States are applied by the caller: only
`active` backends ever receive slots.
"""

from __future__ import annotations

from typing import Callable

from ..config import ServiceConfig


def static(svc: ServiceConfig) -> list[float]:
    """The configured weights, as written."""
    return [b.weight for b in svc.backends]


def round_robin(svc: ServiceConfig) -> list[float]:
    """An even split. The kernel draws per connection, so this is even in
    expectation (random with equal weights), not a strict rotation."""
    return [1.0 for _ in svc.backends]


POLICIES: dict[str, Callable[[ServiceConfig], list[float]]] = {
    "static": static,
    "round-robin": round_robin,
}
