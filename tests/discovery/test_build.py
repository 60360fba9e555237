"""Services + EndpointSlices -> Config (pure: no server, no kernel)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from equilibriumd import config as cfg
from equilibriumd import types as limits
from equilibriumd.discovery.build import build_config, config_to_yaml, service_name
from equilibriumd.types import Addr

from .objects import endpoint_slice, service


def _svc(res: Any, name: str) -> cfg.ServiceConfig:
    found = [s for s in res.config.services if s.name == name]
    assert found, "no service %r in %s (errors: %s)" % (name, [s.name for s in res.config.services], res.errors)
    return found[0]


def _be(s: cfg.ServiceConfig) -> list[tuple[str, str]]:
    return [(str(b.address), b.state) for b in s.backends]


def test_opted_in_service_becomes_clusterip_frontend_with_ready_backends() -> None:
    res = build_config([service("bus")], [endpoint_slice("bus", "bus-1", ["10.244.1.5", "10.244.2.5"])])
    s = _svc(res, "bus.urbanmove")
    assert s.frontend == Addr(4, "10.96.0.10", 80) and s.protocol == "tcp" and s.policy is None
    assert _be(s) == [("10.244.1.5:8080", "active"), ("10.244.2.5:8080", "active")]
    assert res.errors == [] and res.config.source == "kubernetes"


@pytest.mark.parametrize("enabled", [None, "false", "yes", "", True])
def test_services_not_opted_in_are_ignored_silently(enabled: Any) -> None:
    res = build_config([service("bus", enabled=enabled)], [endpoint_slice("bus", "b", ["10.244.1.5"])])
    assert res.config.services == () and res.errors == []


def test_terminating_endpoints_drain_and_unready_ones_are_left_out() -> None:
    sl = endpoint_slice("bus", "b", ["10.244.0.1", ("10.244.0.2", "terminating"), ("10.244.0.3", "notready")])
    s = _svc(build_config([service("bus")], [sl]), "bus.urbanmove")
    assert _be(s) == [("10.244.0.1:8080", "active"), ("10.244.0.2:8080", "draining")]


def test_ready_unset_means_ready() -> None:
    sl = endpoint_slice("bus", "b", ["10.244.0.1"])
    sl["endpoints"][0]["conditions"] = {}
    assert _be(_svc(build_config([service("bus")], [sl]), "bus.urbanmove")) == [("10.244.0.1:8080", "active")]


def test_named_target_port_resolved_per_slice() -> None:
    """Pods declaring port "http" as 8080 and others as 9090 land in two slices;
    each backend gets the number its own pod declares."""
    svc = service("bus", ports=[("web", 80, "http", "TCP"), ("metrics", 9100, 9100, "TCP")])
    a = endpoint_slice("bus", "bus-a", ["10.244.0.1"], port=8080, port_name="web")
    a["ports"].append({"name": "metrics", "port": 9100, "protocol": "TCP"})
    b = endpoint_slice("bus", "bus-b", ["10.244.0.2"], port=9090, port_name="web")
    res = build_config([svc], [a, b])
    assert _be(_svc(res, "bus.urbanmove.web")) == [("10.244.0.1:8080", "active"), ("10.244.0.2:9090", "active")]
    # slice b does not list the metrics port and its target port is numeric: 9100
    assert _be(_svc(res, "bus.urbanmove.metrics")) == [("10.244.0.1:9100", "active"), ("10.244.0.2:9100", "active")]


def test_named_target_port_missing_from_slice_is_an_error_for_that_slice() -> None:
    sl = endpoint_slice("bus", "b", ["10.244.0.1"], port_name="other")
    res = build_config([service("bus")], [sl])
    assert res.config.services == ()
    assert any("urbanmove/b" in e and "named target port 'http'" in e for e in res.errors), res.errors


def test_policy_annotation() -> None:
    res = build_config([service("bus", policy="p2c-ewma"), service("user", ip="10.96.0.11", policy="fastest")],
                       [endpoint_slice("bus", "b", ["10.244.0.1"]), endpoint_slice("user", "u", ["10.244.0.2"])])
    assert _svc(res, "bus.urbanmove").policy == "p2c-ewma"
    assert [s.name for s in res.config.services] == ["bus.urbanmove"]
    assert any(e.startswith("service urbanmove/user:") and "unknown policy 'fastest'" in e for e in res.errors)


def test_balance_annotation() -> None:
    bus = service("bus")
    bus["metadata"]["annotations"]["equilibrium.io/balance"] = "weighted"
    user = service("user", ip="10.96.0.11")
    user["metadata"]["annotations"]["equilibrium.io/balance"] = "fastest"
    res = build_config([bus, user], [endpoint_slice("bus", "b", ["10.244.0.1"]),
                                     endpoint_slice("user", "u", ["10.244.0.2"])])
    b = _svc(res, "bus.urbanmove")
    assert b.balance == "weighted" and res.config.balance_of(b) == "weighted"
    assert [s.name for s in res.config.services] == ["bus.urbanmove"]
    assert any(e.startswith("service urbanmove/user:") and "unknown balance 'fastest'" in e for e in res.errors)
    # the file form keeps it (what a reload or `config_to_yaml` writes)
    from equilibriumd.config import parse
    from equilibriumd.discovery.build import config_to_yaml
    again = parse(config_to_yaml(res.config))
    assert again.services[0].balance == "weighted"


def test_ipv6_and_dual_stack() -> None:
    svc = service("bus", ip=["10.96.0.10", "fd00:10:96::a"])
    v4 = endpoint_slice("bus", "b4", ["10.244.0.1"])
    v6 = endpoint_slice("bus", "b6", ["fd00:10:244::1"], family="IPv6")
    res = build_config([svc], [v4, v6])
    assert _be(_svc(res, "bus.urbanmove")) == [("10.244.0.1:8080", "active")]
    s6 = _svc(res, "bus.urbanmove.ipv6")
    assert str(s6.frontend) == "[fd00:10:96::a]:80" and _be(s6) == [("[fd00:10:244::1]:8080", "active")]


def test_same_address_in_two_slices_counts_once_ready_wins() -> None:
    a = endpoint_slice("bus", "a", [("10.244.0.1", "terminating")])
    b = endpoint_slice("bus", "b", ["10.244.0.1"])
    assert _be(_svc(build_config([service("bus")], [a, b]), "bus.urbanmove")) == [("10.244.0.1:8080", "active")]


def test_service_without_endpoints_is_left_out_without_error() -> None:
    res = build_config([service("bus")], [endpoint_slice("bus", "b", [("10.244.0.1", "notready")])])
    assert res.config.services == () and res.errors == [] and res.empty == ["urbanmove/bus (10.96.0.10:80/tcp)"]


@pytest.mark.parametrize("spec,problem", [
    ({"clusterIP": "None", "clusterIPs": ["None"]}, "headless"),
    ({"type": "ExternalName", "externalName": "x.example"}, "ExternalName"),
    ({"ports": []}, "spec.ports"),
    ({"ports": [{"port": 70000}]}, "not a port number"),
    ({"ports": [{"port": 80, "protocol": "SCTP"}]}, "SCTP"),
    ({"ports": [{"name": "a", "port": 80}, {"port": 81}]}, "must name each"),
    ({"clusterIP": "10.96.0.300", "clusterIPs": ["10.96.0.300"]}, "not an IP address"),
])
def test_unusable_services_are_skipped_with_an_error_naming_them(spec: dict[str, Any], problem: str) -> None:
    bad = service("bad", ip="10.96.0.99")
    bad["spec"].update(spec)
    res = build_config([bad, service("bus")], [endpoint_slice("bus", "b", ["10.244.0.1"]),
                                                endpoint_slice("bad", "x", ["10.244.0.9"])])
    assert [s.name for s in res.config.services] == ["bus.urbanmove"]
    assert any(e.startswith("service urbanmove/bad:") and problem in e for e in res.errors), res.errors


def _malformed() -> list[Any]:
    good = service("x", ip="10.96.1.1")
    out: list[Any] = [42, "text", None, {}, {"metadata": "m"}, {"metadata": {"name": 5}}]
    for path, val in [("spec", "garbage"), ("spec.ports", {"a": 1}), ("spec.ports.0", 7),
                      ("spec.ports.0.port", "80"), ("spec.ports.0.targetPort", [1]),
                      ("spec.clusterIPs", "10.0.0.1"), ("metadata.annotations", ["x"]),
                      ("spec.ports.0.name", 3)]:
        o = copy.deepcopy(good)
        cur: Any = o
        keys = path.split(".")
        for k in keys[:-1]:
            cur = cur[int(k)] if k.isdigit() else cur[k]
        cur[int(keys[-1]) if keys[-1].isdigit() else keys[-1]] = val
        out.append(o)
    return out


def test_malformed_objects_never_raise() -> None:
    slices: list[Any] = [7, {"metadata": {"name": "s", "namespace": "urbanmove",
                                          "labels": {"kubernetes.io/service-name": "bus"}},
                             "addressType": "IPv4", "endpoints": "nope"},
                         {"metadata": {"name": "s2", "namespace": "urbanmove", "labels": "x"}},
                         {"metadata": {"name": "s3", "namespace": "urbanmove",
                                       "labels": {"kubernetes.io/service-name": "bus"}},
                          "addressType": "IPv4", "ports": [{"name": "", "port": 8080}],
                          "endpoints": [{"addresses": ["10.244.0.1", "not-an-ip"]}, {"addresses": "10.1.1.1"}]},
                         endpoint_slice("bus", "ok", ["10.244.0.2"])]
    res = build_config(_malformed() + [service("bus")], slices)
    assert [s.name for s in res.config.services] == ["bus.urbanmove"]
    assert _be(res.config.services[0]) == [("10.244.0.1:8080", "active"), ("10.244.0.2:8080", "active")]
    assert any(e.startswith("endpointslice urbanmove/s (service urbanmove/bus):") for e in res.errors)
    assert any(e.startswith("endpointslice urbanmove/s3 (service urbanmove/bus): endpoint") and "not-an-ip" in e
               for e in res.errors), res.errors
    assert any(e.startswith("endpointslice urbanmove/s3 (service urbanmove/bus): endpoints[1]") for e in res.errors)
    assert any(e.startswith("service urbanmove/x:") for e in res.errors), res.errors


json_values = st.recursive(st.none() | st.booleans() | st.integers(-5, 70000) | st.text(max_size=6),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=12), c, max_size=4),
                           max_leaves=12)


@settings(max_examples=150, deadline=None)
@given(st.lists(json_values, max_size=3), st.lists(json_values, max_size=3))
def test_fuzz_arbitrary_json_never_raises(svcs: list[Any], slices: list[Any]) -> None:
    res = build_config(svcs + [service("bus")], slices + [endpoint_slice("bus", "b", ["10.244.0.1"])])
    assert "bus.urbanmove" in [s.name for s in res.config.services]


def test_result_is_what_config_parse_reads_back() -> None:
    """The same validation as a file: the Config dumped to YAML parses to itself."""
    base = cfg.parse("tick: 250ms\npolicy: round-robin\nservices:\n  - name: static\n    frontend: 127.77.0.1:80\n"
                     "    backends:\n      - address: 127.0.0.11:8080\n")
    svcs = [service("bus", policy="static"), service("user", ip=["10.96.0.11", "fd00::b"]),
            service("ticket", ip="10.96.0.12", ports=[("a", 80, 8080, "TCP"), ("b", 53, 5353, "UDP")])]
    slices = [endpoint_slice("bus", "b", ["10.244.0.1", ("10.244.0.2", "terminating")]),
              endpoint_slice("user", "u", ["10.244.0.3"]), endpoint_slice("user", "u6", ["fd00::3"], family="IPv6"),
              endpoint_slice("ticket", "t", ["10.244.0.4"], port=None, port_name="a")]
    res = build_config(svcs, slices, base)
    assert res.errors == []
    assert [s.name for s in res.config.services] == ["static", "bus.urbanmove", "ticket.urbanmove.a",
                                                     "ticket.urbanmove.b", "user.urbanmove", "user.urbanmove.ipv6"]
    assert res.config.tick == 0.25 and res.config.policy == "round-robin"
    again = cfg.parse(config_to_yaml(res.config), "<discovered>")
    assert again == res.config


def test_collisions_with_static_services_are_refused() -> None:
    base = cfg.Config(services=(cfg.ServiceConfig("bus.urbanmove", Addr(4, "127.77.0.1", 80), "tcp",
                                                  (cfg.BackendConfig(Addr(4, "127.0.0.11", 80)),)),))
    res = build_config([service("bus")], [endpoint_slice("bus", "b", ["10.244.0.1"])], base)
    assert res.config.services == base.services
    assert res.errors == ["service urbanmove/bus (as bus.urbanmove): duplicate service name 'bus.urbanmove' "
                          "(first in <memory>)"]


def test_frontend_collision_between_two_services_names_both() -> None:
    """Two Services on one ClusterIP:port (an API server never does it, a fake one may):
    the first by name wins, the other is an error naming its object and the winner."""
    res = build_config([service("bus"), service("user")], [endpoint_slice("bus", "b", ["10.244.0.1"]),
                                                           endpoint_slice("user", "u", ["10.244.0.2"])])
    assert [s.name for s in res.config.services] == ["bus.urbanmove"]
    assert res.errors == ["service urbanmove/user (as user.urbanmove): duplicate frontend 10.96.0.10:80/tcp "
                          "(already used by service 'bus.urbanmove')"]


def test_node_limits_are_those_of_types(monkeypatch: pytest.MonkeyPatch) -> None:
    """The limits come from equilibriumd.types (the datapath sizes its maps from the same numbers);
    what does not fit is an error naming the Service, the rest is kept; the backend
    budget is shared fairly (discovery.admit; test_admission has the rest)."""
    monkeypatch.setattr(limits, "MAX_SERVICES", 2)
    monkeypatch.setattr(limits, "MAX_BACKENDS", 5)
    monkeypatch.setattr(limits, "MAX_BACKENDS_PER_SERVICE", 3)
    svcs = [service(n, ip="10.96.0.%d" % (10 + i)) for i, n in enumerate(("a", "b", "c", "d"))]
    slices = [endpoint_slice("a", "a", ["10.244.0.1", "10.244.0.2"]),
              endpoint_slice("b", "b", ["10.244.1.%d" % i for i in range(1, 5)]),   # 4 > 3 per service
              endpoint_slice("c", "c", ["10.244.2.1", "10.244.2.2"]),
              endpoint_slice("d", "d", ["10.244.3.1", "10.244.3.2"])]
    res = build_config(svcs, slices)
    assert [s.name for s in res.config.services] == ["a.urbanmove", "b.urbanmove"]
    assert len(res.config.services[1].backends) == 3   # a per-node subset of b's 4 (test_admission)
    assert res.errors == [
        "service urbanmove/b: 10.96.0.11:80/tcp: 3 of its 4 endpoints used (a service holds at most 3; "
        "each node keeps its own subset)",
        "service urbanmove/c (as c.urbanmove): not admitted: the datapath holds 2 services and 5 backends; "
        "it is admitted when room frees up",
        "service urbanmove/d (as d.urbanmove): not admitted: the datapath holds 2 services and 5 backends; "
        "it is admitted when room frees up"]
    # the total: a static service of 2 backends takes room first
    monkeypatch.setattr(limits, "MAX_SERVICES", 3)
    base = cfg.parse("services:\n  - name: s\n    frontend: 127.77.0.1:80\n    backends:\n"
                     "      - address: 127.0.0.11:80\n      - address: 127.0.0.12:80\n", "static.yaml")
    res = build_config(svcs[::2], slices[::2], base)   # a and c
    assert [s.name for s in res.config.services] == ["s", "a.urbanmove", "c.urbanmove"]
    assert [len(s.backends) for s in res.config.services] == [2, 2, 1]   # 3 slots left: 2 + 1, not 2 + 0
    assert "service urbanmove/c (as c.urbanmove): 1 of its 2 endpoints used: the node's 5 backend slots are " \
        "shared fairly between its services" in res.errors


def test_an_endpoint_on_the_frontend_itself_is_refused_like_in_a_file() -> None:
    res = build_config([service("bus")], [endpoint_slice("bus", "b", ["10.96.0.10", "10.244.0.1"], port=80)])
    assert _be(_svc(res, "bus.urbanmove")) == [("10.244.0.1:80", "active")]
    assert res.errors == ["endpointslice urbanmove/b (service urbanmove/bus): endpoint 10.96.0.10:80: "
                          "backend 10.96.0.10:80 is the service's own frontend"]


def test_discovery_validates_with_config_functions(monkeypatch: pytest.MonkeyPatch) -> None:
    """One definition: a rule changed in config changes discovery too."""
    from equilibriumd.discovery import build
    calls: list[str] = []
    real = cfg.check_service

    def spy(s: cfg.ServiceConfig) -> None:
        calls.append(s.name)
        real(s)
    monkeypatch.setattr(cfg, "check_service", spy)
    build.build_config([service("bus")], [endpoint_slice("bus", "b", ["10.244.0.1"])])
    assert calls == ["bus.urbanmove"]


def test_long_names_are_cut_and_hashed_stably() -> None:
    n = service_name("a" * 63, "b" * 63, "web", None)
    assert len(n) <= 63 and n == service_name("a" * 63, "b" * 63, "web", None)
    assert n != service_name("a" * 63, "b" * 63, "api", None)


def test_output_is_deterministic() -> None:
    svcs = [service("bus"), service("user", ip="10.96.0.11")]
    slices = [endpoint_slice("bus", "b", ["10.244.0.9", "10.244.0.1"]), endpoint_slice("user", "u", ["10.244.0.3"])]
    assert build_config(svcs, slices).config == build_config(svcs[::-1], slices[::-1]).config
