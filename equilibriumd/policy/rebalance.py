"""Which pooled connections to move: the quotas the rebalancer closes (pure numpy).

The kernel steers a connection once, at connect(); a client that keeps its
connections (HTTP keep-alive, gRPC, database pools) keeps sending where the
weights pointed when it connected. Each tick the agent compares where this
node's open connections are with where the live tables send new ones, and
asks the kernel (bpf/rebalance.bpf.c) to close idle connections of backends
that hold clearly more than their share; the pool reconnects and connect()
steers the new connection by today's weights.

"Clearly": connections land on backends at random (a weighted draw), so even
with equal weights a backend holds a few more than its share now and then. A
backend gives up connections only when its excess is beyond the noise of that
draw, NOISE_SIGMAS binomial standard deviations plus half a connection; it
then gives up all of its excess (down to its share, not to the band: the band
is the hysteresis that keeps equal backends from trading connections). The
connections that reconnect are steered by the weights and, under balance p2c,
toward the backends holding fewer: placement then stays even, and a pool whose
connections are not replaced sees no closes at all in steady state.
A backend far under its share (it joined, or recovered) makes every backend
over its share give up its excess, so that it fills. A quota counts only when
two ticks in a row see it (`confirmed`).
"""

from __future__ import annotations

import numpy as np

#: Excess within this many binomial standard deviations of a backend's share is noise.
NOISE_SIGMAS = 1.0
#: ... plus this many connections (a backend with no share but one connection gives it up).
NOISE_FLOOR = 0.5


def excess_quota(active: np.ndarray, share: np.ndarray, routable: np.ndarray) -> np.ndarray:
    """(S, B) connections each backend should give up now.

    `active`: open connections this node holds per backend; `share`: the
    fraction of new connections the live table sends each backend (0 for
    backends that take none); `routable`: the backends that take new
    connections. Backends that take none (draining, quarantined) get no quota:
    the kernel closes all their idle connections by state.
    """
    act = np.maximum(np.asarray(active, dtype=np.float64), 0.0)
    p = np.clip(np.asarray(share, dtype=np.float64), 0.0, 1.0)
    total = act.sum(axis=1, keepdims=True)   # all of them: a drained backend's connections land on the rest
    expect = p * total
    band = NOISE_SIGMAS * np.sqrt(total * p * (1.0 - p)) + NOISE_FLOOR
    excess = act - expect
    # a backend far under its share (one that joined, or recovered): the others give up
    # their excess, band or not, and the reconnects fill it (the kernel's two-choice draw
    # prefers the emptier backend)
    short = (routable & (-excess > band)).any(axis=1, keepdims=True)
    give = routable & ((excess > band) | (short & (excess >= 1.0)))
    return np.where(give, np.rint(excess), 0).astype(np.int64)


def shares(slots_held: np.ndarray) -> np.ndarray:
    """(S, B) fraction of new connections each backend gets from the slots it holds."""
    held = np.asarray(slots_held, dtype=np.float64)
    tot = held.sum(axis=1, keepdims=True)
    return np.divide(held, tot, out=np.zeros_like(held), where=tot > 0)


def confirmed(quota: np.ndarray, previous: np.ndarray | None) -> np.ndarray:
    """The quota two ticks in a row agree on (elementwise minimum; none without a
    previous tick of the same layout). Connections that live less than a tick (one
    per request) come and go between ticks and never hold an excess twice, so the
    kernel is not sent to walk for them; a pool's excess stays until it is moved."""
    if previous is None or previous.shape != quota.shape:
        return np.zeros_like(quota)
    return np.minimum(quota, previous)
