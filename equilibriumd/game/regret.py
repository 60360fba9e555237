"""No-regret learners: regret matching (RM, RM+), conditional regret matching, Hedge.

Role in routing: one learner per (node, service) over its backends; its
strategy is the mixed strategy that becomes the slot weights. Payoffs are
maximized (use e.g. ``payoff.routing_payoff`` to turn telemetry into [0, 1]).

Contracts and guarantees (``Delta`` is the range of the payoffs, ``|A|`` the
number of actions, ``T`` the number of updates; "adversarial" means any
payoff sequence, even chosen in response to the learner's past strategies):

- ``RegretMatcher(n_actions, *, plus=False, seed=None)``: external regret
  matching (Hart & Mas-Colell 2000) or RM+ (Tammelin 2014) when ``plus``.
  ``strategy()`` is proportional to the positive cumulative regrets (uniform
  when none is positive); ``observe(payoffs)`` is a full-information update
  with the payoff of every action; ``observe_bandit(action, payoff)`` updates
  from the played action only, with the importance-weighted counterfactual
  estimate ``payoff / strategy[action]`` for it and 0 for the others
  (unbiased). ``average_strategy()`` is the mean of the strategies played.
  Guarantee (full information): ``external_regret() <= Delta *
  sqrt(|A| / T)`` for every payoff sequence, for RM and RM+ alike
  (Blackwell approachability; Cesa-Bianchi & Lugosi 2006, Thm 2.1 with p=2).
  In self-play the average joint play approaches the coarse correlated
  equilibria; in two-player zero-sum games ``average_strategy()`` approaches
  a minmax strategy.
- ``Hedge(n_actions, *, learning_rate=None, horizon=None, seed=None)``:
  multiplicative weights on cumulative payoffs. With payoffs in [0, 1] and
  ``horizon=T`` (rate ``sqrt(8 ln|A| / T)``), regret after T rounds is at most
  ``sqrt(T ln|A| / 2)``; with neither argument the anytime rate
  ``sqrt(8 ln|A| / t)`` gives at most ``sqrt(2 T ln|A|) + sqrt(ln|A| / 8)``
  (Cesa-Bianchi & Lugosi 2006, Thm 2.2 and 2.3).
- ``ConditionalRegretMatcher(n_actions, *, inertia=None, seed=None)``: Hart &
  Mas-Colell's procedure. The next action repeats the last one unless a
  conditional regret ``D(last, k)`` is positive, in which case it switches to
  ``k`` with probability ``D(last, k)^+ / inertia``. Guarantee (Hart &
  Mas-Colell 2000, Main Theorem): every conditional regret average tends to
  0^-, so when all players use it the empirical joint distribution of play
  converges almost surely to the set of correlated equilibria. ``inertia``
  must exceed ``2 * Delta * (|A| - 1)``; by default it is set from the largest
  payoff range seen so far, which keeps that condition.
- ``BatchRegret(n_services, n_backends, *, plus=True, discount=1.0,
  average="uniform", average_discount=1.0, seed=None)``: RM/RM+ for many
  services at once over a masked (services x backends) matrix (a library
  learner: the agent's engine uses ``regret_step``, the update it shares).
  Absent backends get probability 0 and their regret is reset when they
  come back. With ``discount == 1`` each row carries
  ``RegretMatcher``'s guarantee; with ``discount < 1`` old regret fades
  geometrically so the learner tracks drifting latencies (the guarantee then
  holds over a window of about ``1 / (1 - discount)`` ticks).
  ``average_strategy()`` averages the strategy after each update (so it
  includes the current one), weighting the t-th by 1 (``"uniform"``, the
  average that carries the guarantees: in a nonatomic congestion game the
  time-averaged flow of no-regret play approaches the Wardrop equilibrium,
  Blum, Even-Dar & Ligett 2006) or by t (``"linear"``, as in CFR+, which
  converges much faster in practice), each times ``average_discount`` per
  tick of age so the average can follow change. In routing, the last iterate
  of RM+ oscillates around the equilibrium; the average is what to route on.

References: S. Hart & A. Mas-Colell, "A simple adaptive procedure leading to
correlated equilibrium", Econometrica 68 (2000); O. Tammelin, "Solving large
imperfect information games using CFR+" (2014); A. Blum, E. Even-Dar &
K. Ligett, "Routing without regret", PODC 2006; Y. Freund & R. Schapire,
"A decision-theoretic generalization of on-line learning", JCSS 55 (1997);
N. Cesa-Bianchi & G. Lugosi, *Prediction, Learning, and Games* (2006).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from .normal_form import ArrayLike, BoolArray, FloatArray


def _payoff_vector(payoffs: ArrayLike, n: int) -> FloatArray:
    u = np.asarray(payoffs, dtype=np.float64)
    if u.shape != (n,):
        raise ValueError(f"expected {n} payoffs, got shape {u.shape}")
    if not np.isfinite(u).all():
        raise ValueError("payoffs must be finite")
    return u


def _regret_strategy(regret: FloatArray) -> FloatArray:
    pos = np.maximum(regret, 0.0)
    total = pos.sum()
    if total > 0.0:
        return np.asarray(pos / total)
    return np.full(regret.shape, 1.0 / regret.size)


class RegretMatcher:
    """External regret matching (RM) or RM+ over ``n_actions`` actions."""

    def __init__(self, n_actions: int, *, plus: bool = False, seed: int | None = None) -> None:
        if n_actions < 1:
            raise ValueError("n_actions must be >= 1")
        self.n_actions = n_actions
        self.plus = plus
        self._rng = np.random.default_rng(seed)
        self._regret = np.zeros(n_actions)  # RM: cumulative regret; RM+: its clipped form
        self._true_regret = np.zeros(n_actions)  # unclipped, for external_regret()
        self._strategy_sum = np.zeros(n_actions)
        self._t = 0

    @property
    def t(self) -> int:
        """Number of updates so far."""
        return self._t

    def strategy(self) -> FloatArray:
        """Current mixed strategy (a probability vector)."""
        return _regret_strategy(self._regret)

    def sample(self) -> int:
        """Draw an action from the current strategy with the learner's generator."""
        return int(self._rng.choice(self.n_actions, p=self.strategy()))

    def observe(self, payoffs: ArrayLike) -> None:
        """Full-information update with the payoff of every action this round."""
        self._update(_payoff_vector(payoffs, self.n_actions))

    def observe_bandit(self, action: int, payoff: float) -> None:
        """Bandit update: only the played action's payoff is known."""
        sigma = self.strategy()
        if not 0 <= action < self.n_actions or sigma[action] <= 0.0:
            raise ValueError("action must be a valid action with positive probability")
        estimate = np.zeros(self.n_actions)
        estimate[action] = float(payoff) / sigma[action]
        self._update(estimate)

    def _update(self, u: FloatArray) -> None:
        sigma = self.strategy()
        r = u - float(sigma @ u)
        self._strategy_sum += sigma
        self._true_regret += r
        self._regret = np.maximum(self._regret + r, 0.0) if self.plus else self._regret + r
        self._t += 1

    def average_strategy(self) -> FloatArray:
        """Mean of the strategies played so far (uniform before any update)."""
        if self._t == 0:
            return np.full(self.n_actions, 1.0 / self.n_actions)
        return np.asarray(self._strategy_sum / self._t)

    def cumulative_regret(self) -> FloatArray:
        """Regret against each fixed action, summed over the updates so far."""
        return self._true_regret.copy()

    def external_regret(self) -> float:
        """Average regret against the best fixed action, ``max(R)^+ / T``."""
        if self._t == 0:
            return 0.0
        return max(float(self._true_regret.max()), 0.0) / self._t


