"""The game engine: pure, deterministic, vectorized game theory for routing.

Everything here depends on numpy (and scipy, imported only when an LP is
solved) and on ``equilibriumd.types``, performs no I/O and keeps no global
state; randomness comes from ``numpy.random.Generator`` objects seeded
by the caller, so results are reproducible for a given seed.

The agent runs ``engine.EquilibriumEngine`` every tick over all its
services; it is built from ``regret.regret_step``, ``payoff.log_latency_payoff``,
``bayesian``, ``congestion.CongestionFit``, ``strategy`` (the ``*_rows``
functions) and ``convergence``; its cooperation game between callers
(policy.cooperation) runs ``feasible.max_min_fair``, ``folk`` (punishment
length, trigger strategy) and ``reputation``. Its admission (policy.admission) runs
``capacity.ServiceCapacity`` and ``zero_sum`` for stressed services; the cross-node
coordinator solves ``correlated`` equilibria and the agent checks them with
``correlated.max_violation``. ``nash`` and ``potential`` serve analysis and the
simulator; docs/game.md says which module runs where.

Modules (each docstring states its functions' contracts and guarantees):

- ``normal_form``: payoff convention and shared contractions.
- ``regret``: RM, RM+, Hart-Mas-Colell conditional regret matching, Hedge,
  and ``BatchRegret`` for many services at once.
- ``strategy``: sampling, exploration floor, slot-table apportionment.
- ``convergence``: Lyapunov functions and the hysteresis detector.
- ``nash``: best response, exploitability, epsilon-Nash, Wardrop gap.
- ``congestion``: latency models (affine, M/M/1) and their online fit.
- ``potential``: Wardrop and optimal splits, tolls, Beckmann and Rosenthal potentials.
- ``reputation``: decaying per-caller reputation (repeated game).
- ``folk``: trigger strategies, minmax punishment, discount thresholds.
- ``feasible``: capacity-feasible quota vectors and projection onto them.
- ``capacity``: backend capacity fitted from load and latency, a service's
  capacity from backlogged ticks (``ServiceCapacity``), feasibility headroom,
  max-min fair admission, Jain's index.
- ``correlated``: correlated-equilibrium LP and violation check.
- ``bayesian``: beliefs over backend types from signals.
- ``zero_sum``: minmax by LP (a numpy simplex for small games, HiGHS for large).
- ``payoff``: telemetry to payoffs (the engine's log-latency payoff; [0, 1] payoffs).
- ``engine``: the tick the agent runs for every service at once.
"""
