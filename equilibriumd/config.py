"""Standalone configuration: the YAML schema of shared/DESIGN.md, validated.

`load(path)` returns a frozen `Config` or raises `ConfigError` naming the
file, the line and the field at fault. Nothing is applied until the whole
file is valid, so a bad reload leaves the running state untouched.

    tick: 0.5s                 # control loop period
    policy: equilibrium        # equilibrium | equilibrium-tolls | static | random | round-robin
                               # | least-connections | p2c-ewma
    balance: p2c               # optional: how the kernel picks from the weights (p2c | weighted);
                               # default p2c, but weighted for static, random and round-robin
    equilibrium:               # optional: constants of the equilibrium policy (see
      deadband: 0.25           # equilibriumd/policy/equilibrium.py, EquilibriumParams)
    services:
      - name: bus-service
        frontend: 127.77.0.1:80          # ip:port, IPv6 as [addr]:port
        protocol: tcp                    # tcp | udp
        policy: round-robin              # optional, overrides the top-level policy
        balance: weighted                # optional, overrides the top-level balance
        backends:
          - address: 127.0.0.11:8080
            weight: 1                    # static weight / prior, >= 0
            state: active                # active | draining
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from . import types as limits
from .types import Addr, EquilibriumParams

#: Policies the agent runs (see equilibriumd.policy).
POLICIES = ("equilibrium", "equilibrium-tolls", "static", "random", "round-robin", "least-connections",
            "p2c-ewma")
DEFAULT_POLICY = "equilibrium"
#: How the kernel picks a backend from the weights: `weighted` draws one slot
#: (the split follows the weights exactly); `p2c` draws two and takes the one
#: with fewer open connections per unit of weight (the weights steer, the live
#: counts even out queues between ticks).
BALANCES = (limits.BALANCE_P2C, limits.BALANCE_WEIGHTED)
#: Policies whose weights are the point (an operator's split, a uniform
#: baseline) get `weighted` unless the config says otherwise.
WEIGHTED_BY_DEFAULT = ("static", "random", "round-robin")
DEFAULT_TICK_SECONDS = 0.5
BACKEND_STATES = ("active", "draining")
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")


class ConfigError(ValueError):
    """Invalid configuration: `str()` reads `FILE:LINE: FIELD: what is wrong`."""

    def __init__(self, file: str, line: int | None, fieldname: str, message: str) -> None:
        self.file, self.line, self.field, self.message = file, line, fieldname, message
        where = "%s:%d" % (file, line) if line else file
        super().__init__("%s: %s: %s" % (where, fieldname, message) if fieldname else "%s: %s" % (where, message))


@dataclass(frozen=True)
class BackendConfig:
    address: Addr
    weight: float = 1.0  #: relative weight (unitless, >= 0)
    state: str = "active"


@dataclass(frozen=True)
class ServiceConfig:
    name: str
    frontend: Addr
    protocol: str
    backends: tuple[BackendConfig, ...]
    policy: str | None = None  #: None: the top-level policy
    balance: str | None = None  #: None: the top-level balance


@dataclass(frozen=True)
class Config:
    tick: float = DEFAULT_TICK_SECONDS  #: control loop period, seconds
    policy: str = DEFAULT_POLICY
    balance: str | None = None  #: None: by policy (see WEIGHTED_BY_DEFAULT)
    services: tuple[ServiceConfig, ...] = ()
    equilibrium: EquilibriumParams = field(default_factory=EquilibriumParams)
    source: str = field(default="<memory>", compare=False)

    def policy_of(self, svc: ServiceConfig) -> str:
        return svc.policy or self.policy

    def balance_of(self, svc: ServiceConfig) -> str:
        b = svc.balance or self.balance
        if b is not None:
            return b
        return limits.BALANCE_WEIGHTED if self.policy_of(svc) in WEIGHTED_BY_DEFAULT else limits.BALANCE_P2C


# --- parsing helpers -------------------------------------------------------

def parse_addr(text: str) -> Addr:
    """'1.2.3.4:80' or '[::1]:80' -> Addr; ValueError says what is wrong."""
    text = text.strip()
    m = re.match(r"^\[([^\]]+)\]:(\d+)$", text) or re.match(r"^([^:\[\]]+):(\d+)$", text)
    if not m:
        raise ValueError("expected ip:port (IPv6 as [addr]:port), got %r" % text)
    try:
        ip = ipaddress.ip_address(m.group(1))
    except ValueError:
        raise ValueError("%r is not an IP address" % m.group(1)) from None
    port = int(m.group(2))
    if not 1 <= port <= 65535:
        raise ValueError("port %d out of range 1-65535" % port)
    if ip.is_unspecified or ip.is_multicast:
        raise ValueError("%s cannot be a service address" % ip)
    if ip.version == 6 and "[" not in text:
        raise ValueError("write IPv6 addresses as [addr]:port")
    return Addr(ip.version, str(ip), port)


def parse_duration(value: Any) -> float:
    """'0.5s', '500ms', '2' or a number -> seconds (float > 0)."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 0.5s or 500ms")
    if isinstance(value, (int, float)):
        secs = float(value)
    else:
        m = re.match(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s)?\s*$", str(value))
        if not m:
            raise ValueError("expected a duration such as 0.5s or 500ms, got %r" % value)
        secs = float(m.group(1)) / (1000.0 if m.group(2) == "ms" else 1.0)
    if not (0.01 <= secs <= 3600):
        raise ValueError("duration %gs out of range 10ms-1h" % secs)
    return secs


