"""Fuzz the discovery object builder: whatever Services and EndpointSlices the
API server hands over, `build_config` returns services and per-object errors;
it never raises and never emits a backend the datapath cannot connect to
(pure, no server, no root). Derandomized, bounded for CI."""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from equilibriumd import config as cfg
from equilibriumd import types as limits
from equilibriumd.discovery import build
from equilibriumd.discovery.build import build_config

from . import fuzz_settings, paths, put

FUZZ = fuzz_settings(250)

ANNOTATIONS = [build.ANNOTATION_POLICY, build.ANNOTATION_BALANCE, build.ANNOTATION_ENFORCE,
               build.ANNOTATION_REBALANCE, build.ANNOTATION_MAX_AGE]
IPS = ["10.244.0.1", "10.244.0.2", "10.244.0.1", "fd00::1", "fd00::2", "::ffff:10.244.0.3", "fe80::1%eth0",
       "fe80::1", "0.0.0.0", "::", "255.255.255.255", "224.0.0.1", "ff02::1", "0.1.2.3", "127.0.0.1", "::1",
       "10.244.0.1\x00", "10.244.0.256", "not-an-ip", "", " 10.244.0.4", "01.02.03.04", "1" * 5000]
hostile = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from([0, -1, 65536, 2 ** 64, 10 ** 400]),
    st.floats(), st.text(max_size=12), st.sampled_from(IPS),
    st.sampled_from(["TCP", "UDP", "SCTP", "tcp", "IPv4", "IPv6", "FQDN", "None", "ExternalName", "true", "http",
                     "off", "30s", "0.5s", "1e400s", "nan", "static", "p2c", "throttle", "idle", "equilibrium"]),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.just(["TCP"]), st.just({"port": 1}),
)


