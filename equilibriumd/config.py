"""Standalone configuration: the YAML schema of shared/DESIGN.md, validated.

`load(path)` returns a frozen `Config` or raises `ConfigError` naming the
file, the line and the field at fault. Nothing is applied until the whole
file is valid, so a bad reload leaves the running state untouched.

The rules a service must obey (names, frontends, backends, the node's
limits) are written once, in the "validation" section below: `parse` applies
them to a file and reports FILE:LINE: FIELD, and discovery (services from the
Kubernetes API) applies the same functions and reports the object's name.

    tick: 0.5s                 # control loop period
    policy: equilibrium        # equilibrium | equilibrium-tolls | static | random | round-robin
                               # | least-connections | p2c-ewma
    balance: p2c               # optional: how the kernel picks from the weights (p2c | weighted);
                               # default p2c, but weighted for static, random and round-robin
    enforce: observe           # optional: callers that flood a service (off | observe | throttle);
                               # observe counts what would be throttled, throttle refuses it
    equilibrium:               # optional: constants of the equilibrium policy (see
      deadband: 0.25           # equilibriumd/policy/equilibrium.py, EquilibriumParams)
    rebalance:                 # optional: closing pooled connections so they follow the weights
      mode: idle               # idle (close idle connections only) | off
      max_closes: 8            # per service per tick, all reasons together
      min_age: 2s              # never close a connection younger than this
      min_idle: 10ms           # nor one with traffic more recent than this
      max_connection_age: off  # or a duration: close older connections, idle or not (also with mode: off)
    services:
      - name: bus-service
        frontend: 127.77.0.1:80          # ip:port, IPv6 as [addr]:port
        protocol: tcp                    # tcp | udp
        policy: round-robin              # optional, overrides the top-level policy
        balance: weighted                # optional, overrides the top-level balance
        enforce: throttle                # optional, overrides the top-level enforce
        rebalance: off                   # optional, overrides rebalance.mode
        max_connection_age: 60s          # optional, overrides rebalance.max_connection_age
        backends:
          - address: 127.0.0.11:8080
            weight: 1                    # static weight / prior, 0 to 1e6 (relative)
            state: active                # active | draining
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable, Iterable, TypeVar

if TYPE_CHECKING:
    import yaml
else:
    class _Yaml:
        """PyYAML, imported at the first parse: the agent parses in a child process
        (load_apart) and never needs it (~1.2 MB of RSS)."""

        def __getattr__(self, name: str) -> Any:
            import yaml as real

            globals()["yaml"] = real
            return getattr(real, name)

    yaml = _Yaml()

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
#: policies whose kernel first draw stays a random slot; every other sweeps the table (round robin
#: by weight, bpf/lib/pick.h eq_sweep_slot): a sweep would make `random` round robin
RANDOM_DRAW = ("random",)
DEFAULT_TICK_SECONDS = 0.5
#: What happens to a caller that floods a service (policy.cooperation): `off`
#: nothing is watched; `observe` (default) punishments are decided, shown and
#: counted, nothing is refused; `throttle` the punished caller's connects over
#: its budget fail with ECONNREFUSED.
ENFORCE = ("off", "observe", "throttle")
DEFAULT_ENFORCE = "observe"
REBALANCE = ("idle", "off")
DEFAULT_REBALANCE = "idle"
#: rebalance.max_closes: more per tick than this would be a reconnect storm, not a rebalance
MAX_CLOSES_LIMIT = 10000
BACKEND_STATES = ("active", "draining")
PROTOCOLS = ("tcp", "udp")
_T = TypeVar("_T")
_D = TypeVar("_D")
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")


class ConfigError(ValueError):
    """Invalid configuration: `str()` reads `FILE:LINE: FIELD: what is wrong`."""

    def __init__(self, file: str, line: int | None, fieldname: str, message: str) -> None:
        self.file, self.line, self.field, self.message = file, line, fieldname, message
        where = "%s:%d" % (file, line) if line else file
        super().__init__("%s: %s: %s" % (where, fieldname, message) if fieldname else "%s: %s" % (where, message))

    def __reduce__(self) -> tuple[Any, ...]:   # crosses a pipe from load_apart's child
        return (ConfigError, (self.file, self.line, self.field, self.message))


@dataclass(frozen=True, slots=True)
class BackendConfig:
    address: Addr
    weight: float = 1.0  #: relative weight (unitless, >= 0)
    state: str = "active"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_backend, (self.address, self.weight, self.state))


def _backend(address: Addr, weight: float, state: str) -> BackendConfig:
    return BackendConfig(address, limits.shared(weight), limits.shared(state))


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    name: str
    frontend: Addr
    protocol: str
    backends: tuple[BackendConfig, ...]
    policy: str | None = None  #: None: the top-level policy
    balance: str | None = None  #: None: the top-level balance
    enforce: str | None = None  #: None: the top-level enforce
    rebalance: str | None = None  #: None: the top-level rebalance.mode
    max_connection_age: float | None = None  #: seconds, 0 off; None: the top-level one


@dataclass(frozen=True)
class RebalanceConfig:
    """How the agent closes pooled connections so they follow the weights (README,
    "Pooled connections"; the kernel side is bpf/rebalance.bpf.c)."""

    mode: str = DEFAULT_REBALANCE      #: "idle" or "off"
    max_closes: int = 8                #: per service per tick, all reasons together
    min_age: float = 2.0               #: seconds: younger connections are left alone ...
    min_idle: float = 0.010            #: ... and those with traffic more recent than this
    max_connection_age: float = 0.0    #: seconds; 0: none


@dataclass(frozen=True)
class Config:
    tick: float = DEFAULT_TICK_SECONDS  #: control loop period, seconds
    policy: str = DEFAULT_POLICY
    balance: str | None = None  #: None: by policy (see WEIGHTED_BY_DEFAULT)
    services: tuple[ServiceConfig, ...] = ()
    equilibrium: EquilibriumParams = field(default_factory=EquilibriumParams)
    source: str = field(default="<memory>", compare=False)
    enforce: str = DEFAULT_ENFORCE
    rebalance: RebalanceConfig = field(default_factory=RebalanceConfig)

    def policy_of(self, svc: ServiceConfig) -> str:
        return svc.policy or self.policy

    def enforce_of(self, svc: ServiceConfig) -> str:
        return svc.enforce or self.enforce

    def rebalance_of(self, svc: ServiceConfig) -> str:
        return svc.rebalance or self.rebalance.mode

    def max_age_of(self, svc: ServiceConfig) -> float:
        a = svc.max_connection_age
        return self.rebalance.max_connection_age if a is None else a

    def sweep_of(self, svc: ServiceConfig) -> bool:
        """Whether the kernel's first draw sweeps the table (SVC_SWEEP) rather than a random slot."""
        return self.policy_of(svc) not in RANDOM_DRAW

    def balance_of(self, svc: ServiceConfig) -> str:
        b = svc.balance or self.balance
        if b is not None:
            return b
        return limits.BALANCE_WEIGHTED if self.policy_of(svc) in WEIGHTED_BY_DEFAULT else limits.BALANCE_P2C


