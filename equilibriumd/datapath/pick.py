"""The kernel's pick rule in Python: the one mirror of bpf/lb.bpf.c eq_pick.

Must match eq_pick_once / eq_pick in bpf/lb.bpf.c and the arithmetic in
bpf/lib/pick.h. Every Python user of the rule (the simulator,
`equilibriumctl pick`, the tests) calls this module, so a change to the
kernel's rule has one place to follow it here. Pure numpy, no I/O.

The rule, for one connect to a service whose live table half is `table`:

* one random u32 `r` gives two slots: bits 0-9 (`r & SLOT_MASK`) and
  bits 16-25 (`(r >> SECOND_SHIFT) & SLOT_MASK`);
* with the sweep flag (SVC_SWEEP) the first slot is not bits 0-9 but the
  next point of the CPU's sweep of the table (`sweep_slot`: round robin by
  weight); a caller feeds the rule `sweep_draw(r, k, n)` instead of `r`;
* the first slot's backend is the choice, unless the service has the
  two-choice flag (SVC_P2C), the first backend has open connections (an
  idle first draw cannot be beaten, so the kernel skips the second lookup),
  and the second slot holds a different backend that is over 1/16 less
  loaded per slot (open connections / slots held; see `second_wins`);
* `balance: weighted` (no SVC_P2C) uses the first slot alone;
* a slot holding NO_BACKEND fails the connect (EHOSTUNREACH); a backend that
  is no longer usable (not active, or another service's: a stale slot) gets
  a fresh draw, up to TRIES draws in all.

Loads are the node's open connections per backend id (eq_lb_active, clamped
at 0) and shares the slots each id holds in the live half (carried in the
table's slots beside each id: slots.pack).
"""

from __future__ import annotations

from typing import Sequence, overload

import numpy as np

from .constants import NO_BACKEND, SLOTS, SVC_P2C, SVC_SWEEP

#: Mask of one slot index (EQ_SLOTS - 1; a power of two).
SLOT_MASK = SLOTS - 1
#: The second slot comes from bits 16 up of the same random u32 (EQ_SECOND_SHIFT).
SECOND_SHIFT = 16
#: Draws per connect: a stale slot gets two more (eq_pick, unrolled by hand).
TRIES = 3
#: SVC_SWEEP: how far each sweep's offset moves, in slots (EQ_SWEEP_STEP: ~SLOTS / golden ratio, odd)
SWEEP_STEP = 633

if SLOTS & SLOT_MASK or SLOTS > 1 << SECOND_SHIFT:
    raise ImportError("SLOTS must be a power of two <= 65536: both draws come from one u32")


