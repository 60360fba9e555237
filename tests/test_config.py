"""Config parsing: every error names file, line and field (pure, no root)."""

from __future__ import annotations

import pytest

from equilibriumd import config as cfg
from equilibriumd import types as limits
from equilibriumd.config import ConfigError, load, parse
from equilibriumd.types import Addr

GOOD = """\
tick: 250ms
policy: round-robin
services:
  - name: bus-service
    frontend: 127.77.0.1:80
    protocol: tcp
    backends:
      - address: 127.0.0.11:8080
        weight: 2
      - address: 127.0.0.12:8080
        state: draining
  - name: v6
    frontend: "[fd00::1]:443"
    policy: static
    backends:
      - address: "[fd00::2]:8443"
"""


def test_good_config():
    c = parse(GOOD, "g.yaml")
    assert c.tick == 0.25 and c.policy == "round-robin"
    bus, v6 = c.services
    assert str(bus.frontend) == "127.77.0.1:80" and bus.backends[0].weight == 2.0
    assert bus.backends[1].state == "draining" and bus.backends[1].weight == 1.0
    assert v6.frontend.family == 6 and c.policy_of(v6) == "static"
    # balance: weighted by default for static/random/round-robin, p2c for the learning policies
    assert c.balance is None and c.balance_of(bus) == "weighted" and c.balance_of(v6) == "weighted"


def test_balance_defaults_and_overrides():
    c = parse(GOOD.replace("policy: round-robin", "policy: equilibrium"), "g.yaml")
    bus, v6 = c.services
    assert c.balance_of(bus) == "p2c" and c.balance_of(v6) == "weighted"
    c = parse(GOOD.replace("policy: static", "policy: static\n    balance: p2c")
              .replace("tick: 250ms", "tick: 250ms\nbalance: weighted"), "g.yaml")
    bus, v6 = c.services
    assert c.balance == "weighted" and c.balance_of(bus) == "weighted" and c.balance_of(v6) == "p2c"


def test_enforce_defaults_overrides_and_errors():
    c = parse(GOOD, "g.yaml")
    bus, v6 = c.services
    assert c.enforce == "observe" and c.enforce_of(bus) == "observe"
    c = parse(GOOD.replace("policy: static", "policy: static\n    enforce: throttle")
              .replace("tick: 250ms", "tick: 250ms\nenforce: off"), "g.yaml")
    bus, v6 = c.services
    assert c.enforce_of(bus) == "off" and c.enforce_of(v6) == "throttle"   # `off` as written, not a YAML false
    with pytest.raises(ConfigError, match=r"g.yaml:1: enforce: unknown enforce 'maybe'; use one of: off, observe"):
        parse("enforce: maybe\n" + GOOD, "g.yaml")


@pytest.mark.parametrize("edit, where", [
    (("127.77.0.1:80", "127.77.0.1"), "f.yaml:5: services[0].frontend: expected ip:port"),
    (("127.77.0.1:80", "127.77.0.999:80"), "f.yaml:5: services[0].frontend: '127.77.0.999' is not an IP"),
    (("127.0.0.11:8080", "127.0.0.11:0"), "f.yaml:8: services[0].backends[0].address: port 0 out of range"),
    (("weight: 2", "weight: -2"), "f.yaml:9: services[0].backends[0].weight: weight must be finite and >= 0"),
    (("weight: 2", "weight: lots"), "f.yaml:9: services[0].backends[0].weight: weight must be a number"),
    (("state: draining", "state: asleep"), "f.yaml:11: services[0].backends[1].state: state must be one of"),
    (("protocol: tcp", "protocol: sctp"), "f.yaml:6: services[0].protocol: protocol must be tcp or udp"),
    (("policy: round-robin", "policy: fastest"), "f.yaml:2: policy: unknown policy 'fastest'"),
    (("policy: round-robin", "policy: round-robin\nequilibrium: {inertia: 2}"),
     "f.yaml:3: equilibrium.inertia: must be <= 1"),
    (("tick: 250ms", "tick: soon"), "f.yaml:1: tick: expected a duration"),
    (("tick: 250ms", "tick: 250ms\nbalance: fastest"),
     "f.yaml:2: balance: unknown balance 'fastest'; use one of: p2c, weighted"),
    (("    protocol: tcp", "    protocol: tcp\n    balance: 2"), "f.yaml:7: services[0].balance: "),
    (("    protocol: tcp", "    protcol: tcp"), "f.yaml:6: services[0].protcol: unknown field"),
    (("name: v6", "name: bus-service"),
     "f.yaml:12: services[1].name: duplicate service name 'bus-service' (first at line 4)"),
    (("name: v6", "name: Bus"), "f.yaml:12: services[1].name: name 'Bus' must be 1-63 lower-case"),
    (("    policy: static", "    policy: fastest"), "f.yaml:14: services[1].policy: unknown policy 'fastest'"),
    (("      - address: \"[fd00::2]:8443\"", "      - address: \"[fd00::1]:443\""),
     "f.yaml:16: services[1].backends[0].address: backend [fd00::1]:443 is the service's own frontend"),
    (("    backends:\n      - address: \"[fd00::2]:8443\"\n", "    backends: []\n"),
     "f.yaml:15: services[1].backends: a service needs at least one backend"),
    (('"[fd00::1]:443"', "127.77.0.1:80"), "f.yaml:13: services[1].frontend: duplicate frontend 127.77.0.1:80/tcp"),
    (('"[fd00::2]:8443"', "127.0.0.2:8443"), "f.yaml:16: services[1].backends[0].address: backend is IPv4"),
    (("      - address: 127.0.0.12:8080", "      - address: 127.0.0.11:8080"),
     "f.yaml:10: services[0].backends[1].address: duplicate backend 127.0.0.11:8080"),
])
def test_errors_name_file_line_field(edit, where):
    text = GOOD.replace(*edit)
    assert text != GOOD
    with pytest.raises(ConfigError) as ei:
        parse(text, "f.yaml")
    assert str(ei.value).startswith(where), str(ei.value)


