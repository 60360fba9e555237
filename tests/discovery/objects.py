"""Kubernetes API objects (as the API server sends them: JSON dicts) for the tests."""

from __future__ import annotations

from typing import Any, Iterable

#: an endpoint: "10.0.0.1" (ready), or ("10.0.0.1", "ready" | "terminating" | "notready")
Endpoint = Any
_COND = {"ready": (True, True, False), "terminating": (False, True, True), "notready": (False, False, False)}


def service(name: str, ns: str = "urbanmove", ip: str | list[str] = "10.96.0.10",
            ports: Iterable[tuple[str, int, Any, str]] = (("", 80, "http", "TCP"),),
            enabled: Any = "true", policy: str | None = None, **spec: Any) -> dict[str, Any]:
    ann: dict[str, Any] = {}
    if enabled is not None:
        ann["equilibrium.io/enabled"] = enabled
    if policy is not None:
        ann["equilibrium.io/policy"] = policy
    ips = ip if isinstance(ip, list) else [ip]
    s: dict[str, Any] = {"type": "ClusterIP", "clusterIP": ips[0], "clusterIPs": ips,
                         "ports": [{"name": n, "port": p, "targetPort": t, "protocol": pr} if n else
                                   {"port": p, "targetPort": t, "protocol": pr} for n, p, t, pr in ports]}
    s.update(spec)
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns, "annotations": ann, "uid": "u-" + name}, "spec": s}


def endpoint_slice(svc: str, name: str, endpoints: Iterable[Endpoint], ns: str = "urbanmove",
                   port: int | None = 8080, port_name: str = "", family: str = "IPv4",
                   protocol: str = "TCP") -> dict[str, Any]:
    eps = []
    for e in endpoints:
        addr, state = (e, "ready") if isinstance(e, str) else e
        ready, serving, term = _COND[state]
        eps.append({"addresses": [addr], "conditions": {"ready": ready, "serving": serving, "terminating": term}})
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
            "addressType": family, "endpoints": eps,
            "ports": [{"name": port_name, "port": port, "protocol": protocol}]}


def pod(name: str, uid: str, ns: str = "urbanmove", node: str = "node-a",
        mirror: str | None = None) -> dict[str, Any]:
    md: dict[str, Any] = {"name": name, "namespace": ns, "uid": uid}
    if mirror:
        md["annotations"] = {"kubernetes.io/config.mirror": mirror}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": md, "spec": {"nodeName": node}}
