"""What the reflectors keep of each object: only the fields `build` reads.

A cluster's Services and EndpointSlices arrive with managedFields, every
label and annotation, status and more; kept whole, the agent's memory grows
with the whole cluster's metadata (managedFields alone are often most of an
object). The reflectors store these trimmed copies instead:

* a Service: name, namespace, resourceVersion, our own annotations
  (`equilibrium.io/*`), and, only when it opts in, the spec fields that give
  its frontends (type, clusterIP(s), ports);
* an EndpointSlice: name, namespace, resourceVersion, the service-name label,
  addressType, ports, and each endpoint's addresses and ready/terminating.

Values are copied as they came, right or wrong: judging them is `build`'s
job, and a malformed object must reach it to be reported. An object too
malformed to trim (no metadata map) is kept as it is.
"""

from __future__ import annotations

from typing import Any

from .build import ANNOTATION_ENABLED, LABEL_SERVICE_NAME

#: our annotations' prefix: the only ones kept
OURS = ANNOTATION_ENABLED.split("/", 1)[0] + "/"
_META = ("name", "namespace", "resourceVersion")
_SERVICE_SPEC = ("type", "clusterIP", "clusterIPs", "ports")
_SERVICE_PORT = ("name", "port", "protocol", "targetPort")
_SLICE_PORT = ("name", "port", "protocol")
_CONDITIONS = ("ready", "terminating")


def _pick(d: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: d[k] for k in keys if k in d}


def _meta(md: dict[str, Any], map_key: str, keep: Any) -> dict[str, Any]:
    out = _pick(md, _META)
    m = md.get(map_key)
    if isinstance(m, dict):
        got = {k: v for k, v in m.items() if keep(k)}
        if got:
            out[map_key] = got
    elif m is not None:
        out[map_key] = m   # not a map: build says so
    return out


def _list_of(v: Any, keys: tuple[str, ...]) -> Any:
    if not isinstance(v, list):
        return v
    return [_pick(x, keys) if isinstance(x, dict) else x for x in v]


def service(obj: Any) -> Any:
    """The fields of a Service that `build` reads."""
    if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
        return obj
    out: dict[str, Any] = {"metadata": _meta(obj["metadata"], "annotations",
                                             lambda k: isinstance(k, str) and k.startswith(OURS))}
    ann = out["metadata"].get("annotations")
    v = ann.get(ANNOTATION_ENABLED) if isinstance(ann, dict) else None
    if isinstance(v, str) and v.strip().lower() == "true" and "spec" in obj:
        spec = obj["spec"]
        if isinstance(spec, dict):
            spec = _pick(spec, _SERVICE_SPEC)
            if "ports" in spec:
                spec["ports"] = _list_of(spec["ports"], _SERVICE_PORT)
        out["spec"] = spec
    return out


def endpoint_slice(obj: Any) -> Any:
    """The fields of an EndpointSlice that `build` reads."""
    if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
        return obj
    out: dict[str, Any] = {"metadata": _meta(obj["metadata"], "labels", lambda k: k == LABEL_SERVICE_NAME)}
    for k in ("addressType", "ports", "endpoints"):
        if k in obj:
            out[k] = obj[k]
    if "ports" in out:
        out["ports"] = _list_of(out["ports"], _SLICE_PORT)
    eps = out.get("endpoints")
    if isinstance(eps, list):
        kept = []
        for ep in eps:
            if isinstance(ep, dict):
                e = _pick(ep, ("addresses", "conditions"))
                if isinstance(e.get("conditions"), dict):
                    e["conditions"] = _pick(e["conditions"], _CONDITIONS)
                ep = e
            kept.append(ep)
        out["endpoints"] = kept
    return out
