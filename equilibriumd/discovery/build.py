"""Services and EndpointSlices (raw API dicts) -> one complete `Config`.

Pure: no I/O, no kubernetes import. `build_config` is called with the whole
current state every time (never a delta), so its output depends only on what
the API server holds, and a rebuild after any reconnect or relist is exact.

Rules:

* A Service opts in with the annotation `equilibrium.io/enabled: "true"`;
  `equilibrium.io/policy` picks a policy (one of `config.POLICIES`),
  `equilibrium.io/balance` how the kernel picks (`p2c` | `weighted`).
  `equilibrium.io/enforce` what a caller that floods it meets (`off` | `observe` | `throttle`).
  `equilibrium.io/rebalance` whether its pooled connections are moved (`idle` | `off`),
  `equilibrium.io/max-connection-age` closes older connections, idle or not (`30s` | `off`).
* Frontend: ClusterIP:port, one Equilibrium service per (ClusterIP, port);
  dual-stack Services get one per family. Headless and ExternalName
  Services cannot be steered (no virtual IP) and are reported as errors.
* Backends: the addresses of the Service's EndpointSlices (label
  `kubernetes.io/service-name`) of the frontend's family, with the port the
  slice gives for the Service port's name. That is how a named target port
  (`targetPort: http`) is resolved: the EndpointSlice controller writes the
  number each pod declares, and splits pods with different numbers into
  different slices. Ready endpoints are `active`, terminating ones
  `draining` (no new connections, existing ones keep flowing); endpoints
  neither ready nor terminating are left out.
* Names: `<service>.<namespace>`, plus `.<port name>` when the Service has
  more than one port, plus `.ipv4`/`.ipv6` for the second family of a
  dual-stack Service; longer than 63 characters -> cut and suffixed with a
  hash. Backends are sorted by address, services by name, so two builds of
  the same state are equal.
* A service with no ready or terminating endpoint is left out (connects to
  its ClusterIP then go wherever kube-proxy sends them); this is normal
  during a rollout and is not an error.

Every check that `config.parse` makes on a file is made here too, by the
same functions (`config.check_*`, `config.ServiceSet`); an object that fails
one is skipped with an error naming `namespace/name`, the others are kept.
The node limits are those of `equilibriumd.types` (no datapath import).
`config_to_yaml` writes the result in the file format, and a test holds
that `config.parse` of it gives back the same `Config`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

import yaml  # type: ignore[import-untyped,unused-ignore]

from .. import config as cfg
from .. import types as limits
from ..types import Addr
from .admit import admit, subset

ANNOTATION_ENABLED = "equilibrium.io/enabled"
ANNOTATION_POLICY = "equilibrium.io/policy"
ANNOTATION_BALANCE = "equilibrium.io/balance"
ANNOTATION_ENFORCE = "equilibrium.io/enforce"
ANNOTATION_REBALANCE = "equilibrium.io/rebalance"
ANNOTATION_MAX_AGE = "equilibrium.io/max-connection-age"
LABEL_SERVICE_NAME = "kubernetes.io/service-name"
SOURCE = "kubernetes"
_V = TypeVar("_V")

_PROTOCOLS = {p.upper(): p for p in cfg.PROTOCOLS}  # the API's names -> the config's


@dataclass
class BuildResult:
    config: cfg.Config
    #: "namespace/name: problem" for every object skipped or partly ignored
    errors: list[str] = field(default_factory=list)
    #: opted-in services left out because they have no endpoint (not errors)
    empty: list[str] = field(default_factory=list)
    #: services not admitted for lack of room in the maps, in the order they wait (admit)
    left_out: list[str] = field(default_factory=list)
    #: services cut to their fair share of backends: name -> (kept, offered)
    capped: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: the admitted discovered services, in admission order (the next build's `order`)
    admitted: list[str] = field(default_factory=list)


class _Skip(ValueError):
    """This object (or this port of it) cannot be used; the message says why."""


def _key(obj: Mapping[str, Any]) -> str:
    md = obj.get("metadata") if isinstance(obj, Mapping) else None
    if not isinstance(md, Mapping):
        return "<no metadata>"
    return "%s/%s" % (md.get("namespace") or "default", md.get("name") or "<no name>")


def _meta(obj: Any) -> tuple[str, str, Mapping[str, Any]]:
    """(namespace, name, metadata) or _Skip."""
    if not isinstance(obj, Mapping):
        raise _Skip("not an object")
    md = obj.get("metadata")
    if not isinstance(md, Mapping):
        raise _Skip("metadata is missing or not an object")
    name, ns = md.get("name"), md.get("namespace") or "default"
    if not isinstance(name, str) or not name or not isinstance(ns, str):
        raise _Skip("metadata.name/namespace missing or not text")
    return ns, name, md


def _str_map(md: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    v = md.get(key)
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise _Skip("metadata.%s is not a map" % key)
    return v


def opted_in(obj: Any) -> bool:
    """True when the Service carries `equilibrium.io/enabled: "true"` (malformed objects: False)."""
    try:
        _, _, md = _meta(obj)
        ann = _str_map(md, "annotations")
    except _Skip:
        return False
    v = ann.get(ANNOTATION_ENABLED)
    return isinstance(v, str) and v.strip().lower() == "true"


def _addr(ip: str, port: int) -> Addr:
    """parse_addr on an IP and a port from the API (IPv6 bracketed)."""
    try:
        v = ipaddress.ip_address(ip)
    except ValueError:
        raise _Skip("%s is not an IP address" % cfg.show(ip)) from None
    text = "[%s]:%d" % (v, port) if v.version == 6 else "%s:%d" % (v, port)
    try:
        return cfg.parse_addr(text)
    except ValueError as e:
        raise _Skip(str(e)) from None


def _port_number(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65535:
        raise _Skip("%s %s is not a port number 1-65535" % (what, cfg.show(v)))
    return v


def service_name(name: str, namespace: str, port_name: str | None, family_suffix: str | None) -> str:
    """`name.namespace[.port][.ipvN]`, at most 63 characters (config's rule)."""
    parts = [name, namespace] + ([port_name] if port_name else []) + ([family_suffix] if family_suffix else [])
    full = ".".join(p.lower() for p in parts)
    if cfg.valid_name(full):
        return full
    digest = hashlib.sha1(full.encode()).hexdigest()[:8]
    cut = re.sub(r"[^a-z0-9.-]", "-", full)[:54].rstrip(".-")
    return "%s-%s" % (cut or "svc", digest)


@dataclass(frozen=True)
class _Port:
    name: str            # "" when unnamed (single-port Services)
    port: int            # the Service (frontend) port
    protocol: str        # tcp | udp
    target: int | str    # targetPort: a number, or a container port name


def _ports(spec: Mapping[str, Any]) -> list[_Port]:
    raw = spec.get("ports")
    if not isinstance(raw, list) or not raw:
        raise _Skip("spec.ports is missing or empty")
    out = []
    for i, p in enumerate(raw):
        if not isinstance(p, Mapping):
            raise _Skip("spec.ports[%d] is not an object" % i)
        name = p.get("name") or ""
        if not isinstance(name, str):
            raise _Skip("spec.ports[%d].name is not text" % i)
        port = _port_number(p.get("port"), "spec.ports[%d].port" % i)
        proto_k8s = p.get("protocol") or "TCP"
        if not isinstance(proto_k8s, str) or proto_k8s not in _PROTOCOLS:   # a list is unhashable
            raise _Skip("spec.ports[%d].protocol %s is not supported (TCP or UDP)" % (i, cfg.show(proto_k8s)))
        target = p.get("targetPort", port)
        if target is None:
            target = port
        if isinstance(target, bool) or not isinstance(target, (int, str)) or target == "":
            raise _Skip("spec.ports[%d].targetPort %s is neither a number nor a name" % (i, cfg.show(target)))
        out.append(_Port(name, port, _PROTOCOLS[proto_k8s], target))
    if len(out) > 1 and any(not p.name for p in out):
        raise _Skip("a Service with several ports must name each of them")
    return out


def _cluster_ips(spec: Mapping[str, Any]) -> list[str]:
    if spec.get("type") == "ExternalName":
        raise _Skip("an ExternalName Service has no ClusterIP to steer")
    ips = spec.get("clusterIPs")
    if not ips:
        ips = [spec.get("clusterIP")]
    if not isinstance(ips, list) or not all(isinstance(i, str) for i in ips):
        raise _Skip("spec.clusterIPs is not a list of addresses")
    if not ips or ips[0] in ("", "None"):
        raise _Skip("a headless Service (clusterIP: None) has no virtual IP to steer")
    return ips


def _slice_port(slice_: Mapping[str, Any], p: _Port) -> int:
    """The number this slice's endpoints serve the Service port `p` on."""
    ports = slice_.get("ports")
    if ports is None:
        ports = []
    if not isinstance(ports, list):
        raise _Skip("ports is not a list")
    for sp in ports:
        if not isinstance(sp, Mapping):
            raise _Skip("ports holds a non-object")
        proto = sp.get("protocol") or "TCP"
        if not isinstance(proto, str):   # a list is unhashable
            raise _Skip("ports holds protocol %s, not TCP or UDP" % cfg.show(proto))
        if (sp.get("name") or "") == p.name and _PROTOCOLS.get(proto) == p.protocol:
            if sp.get("port") is None:  # "all ports": the endpoint serves the target port as such
                break
            return _port_number(sp.get("port"), "port %s" % (p.name or "(unnamed)"))
    if isinstance(p.target, int):
        return _port_number(p.target, "targetPort")
    raise _Skip("named target port %s of service port %s is not resolved in this slice"
                % (cfg.show(p.target), p.name or p.port))


def _endpoints(slice_: Mapping[str, Any], errors: list[str], where: str) -> list[tuple[list[str], str]]:
    """[(addresses, 'active'|'draining')] of the endpoints to route to; a
    malformed endpoint is reported and skipped, the rest of the slice is used."""
    eps = slice_.get("endpoints")
    if eps is None:
        return []
    if not isinstance(eps, list):
        raise _Skip("endpoints is not a list")
    out = []
    for i, ep in enumerate(eps):
        addrs = ep.get("addresses") if isinstance(ep, Mapping) else None
        cond = (ep.get("conditions") or {}) if isinstance(ep, Mapping) else None
        if not isinstance(addrs, list) or not all(isinstance(a, str) for a in addrs) \
                or not isinstance(cond, Mapping):
            errors.append("%s: endpoints[%d] is not an object with a list of addresses and conditions"
                          % (where, i))
            continue
        # The API's rule: an unset `ready` means ready; terminating endpoints
        # are never ready, but may still be serving their open connections.
        if cond.get("terminating") is True:
            out.append((addrs, "draining"))
        elif cond.get("ready") is not False:
            out.append((addrs, "active"))
    return out


def _slice_index(slices: Iterable[Any], errors: list[str]) -> dict[tuple[str, str], list[Mapping[str, Any]]]:
    by_svc: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for s in slices:
        try:
            ns, _, md = _meta(s)
            labels = _str_map(md, "labels")
        except _Skip as e:
            errors.append("endpointslice %s: %s" % (_key(s) if isinstance(s, Mapping) else "?", e))
            continue
        svc = labels.get(LABEL_SERVICE_NAME)
        if isinstance(svc, str) and svc:
            by_svc.setdefault((ns, svc), []).append(s)
    for v in by_svc.values():
        v.sort(key=_key)
    return by_svc


def _backends(ns: str, name: str, p: _Port, fe: Addr, slices: list[Mapping[str, Any]],
              errors: list[str]) -> tuple[cfg.BackendConfig, ...]:
    family = "IPv%d" % fe.family
    states: dict[Addr, str] = {}
    for s in slices:
        where = "endpointslice %s (service %s/%s)" % (_key(s), ns, name)
        if s.get("addressType") != family:
            if s.get("addressType") not in ("IPv4", "IPv6", "FQDN"):
                errors.append("%s: addressType %s is not IPv4, IPv6 or FQDN" % (where, cfg.show(s.get("addressType"))))
            continue
        try:
            port = _slice_port(s, p)
            eps = _endpoints(s, errors, where)
        except _Skip as e:
            errors.append("%s: %s" % (where, e))
            continue
        for addrs, state in eps:
            for a in addrs:
                try:
                    be = _addr(a, port)
                except _Skip as e:
                    errors.append("%s: endpoint %s" % (where, e))
                    continue
                try:
                    cfg.check_backend(be, fe)
                except ValueError as e:
                    errors.append("%s: endpoint %s: %s" % (where, be, e))
                    continue
                # The same address may sit in two slices while the controller
                # moves it; if either says ready it is ready.
                if states.get(be) != "active":
                    states[be] = state
    return tuple(cfg.BackendConfig(a, 1.0, st) for a, st in sorted(states.items(), key=_addr_order))


def _addr_order(item: tuple[Addr, str]) -> tuple[int, int, int]:
    a = item[0]
    return (a.family, int(ipaddress.ip_address(a.ip)), a.port)


def _service(obj: Mapping[str, Any], slices: dict[tuple[str, str], list[Mapping[str, Any]]],
             errors: list[str], empty: list[str], subset_key: str) -> list[cfg.ServiceConfig]:
    ns, name, md = _meta(obj)
    ann = _str_map(md, "annotations")
    policy = _annotation(ann, ANNOTATION_POLICY, cfg.check_policy)
    balance = _annotation(ann, ANNOTATION_BALANCE, cfg.check_balance)
    enforce = _annotation(ann, ANNOTATION_ENFORCE, cfg.check_enforce)
    rebalance = _annotation(ann, ANNOTATION_REBALANCE, cfg.check_rebalance)
    max_age = _annotation(ann, ANNOTATION_MAX_AGE, cfg.parse_age)
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        raise _Skip("spec is missing or not an object")
    ips = _cluster_ips(spec)
    ports = _ports(spec)
    out = []
    for n_ip, ip in enumerate(ips):
        fam_suffix = None
        if n_ip > 0:
            try:
                fam_suffix = "ipv%d" % ipaddress.ip_address(ip).version
            except ValueError:
                raise _Skip("spec.clusterIPs[%d] %s is not an IP address" % (n_ip, cfg.show(ip))) from None
        for p in ports:
            fe = _addr(ip, p.port)
            sname = service_name(name, ns, p.name if len(ports) > 1 else None, fam_suffix)
            bes = _backends(ns, name, p, fe, slices.get((ns, name), []), errors)
            if not bes:
                empty.append("%s/%s (%s/%s)" % (ns, name, fe, p.protocol))
                continue
            if len(bes) > limits.MAX_BACKENDS_PER_SERVICE:   # a per-node subset, not the whole Service dropped
                errors.append("service %s/%s: %s/%s: %d of its %d endpoints used (a service holds at most %d; "
                              "each node keeps its own subset)" % (ns, name, fe, p.protocol,
                                                                    limits.MAX_BACKENDS_PER_SERVICE, len(bes),
                                                                    limits.MAX_BACKENDS_PER_SERVICE))
                bes = subset(bes, limits.MAX_BACKENDS_PER_SERVICE, subset_key)
            out.append(cfg.ServiceConfig(sname, fe, p.protocol, bes, policy, balance, enforce, rebalance, max_age))
    return out


def _annotation(ann: Mapping[str, Any], key: str, check: Callable[[Any], _V]) -> _V | None:
    """The annotation's value checked as config checks the field (None when absent), or _Skip."""
    v = ann.get(key)
    if v is None:
        return None
    try:
        return check(v)
    except ValueError as e:
        raise _Skip("annotation %s: %s" % (key, e)) from None


def build_config(services: Iterable[Any], slices: Iterable[Any], base: cfg.Config | None = None,
                 order: Sequence[str] = (), subset_key: str = "") -> BuildResult:
    """The complete Config for the current state: `base`'s tick, policy,
    equilibrium constants and static services, plus every opted-in Service
    there is room for; `order`: the last build's admitted then left_out names
    (they keep their place: discovery.admit); `subset_key`: this node's name,
    which picks the backends a service with too many endpoints keeps."""
    base = base or cfg.Config()
    errors: list[str] = []
    empty: list[str] = []
    by_svc = _slice_index(slices, errors)
    found: list[tuple[str, cfg.ServiceConfig]] = []  # (the Service's namespace/name, what it gives)
    for obj in services:
        if not opted_in(obj):
            continue
        try:
            found.extend((_key(obj), s) for s in _service(obj, by_svc, errors, empty, subset_key))
        except _Skip as e:
            errors.append("service %s: %s" % (_key(obj), e))

    # The rules across services, with the static services first (they win); the
    # datapath's room goes to the established services first (discovery.admit)
    node = cfg.ServiceSet(base.services, "in %s" % base.source)
    got = admit(node, found, errors, order, subset_key)
    services_out = list(base.services) + sorted(got.services, key=lambda s: s.name)
    conf = cfg.Config(tick=base.tick, policy=base.policy, balance=base.balance, services=tuple(services_out),
                      equilibrium=base.equilibrium, source=SOURCE, enforce=base.enforce,
                      rebalance=base.rebalance)
    return BuildResult(conf, sorted(set(errors)), sorted(empty), got.left_out, got.capped,
                       [s.name for s in got.services])


def config_to_dict(c: cfg.Config) -> dict[str, Any]:
    """The file form of a Config (what `config.parse` reads)."""
    out: dict[str, Any] = {"tick": "%gs" % c.tick, "policy": c.policy, "services": []}
    if c.balance:
        out["balance"] = c.balance
    out["enforce"] = c.enforce
    rb = c.rebalance
    out["rebalance"] = {"mode": rb.mode, "max_closes": rb.max_closes, "min_age": "%gs" % rb.min_age,
                        "min_idle": "%gs" % rb.min_idle,
                        "max_connection_age": "%gs" % rb.max_connection_age if rb.max_connection_age else "off"}
    for s in c.services:
        d: dict[str, Any] = {"name": s.name, "frontend": str(s.frontend), "protocol": s.protocol}
        if s.policy:
            d["policy"] = s.policy
        if s.balance:
            d["balance"] = s.balance
        if s.enforce:
            d["enforce"] = s.enforce
        if s.rebalance:
            d["rebalance"] = s.rebalance
        if s.max_connection_age is not None:
            d["max_connection_age"] = "%gs" % s.max_connection_age if s.max_connection_age else "off"
        d["backends"] = [{"address": str(b.address), "weight": b.weight, "state": b.state} for b in s.backends]
        out["services"].append(d)
    return out


def config_to_yaml(c: cfg.Config) -> str:
    return str(yaml.safe_dump(config_to_dict(c), sort_keys=False))