# --- validation: the rules every source of services obeys --------------------
# Each check raises ValueError saying what is wrong; `parse` turns that into a
# ConfigError at the field's line, discovery into an error naming the object.

def valid_name(name: str) -> bool:
    """A service name: 1-63 lower-case letters, digits, '-' or '.', alphanumeric at both ends."""
    return bool(_NAME_RE.match(name))


def check_name(name: str) -> str:
    if not valid_name(name):
        raise ValueError("name %s must be 1-63 lower-case letters, digits, '-' or '.'" % show(name))
    return name


def check_protocol(protocol: object) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError("protocol must be tcp or udp, got %s" % show(protocol))
    return str(protocol)


def check_policy(policy: object) -> str:
    if not isinstance(policy, str) or policy not in POLICIES:
        raise ValueError("unknown policy %s; use one of: %s" % (show(policy), ", ".join(POLICIES)))
    return policy


def check_enforce(enforce: object) -> str:
    if not isinstance(enforce, str) or enforce not in ENFORCE:
        raise ValueError("unknown enforce %s; use one of: %s" % (show(enforce), ", ".join(ENFORCE)))
    return enforce


def check_rebalance(mode: object) -> str:
    if not isinstance(mode, str) or mode not in REBALANCE:
        raise ValueError("unknown rebalance mode %s; use one of: %s" % (show(mode), ", ".join(REBALANCE)))
    return mode


