"""LeaseElector with the real `kubernetes` client against the loopback API
server (fakeapi.py), which holds Leases with resourceVersion-checked writes.

Short timings (lease 2 s, deadline 1 s, retry 0.2 s) keep the suite quick;
the algorithm does not depend on the scale.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime
from typing import Any, Callable, Iterator

import pytest

from equilibriumd.discovery.client import api_client_for
from equilibriumd.discovery.lease import ElectionTiming, LeaseElector

from .fakeapi import FakeAPIServer
from .test_watch import wait_for

pytestmark = pytest.mark.timeout(30)

NS, NAME = "equilibrium", "equilibrium-coordinator"
FAST = ElectionTiming(lease_duration=2, renew_deadline=1.0, retry_period=0.2)


class Timeline:
    """Samples every elector's is_leader() every 10 ms in a thread."""

    def __init__(self, electors: list[LeaseElector]) -> None:
        self.electors = electors
        self.samples: list[tuple[float, tuple[bool, ...]]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.samples.append((time.monotonic(), tuple(e.is_leader() for e in self.electors)))

    def stop(self) -> None:
        self._stop.set()
        self._t.join()

    def max_leaders(self) -> int:
        return max((sum(s) for _, s in self.samples), default=0)


@pytest.fixture
def make(api: FakeAPIServer) -> Iterator[Callable[..., LeaseElector]]:
    made: list[LeaseElector] = []

    def mk(identity: str, start: bool = True, **kw: Any) -> LeaseElector:
        kw.setdefault("timing", FAST)
        e = LeaseElector(api_client_for(api.url), NS, NAME, identity, **kw)
        made.append(e)
        if start:
            e.start()
        return e

    yield mk
    for e in made:
        e.stop(release=False)


def leaders(*es: LeaseElector) -> list[str]:
    return [e.identity for e in es if e.is_leader()]


def holder(api: FakeAPIServer) -> str | None:
    lease = api.get_object("leases", NS, NAME)
    return None if lease is None else lease["spec"].get("holderIdentity")


def test_timing_orderings_are_checked_as_client_go_does() -> None:
    assert ElectionTiming() == ElectionTiming(15, 10.0, 2.0)
    with pytest.raises(ValueError, match="lease_duration"):
        ElectionTiming(lease_duration=10, renew_deadline=10.0)
    with pytest.raises(ValueError, match="retry_period"):
        ElectionTiming(renew_deadline=2.0, retry_period=2.0)


def test_one_of_two_becomes_leader_and_the_lease_records_it(api: FakeAPIServer,
                                                            make: Callable[..., LeaseElector]) -> None:
    started: list[str] = []
    a = make("node-a", on_started_leading=lambda: started.append("a"))
    b = make("node-b", on_started_leading=lambda: started.append("b"))
    tl = Timeline([a, b])
    wait_for(lambda: leaders(a, b), what="a leader")
    time.sleep(1.0)  # several renewals: still exactly one, the same one
    tl.stop()
    assert len(leaders(a, b)) == 1 and tl.max_leaders() == 1
    assert len(started) == 1
    lease = api.get_object("leases", NS, NAME)
    assert lease is not None
    spec = lease["spec"]
    assert spec["holderIdentity"] == leaders(a, b)[0]
    assert spec["leaseDurationSeconds"] == 2 and spec["leaseTransitions"] == 0
    renewed = datetime.fromisoformat(spec["renewTime"].replace("Z", "+00:00"))
    acquired = datetime.fromisoformat(spec["acquireTime"].replace("Z", "+00:00"))
    assert (renewed - acquired).total_seconds() >= 0.5  # renewed in place, acquireTime kept


def test_clean_stop_releases_and_the_other_takes_over_within_a_retry(api: FakeAPIServer,
                                                                      make: Callable[..., LeaseElector]) -> None:
    a = make("node-a")
    wait_for(a.is_leader, what="a leads")
    stopped: list[float] = []
    a.on_stopped_leading = lambda: stopped.append(time.monotonic())
    b = make("node-b")
    time.sleep(0.5)
    assert not b.is_leader()
    t0 = time.monotonic()
    a.stop(release=True)
    assert not a.is_leader() and stopped
    wait_for(b.is_leader, timeout=3, what="b takes over")
    took = time.monotonic() - t0
    # a candidate retries every retry period plus up to 1.2 x of jitter
    assert took < FAST.retry_period * 2.2 + 0.3, took
    lease = api.get_object("leases", NS, NAME)
    assert lease is not None
    assert lease["spec"]["holderIdentity"] == "node-b" and lease["spec"]["leaseTransitions"] == 1


def test_a_killed_leader_is_replaced_only_after_the_lease_expires(api: FakeAPIServer,
                                                                   make: Callable[..., LeaseElector]) -> None:
    a = make("node-a")
    wait_for(a.is_leader, what="a leads")
    b = make("node-b")
    time.sleep(0.5)  # b has seen a's record by now
    a.stop(release=False)  # a process killed: no release
    lease = api.get_object("leases", NS, NAME)
    assert lease is not None and lease["spec"]["holderIdentity"] == "node-a"
    last_renew = datetime.fromisoformat(lease["spec"]["renewTime"].replace("Z", "+00:00")).timestamp()
    wait_for(b.is_leader, timeout=FAST.lease_duration + 3, what="b takes over")
    took_over = time.time()
    # b counts from when it saw a's last renewal, which is after a wrote it
    assert took_over >= last_renew + FAST.lease_duration, took_over - last_renew
    assert took_over < last_renew + FAST.lease_duration + 3 * FAST.retry_period + 0.5, took_over - last_renew
    assert holder(api) == "node-b"


@pytest.mark.parametrize("existing", [False, True], ids=["create-race", "replace-race"])
def test_a_race_has_exactly_one_winner(api: FakeAPIServer, make: Callable[..., LeaseElector],
                                       existing: bool) -> None:
    if existing:  # a released Lease: both may take it, both PUT the same resourceVersion
        api.put_object("leases", {"metadata": {"name": NAME, "namespace": NS},
                                  "spec": {"holderIdentity": "", "leaseDurationSeconds": 1}})
    api.write_barrier = threading.Barrier(2)  # both writes arrive before either is applied
    a, b = make("node-a", start=False), make("node-b", start=False)
    results: dict[str, bool] = {}
    ts = [threading.Thread(target=lambda e=e: results.__setitem__(e.identity, e._try_acquire_or_renew()))
          for e in (a, b)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(10)
    api.write_barrier = None
    assert sorted(results.values()) == [False, True], results
    winner = [k for k, v in results.items() if v][0]
    assert holder(api) == winner
    assert api.writes["leases"] == 1  # the loser's write was refused (put_object is not counted)


def test_an_api_outage_makes_the_leader_step_down_never_two_leaders(api: FakeAPIServer,
                                                                   make: Callable[..., LeaseElector]) -> None:
    lost: list[float] = []
    a = make("node-a", on_stopped_leading=lambda: lost.append(time.monotonic()))
    wait_for(a.is_leader, what="a leads")
    b = make("node-b")
    tl = Timeline([a, b])
    time.sleep(0.5)
    api.outage = True
    t0 = time.monotonic()
    wait_for(lambda: not a.is_leader(), timeout=3, what="a steps down")
    down = time.monotonic() - t0
    # the deadline counts from the start of the last good renewal, at most a retry before the outage
    assert FAST.renew_deadline - FAST.retry_period - 0.05 <= down <= FAST.renew_deadline + 0.3, down
    wait_for(lambda: lost, timeout=3, what="on_stopped_leading")
    assert not b.is_leader()
    time.sleep(1.0)
    api.outage = False
    t1 = time.monotonic()
    wait_for(lambda: leaders(a, b), timeout=FAST.lease_duration + 3, what="a leader after the outage")
    time.sleep(0.5)
    tl.stop()
    assert tl.max_leaders() == 1, "two leaders at once"
    during = [s for t, s in tl.samples if t0 + FAST.renew_deadline + 0.05 < t < t1]
    assert during and all(not any(s) for s in during), "someone acted while the API server was down"
