"""Weights -> slot table: largest-remainder apportionment (pure, no I/O).

A service's table has `constants.SLOTS` entries; backend i gets a number of
slots proportional to its weight, rounded by the largest-remainder method
(Hamilton), so the counts sum exactly to the table size and each differs
from its exact quota by less than one slot. The kernel then picks a slot
uniformly at random: P(backend i) = slots_i / SLOTS.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .constants import ID_BITS, ID_MASK, NO_BACKEND, SLOTS


def apportion(weights: Sequence[float] | np.ndarray, n_slots: int = SLOTS) -> np.ndarray:
    """Slot counts (int64) for non-negative `weights`; all zero if they sum to 0.

    Ties in the remainders go to the lower index, so the result is
    deterministic for a given input.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1:
        raise ValueError("weights must be a vector")
    if np.any(~np.isfinite(w)) or np.any(w < 0):
        raise ValueError("weights must be finite and non-negative")
    return apportion_rows(w[None, :], n_slots)[0]


def apportion_rows(weights: np.ndarray, n_slots: int = SLOTS) -> np.ndarray:
    """`apportion` for every row of a (services x backends) matrix at once, with the
    same result per row (the agent's tick apportions every service in one call).
    Entries must be finite and >= 0; a row summing to 0 gets no slots."""
    w = np.asarray(weights, dtype=np.float64)
    out = np.zeros(w.shape, dtype=np.int64)
    if w.size == 0:
        return out
    total = w.sum(axis=1, keepdims=True)
    live = total[:, 0] > 0
    # normalise first: n_slots/total overflows for tiny totals
    quota = np.divide(w, total, out=np.zeros_like(w), where=total > 0) * n_slots
    counts = np.floor(quota).astype(np.int64)
    short = n_slots - counts.sum(axis=1)
    # stable sort on -remainder: larger remainder first, lower index on ties
    order = np.argsort(-(quota - counts), axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(w.shape[1]), w.shape), axis=1)
    counts += rank < short[:, None]
    out[live] = counts[live]
    return out


def build_table(backend_ids: Sequence[int], weights: Sequence[float] | np.ndarray,
                n_slots: int = SLOTS) -> np.ndarray:
    """The slot table (uint32 backend ids); all NO_BACKEND when nothing has weight.

    Slots are laid out in contiguous runs: the kernel draws uniformly, so
    order carries no meaning, and runs make the table easy to read in dumps.
    """
    counts = apportion(weights, n_slots)
    if counts.sum() == 0:
        return np.full(n_slots, NO_BACKEND, dtype=np.uint32)
    return np.repeat(np.asarray(backend_ids, dtype=np.uint32), counts)


def counts(table: np.ndarray, backend_ids: Sequence[int]) -> np.ndarray:
    """Slots each of `backend_ids` holds in a table (uint32, in the order given)."""
    held, n = np.unique(table[table != NO_BACKEND], return_counts=True)
    by_id = dict(zip(held.tolist(), n.tolist()))
    return np.array([by_id.get(int(i), 0) for i in backend_ids], dtype=np.uint32)


def shares(table: np.ndarray) -> dict[int, float]:
    """Fraction of slots held by each backend id in a table."""
    ids, counts = np.unique(table[table != NO_BACKEND], return_counts=True)
    return {int(i): c / table.size for i, c in zip(ids, counts)}


def slot_values(ids: np.ndarray, held: np.ndarray) -> np.ndarray:
    """The u32 a slot holds for backend `ids` holding `held` slots of its table:
    the id, and above ID_BITS the share the two-choice comparison divides by."""
    return (np.asarray(ids).astype(np.uint32) & np.uint32(ID_MASK)) | \
        (np.asarray(held).astype(np.uint32) << np.uint32(ID_BITS))


def pack(tables: np.ndarray) -> np.ndarray:
    """Tables of backend ids as the kernel stores them (slot_values, each id's
    slots counted in its own table); NO_BACKEND slots stay NO_BACKEND. The tick
    path builds its tables packed from the counts it apportioned."""
    t = np.asarray(tables, dtype=np.uint32)
    flat = t.reshape(-1, t.shape[-1])
    held = np.zeros_like(flat)
    for i, row in enumerate(flat):
        _, inv, n = np.unique(row, return_inverse=True, return_counts=True)
        held[i] = n[inv.reshape(-1)]
    return np.where(t == NO_BACKEND, np.uint32(NO_BACKEND), slot_values(t, held.reshape(t.shape))).astype(np.uint32)


def unpack(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(backend ids, shares) of packed slots; NO_BACKEND slots: NO_BACKEND, 0."""
    v = np.asarray(values, dtype=np.uint32)
    none = v == NO_BACKEND
    return (np.where(none, np.uint32(NO_BACKEND), v & np.uint32(ID_MASK)).astype(np.uint32),
            np.where(none, 0, v >> np.uint32(ID_BITS)).astype(np.uint32))


def carried(ids: np.ndarray, shares: np.ndarray, backend_ids: Sequence[int]) -> list[int]:
    """The share each of `backend_ids` carries in an unpacked table (0: holds none)."""
    by_id = dict(zip(np.asarray(ids).tolist(), np.asarray(shares).tolist()))
    return [int(by_id.get(int(i), 0)) for i in backend_ids]