def parse_age(value: Any) -> float:
    """A max connection age: 'off' (0) or a duration of at least 1s."""
    if value in ("off", "0"):
        return 0.0
    secs = parse_duration(value)
    if secs < 1.0:
        raise ValueError("a max connection age below 1s would close connections faster than they are used")
    return secs


def parse_span(value: Any) -> float:
    """min_age / min_idle: a duration from 0 to 1h."""
    secs = _seconds(value)
    if secs > 3600:
        raise ValueError("duration %gs out of range 0-1h" % secs)
    return secs


def check_balance(balance: object) -> str:
    if not isinstance(balance, str) or balance not in BALANCES:
        raise ValueError("unknown balance %s; use one of: %s" % (show(balance), ", ".join(BALANCES)))
    return balance


#: Largest configured weight: weights are relative, and 256 of these still sum far
#: inside a float's exact range (1e308 overflowed the apportionment and killed the agent).
MAX_WEIGHT = 1e6
#: equilibrium.patience (ticks): a bound so that no counter built on it overflows.
MAX_PATIENCE = 100_000
#: Upper bounds of the `equilibrium:` constants that EquilibriumParams leaves open
#: (the fractions are <= 1 there): seconds at most an hour, the others at most
#: 1e6, so that sums and products of them in the engine stay finite.
EQUILIBRIUM_SECONDS = ("latency_floor", "error_penalty", "slow_start")
MAX_EQUILIBRIUM_SECONDS = 3600.0
MAX_EQUILIBRIUM_CONSTANT = 1e6


#: 1e6, 2.5E-3: YAML 1.1 (PyYAML) reads an exponent without a dot as text
_EXPONENT = re.compile(r"[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+")


def number(v: Any) -> Any:
    """`v`, or the float a YAML 1.1 string such as `1e6` spells (the documented
    largest weight is written so); anything else is left for the caller to refuse."""
    if isinstance(v, str) and len(v) < 400 and _EXPONENT.fullmatch(v):
        return float(v)
    return v