def slots_of(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (first, second) slot indices a random u32 draws (eq_slot1/eq_slot2)."""
    r = np.asarray(r, dtype=np.uint32)
    return r & SLOT_MASK, (r >> SECOND_SHIFT) & SLOT_MASK


def compose(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """The random u32 whose two draws are `first` and `second` (the inverse of
    `slots_of`): lets a caller with its own uniform draws (the simulator) or
    an exhaustive enumeration (the tests) feed the rule."""
    f = np.asarray(first, dtype=np.uint32)
    s = np.asarray(second, dtype=np.uint32)
    return (f & SLOT_MASK) | ((s & SLOT_MASK) << SECOND_SHIFT)


@overload
def sweep_slot(k: int, n: int) -> int: ...
@overload
def sweep_slot(k: np.ndarray, n: int) -> np.ndarray: ...
def sweep_slot(k, n):  # type: ignore[no-untyped-def]
    """The first slot of a CPU's k-th connect to a service with n backends holding slots, under
    SVC_SWEEP (eq_sweep_slot, u32 arithmetic): ((k mod n) + o) * SLOTS / n, o the fractional part
    of (k div n) * SWEEP_STEP / SLOTS. A sweep of n connects samples the table at n points SLOTS / n
    apart: with equal weights each backend once (round robin); a backend with c slots c * n / SLOTS
    times, give or take one; the golden-ratio step spreads the offsets of successive sweeps."""
    if isinstance(k, np.ndarray):
        kk = k.astype(np.uint64) & 0xFFFFFFFF
        sweep, i = kk // n, kk % n
        return ((i * SLOTS + ((sweep * SWEEP_STEP) & SLOT_MASK)) // n).astype(np.int64) & SLOT_MASK
    k &= 0xFFFFFFFF
    sweep, i = divmod(k, n)
    return ((i * SLOTS + ((sweep * SWEEP_STEP) & SLOT_MASK)) // n) & SLOT_MASK


def sweep_draw(r: int, k: int, n: int) -> int:
    """The u32 `pick_one` takes for a connect under SVC_SWEEP: the sweep's first slot, the second
    slot still from the random `r` (bits 16 up), as eq_pick_once does."""
    return (r & ~SLOT_MASK & 0xFFFFFFFF) | sweep_slot(k, n) if n > 0 else r


def first_draw(flags: int, r: int, k: int, n: int) -> int:
    """`r` as the kernel uses it for a service with these flags: `sweep_draw` under SVC_SWEEP."""
    return sweep_draw(r, k, n) if flags & SVC_SWEEP else r


@overload
def second_wins(load1: int, share1: int, load2: int, share2: int) -> bool: ...
@overload
def second_wins(load1: np.ndarray, share1: np.ndarray, load2: np.ndarray, share2: np.ndarray) -> np.ndarray: ...
def second_wins(load1, share1, load2, share2):  # type: ignore[no-untyped-def]
    """Whether the second backend is over 1/16 less loaded per slot:
    load2 / share2 < (16/17) load1 / share1, multiplied out as the kernel does
    (eq_second_wins). The margin keeps rounding out of it: an even split of
    1,024 slots is 342/341/341, and without it the odd slot would decide every
    pair with equal counts. Works on ints and on uint64 arrays alike."""
    return load2 * share1 * 17 < load1 * share2 * 16


def _at(values: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """values[ids] as uint64, 0 where an id is out of range (a map lookup that
    finds nothing reads as 0 in the kernel)."""
    ok = ids < values.shape[0]
    return np.where(ok, values[np.where(ok, ids, 0)], 0).astype(np.uint64)


def pick_once(table: np.ndarray, shares: np.ndarray, active: np.ndarray, flags: int,
              r: np.ndarray) -> np.ndarray:
    """One draw per random u32 in `r` (eq_pick_once): the backend id chosen, or
    NO_BACKEND where the first slot is empty. Does not look at backend states.

    `table`: the live table half (SLOTS uint32 ids); `shares` and `active`:
    slots held and open connections, indexed by backend id."""
    tab = np.asarray(table, dtype=np.uint32)
    if tab.shape != (SLOTS,):
        raise ValueError("a table half has %d slots, got shape %s" % (SLOTS, tab.shape))
    s1, s2 = slots_of(r)
    id1 = tab[s1]
    if not flags & SVC_P2C:
        return id1
    load = np.maximum(np.asarray(active, dtype=np.int64), 0)
    share = np.asarray(shares, dtype=np.uint64)
    id2 = tab[s2]
    l1 = _at(load, id1)
    take = ((l1 > 0) & (id1 != NO_BACKEND) & (id2 != id1) & (id2 != NO_BACKEND)
            & second_wins(l1, _at(share, id1), _at(load, id2), _at(share, id2)))
    return np.where(take, id2, id1)


def pick(table: np.ndarray, shares: np.ndarray, active: np.ndarray, flags: int, r: np.ndarray,
         usable: np.ndarray | None = None) -> np.ndarray:
    """The backend each connect gets (eq_pick), NO_BACKEND where it would fail.

    `r`: shape (n,) for one draw per connect, or (n, k) with k <= TRIES: column
    t is the random u32 of draw t, used only if draws 0..t-1 landed on stale
    slots. `usable` (bool by backend id: active and the service's own) marks
    what a draw may return; None takes every id in the table as usable."""
    rr = np.asarray(r)
    if rr.ndim == 1:
        rr = rr[:, None]
    if rr.ndim != 2 or not 1 <= rr.shape[1] <= TRIES:
        raise ValueError("r must have shape (n,) or (n, k) with 1 <= k <= %d" % TRIES)
    out = np.full(rr.shape[0], NO_BACKEND, dtype=np.uint32)
    todo = np.arange(rr.shape[0])
    for t in range(rr.shape[1]):
        ids = pick_once(table, shares, active, flags, rr[todo, t])
        empty = ids == NO_BACKEND
        if usable is None:
            ok = ~empty
        else:
            u = np.asarray(usable, dtype=bool)
            ok = ~empty & (ids < u.shape[0]) & u[np.where(ids < u.shape[0], ids, 0)]
        out[todo[ok]] = ids[ok]
        todo = todo[~(empty | ok)]          # only a stale draw tries again
        if todo.size == 0:
            break
    return out


def pick_one(table: Sequence[int], shares: Sequence[int], active: Sequence[int], flags: int, r: int) -> int:
    """`pick_once` for a single connect, on Python ints: the simulator decides
    one connection at a time with counts that change after each, where a numpy
    call per decision would cost several times the rest of its loop. The same
    steps as `pick_once` (a test holds the two equal); ids must index
    `shares` and `active`."""
    b = table[r & SLOT_MASK]
    if not flags & SVC_P2C or b == NO_BACKEND:
        return b
    l1 = active[b]
    if l1 <= 0:                     # idle first draw: no second
        return b
    b2 = table[(r >> SECOND_SHIFT) & SLOT_MASK]
    if b2 != b and b2 != NO_BACKEND and second_wins(l1, shares[b], max(active[b2], 0), shares[b2]):
        return b2
    return b