class Hedge:
    """Multiplicative weights (Hedge / exponential weights) on cumulative payoffs."""

    def __init__(
        self,
        n_actions: int,
        *,
        learning_rate: float | None = None,
        horizon: int | None = None,
        seed: int | None = None,
    ) -> None:
        if n_actions < 1:
            raise ValueError("n_actions must be >= 1")
        self.n_actions = n_actions
        self._fixed_rate = learning_rate
        if learning_rate is None and horizon is not None:
            self._fixed_rate = math.sqrt(8.0 * math.log(max(n_actions, 2)) / horizon)
        self._rng = np.random.default_rng(seed)
        self._score = np.zeros(n_actions)
        self._true_regret = np.zeros(n_actions)
        self._strategy_sum = np.zeros(n_actions)
        self._t = 0

    def learning_rate(self) -> float:
        """The rate used for the next strategy."""
        if self._fixed_rate is not None:
            return self._fixed_rate
        return math.sqrt(8.0 * math.log(max(self.n_actions, 2)) / max(self._t, 1))

    def strategy(self) -> FloatArray:
        z = self.learning_rate() * self._score
        w = np.exp(z - z.max())  # shift for overflow safety; the ratio is unchanged
        return np.asarray(w / w.sum())

    def sample(self) -> int:
        return int(self._rng.choice(self.n_actions, p=self.strategy()))

    def observe(self, payoffs: ArrayLike) -> None:
        self._update(_payoff_vector(payoffs, self.n_actions))

    def observe_bandit(self, action: int, payoff: float) -> None:
        """Exp3-style update with the importance-weighted payoff estimate."""
        sigma = self.strategy()
        if not 0 <= action < self.n_actions or sigma[action] <= 0.0:
            raise ValueError("action must be a valid action with positive probability")
        estimate = np.zeros(self.n_actions)
        estimate[action] = float(payoff) / sigma[action]
        self._update(estimate)

    def _update(self, u: FloatArray) -> None:
        sigma = self.strategy()
        self._strategy_sum += sigma
        self._true_regret += u - float(sigma @ u)
        self._score += u
        self._t += 1

    def average_strategy(self) -> FloatArray:
        if self._t == 0:
            return np.full(self.n_actions, 1.0 / self.n_actions)
        return np.asarray(self._strategy_sum / self._t)

    def cumulative_regret(self) -> FloatArray:
        return self._true_regret.copy()

    def external_regret(self) -> float:
        if self._t == 0:
            return 0.0
        return max(float(self._true_regret.max()), 0.0) / self._t