def check_weight(v: Any) -> float:
    v = number(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError("weight must be a number, got %s" % show(v))
    try:
        w = float(v)
    except OverflowError:
        raise ValueError("weight must be at most %g" % MAX_WEIGHT) from None
    if not math.isfinite(w) or w < 0:
        raise ValueError("weight must be finite and >= 0, got %r" % (v,))
    if w > MAX_WEIGHT:
        raise ValueError("weight must be at most %g (weights are relative), got %g" % (MAX_WEIGHT, w))
    return w + 0.0   # -0.0 -> 0.0


def check_state(state: object) -> str:
    if state not in BACKEND_STATES:
        raise ValueError("state must be one of %s, got %s" % (", ".join(BACKEND_STATES), show(state)))
    return str(state)


def check_backend(address: Addr, frontend: Addr) -> None:
    """A backend of the frontend's family that is not the frontend itself."""
    if address.family != frontend.family:
        raise ValueError("backend is IPv%d but the frontend %s is IPv%d" % (address.family, frontend, frontend.family))
    if address == frontend:
        raise ValueError("backend %s is the service's own frontend" % address)


def check_backend_count(n: int) -> None:
    """One service's backends: at least one, at most MAX_BACKENDS_PER_SERVICE."""
    if n < 1:
        raise ValueError("a service needs at least one backend")
    if n > limits.MAX_BACKENDS_PER_SERVICE:
        raise ValueError("%d backends; a service may have at most %d" % (n, limits.MAX_BACKENDS_PER_SERVICE))


def check_service_count(n: int) -> None:
    if n > limits.MAX_SERVICES:
        raise ValueError("%d services; the datapath holds at most %d" % (n, limits.MAX_SERVICES))


def check_service(svc: ServiceConfig) -> None:
    """Every rule on one service (those `parse` applies field by field), on a
    ServiceConfig built elsewhere (discovery)."""
    check_name(svc.name)
    check_protocol(svc.protocol)
    if svc.policy is not None:
        check_policy(svc.policy)
    if svc.balance is not None:
        check_balance(svc.balance)
    if svc.enforce is not None:
        check_enforce(svc.enforce)
    if svc.rebalance is not None:
        check_rebalance(svc.rebalance)
    check_backend_count(len(svc.backends))
    seen: set[Addr] = set()
    for b in svc.backends:
        check_backend(b.address, svc.frontend)
        if b.address in seen:
            raise ValueError("duplicate backend %s" % b.address)
        seen.add(b.address)
        check_weight(b.weight)
        check_state(b.state)


class ServiceSet:
    """The services of one node, checked across services as they are added:
    unique names, unique (frontend, protocol), at most MAX_SERVICES services and
    MAX_BACKENDS backends in all. `where` says where a service was given, for
    the message about a later duplicate ("at line 12", "in service ns/name")."""

    def __init__(self, services: Iterable[ServiceConfig] = (), where: str = "") -> None:
        self.names: dict[str, str] = {}  #: name -> where it was given
        self.frontends: dict[tuple[Addr, str], str] = {}  #: (frontend, protocol) -> service name
        self.n_backends = 0
        for svc in services:  # already valid (a parsed file): recorded, not checked
            self._record(svc, where)

    def __len__(self) -> int:
        return len(self.names)

    def check_name(self, name: str) -> None:
        if name in self.names:
            raise ValueError("duplicate service name %r (first %s)" % (name, self.names[name]))

    def check_frontend(self, frontend: Addr, protocol: str) -> None:
        if (frontend, protocol) in self.frontends:
            raise ValueError("duplicate frontend %s/%s (already used by service %r)"
                             % (frontend, protocol, self.frontends[(frontend, protocol)]))

    def check_room(self, n_backends: int) -> None:
        """Room on the node for one more service with `n_backends` backends."""
        if len(self.names) >= limits.MAX_SERVICES:
            raise ValueError("more than %d services; the datapath holds at most %d"
                             % (limits.MAX_SERVICES, limits.MAX_SERVICES))
        if self.n_backends + n_backends > limits.MAX_BACKENDS:
            raise ValueError("more than %d backends in total; the datapath cannot hold them" % limits.MAX_BACKENDS)

    def add(self, svc: ServiceConfig, where: str = "") -> None:
        """Check `svc` against the services already added, then add it; ValueError says why not."""
        self.check_name(svc.name)
        self.check_frontend(svc.frontend, svc.protocol)
        self.check_room(len(svc.backends))
        self._record(svc, where)

    def _record(self, svc: ServiceConfig, where: str) -> None:
        self.names[svc.name] = where
        self.frontends[(svc.frontend, svc.protocol)] = svc.name
        self.n_backends += len(svc.backends)


# --- parsing helpers -------------------------------------------------------

def parse_addr(text: str) -> Addr:
    """'1.2.3.4:80' or '[::1]:80' -> Addr; ValueError says what is wrong.

    Only addresses the datapath can connect to without more context: no
    unspecified, multicast, broadcast or "this network" (0/8) address, no IPv6
    zone (`%eth0`) or link-local address (they need one), no IPv4-mapped IPv6
    address (write it as IPv4)."""
    if not isinstance(text, str):
        raise ValueError("expected ip:port (IPv6 as [addr]:port), got %s" % show(text))
    text = text.strip()
    m = re.match(r"^\[([^\]]+)\]:([0-9]{1,5})$", text) or re.match(r"^([^:\[\]]+):([0-9]{1,5})$", text)
    if not m:
        raise ValueError("expected ip:port (IPv6 as [addr]:port), got %s" % show(text))
    try:
        ip = ipaddress.ip_address(m.group(1))
    except ValueError:
        raise ValueError("%s is not an IP address" % show(m.group(1))) from None
    port = int(m.group(2))
    if not 1 <= port <= 65535:
        raise ValueError("port %d out of range 1-65535" % port)
    if ip.is_unspecified or ip.is_multicast:
        raise ValueError("%s cannot be a service address" % ip)
    if ip.version == 4 and (ip == ipaddress.IPv4Address("255.255.255.255") or ip in _THIS_NETWORK):
        raise ValueError("%s cannot be a service address (broadcast or \"this network\")" % ip)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id is not None or ip.is_link_local:
            raise ValueError("%s: link-local IPv6 addresses and zones (%%iface) are not supported" % ip)
        if ip.ipv4_mapped is not None:
            raise ValueError("%s is an IPv4-mapped address: write it as %s" % (ip, ip.ipv4_mapped))
    if ip.version == 6 and "[" not in text:
        raise ValueError("write IPv6 addresses as [addr]:port")
    return Addr(ip.version, str(ip), port)


_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")


def show(v: Any, limit: int = 60) -> str:
    """repr(v) cut to `limit` characters: a hostile value stays a readable message."""
    try:
        r = repr(v)
    except ValueError:   # an int of more than 4,300 digits has no repr
        r = "<a %d-bit number>" % v.bit_length() if isinstance(v, int) else "<%s>" % type(v).__name__
    return r if len(r) <= limit else r[:limit] + "...(%d characters)" % len(r)


def field_name(key: Any) -> str:
    """A key as a message names it: as written when it is a plain word, else quoted and cut."""
    return key if isinstance(key, str) and re.fullmatch(r"[A-Za-z0-9_.-]{1,40}", key) else show(key, 40)


def parse_duration(value: Any) -> float:
    """'0.5s', '500ms', '2' or a number -> seconds (float > 0)."""
    secs = _seconds(value)
    if not (0.01 <= secs <= 3600):
        raise ValueError("duration %gs out of range 10ms-1h" % secs)
    return secs


def _seconds(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 0.5s or 500ms")
    if isinstance(value, (int, float)):
        try:
            secs = float(value)
        except OverflowError:
            secs = math.inf
        if not math.isfinite(secs) or secs < 0:
            raise ValueError("duration %s is not a finite number of seconds >= 0" % show(value))
    else:
        m = re.match(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s)?\s*$", str(value))
        if not m:
            raise ValueError("expected a duration such as 0.5s or 500ms, got %s" % show(value))
        secs = float(m.group(1)) / (1000.0 if m.group(2) == "ms" else 1.0)
        if not math.isfinite(secs):
            raise ValueError("duration %s is too large" % show(value))
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
            shown = key if key in allowed else field_name(key)   # an unknown key may be anything
            sub = "%s.%s" % (self.path, shown) if self.path else shown
            if key is None:
                raise self.fail("a field name must be plain text", self.path or None, k)
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
        try:
            return yaml.safe_load(yaml.serialize(self.node))
        except (yaml.YAMLError, ValueError, OverflowError) as e:   # a 5,000-digit int, a 13th month
            raise self.fail("cannot read the value: %s" % show(str(e).splitlines()[0] if str(e) else e, 120)) from None

    def string(self) -> str:
        v = self.scalar()
        if not isinstance(v, str):
            raise self.fail("expected text, got %s" % show(v))
        return v

    def word(self) -> str:
        """The value as written: YAML 1.1 reads `off`, `on`, `yes`, `no` as booleans,
        and `enforce: off` must mean "off", not false."""
        if not isinstance(self.node, yaml.ScalarNode):
            raise self.fail("expected a single value")
        return str(self.node.value)

    def convert(self, fn: Callable[[Any], _T]) -> _T:
        """fn(this value); its ValueError becomes a ConfigError at this node."""
        return self.check(fn, self.scalar())

    def check(self, fn: Callable[..., _T], *args: Any) -> _T:
        """fn(*args); its ValueError becomes a ConfigError at this node."""
        try:
            return fn(*args)
        except ValueError as e:
            raise self.fail(str(e)) from None


#: A config file larger than this is refused (65,536 backends take ~6 MB).
MAX_CONFIG_BYTES = 64 << 20
#: YAML nodes in a config (65,536 backends with every field take ~500,000).
MAX_NODES = 2_000_000
#: The tags a config may hold: the plain values, lists and maps a YAML parser
#: reads without being told. Anything else (`!!python/object`, `!!binary`,
#: `!!set`, a custom `!tag`) is refused where it is written.
_PLAIN_TAGS = frozenset("tag:yaml.org,2002:" + t for t in ("str", "int", "float", "bool", "null", "map", "seq",
                                                           "timestamp", "merge"))


def _loader() -> type:
    """SafeLoader that refuses aliases (a billion-laughs file expands them
    exponentially), tags other than the plain ones, and more than MAX_NODES nodes."""
    from yaml.composer import ComposerError

    class Refused(ComposerError):
        """Valid YAML this parser will not read; `field` is the key it was the value of."""

        def __init__(self, problem: str, node: Any, index: Any) -> None:
            super().__init__(None, None, problem, node.start_mark)
            self.field = index.value if isinstance(index, yaml.ScalarNode) else ""

    class Loader(yaml.SafeLoader):   # type: ignore[name-defined,misc]
        nodes = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                ev = self.peek_event()
                raise Refused("aliases (*%s) are not supported: write the value out" % show(ev.anchor), ev, index)
            node: Any = super().compose_node(parent, index)
            if node.tag not in _PLAIN_TAGS:
                tag = node.tag.replace("tag:yaml.org,2002:", "!!")
                raise Refused("the YAML tag %s is not allowed (plain values, lists and maps only)" % show(tag),
                              node, index)
            self.nodes += 1
            if self.nodes > MAX_NODES:
                raise Refused("more than %d YAML nodes; the file is too large" % MAX_NODES, node, index)
            return node

    return Loader


def _yaml_error(file: str, text: str, e: Exception) -> ConfigError:
    """A YAML error at its line (a reader error knows only its character position)."""
    mark = getattr(e, "problem_mark", None)
    line = mark.line + 1 if mark is not None else None
    pos = getattr(e, "position", None)
    if line is None and isinstance(pos, int):
        line = text.count("\n", 0, pos) + 1
    problem = getattr(e, "problem", None) or getattr(e, "reason", None) or str(e)
    if hasattr(e, "field"):   # valid YAML, refused (_loader)
        return ConfigError(file, line, field_name(e.field) if e.field else "", problem)
    return ConfigError(file, line, "", "not valid YAML: %s" % problem)


def parse(text: str, file: str = "<config>") -> Config:
    """Parse and validate YAML text; raises ConfigError."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(file, None, "", "%d characters; a config may have at most %d" % (len(text), MAX_CONFIG_BYTES))
    try:
        root = yaml.compose(text, Loader=_loader())
    except yaml.YAMLError as e:
        raise _yaml_error(file, text, e) from None
    except RecursionError:
        raise ConfigError(file, None, "", "nested too deeply to parse") from None
    if root is None:
        raise ConfigError(file, None, "", "the file is empty")
    top = _Node(file, root, "").mapping(("tick", "policy", "balance", "enforce", "equilibrium", "rebalance",
                                         "services"), ("services",))
    tick = top["tick"].convert(parse_duration) if "tick" in top else DEFAULT_TICK_SECONDS
    policy = top["policy"].check(check_policy, top["policy"].string()) if "policy" in top else DEFAULT_POLICY
    balance = top["balance"].check(check_balance, top["balance"].string()) if "balance" in top else None
    enforce = top["enforce"].check(check_enforce, top["enforce"].word()) if "enforce" in top else DEFAULT_ENFORCE
    params = _params(top["equilibrium"]) if "equilibrium" in top else EquilibriumParams()
    rebalance = _rebalance(top["rebalance"]) if "rebalance" in top else RebalanceConfig()

    services = ServiceSet()
    out: list[ServiceConfig] = []
    svc_nodes = top["services"].seq()
    top["services"].check(check_service_count, len(svc_nodes))
    for sn in svc_nodes:
        s = sn.mapping(("name", "frontend", "protocol", "policy", "balance", "enforce", "rebalance",
                        "max_connection_age", "backends"), ("name", "frontend", "backends"))
        name = s["name"].check(check_name, s["name"].string())
        s["name"].check(services.check_name, name)
        fe = s["frontend"].convert(parse_addr)
        proto = s["protocol"].check(check_protocol, s["protocol"].string()) if "protocol" in s else "tcp"
        s["frontend"].check(services.check_frontend, fe, proto)
        spol = s["policy"].check(check_policy, s["policy"].string()) if "policy" in s else None
        sbal = s["balance"].check(check_balance, s["balance"].string()) if "balance" in s else None
        senf = s["enforce"].check(check_enforce, s["enforce"].word()) if "enforce" in s else None
        sreb = s["rebalance"].check(check_rebalance, s["rebalance"].word()) if "rebalance" in s else None
        sage = _field(s, "max_connection_age", parse_age, None)

        be_nodes = s["backends"].seq()
        s["backends"].check(check_backend_count, len(be_nodes))
        seen: dict[Addr, int] = {}
        backends = []
        for bn in be_nodes:
            b = bn.mapping(("address", "weight", "state"), ("address",))
            addr = b["address"].convert(parse_addr)
            b["address"].check(check_backend, addr, fe)
            if addr in seen:
                raise b["address"].fail("duplicate backend %s (first at line %d)" % (addr, seen[addr]))
            seen[addr] = b["address"].line
            weight = b["weight"].convert(check_weight) if "weight" in b else 1.0
            state = b["state"].check(check_state, b["state"].string()) if "state" in b else "active"
            backends.append(BackendConfig(addr, weight, state))
        svc = ServiceConfig(name, fe, proto, tuple(backends), spol, sbal, senf, sreb, sage)
        s["backends"].check(services.check_room, len(backends))
        services.add(svc, "at line %d" % s["name"].line)
        out.append(svc)
    return Config(tick=tick, policy=policy, balance=balance, services=tuple(out), equilibrium=params,
                  source=file, enforce=enforce, rebalance=rebalance)


def _field(kv: dict[str, _Node], key: str, fn: Callable[[str], float], default: _D) -> float | _D:
    """fn(the value as written) of an optional field (a duration: `off` stays a word)."""
    return kv[key].check(fn, kv[key].word()) if key in kv else default


def _rebalance(n: _Node) -> RebalanceConfig:
    kv = n.mapping(("mode", "max_closes", "min_age", "min_idle", "max_connection_age"))
    d = RebalanceConfig()
    mode = kv["mode"].check(check_rebalance, kv["mode"].word()) if "mode" in kv else d.mode
    max_closes = d.max_closes
    if "max_closes" in kv:
        v = kv["max_closes"].scalar()
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_CLOSES_LIMIT:
            raise kv["max_closes"].fail("must be a whole number from 1 to %d (mode: off stops closing)"
                                        % MAX_CLOSES_LIMIT)
        max_closes = v
    min_age = _field(kv, "min_age", parse_span, d.min_age)
    min_idle = _field(kv, "min_idle", parse_span, d.min_idle)
    age = _field(kv, "max_connection_age", parse_age, d.max_connection_age)
    return RebalanceConfig(mode, max_closes, min_age, min_idle, age)


def _params(n: _Node) -> EquilibriumParams:
    names = tuple(f.name for f in fields(EquilibriumParams) if f.name != "tolls")
    kv = n.mapping(names)
    values: dict[str, Any] = {}
    for k, v in kv.items():
        val = number(v.scalar()) if k != "patience" else v.scalar()
        if k == "patience":
            if isinstance(val, bool) or not isinstance(val, int):
                raise v.fail("must be a whole number")
            if not 1 <= val <= MAX_PATIENCE:
                raise v.fail("must be a whole number from 1 to %d" % MAX_PATIENCE)
        elif isinstance(val, bool) or not isinstance(val, (int, float)):
            raise v.fail("must be a number")
        else:
            try:
                val = float(val)
            except OverflowError:
                raise v.fail("is too large to be a number the agent can use") from None
            if not math.isfinite(val):
                raise v.fail("must be a finite number")
            top = MAX_EQUILIBRIUM_SECONDS if k in EQUILIBRIUM_SECONDS else MAX_EQUILIBRIUM_CONSTANT
            if val > top:
                raise v.fail("must be at most %g%s, got %g" % (top, " (seconds)" if k in EQUILIBRIUM_SECONDS else "",
                                                                val))
            val += 0.0   # -0.0 -> 0.0
        values[k] = val
    try:
        params = EquilibriumParams(**values)
    except ValueError as e:
        field_name = str(e).split(" ")[0]
        node = kv.get(field_name.split(".")[-1], n)
        raise node.fail(str(e).split(" ", 1)[1] if " " in str(e) else str(e)) from None
    if params.converged_enter >= params.converged_exit:   # the engine's ConvergenceDetector refuses it at apply
        node = kv.get("converged_enter") or kv.get("converged_exit") or n
        raise node.fail("converged_enter (%g) must be below converged_exit (%g)"
                        % (params.converged_enter, params.converged_exit))
    return params


def load(path: str) -> Config:
    """Read and validate a config file; ConfigError names file, line and field."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)   # more is refused by parse, unread
    except OSError as e:
        raise ConfigError(path, None, "", "cannot read: %s" % e.strerror) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(path, data.count(b"\n", 0, e.start) + 1, "", "not UTF-8 text: %s" % e.reason) from None
    return parse(text, path)


#: load_apart: a parse that takes longer is stopped (65,536 backends parse in ~10 s here)
PARSE_TIMEOUT_SECONDS = 120.0
#: load_apart: the child's address-space limit; a file that needs more is refused
PARSE_MEMORY_BYTES = 2 << 30
_CHILD = "import sys; from equilibriumd.config import _load_child; _load_child(sys.argv[1])"


def load_apart(path: str, timeout: float = PARSE_TIMEOUT_SECONDS) -> Config:
    """`load` in a child process, for the long-running agent.

    A parse builds a tree of every YAML node, many times the size of the Config
    it keeps; in the agent's heap that tree would leave memory Python cannot
    give back (~10 MB at 16,384 backends, with a peak of twice the agent's
    size). In a child it goes with the child, and a hostile file (too deep,
    too big, too slow) costs a ConfigError, not the agent. The Config comes
    back pickled over a pipe from the child this function started."""
    import pickle
    import subprocess
    import sys

    try:
        r = subprocess.run([sys.executable, "-c", _CHILD, path], capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ConfigError(path, None, "", "not parsed within %gs; the parser was stopped" % timeout) from None
    except OSError as e:
        raise ConfigError(path, None, "", "cannot start the parser: %s" % e.strerror) from None
    if r.returncode != 0 or not r.stdout:
        why = "killed by signal %d" % -r.returncode if r.returncode < 0 else "exit status %d" % r.returncode
        last = r.stderr.decode(errors="replace").strip().splitlines()[-1:]
        raise ConfigError(path, None, "", "the parser failed (%s)%s" % (why, ": " + last[0] if last else ""))
    try:
        out = pickle.loads(r.stdout)  # noqa: S301 (written by our own child, above)
    finally:
        limits._SHARED.clear()   # equal ports, weights and states came back as one object each
    if isinstance(out, ConfigError):
        raise out
    if not isinstance(out, Config):
        raise ConfigError(path, None, "", "the parser returned %s" % type(out).__name__)
    return out


def _load_child(path: str) -> None:
    """load_apart's child: the Config, or the ConfigError, pickled to stdout."""
    import pickle
    import resource
    import sys

    resource.setrlimit(resource.RLIMIT_AS, (PARSE_MEMORY_BYTES, PARSE_MEMORY_BYTES))
    out: Config | ConfigError
    try:
        out = load(path)
    except ConfigError as e:
        out = e
    except MemoryError:
        out = ConfigError(path, None, "", "needs more than %d MiB to parse" % (PARSE_MEMORY_BYTES >> 20))
    except RecursionError:
        out = ConfigError(path, None, "", "nested too deeply to parse")
    except Exception as e:   # whatever the file does to the parser, the agent gets an error
        out = ConfigError(path, None, "", "cannot be parsed: %s: %s" % (type(e).__name__, e))
    sys.stdout.buffer.write(pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL))
