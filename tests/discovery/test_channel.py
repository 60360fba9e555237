"""Channel (ConfigMaps as the agent <-> coordinator channel) with the real
`kubernetes` client against the loopback API server (fakeapi.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import kubernetes_validate  # the test extra installs it
import pytest
import yaml

from equilibriumd.discovery.channel import (
    CONFIGMAP_DATA_LIMIT,
    DATA_KEY,
    LABEL_CHANNEL,
    Channel,
    PayloadTooLarge,
    recommendation_name,
    summary_name,
)
from equilibriumd.discovery.client import api_client_for
from equilibriumd.discovery.lease import DEFAULT_LEASE_NAME

from .fakeapi import FakeAPIServer

pytestmark = pytest.mark.timeout(30)

NS = "equilibrium"
RECO = recommendation_name("node-a")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def make(api: FakeAPIServer) -> Callable[..., Channel]:
    def mk(**kw: Any) -> Channel:
        return Channel(api_client_for(api.url), NS, **kw)
    return mk


def test_publish_creates_then_updates_a_labelled_configmap(api: FakeAPIServer, make: Callable[..., Channel]) -> None:
    ch = make(min_interval=0)
    assert ch.publish(summary_name("node-a"), {"load": 1}, "summary") == "written"
    assert ch.publish(summary_name("node-a"), {"load": 2}, "summary") == "written"
    cm = api.get_object("configmaps", NS, "equilibrium-summary-node-a")
    assert cm is not None
    assert cm["metadata"]["labels"][LABEL_CHANNEL] == "summary"
    assert json.loads(cm["data"][DATA_KEY]) == {"load": 2}
    assert api.writes["configmaps"] == 2  # applied: the create, then one update


def test_rate_limit_holds_per_object(api: FakeAPIServer, make: Callable[..., Channel]) -> None:
    clock = FakeClock()
    ch = make(min_interval=10.0, clock=clock)
    outcomes = []
    for i in range(25):  # 25 calls over 24 s, one per second
        outcomes.append(ch.publish("equilibrium-summary-node-a", {"i": i}, "summary"))
        clock.t += 1.0
    assert outcomes.count("written") == 3  # t = 0, 10, 20
    assert [i for i, o in enumerate(outcomes) if o == "written"] == [0, 10, 20]
    assert api.writes["configmaps"] == 3  # what reached the API server, not just what was reported
    # another object has its own budget
    assert ch.publish(RECO, {"r": 1}, "recommendation") == "written"


def test_an_oversized_payload_is_refused_before_anything_is_sent(api: FakeAPIServer,
                                                                  make: Callable[..., Channel]) -> None:
    ch = make(max_bytes=1000)
    with pytest.raises(PayloadTooLarge, match=r"is 1\d\d\d bytes, over the channel's limit of 1000 bytes"):
        ch.publish("equilibrium-summary-node-a", {"x": "y" * 1000}, "summary")
    assert api.writes["configmaps"] == 0
    # refused payloads do not use up the rate budget
    assert ch.publish("equilibrium-summary-node-a", {"x": "small"}, "summary") == "written"
    with pytest.raises(ValueError, match="not JSON"):
        ch.publish("equilibrium-summary-node-a", {"x": float("nan")}, "summary")
    with pytest.raises(ValueError, match="max_bytes"):
        make(max_bytes=CONFIGMAP_DATA_LIMIT + 1)


def test_read_all_selects_by_label_and_reports_malformed_objects(api: FakeAPIServer,
                                                                 make: Callable[..., Channel]) -> None:
    ch = make(min_interval=0)
    for node in ("node-a", "node-b"):
        ch.publish(summary_name(node), {"node": node}, "summary")
    ch.publish(RECO, {"r": 1}, "recommendation")
    labels = {LABEL_CHANNEL: "summary"}
    api.put_object("configmaps", {"metadata": {"name": "equilibrium-summary-bad1", "namespace": NS,
                                               "labels": labels}, "data": {DATA_KEY: "{not json"}})
    api.put_object("configmaps", {"metadata": {"name": "equilibrium-summary-bad2", "namespace": NS,
                                               "labels": labels}, "data": {"other": "x"}})
    api.put_object("configmaps", {"metadata": {"name": "equilibrium-summary-bad3", "namespace": NS,
                                               "labels": labels}, "data": {DATA_KEY: "[1, 2]"}})
    api.put_object("configmaps", {"metadata": {"name": "unrelated", "namespace": NS}, "data": {}})
    got = {m.name: m for m in ch.read_all("summary").messages}
    assert sorted(got) == ["equilibrium-summary-bad1", "equilibrium-summary-bad2", "equilibrium-summary-bad3",
                           "equilibrium-summary-node-a", "equilibrium-summary-node-b"]
    assert got["equilibrium-summary-node-a"].payload == {"node": "node-a"}
    assert got["equilibrium-summary-node-a"].error is None
    assert got["equilibrium-summary-node-a"].published_at
    assert got["equilibrium-summary-bad1"].payload is None
    assert "not JSON" in (got["equilibrium-summary-bad1"].error or "")
    assert "no payload.json" in (got["equilibrium-summary-bad2"].error or "")
    assert "not a JSON object" in (got["equilibrium-summary-bad3"].error or "")


def test_read_reports_missing_and_api_failures_without_raising(api: FakeAPIServer,
                                                               make: Callable[..., Channel]) -> None:
    ch = make(min_interval=0, request_timeout=2.0)
    m = ch.read(RECO)
    assert m.payload is None and m.error == "not found"
    ch.publish(RECO, {"epoch": 7}, "recommendation")
    first = ch.read(RECO)
    assert first.payload == {"epoch": 7} and first.error is None and first.resource_version
    assert ch.read(RECO).resource_version == first.resource_version  # unchanged: same rv
    api.outage = True
    m = ch.read(RECO)
    assert m.payload is None and (m.error or "").startswith("api: 503")
    listing = ch.read_all("summary")
    assert listing.messages == [] and (listing.error or "").startswith("api: 503")
    assert ch.publish(RECO, {"epoch": 8}, "recommendation") == "failed"
    api.outage = False


def test_summary_names_are_valid_and_distinct_for_long_node_names() -> None:
    assert summary_name("node-a") == "equilibrium-summary-node-a"
    long1, long2 = "a" * 240 + ".x", "a" * 240 + ".y"
    n1, n2 = summary_name(long1), summary_name(long2)
    assert n1 != n2 and len(n1) <= 253 and len(n2) <= 253
    assert DNS_SUBDOMAIN.match(n1) and DNS_SUBDOMAIN.match(n2)
    edge = summary_name("b" * 215 + "." + "c" * 30)  # the cut lands next to a dot
    assert DNS_SUBDOMAIN.match(edge), edge


# --- daemonset/coordinator/rbac.yaml -------------------------------------------------

RBAC = Path(__file__).resolve().parents[2] / "daemonset" / "coordinator" / "rbac.yaml"


def _rbac() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(RBAC.read_text()) if d]


def _grants(role: dict[str, Any]) -> set[tuple[str, str, str, str]]:
    """(apiGroup, resource, verb, resourceName or "*") for every rule of a Role."""
    return {(g, r, v, n) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"] for n in rule.get("resourceNames", ["*"])}


def test_coordinator_rbac_is_valid_against_the_kubernetes_schemas() -> None:
    docs = _rbac()
    assert sorted(d["kind"] for d in docs) == ["Role", "Role", "RoleBinding", "RoleBinding", "ServiceAccount"]
    for d in docs:
        assert d["metadata"]["namespace"] == "equilibrium"
        for v in ("1.29", kubernetes_validate.utils.latest_version()):
            kubernetes_validate.validate(d, v, strict=True)


def test_coordinator_rbac_grants_exactly_what_lease_and_channel_use() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _rbac()}
    coord = docs[("Role", "equilibrium-coordinator")]
    assert _grants(coord) == {
        ("coordination.k8s.io", "leases", "get", DEFAULT_LEASE_NAME),
        ("coordination.k8s.io", "leases", "update", DEFAULT_LEASE_NAME),
        ("coordination.k8s.io", "leases", "create", "*"),  # RBAC cannot limit create by name
        ("", "configmaps", "list", "*"),  # every node's summary, by label
        ("", "configmaps", "watch", "*"),
        # one recommendation object per node: names unknown here
        ("", "configmaps", "create", "*"),
        ("", "configmaps", "update", "*"),
        ("", "configmaps", "delete", "*"),  # a departed node's recommendation
    }
    agent = docs[("Role", "equilibrium-agent-channel")]
    assert _grants(agent) == {
        ("", "configmaps", "create", "*"),
        ("", "configmaps", "update", "*"),  # the summary's name is the node's: unknown here
        ("", "configmaps", "get", "*"),     # so is its recommendation's
    }
    agent_sa = yaml.safe_load((RBAC.parents[1] / "serviceaccount.yaml").read_text())["metadata"]
    for role, sa in ((coord, docs[("ServiceAccount", "equilibrium-coordinator")]["metadata"]),
                     (agent, agent_sa)):
        binding = docs[("RoleBinding", role["metadata"]["name"])]
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": role["metadata"]["name"]}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["name"], "namespace": sa["namespace"]}]