@st.composite
def good_state(draw: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Opted-in Services with their EndpointSlices, valid (v4, v6 and dual-stack)."""
    services, slices = [], []
    for i in range(draw(st.integers(1, 3))):
        name = "svc%d" % i
        dual = draw(st.booleans())
        ips = ["10.96.0.%d" % (i + 1)] + (["fd00:96::%x" % (i + 1)] if dual else [])
        ports = [{"name": "p%d" % k, "port": draw(st.sampled_from([1, 80, 65535])), "targetPort": 8080,
                  "protocol": draw(st.sampled_from(["TCP", "UDP"]))} for k in range(draw(st.integers(1, 2)))]
        ann = {"equilibrium.io/enabled": "true"}
        for a in draw(st.lists(st.sampled_from(ANNOTATIONS), max_size=2, unique=True)):
            ann[a] = {build.ANNOTATION_POLICY: "static", build.ANNOTATION_BALANCE: "p2c",
                      build.ANNOTATION_ENFORCE: "throttle", build.ANNOTATION_REBALANCE: "off",
                      build.ANNOTATION_MAX_AGE: "30s"}[a]
        services.append({"apiVersion": "v1", "kind": "Service",
                         "metadata": {"name": name, "namespace": "ns", "annotations": ann},
                         "spec": {"type": "ClusterIP", "clusterIP": ips[0], "clusterIPs": ips, "ports": ports}})
        for fam, base in (("IPv4", "10.244.%d.%d"), ("IPv6", "fd00:244::%x:%x")):
            if fam == "IPv6" and not dual:
                continue
            eps = [{"addresses": [base % (i, j + 1)],
                    "conditions": {"ready": draw(st.booleans()), "terminating": draw(st.booleans())}}
                   for j in range(draw(st.integers(1, 3)))]
            slices.append({"metadata": {"name": "%s-%s" % (name, fam), "namespace": "ns",
                                        "labels": {build.LABEL_SERVICE_NAME: name}},
                           "addressType": fam, "endpoints": eps,
                           "ports": [{"name": p["name"], "port": 8080, "protocol": p["protocol"]} for p in ports]})
    return services, slices




@st.composite
def hostile_state(draw: Any) -> tuple[list[Any], list[Any]]:
    """A valid state with up to three values (or whole objects) replaced by hostile ones."""
    services, slices = draw(good_state())
    state: list[Any] = [services, slices]
    for _ in range(draw(st.integers(0, 3))):
        inner = [p for p in paths(state) if len(p) > 1]   # the two lists stay lists (the reflectors' caches)
        put(state, draw(st.sampled_from(inner)), copy.deepcopy(draw(hostile)))
    return state[0], state[1]


def check(services: list[Any], slices: list[Any]) -> build.BuildResult:
    """The property: no exception; every service passes config's checks and every
    backend is a unicast address of the frontend's family on a port 1-65535."""
    res = build_config(services, slices)
    assert all(isinstance(e, str) for e in res.errors)
    cfg.ServiceSet().__init__(res.config.services)   # recorded without error
    assert len({s.name for s in res.config.services}) == len(res.config.services)
    for s in res.config.services:
        cfg.check_service(s)   # raises if anything config would refuse came through
        for a in [s.frontend] + [b.address for b in s.backends]:
            ip = ipaddress.ip_address(a.ip)
            assert 1 <= a.port <= 65535 and ip.version == a.family == s.frontend.family
            assert not (ip.is_unspecified or ip.is_multicast or ip.is_link_local and ip.version == 6)
            assert not isinstance(ip, ipaddress.IPv6Address) or (ip.ipv4_mapped is None and ip.scope_id is None)
            assert str(ip) == a.ip
        assert 1 <= len(s.backends) <= limits.MAX_BACKENDS_PER_SERVICE
    return res


def _one(ip: str = "10.96.0.1", ep: Any = "10.244.0.1", port: Any = 8080, proto: Any = "TCP",
         ann: dict[str, Any] | None = None) -> tuple[list[Any], list[Any]]:
    svc = {"metadata": {"name": "web", "namespace": "ns",
                        "annotations": {"equilibrium.io/enabled": "true", **(ann or {})}},
           "spec": {"clusterIPs": [ip], "ports": [{"port": 80, "targetPort": 8080, "protocol": proto}]}}
    sl = {"metadata": {"name": "web-1", "namespace": "ns", "labels": {build.LABEL_SERVICE_NAME: "web"}},
          "addressType": "IPv6" if ":" in ip else "IPv4",
          "endpoints": [{"addresses": [ep], "conditions": {"ready": True}}],
          "ports": [{"name": "", "port": port, "protocol": proto}]}
    return [svc], [sl]


@FUZZ
@given(hostile_state())
@example(_one(proto=["TCP"]))                           # unhashable protocol: TypeError escaped
@example(_one(ip="fd00::1", ep="fe80::1%eth0"))          # a zoned backend: emitted
@example(_one(ip="fd00::1", ep="::ffff:10.244.0.1"))     # an IPv4-mapped backend: emitted
@example(_one(ep="255.255.255.255"))                     # a broadcast backend: emitted
@example(_one(ip="::ffff:10.96.0.1"))                    # an IPv4-mapped frontend: emitted
@example(_one(ann={build.ANNOTATION_MAX_AGE: float("nan")}))
@example(_one(ann={build.ANNOTATION_MAX_AGE: 10 ** 400}))
def test_any_objects(state: tuple[list[Any], list[Any]]) -> None:
    check(*state)


def test_found_unhashable_protocol_is_an_error_naming_the_object() -> None:
    for svcs, slices in (_one(proto=["TCP"]), _one(proto={"a": 1})):
        res = check(svcs, slices)
        assert res.config.services == () and any(e.startswith("service ns/web:") and "protocol" in e
                                                 for e in res.errors), res.errors
    svcs, slices = _one()
    slices[0]["ports"][0]["protocol"] = ["TCP"]   # in the slice only: that slice is skipped, named
    res = check(svcs, slices)
    assert any(e.startswith("endpointslice ns/web-1 (service ns/web):") for e in res.errors), res.errors


def test_found_addresses_the_datapath_cannot_reach_are_reported_per_endpoint() -> None:
    for ip, ep in (("fd00::1", "fe80::1%eth0"), ("fd00::1", "::ffff:10.244.0.1"), ("10.96.0.1", "255.255.255.255"),
                   ("10.96.0.1", "0.1.2.3")):
        res = check(*_one(ip=ip, ep=ep))
        assert res.config.services == () and any("endpoint" in e for e in res.errors), (ep, res.errors)
    res = check(*_one(ip="::ffff:10.96.0.1", ep="::ffff:10.244.0.1"))
    assert res.config.services == () and any(e.startswith("service ns/web:") and "IPv4-mapped" in e
                                             for e in res.errors), res.errors


@FUZZ
@given(st.sampled_from(ANNOTATIONS), hostile)
def test_hostile_annotations_are_errors_naming_the_object_and_the_annotation(key: str, value: Any) -> None:
    res = check(*_one(ann={key: value}))
    if res.config.services:
        return   # a valid value (or none: null)
    assert any(e.startswith("service ns/web: annotation %s: " % key) for e in res.errors), res.errors
    assert all(len(e) < 1000 for e in res.errors)   # a hostile value is cut in the message