class _Node:
    """A YAML node with its line, converted to Python lazily."""

    def __init__(self, file: str, node: yaml.Node, path: str) -> None:
        self.file, self.node, self.path = file, node, path

    @property
    def line(self) -> int:
        return self.node.start_mark.line + 1

    def fail(self, message: str, sub: str | None = None, node: yaml.Node | None = None) -> ConfigError:
        line = (node.start_mark.line + 1) if node is not None else self.line
        return ConfigError(self.file, line, sub or self.path, message)

    def mapping(self, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict[str, "_Node"]:
        if not isinstance(self.node, yaml.MappingNode):
            raise self.fail("expected a mapping")
        out: dict[str, _Node] = {}
        for k, v in self.node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else None
            sub = "%s.%s" % (self.path, key) if self.path else str(key)
            if key not in allowed:
                raise self.fail("unknown field (allowed: %s)" % ", ".join(allowed), sub, k)
            if key in out:
                raise self.fail("given twice", sub, k)
            out[key] = _Node(self.file, v, sub)
        for r in required:
            if r not in out:
                raise self.fail("missing required field %r" % r)
        return out

    def seq(self) -> list["_Node"]:
        if not isinstance(self.node, yaml.SequenceNode):
            raise self.fail("expected a list")
        return [_Node(self.file, v, "%s[%d]" % (self.path, i)) for i, v in enumerate(self.node.value)]

    def scalar(self) -> Any:
        if not isinstance(self.node, yaml.ScalarNode):
            raise self.fail("expected a single value")
        return yaml.safe_load(yaml.serialize(self.node))

    def string(self) -> str:
        v = self.scalar()
        if not isinstance(v, str):
            raise self.fail("expected text, got %r" % (v,))
        return v

    def convert(self, fn: Any) -> Any:
        try:
            return fn(self.scalar())
        except ValueError as e:
            raise self.fail(str(e)) from None


def _policy(n: _Node) -> str:
    p = n.string()
    if p in POLICIES:
        return p
    raise n.fail("unknown policy %r; use one of: %s" % (p, ", ".join(POLICIES)))


def _balance(n: _Node) -> str:
    b = n.string()
    if b in BALANCES:
        return b
    raise n.fail("unknown balance %r; use one of: %s" % (b, ", ".join(BALANCES)))


def _weight(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError("weight must be a number, got %r" % (v,))
    if not math.isfinite(v) or v < 0:
        raise ValueError("weight must be finite and >= 0, got %r" % (v,))
    return float(v)


def parse(text: str, file: str = "<config>") -> Config:
    """Parse and validate YAML text; raises ConfigError."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ConfigError(file, mark.line + 1 if mark else None, "", "not valid YAML: %s" % getattr(e, "problem", e))
    if root is None:
        raise ConfigError(file, None, "", "the file is empty")
    top = _Node(file, root, "").mapping(("tick", "policy", "balance", "equilibrium", "services"), ("services",))
    tick = top["tick"].convert(parse_duration) if "tick" in top else DEFAULT_TICK_SECONDS
    policy = _policy(top["policy"]) if "policy" in top else DEFAULT_POLICY
    balance = _balance(top["balance"]) if "balance" in top else None
    params = _params(top["equilibrium"]) if "equilibrium" in top else EquilibriumParams()

    services: list[ServiceConfig] = []
    names: dict[str, int] = {}
    frontends: dict[tuple[Addr, str], str] = {}
    total_backends = 0
    svc_nodes = top["services"].seq()
    if len(svc_nodes) > limits.MAX_SERVICES:
        raise top["services"].fail("%d services; the datapath holds at most %d" % (len(svc_nodes), limits.MAX_SERVICES))
    for sn in svc_nodes:
        s = sn.mapping(("name", "frontend", "protocol", "policy", "balance", "backends"), ("name", "frontend", "backends"))
        name = s["name"].string()
        if not _NAME_RE.match(name):
            raise s["name"].fail("name %r must be 1-63 lower-case letters, digits, '-' or '.'" % name)
        if name in names:
            raise s["name"].fail("duplicate service name %r (first at line %d)" % (name, names[name]))
        names[name] = s["name"].line
        fe = s["frontend"].convert(parse_addr)
        proto = s["protocol"].string() if "protocol" in s else "tcp"
        if proto not in ("tcp", "udp"):
            raise s["protocol"].fail("protocol must be tcp or udp, got %r" % proto)
        if (fe, proto) in frontends:
            raise s["frontend"].fail("duplicate frontend %s/%s (already used by service %r)"
                                     % (fe, proto, frontends[(fe, proto)]))
        frontends[(fe, proto)] = name
        spol = _policy(s["policy"]) if "policy" in s else None
        sbal = _balance(s["balance"]) if "balance" in s else None

        be_nodes = s["backends"].seq()
        if not be_nodes:
            raise s["backends"].fail("a service needs at least one backend")
        if len(be_nodes) > limits.MAX_BACKENDS_PER_SERVICE:
            raise s["backends"].fail("%d backends; a service may have at most %d"
                                     % (len(be_nodes), limits.MAX_BACKENDS_PER_SERVICE))
        seen: dict[Addr, int] = {}
        backends = []
        for bn in be_nodes:
            b = bn.mapping(("address", "weight", "state"), ("address",))
            addr = b["address"].convert(parse_addr)
            if addr.family != fe.family:
                raise b["address"].fail("backend is IPv%d but the frontend %s is IPv%d" % (addr.family, fe, fe.family))
            if addr == fe:
                raise b["address"].fail("backend %s is the service's own frontend" % addr)
            if addr in seen:
                raise b["address"].fail("duplicate backend %s (first at line %d)" % (addr, seen[addr]))
            seen[addr] = b["address"].line
            weight = b["weight"].convert(_weight) if "weight" in b else 1.0
            state = b["state"].string() if "state" in b else "active"
            if state not in BACKEND_STATES:
                raise b["state"].fail("state must be one of %s, got %r" % (", ".join(BACKEND_STATES), state))
            backends.append(BackendConfig(addr, weight, state))
        total_backends += len(backends)
        if total_backends > limits.MAX_BACKENDS:
            raise s["backends"].fail("more than %d backends in total; the datapath cannot hold them"
                                     % limits.MAX_BACKENDS)
        services.append(ServiceConfig(name, fe, proto, tuple(backends), spol, sbal))
    return Config(tick=tick, policy=policy, balance=balance, services=tuple(services), equilibrium=params,
                  source=file)


def _params(n: _Node) -> EquilibriumParams:
    names = tuple(f.name for f in fields(EquilibriumParams) if f.name != "tolls")
    kv = n.mapping(names)
    values: dict[str, Any] = {}
    for k, v in kv.items():
        val = v.scalar()
        if k == "patience":
            if isinstance(val, bool) or not isinstance(val, int):
                raise v.fail("must be a whole number")
        elif isinstance(val, bool) or not isinstance(val, (int, float)):
            raise v.fail("must be a number")
        values[k] = val
    try:
        return EquilibriumParams(**values)
    except ValueError as e:
        field_name = str(e).split(" ")[0]
        node = kv.get(field_name.split(".")[-1], n)
        raise node.fail(str(e).split(" ", 1)[1] if " " in str(e) else str(e)) from None


def load(path: str) -> Config:
    """Read and validate a config file; ConfigError names file, line and field."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(path, None, "", "cannot read: %s" % e.strerror) from None
    except UnicodeDecodeError as e:
        raise ConfigError(path, None, "", "not UTF-8 text: %s" % e.reason) from None
    return parse(text, path)