def test_too_many_backends_for_the_maps():
    n = limits.MAX_BACKENDS_PER_SERVICE + 1
    bes = "\n".join("      - address: 127.0.%d.%d:80" % (i // 250, i % 250 + 1) for i in range(n))
    with pytest.raises(ConfigError, match="at most %d" % limits.MAX_BACKENDS_PER_SERVICE):
        parse("services:\n  - name: big\n    frontend: 127.77.0.1:80\n    backends:\n" + bes)


def test_not_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"x.yaml:3: not valid YAML: expected"):
        parse("services:\n  - [unclosed\n", "x.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        load(str(tmp_path / "absent.yaml"))
    with pytest.raises(ConfigError, match="empty"):
        parse("", "e.yaml")
    with pytest.raises(ConfigError, match="missing required field 'services'"):
        parse("tick: 1s\n", "e.yaml")


def test_check_config_cli(tmp_path):
    """`equilibriumd check-config` prints what each service will run, or the error (exit 2)."""
    from click.testing import CliRunner

    from equilibriumd.cli.daemon import cli

    good = tmp_path / "good.yaml"
    good.write_text(GOOD.replace("policy: round-robin", "policy: equilibrium"))
    r = CliRunner().invoke(cli, ["check-config", str(good)])
    assert r.exit_code == 0, r.output
    assert "ok: 2 services, 3 backends, policy equilibrium" in r.output
    assert "bus-service  127.77.0.1:80/tcp  2 backends  policy equilibrium  balance p2c" in r.output
    assert "policy static  balance weighted" in r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("tick: 250ms", "tick: 250ms\nbalance: fastest"))
    r = CliRunner().invoke(cli, ["check-config", str(bad)])
    assert r.exit_code == 2 and "bad.yaml:2: balance: unknown balance 'fastest'" in r.output
    deep = tmp_path / "deep.yaml"
    deep.write_text("services: " + "[" * 50000)   # a traceback from the parser in-process
    r = CliRunner().invoke(cli, ["check-config", str(deep)])
    assert r.exit_code == 2 and "deep.yaml: nested too deeply to parse" in r.output, r.output


def _services(n: int, backends: int = 1) -> str:
    out = ["services:"]
    for i in range(n):
        out += ["  - name: s%d" % i, "    frontend: 127.77.%d.%d:80" % (i // 250, i % 250 + 1), "    backends:"]
        out += ["      - address: 127.1.%d.%d:80" % (j // 250, j % 250 + 1) for j in range(backends)]
    return "\n".join(out) + "\n"


def test_node_limits_come_from_types(monkeypatch: pytest.MonkeyPatch) -> None:
    """The node's limits are those of equilibriumd.types, read when a file is checked."""
    monkeypatch.setattr(limits, "MAX_SERVICES", 3)
    monkeypatch.setattr(limits, "MAX_BACKENDS", 7)
    assert len(parse(_services(3, 2), "f.yaml").services) == 3
    with pytest.raises(ConfigError, match=r"^f.yaml:2: services: 4 services; the datapath holds at most 3$"):
        parse(_services(4), "f.yaml")
    with pytest.raises(ConfigError, match=r"^f.yaml:\d+: services\[1\].backends: more than 7 backends in total"):
        parse(_services(2, 4), "f.yaml")


# --- the validation functions discovery shares ---------------------------------------

FE = Addr(4, "127.77.0.1", 80)


def _svc(**kw: object) -> cfg.ServiceConfig:
    d: dict[str, object] = {"name": "bus", "frontend": FE, "protocol": "tcp",
                            "backends": (cfg.BackendConfig(Addr(4, "127.0.0.11", 80)),)}
    d.update(kw)
    return cfg.ServiceConfig(**d)  # type: ignore[arg-type]


def test_every_parsed_service_passes_check_service() -> None:
    for s in parse(GOOD).services:
        cfg.check_service(s)


@pytest.mark.parametrize("kw, problem", [
    ({"name": "Bus"}, "name 'Bus' must be 1-63"),
    ({"name": "x" * 64}, "must be 1-63"),
    ({"protocol": "sctp"}, "protocol must be tcp or udp"),
    ({"policy": "fastest"}, "unknown policy 'fastest'"),
    ({"balance": "fastest"}, "unknown balance 'fastest'"),
    ({"backends": ()}, "at least one backend"),
    ({"backends": (cfg.BackendConfig(Addr(6, "::1", 80)),)}, "backend is IPv6 but the frontend 127.77.0.1:80 is IPv4"),
    ({"backends": (cfg.BackendConfig(FE),)}, "own frontend"),
    ({"backends": (cfg.BackendConfig(Addr(4, "127.0.0.11", 80)),) * 2}, "duplicate backend 127.0.0.11:80"),
    ({"backends": (cfg.BackendConfig(Addr(4, "127.0.0.11", 80), float("nan")),)}, "weight must be finite"),
    ({"backends": (cfg.BackendConfig(Addr(4, "127.0.0.11", 80), 1.0, "asleep"),)}, "state must be one of"),
])
def test_check_service_refuses_what_parse_refuses(kw: dict[str, object], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        cfg.check_service(_svc(**kw))


def test_check_service_backend_count_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "MAX_BACKENDS_PER_SERVICE", 2)
    bes = tuple(cfg.BackendConfig(Addr(4, "127.0.0.%d" % i, 80)) for i in (11, 12, 13))
    with pytest.raises(ValueError, match="3 backends; a service may have at most 2"):
        cfg.check_service(_svc(backends=bes))


def test_service_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "MAX_SERVICES", 3)
    monkeypatch.setattr(limits, "MAX_BACKENDS", 3)
    node = cfg.ServiceSet([_svc()], "in base.yaml")
    with pytest.raises(ValueError, match=r"duplicate service name 'bus' \(first in base.yaml\)"):
        node.add(_svc(frontend=Addr(4, "127.77.0.2", 80)))
    with pytest.raises(ValueError, match=r"duplicate frontend 127.77.0.1:80/tcp \(already used by service 'bus'\)"):
        node.add(_svc(name="tram"))
    node.add(_svc(name="tram", protocol="udp"), "in service a/tram")  # same address, other protocol: fine
    assert len(node) == 2 and node.names["tram"] == "in service a/tram"
    two = tuple(cfg.BackendConfig(Addr(4, "127.0.0.%d" % i, 80)) for i in (11, 12))
    with pytest.raises(ValueError, match="more than 3 backends in total"):
        node.add(_svc(name="metro", frontend=Addr(4, "127.77.0.3", 80), backends=two))
    node.add(_svc(name="metro", frontend=Addr(4, "127.77.0.3", 80)))
    with pytest.raises(ValueError, match="more than 3 services; the datapath holds at most 3"):
        node.check_room(0)


# --- load_apart: the agent's parse, in a child process -------------------------------
def test_load_apart_returns_what_load_returns(tmp_path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("tick: 0.25s\nservices:\n" + "".join(
        "  - name: s%d\n    frontend: 127.77.0.%d:80\n    backends:\n      - address: 127.0.0.%d:8080\n"
        "        weight: 2.5\n" % (i, i + 1, i + 1) for i in range(20)))
    assert cfg.load_apart(str(p)) == cfg.load(str(p))


def test_load_apart_raises_the_parse_error_with_its_line(tmp_path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("services:\n  - name: a\n    frontend: 127.77.0.1:80\n    backends:\n      - address: nope\n")
    with pytest.raises(cfg.ConfigError) as e:
        cfg.load_apart(str(p))
    assert e.value.line == 5 and e.value.file == str(p) and "address" in str(e.value)
    with pytest.raises(cfg.ConfigError, match="cannot read"):
        cfg.load_apart(str(tmp_path / "missing.yaml"))


def test_a_file_that_breaks_the_parser_is_an_error_not_a_crash(tmp_path) -> None:
    """Nesting deep enough to exhaust the parser's recursion: a traceback in load,
    a ConfigError from load_apart (whose child takes the blow)."""
    p = tmp_path / "deep.yaml"
    p.write_text("services: " + "[" * 50000)
    with pytest.raises(cfg.ConfigError, match="nested too deeply|cannot be parsed"):
        cfg.load_apart(str(p))


def test_load_apart_stops_a_parse_that_takes_too_long(tmp_path, monkeypatch) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("services: []\n")
    monkeypatch.setattr(cfg, "_CHILD", "import time; time.sleep(30)")
    with pytest.raises(cfg.ConfigError, match="not parsed within 0.5s"):
        cfg.load_apart(str(p), timeout=0.5)


REBALANCE = """\
rebalance:
  mode: idle
  max_closes: 4
  min_age: 0
  min_idle: 5ms
  max_connection_age: off
services:
  - name: a
    frontend: 127.77.0.1:80
    rebalance: off
    max_connection_age: 30s
    backends: [{address: 127.0.0.11:8080}]
  - name: b
    frontend: 127.77.0.2:80
    backends: [{address: 127.0.0.12:8080}]
"""


def test_rebalance_section_and_service_overrides() -> None:
    c = parse(REBALANCE)
    assert c.rebalance == cfg.RebalanceConfig("idle", 4, 0.0, 0.005, 0.0)
    a, b = c.services
    assert (c.rebalance_of(a), c.max_age_of(a)) == ("off", 30.0)
    assert (c.rebalance_of(b), c.max_age_of(b)) == ("idle", 0.0)
    d = parse("services: []\n").rebalance   # the defaults: on, gentle
    assert (d.mode, d.max_closes, d.min_age, d.min_idle, d.max_connection_age) == ("idle", 8, 2.0, 0.01, 0.0)


@pytest.mark.parametrize("text, where, says", [
    ("rebalance: {mode: sometimes}\nservices: []\n", "1: rebalance.mode", "use one of: idle, off"),
    ("rebalance: {max_closes: 0}\nservices: []\n", "1: rebalance.max_closes", "whole number from 1"),
    ("rebalance: {max_closes: 2.5}\nservices: []\n", "1: rebalance.max_closes", "whole number"),
    ("rebalance: {max_connection_age: 0.5s}\nservices: []\n", "1: rebalance.max_connection_age", "below 1s"),
    ("rebalance: {min_age: -1}\nservices: []\n", "1: rebalance.min_age", "duration"),
    ("rebalance: {min_idle: 2h}\nservices: []\n", "1: rebalance.min_idle", "duration"),
    ("rebalance: {often: yes}\nservices: []\n", "1: rebalance", "unknown field"),
    ("services:\n  - name: a\n    frontend: 127.77.0.1:80\n    rebalance: always\n    backends: []\n",
     "4: services[0].rebalance", "use one of"),
    ("services:\n  - name: a\n    frontend: 127.77.0.1:80\n    max_connection_age: soon\n    backends: []\n",
     "4: services[0].max_connection_age", "duration"),
])
def test_rebalance_errors_name_line_and_field(text: str, where: str, says: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(text)
    assert where in str(e.value) and says in str(e.value), str(e.value)


HUGE = "9" * 400


@pytest.mark.parametrize("text, where, says", [
    # issue 14: 1e308 passed check-config and a SIGHUP with it killed the agent (the
    # apportionment's sum overflowed); a 400-digit constant ended in a traceback
    ("services:\n  - name: a\n    frontend: 127.77.0.1:80\n    backends:\n"
     "      - {address: 127.0.0.2:80, weight: 1.0e+308}\n      - {address: 127.0.0.3:80, weight: 1.0e+308}\n",
     "5: services[0].backends[0].weight", "at most 1e+06"),
    ("services:\n  - name: a\n    frontend: 127.77.0.1:80\n    backends:\n"
     "      - {address: 127.0.0.2:80, weight: %s}\n" % HUGE, "5: services[0].backends[0].weight", "at most"),
    ("equilibrium: {deadband: %s}\nservices: []\n" % HUGE, "1: equilibrium.deadband", "too large"),
    ("equilibrium: {deadband: .inf}\nservices: []\n", "1: equilibrium.deadband", "finite"),
    ("equilibrium: {patience: %s}\nservices: []\n" % HUGE, "1: equilibrium.patience", "from 1 to 100000"),
])
def test_numbers_the_datapath_cannot_use_are_refused_at_their_line(text: str, where: str, says: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(text)
    assert where in str(e.value) and says in str(e.value), str(e.value)


def test_the_largest_weight_still_apportions() -> None:
    """What the bound lets through is safe for the tables: 256 backends at the
    largest weight split a table evenly."""
    from equilibriumd.datapath.slots import apportion

    counts = apportion([cfg.MAX_WEIGHT] * 256, limits.SLOTS)
    assert sum(counts) == limits.SLOTS and max(counts) - min(counts) <= 1


def _one(frontend: str = "127.77.0.1:80", backend: str = "127.0.0.2:80", weight: str = "1") -> str:
    return ("services:\n  - name: a\n    frontend: %s\n    backends:\n      - address: %s\n        weight: %s\n"
            % (frontend, backend, weight))


@pytest.mark.parametrize("text, where, says", [
    # validation at the edge (issue 14): tags, huge values, wrong types, addresses
    (_one(weight="!!python/object/apply:os.system ['true']"), "f.yaml:6: weight: ", "YAML tag"),
    (_one(weight="!custom 1"), "f.yaml:6: weight: ", "YAML tag '!custom' is not allowed"),
    (_one(weight="!!binary 1"), "f.yaml:6: weight: ", "YAML tag '!!binary'"),   # bad base64: ConstructorError
    ("a: &x 1\nservices: *x\n", "f.yaml:2: services: ", "aliases"),
    (_one(weight="9" * 5000), "f.yaml:6: services[0].backends[0].weight: ", "cannot read the value"),
    ("services: []\ntick: 2001-13-45\n", "f.yaml:2: tick: ", "cannot read the value"),
    ("services: []\ntick: %s\n" % ("9" * 400), "f.yaml:2: tick: ", "not a finite number"),
    (_one(frontend="80"), "f.yaml:3: services[0].frontend: ", "expected ip:port"),
    (_one(frontend="127.0.0.1:" + "8" * 5000), "f.yaml:3: services[0].frontend: ", "characters)"),
    (_one(frontend="255.255.255.255:80"), "f.yaml:3: services[0].frontend: ", "broadcast"),
    (_one(frontend="0.1.2.3:80"), "f.yaml:3: services[0].frontend: ", "this network"),
    (_one(frontend="'[fe80::1%eth0]:80'", backend="'[fd00::2]:80'"), "f.yaml:3: services[0].frontend: ", "zones"),
    (_one(frontend="'[fd00::1]:80'", backend="'[::ffff:10.0.0.1]:80'"), "f.yaml:5: services[0].backends[0].address: ",
     "write it as 10.0.0.1"),
    ("services: []\nequilibrium: {deadband: 1.0e+300}\n", "f.yaml:2: equilibrium.deadband: ", "at most 1e+06"),
    ("services: []\nequilibrium: {slow_start: 7200}\n", "f.yaml:2: equilibrium.slow_start: ", "at most 3600"),
    ("services: []\nequilibrium: {prior_regret: 1e7}\n", "f.yaml:2: equilibrium.prior_regret: ", "at most 1e+06"),
    ("services: []\n? [a]\n: 1\n", "f.yaml:2: ", "a field name must be plain text"),
    # passed parse, then the engine's ConvergenceDetector raised at apply ("need 0 <= enter < exit")
    ("services: []\nequilibrium: {converged_enter: 0.5}\n", "f.yaml:2: equilibrium.converged_enter: ",
     "must be below converged_exit (0.3)"),
    ("services: []\n" + "x" * 100 + ": 1\n", "f.yaml:2: 'xxxx", "unknown field"),
])
def test_hostile_values_are_errors_at_their_line_and_field(text: str, where: str, says: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(text, "f.yaml")
    assert str(e.value).startswith(where) and says in str(e.value), str(e.value)
    assert len(str(e.value)) < 400   # a hostile value is cut, not echoed


def test_an_exponent_without_a_dot_is_a_number() -> None:
    """YAML 1.1 reads `1e6` as text: the documented largest weight was refused."""
    c = parse(_one(weight="1e6") + "equilibrium: {prior_regret: 2E+1}\n", "f.yaml")
    assert c.services[0].backends[0].weight == 1e6 and c.equilibrium.prior_regret == 20.0
    with pytest.raises(ConfigError, match="at most 1e"):
        parse(_one(weight="1e7"), "f.yaml")
