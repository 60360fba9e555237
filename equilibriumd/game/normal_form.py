"""Normal-form games: the payoff convention and the contractions every solver shares.

Convention (fixed, relied on by every module of ``equilibriumd.game``): an
n-player game is a sequence of n arrays of one shape ``(|A1|, ..., |An|)``;
player i's payoff at profile ``(a1, ..., an)`` is ``payoffs[i][a1, ..., an]``
and every player maximizes.

Contracts:

- ``as_payoffs(payoffs)`` returns the payoffs as a list of float arrays and
  raises ``ValueError`` unless there is one array per axis, all of one shape.
- ``as_strategies(strategies, shape)`` returns one float vector per player and
  raises ``ValueError`` unless each is a probability vector (non-negative,
  summing to 1 within ``atol``) of the right length.
- ``deviation_payoffs(payoffs, strategies, player)`` is the vector whose entry
  ``a`` is player ``player``'s expected payoff from playing pure ``a`` while
  the others play their mixed strategies independently. Exact (a tensor
  contraction, no sampling).
- ``expected_payoffs(payoffs, strategies)`` is each player's expected payoff
  under the independent product of the strategies. Exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]
ArrayLike = npt.ArrayLike

#: Tolerance for "is a probability vector" checks on caller input.
PROBABILITY_ATOL = 1e-6


def as_payoffs(payoffs: Sequence[ArrayLike]) -> list[FloatArray]:
    """Validate and convert payoffs to float arrays of one common shape."""
    arrays = [np.asarray(p, dtype=np.float64) for p in payoffs]
    if not arrays:
        raise ValueError("a game needs at least one player")
    shape = arrays[0].shape
    if len(shape) != len(arrays):
        raise ValueError(
            f"{len(arrays)} players need payoff arrays with {len(arrays)} axes, got shape {shape}"
        )
    if any(a.shape != shape for a in arrays):
        raise ValueError("all payoff arrays must have the same shape")
    if any(n == 0 for n in shape):
        raise ValueError("every player needs at least one action")
    if not all(np.isfinite(a).all() for a in arrays):
        raise ValueError("payoffs must be finite")
    return arrays


def as_strategies(
    strategies: Sequence[ArrayLike], shape: tuple[int, ...], atol: float = PROBABILITY_ATOL
) -> list[FloatArray]:
    """Validate one probability vector per player, matching the action counts."""
    if len(strategies) != len(shape):
        raise ValueError(f"expected {len(shape)} strategies, got {len(strategies)}")
    out = []
    for i, (s, n) in enumerate(zip(strategies, shape)):
        v = np.asarray(s, dtype=np.float64)
        if v.shape != (n,):
            raise ValueError(f"strategy {i} must have shape ({n},), got {v.shape}")
        if (v < -atol).any() or abs(v.sum() - 1.0) > atol:
            raise ValueError(f"strategy {i} is not a probability vector")
        out.append(v)
    return out


def deviation_payoffs(
    payoffs: Sequence[ArrayLike], strategies: Sequence[ArrayLike], player: int
) -> FloatArray:
    """Player ``player``'s expected payoff for each of its pure actions."""
    arrays = as_payoffs(payoffs)
    strats = as_strategies(strategies, arrays[0].shape)
    return _contract_others(arrays[player], strats, player)


def expected_payoffs(payoffs: Sequence[ArrayLike], strategies: Sequence[ArrayLike]) -> FloatArray:
    """Each player's expected payoff under the product of the mixed strategies."""
    arrays = as_payoffs(payoffs)
    strats = as_strategies(strategies, arrays[0].shape)
    return np.array(
        [float(_contract_others(a, strats, i) @ strats[i]) for i, a in enumerate(arrays)]
    )


def _contract_others(u: FloatArray, strats: Sequence[FloatArray], player: int) -> FloatArray:
    # Contract from the last axis down so the remaining axis indices stay valid.
    out = u
    for j in range(len(strats) - 1, -1, -1):
        if j != player:
            out = np.tensordot(out, strats[j], axes=([j], [0]))
    return np.asarray(out, dtype=np.float64)
