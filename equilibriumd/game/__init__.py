"""The game engine: pure, deterministic, vectorized game theory for routing.

Everything here depends on numpy and scipy only, performs no I/O and keeps no
global state; randomness comes from ``numpy.random.Generator`` objects seeded
by the caller, so results are reproducible for a given seed.

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
- ``correlated``: correlated-equilibrium LP and violation check.
- ``bayesian``: beliefs over backend types from signals.
- ``zero_sum``: minmax by LP.
- ``payoff``: telemetry to payoffs in [0, 1].
- ``tick``: the batch engine tick the agent calls every period.
"""