class ConditionalRegretMatcher:
    """Hart & Mas-Colell's conditional (internal) regret matching with inertia."""

    def __init__(
        self, n_actions: int, *, inertia: float | None = None, seed: int | None = None
    ) -> None:
        if n_actions < 1:
            raise ValueError("n_actions must be >= 1")
        self.n_actions = n_actions
        self._inertia = inertia
        self._rng = np.random.default_rng(seed)
        # _cond[j, k]: sum over rounds where j was played of u(k) - u(j).
        self._cond = np.zeros((n_actions, n_actions))
        self._range = 0.0
        self._last: int | None = None
        self._t = 0

    def inertia(self) -> float:
        """The normalizer ``mu``; switching probabilities are ``D^+ / mu``."""
        if self._inertia is not None:
            return self._inertia
        # Strictly above 2 * Delta * (|A| - 1) (HMC's condition), never zero.
        return 2.0 * max(self._range, 1e-12) * max(self.n_actions - 1, 1) + 1e-12

    def strategy(self) -> FloatArray:
        """Distribution of the next action (uniform before the first round)."""
        n = self.n_actions
        if self._last is None or self._t == 0:
            return np.full(n, 1.0 / n)
        d = np.maximum(self._cond[self._last] / self._t, 0.0)
        d[self._last] = 0.0
        p = d / self.inertia()
        p[self._last] = max(1.0 - float(p.sum()), 0.0)
        return np.asarray(p / p.sum())

    def sample(self) -> int:
        return int(self._rng.choice(self.n_actions, p=self.strategy()))

    def observe(self, payoffs: ArrayLike, action: int) -> None:
        """Record that ``action`` was played and each action's payoff this round."""
        u = _payoff_vector(payoffs, self.n_actions)
        if not 0 <= action < self.n_actions:
            raise ValueError("action out of range")
        self._cond[action] += u - u[action]
        self._range = max(self._range, float(u.max() - u.min()))
        self._last = action
        self._t += 1

    def observe_bandit(self, action: int, payoff: float, probability: float) -> None:
        """Bandit update: counterfactuals estimated as 0 except the played action.

        The played action's payoff is importance-weighted by the probability it
        was drawn with, so the conditional regret estimates stay unbiased.
        """
        if probability <= 0.0:
            raise ValueError("probability must be positive")
        u = np.zeros(self.n_actions)
        u[action] = payoff / probability
        self.observe(u, action)

    def conditional_regret(self) -> FloatArray:
        """Average conditional regrets ``D[j, k]`` (diagonal 0)."""
        if self._t == 0:
            return np.zeros((self.n_actions, self.n_actions))
        return np.asarray(self._cond / self._t)

    def internal_regret(self) -> float:
        """Largest positive average conditional regret."""
        return max(float(self.conditional_regret().max()), 0.0)


