"""equilibrium-coordinated in the simulator (sim.coordinated): short runs."""

from __future__ import annotations

import numpy as np

from equilibriumd.lab.sim import coordinated
from equilibriumd.lab.sim.engine import Run, simulate
from equilibriumd.lab.sim.scenarios import SCENARIOS

POLICY = "equilibrium-coordinated"


def _agents(run: Run) -> tuple[coordinated.SimCoordinator, list[coordinated.CoordinatedAgent]]:
    assert run.coordination is not None
    coord, agents = run.coordination
    return coord, [a for a in agents if isinstance(a, coordinated.CoordinatedAgent)]


def test_a_coordinated_run_is_deterministic_given_a_seed() -> None:
    sc = SCENARIOS["many-nodes"].scaled(0.15)
    a, b = simulate(sc, POLICY, 3), simulate(sc, POLICY, 3)
    assert np.array_equal(a.backend, b.backend) and np.array_equal(a.latency, b.latency)
    ha = [x for ag in _agents(a)[1] for x in ag.history]
    assert ha == [x for ag in _agents(b)[1] for x in ag.history]
    # and the agents did follow the coordinator (so the next test's fallback means something)
    assert np.mean([f for _, f, _ in ha]) > 0.5


def test_agents_fall_back_within_two_ticks_of_expiry_when_the_coordinator_fails() -> None:
    sc = SCENARIOS["many-nodes-coordinator-fails"].scaled(0.3)
    assert sc.coordinator_stops is not None
    coord, agents = _agents(simulate(sc, POLICY, 0))
    assert len(agents) == sc.nodes and coord.last_round < sc.coordinator_stops
    for ag in agents:
        rec = coord.recs[ag.node]
        assert rec.issued < sc.coordinator_stops <= rec.expires + sc.tick
        assert any(f for t, f, _ in ag.history if t < sc.coordinator_stops)      # it was following
        after = [(t, f, why) for t, f, why in ag.history if t >= rec.expires + 2 * sc.tick]
        assert after and not any(f for _, f, _ in after)
        assert {why for _, _, why in after} == {"expired"}
        # the flag went false at the first tick at or after expiry (within two ticks)
        first = next((t, f) for t, f, _ in ag.history if t >= rec.expires)
        assert first[0] < rec.expires + 2 * sc.tick and first[1] is False
    assert not any(a.following for a in agents)


def test_the_new_scenario_leaves_other_policies_as_in_many_nodes() -> None:
    # same random streams (twin) and nothing but the coordinator differs: equilibrium is unchanged
    a = simulate(SCENARIOS["many-nodes"].scaled(0.1), "equilibrium", 1)
    b = simulate(SCENARIOS["many-nodes-coordinator-fails"].scaled(0.1), "equilibrium", 1)
    assert np.array_equal(a.backend, b.backend) and np.array_equal(a.latency, b.latency)
    assert a.coordination is None
