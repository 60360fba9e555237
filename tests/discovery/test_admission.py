"""When the cluster offers more than the maps hold, admission is stable and
fair (discovery.admit): established services keep routing when a newcomer
whose name sorts first arrives (it waits, and is reported), a waiting one is
admitted when room frees up, and one service with many endpoints does not
take the backend slots of the others. The limits are lowered for the test
(the real ones are 4,096 services and 65,536 backends)."""

from __future__ import annotations

from typing import Any

import pytest

from equilibriumd import types as limits
from equilibriumd.discovery.admit import fair_cap, subset
from equilibriumd.discovery.build import build_config

from .fakeapi import FakeAPIServer
from .objects import endpoint_slice, service
from .test_watch import make_source, wait_for  # noqa: F401 - the fixture


def _svc(name: str, n: int, i: int, terminating: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    eps = [("10.%d.%d.%d" % (100 + i, k // 250, k % 250 + 1), "terminating" if k < terminating else "ready")
           for k in range(n)]
    return service(name, ip="10.96.%d.%d" % (i // 250, i % 250 + 1)), endpoint_slice(name, name + "-1", eps)


@pytest.fixture
def small(monkeypatch: Any) -> None:
    monkeypatch.setattr(limits, "MAX_SERVICES", 4)
    monkeypatch.setattr(limits, "MAX_BACKENDS", 20)


def test_fair_cap() -> None:
    assert fair_cap([15, 3, 3], 20) == 14
    assert fair_cap([50, 50, 2], 20) == 9
    assert fair_cap([1, 2], 20) == 2
    assert sum(min(n, fair_cap([7, 9, 30, 1], 25)) for n in (7, 9, 30, 1)) <= 25


def test_a_newcomer_that_sorts_first_does_not_evict_an_established_service(small: None) -> None:
    objs = [_svc("m%d" % i, 2, i) for i in range(4)]
    first = build_config([s for s, _ in objs], [e for _, e in objs])
    assert [s.name for s in first.config.services] == ["m%d.urbanmove" % i for i in range(4)]
    objs.append(_svc("a0", 2, 9))
    order = first.admitted + first.left_out
    second = build_config([s for s, _ in objs], [e for _, e in objs], order=order)
    assert [s.name for s in second.config.services] == ["m%d.urbanmove" % i for i in range(4)]
    assert second.left_out == ["a0.urbanmove"]
    assert any("a0" in e and "not admitted" in e for e in second.errors)
    # m2 goes: the waiting one takes its place, before any newer one
    objs2 = [o for o in objs if o[0]["metadata"]["name"] != "m2"] + [_svc("aa", 2, 10)]
    third = build_config([s for s, _ in objs2], [e for _, e in objs2], order=second.admitted + second.left_out)
    assert sorted(s.name for s in third.config.services) == ["a0.urbanmove", "m0.urbanmove", "m1.urbanmove",
                                                              "m3.urbanmove"]
    assert third.left_out == ["aa.urbanmove"]


def test_a_service_with_many_endpoints_does_not_starve_the_others(small: None) -> None:
    objs = [_svc("a-big", 15, 1, terminating=2), _svc("s1", 3, 2), _svc("s2", 3, 3)]
    res = build_config([s for s, _ in objs], [e for _, e in objs])
    got = {s.name: s for s in res.config.services}
    assert sorted(got) == ["a-big.urbanmove", "s1.urbanmove", "s2.urbanmove"]
    assert len(got["s1.urbanmove"].backends) == 3 and len(got["s2.urbanmove"].backends) == 3
    big = got["a-big.urbanmove"].backends
    assert len(big) == 14 and res.capped == {"a-big.urbanmove": (14, 15)}
    assert [b.state for b in big].count("draining") == 1   # active ones kept first
    assert sum(len(s.backends) for s in res.config.services) <= limits.MAX_BACKENDS


def test_the_source_keeps_established_services_and_reports_the_waiting_one(
        small: None, api: FakeAPIServer, make_source: Any) -> None:  # noqa: F811
    for i in range(4):
        s, e = _svc("m%d" % i, 2, i)
        api.put("Service", s)
        api.put("EndpointSlice", e)
    src, rec = make_source()
    src.wait_for_first(5)
    s, e = _svc("a0", 2, 9)
    api.put("EndpointSlice", e)
    api.put("Service", s)
    wait_for(lambda: src.last_result is not None and src.last_result.left_out == ["a0.urbanmove"],
             what="a0 waiting")
    assert [x.name for x in rec.last.services] == ["m%d.urbanmove" % i for i in range(4)]
    api.delete("Service", "urbanmove", "m1")
    wait_for(lambda: rec.last is not None and "a0.urbanmove" in [x.name for x in rec.last.services],
             what="a0 admitted once m1 went")
    assert src.last_result.left_out == []


def test_a_service_with_more_endpoints_than_a_service_holds_keeps_a_per_node_subset(monkeypatch: Any) -> None:
    """Before: a Service with more than MAX_BACKENDS_PER_SERVICE ready endpoints was
    skipped whole. Now each node keeps its own rendezvous-hashed subset: the
    nodes together cover (nearly) every endpoint, and one endpoint joining moves
    at most one backend of a node's subset."""
    monkeypatch.setattr(limits, "MAX_BACKENDS_PER_SERVICE", 8)
    s, e = _svc("wide", 20, 1, terminating=4)
    per_node = {}
    for node in ("node-%d" % i for i in range(6)):
        res = build_config([s], [e], subset_key=node)
        (svc,) = res.config.services
        assert len(svc.backends) == 8 and all(b.state == "active" for b in svc.backends)   # ready ones first
        assert any("8 of its 20 endpoints used" in x for x in res.errors)
        per_node[node] = {b.address for b in svc.backends}
    assert len(set(map(frozenset, per_node.values()))) >= 5     # the nodes differ
    assert len(set().union(*per_node.values())) >= 14            # and cover most of the 16 ready ones
    # stable: the same node keeps the same subset, and one more endpoint moves at most one backend
    s2, e2 = _svc("wide", 21, 1, terminating=4)
    again = {b.address for b in build_config([s2], [e2], subset_key="node-0").config.services[0].backends}
    assert len(again - per_node["node-0"]) <= 1


def test_subset_prefers_active_backends_and_keeps_their_order() -> None:
    from equilibriumd import config as cfg
    from equilibriumd.types import Addr
    bes = [cfg.BackendConfig(Addr(4, "10.0.0.%d" % i, 80), 1.0, "draining" if i < 3 else "active")
           for i in range(1, 11)]
    got = subset(bes, 5, "n1")
    assert len(got) == 5 and all(b.state == "active" for b in got)
    assert list(got) == sorted(got, key=lambda b: bes.index(b))
    assert subset(bes, 5, "n1") == got and subset(bes, 20, "n1") == tuple(bes)