def regret_step(
    regret: FloatArray,
    payoff: FloatArray,
    strategy: FloatArray,
    *,
    discount: float = 1.0,
    plus: bool = True,
    where: BoolArray | None = None,
) -> FloatArray:
    """One regret-matching update for a batch of rows (services x backends).

    ``R <- gamma * R + (u - sigma . u)`` on the entries in ``where`` (the
    others only decay), clipped at 0 when ``plus`` (RM+). ``sigma`` is the
    mixed strategy that was played, so ``u - sigma . u`` is how much better
    each backend would have done than the mix: the instantaneous regret.
    ``discount < 1`` forgets old regret geometrically, so the learner follows
    a changing world. Returns a new array.
    """
    expected = (strategy * payoff).sum(axis=-1, keepdims=True)
    inst = payoff - expected
    if where is not None:
        inst = np.where(where, inst, 0.0)
    out = regret * discount + inst
    return np.maximum(out, 0.0) if plus else out


class BatchRegret:
    """RM / RM+ for ``n_services`` learners over ``n_backends`` masked actions.

    ``mask[s, b]`` says backend ``b`` exists for service ``s``; only those
    entries ever get probability. ``observe(payoffs, observed)`` is a
    full-information update where ``observed`` (default: all present) marks
    the entries measured this tick; an unmeasured entry uses the last payoff
    measured for it (or the row's mean of measured payoffs if never measured),
    the estimated counterfactual.
    """

    def __init__(
        self,
        n_services: int,
        n_backends: int,
        *,
        plus: bool = True,
        discount: float = 1.0,
        average: Literal["uniform", "linear"] = "uniform",
        average_discount: float = 1.0,
        seed: int | None = None,
    ) -> None:
        if n_services < 1 or n_backends < 1:
            raise ValueError("need at least one service and one backend")
        if not (0.0 < discount <= 1.0 and 0.0 < average_discount <= 1.0):
            raise ValueError("discounts must be in (0, 1]")
        if average not in ("uniform", "linear"):
            raise ValueError("average must be 'uniform' or 'linear'")
        shape = (n_services, n_backends)
        self.plus = plus
        self.discount = discount
        self.average = average
        self.average_discount = average_discount
        self._rng = np.random.default_rng(seed)
        self._mask = np.ones(shape, dtype=bool)
        self._regret = np.zeros(shape)
        self._strategy_sum = np.zeros(shape)
        self._estimate = np.zeros(shape)
        self._seen = np.zeros(shape, dtype=bool)
        self._t = np.zeros(n_services)  # (discounted) number of updates per row
        self._n = np.zeros(n_services)  # undiscounted number of updates per row
        self._avg_weight = np.zeros(n_services)  # total averaging weight per row
        self._strategy = self._compute_strategy()

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self._mask.shape[0]), int(self._mask.shape[1]))

    @property
    def mask(self) -> BoolArray:
        return self._mask.copy()

    def set_mask(self, mask: ArrayLike) -> None:
        """Change which backends exist; entries that change state start afresh."""
        m = np.asarray(mask, dtype=bool)
        if m.shape != self._mask.shape:
            raise ValueError(f"mask must have shape {self._mask.shape}")
        changed = m != self._mask
        self._regret[changed] = 0.0
        self._strategy_sum[changed] = 0.0
        # A row whose backends changed averages afresh (its old mix is stale).
        rows = changed.any(axis=1)
        self._strategy_sum[rows] = 0.0
        self._avg_weight[rows] = 0.0
        self._n[rows] = 0.0
        self._seen[changed] = False
        self._mask = m.copy()
        self._strategy = self._compute_strategy()

    def _compute_strategy(self) -> FloatArray:
        pos = np.maximum(self._regret, 0.0)
        pos *= self._mask
        total = pos.sum(axis=1, keepdims=True)
        n = self._mask.sum(axis=1, keepdims=True)
        uniform = self._mask / np.maximum(n, 1)
        return np.where(total > 0.0, pos / np.where(total > 0.0, total, 1.0), uniform)

    def strategy(self) -> FloatArray:
        """Current strategies, one row per service; rows without backends are 0."""
        return self._strategy.copy()

    def observe(self, payoffs: ArrayLike, observed: ArrayLike | None = None) -> None:
        """Update every service with this tick's per-backend payoffs."""
        u = np.asarray(payoffs, dtype=np.float64)
        if u.shape != self._mask.shape:
            raise ValueError(f"payoffs must have shape {self._mask.shape}")
        obs = self._mask if observed is None else np.asarray(observed, dtype=bool) & self._mask
        obs = obs & np.isfinite(u)
        u_obs = np.where(obs, u, 0.0)
        n_obs = obs.sum(axis=1, keepdims=True)
        row_mean = u_obs.sum(axis=1, keepdims=True) / np.maximum(n_obs, 1)
        # Counterfactual for unmeasured entries: last measurement, else the row mean.
        fallback = np.where(self._seen, self._estimate, row_mean)
        est = np.where(obs, u_obs, fallback)
        est = np.where(self._mask, est, 0.0)
        self._estimate = np.where(obs, u_obs, self._estimate)
        self._seen |= obs
        active = (n_obs[:, 0] > 0) | self._seen.any(axis=1)
        self._regret = regret_step(self._regret, est, self._strategy, discount=self.discount, plus=self.plus,
                                   where=self._mask & active[:, None])
        if self.discount < 1.0:
            self._t *= self.discount
        self._n += active
        self._t += active
        self._strategy = self._compute_strategy()
        if self.average_discount < 1.0:
            self._strategy_sum *= self.average_discount
            self._avg_weight *= self.average_discount
        # Average the strategy that results from this update (the one played
        # next): routing on an average that lags the latest payoffs by a tick
        # feeds back into the flows and slows convergence several times over.
        weight = np.where(active, self._n if self.average == "linear" else 1.0, 0.0)
        self._strategy_sum += weight[:, None] * self._strategy
        self._avg_weight += weight

    def average_strategy(self) -> FloatArray:
        """Weighted average of the strategies after each update, the current one included.

        Before any update: uniform over present backends. Compared with the
        average of the strategies before each update (``RegretMatcher``'s),
        it drops the first and adds the current one, an O(1/t) difference
        that leaves the guarantees unchanged.
        """
        w = self._avg_weight[:, None]
        uniform = self._mask / np.maximum(self._mask.sum(axis=1, keepdims=True), 1)
        avg = self._strategy_sum / np.where(w > 0, w, 1.0)
        return np.where(w > 0, avg, uniform)

    def regret_potential(self) -> FloatArray:
        """Per service, the Lyapunov function ``sum (R^+)^2`` of regret matching."""
        pos = np.maximum(self._regret, 0.0) * self._mask
        return np.asarray((pos * pos).sum(axis=1))

    def average_regret(self) -> FloatArray:
        """Per service, ``max(R^+) / t``: 0 when nothing is left to regret.

        For RM+ the clipped regret bounds the true regret from above, so this
        never understates the distance from a no-regret state.
        """
        pos = np.where(self._mask, np.maximum(self._regret, 0.0), 0.0)
        return np.asarray(pos.max(axis=1) / np.maximum(self._t, 1.0))

    def sample(self) -> np.ndarray:
        """One backend index per service drawn from its strategy (-1 if none)."""
        cum = np.cumsum(self._strategy, axis=1)
        u = self._rng.random((cum.shape[0], 1)) * cum[:, -1:]
        idx = (cum <= u).sum(axis=1)
        return np.where(cum[:, -1] > 0, np.minimum(idx, cum.shape[1] - 1), -1)
