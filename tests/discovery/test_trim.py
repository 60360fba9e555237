"""The reflectors keep only what the builder reads: objects with big
managedFields, foreign labels and annotations, status and the specs of
Services that do not opt in are stored without them, and the config built
from the trimmed objects is the one built from the whole ones (through the
real KubernetesSource against the fake API server, and unit-wise)."""

from __future__ import annotations

import json
from typing import Any

from equilibriumd.discovery import trim
from equilibriumd.discovery.build import build_config

from .fakeapi import FakeAPIServer
from .objects import endpoint_slice, service
from .test_watch import make_source, wait_for  # noqa: F401 - the fixture

#: a managedFields entry of the size a real one has (a few KB each, one per manager)
BIG = [{"manager": "kubectl-client-side-apply-%d" % i, "operation": "Update", "apiVersion": "v1",
        "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:x%d" % j: {} for j in range(200)}}}
       for i in range(5)]


def _bloat(obj: dict[str, Any]) -> dict[str, Any]:
    obj = json.loads(json.dumps(obj))
    md = obj["metadata"]
    md["managedFields"] = BIG
    md.setdefault("labels", {}).update({"team-%d" % i: "x" * 50 for i in range(20)})
    md.setdefault("annotations", {})["kubectl.kubernetes.io/last-applied-configuration"] = "y" * 5000
    md["uid"], md["creationTimestamp"] = "u", "2026-01-01T00:00:00Z"
    obj["status"] = {"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}] * 10}}
    if obj["kind"] == "EndpointSlice":
        for ep in obj["endpoints"]:
            ep.update({"nodeName": "node-a", "zone": "z", "targetRef": {"kind": "Pod", "name": "p" * 60},
                       "hints": {"forZones": [{"name": "z"}]}})
    else:
        obj["spec"].update({"sessionAffinity": "None", "ipFamilies": ["IPv4"], "selector": {"a": "b" * 100}})
    return obj


def _objects() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    svcs = [_bloat(service("bus", ip="10.96.0.10", policy="static")), _bloat(service("user", ip="10.96.0.11")),
            _bloat(service("other", ip="10.96.0.12", enabled=None))]
    slices = [_bloat(endpoint_slice("bus", "bus-1", ["10.244.0.1", ("10.244.0.2", "terminating")])),
              _bloat(endpoint_slice("user", "user-1", ["10.244.1.1", ("10.244.1.2", "notready")])),
              _bloat(endpoint_slice("other", "other-1", ["10.244.2.1"]))]
    return svcs, slices


def test_trimmed_objects_hold_none_of_the_rest_and_build_the_same_config() -> None:
    svcs, slices = _objects()
    ts, tl = [trim.service(s) for s in svcs], [trim.endpoint_slice(s) for s in slices]
    text = json.dumps(ts + tl)
    for gone in ("managedFields", "team-0", "last-applied", "status", "nodeName", "targetRef", "sessionAffinity",
                 "uid", "creationTimestamp"):
        assert gone not in text, gone
    assert "spec" not in ts[2]   # not opted in: nothing of its spec is kept
    assert len(text) * 20 < len(json.dumps(svcs + slices)), (len(text), len(json.dumps(svcs + slices)))
    whole, trimmed = build_config(svcs, slices), build_config(ts, tl)
    assert whole.config == trimmed.config and whole.errors == trimmed.errors
    assert [s.name for s in trimmed.config.services] == ["bus.urbanmove", "user.urbanmove"]
    # malformed objects stay malformed for the builder to report
    odd = {"metadata": {"name": "x", "namespace": "n", "annotations": "not a map"}, "spec": 3}
    assert build_config([odd], []).errors == build_config([trim.service(odd)], []).errors
    assert trim.service(["junk"]) == ["junk"]


def test_the_reflectors_store_trimmed_objects(api: FakeAPIServer, make_source: Any) -> None:  # noqa: F811
    svcs, slices = _objects()
    for s in svcs[:2]:
        api.put("Service", s)
    api.put("EndpointSlice", slices[0])
    src, rec = make_source()
    src.wait_for_first(5)
    api.put("EndpointSlice", slices[1])   # through the watch
    api.put("Service", svcs[2])
    wait_for(lambda: len(src.slices.items()) == 2 and len(src.services.items()) == 3, what="watch events")
    stored = json.dumps(src.services.items() + src.slices.items())
    assert "managedFields" not in stored and "last-applied" not in stored and "team-0" not in stored
    assert len(stored) < 3000, len(stored)
    wait_for(lambda: [s.name for s in rec.last.services] == ["bus.urbanmove", "user.urbanmove"],
             what="the config built from them")
