"""Fuzz the config parser: whatever the text, `parse` gives a Config whose
numbers the datapath can represent, or a ConfigError reading `FILE:LINE: ...`;
never another exception, and a valid Config always apportions (pure, no root).

Bounded for CI: derandomized (the same examples every run, no example
database), a fixed number of examples per test, no per-example deadline."""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import math
import re
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from equilibriumd import config as cfg
from equilibriumd import types as limits
from equilibriumd.config import Config, ConfigError, load, parse
from equilibriumd.datapath.constants import SLOTS
from equilibriumd.datapath.slots import apportion

from . import fuzz_settings, paths, put

FILE = "f.yaml"
FUZZ = fuzz_settings(200)
_SHAPE = re.compile(r"^%s(:\d+)?: " % re.escape(FILE))


def in_range(c: Config) -> None:
    """Every number of a valid Config is one the datapath and the engine can use."""
    assert 0.01 <= c.tick <= 3600
    rb = c.rebalance
    assert isinstance(rb.max_closes, int) and 1 <= rb.max_closes <= cfg.MAX_CLOSES_LIMIT
    for secs in (rb.min_age, rb.min_idle):
        assert math.isfinite(secs) and 0 <= secs <= 3600
    ages = [rb.max_connection_age] + [s.max_connection_age for s in c.services if s.max_connection_age is not None]
    assert all(a == 0 or 1 <= a <= 3600 for a in ages), ages
    for f in dataclasses.fields(c.equilibrium):
        v = getattr(c.equilibrium, f.name)
        if f.name == "tolls":
            continue
        assert not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= cfg.MAX_EQUILIBRIUM_CONSTANT, (f.name, v)
    assert len(c.services) <= limits.MAX_SERVICES
    assert sum(len(s.backends) for s in c.services) <= limits.MAX_BACKENDS
    for s in c.services:
        assert 1 <= len(s.backends) <= limits.MAX_BACKENDS_PER_SERVICE
        for a in [s.frontend] + [b.address for b in s.backends]:
            ip = ipaddress.ip_address(a.ip)
            assert 1 <= a.port <= 65535 and a.family == ip.version == s.frontend.family
            assert not (ip.is_unspecified or ip.is_multicast) and str(ip) == a.ip
            assert not isinstance(ip, ipaddress.IPv6Address) or (ip.ipv4_mapped is None and ip.scope_id is None)
        w = [b.weight for b in s.backends]
        assert all(isinstance(x, float) and math.isfinite(x) and 0 <= x <= cfg.MAX_WEIGHT for x in w), w
        n = apportion(w)   # what the agent hands the kernel: never raises, sums to the table
        assert n.sum() in (0, SLOTS) and (n >= 0).all()


def check(text: str) -> Config | None:
    """The property: a Config in range, or a ConfigError of the `FILE:LINE: ` shape."""
    try:
        c = parse(text, FILE)
    except ConfigError as e:
        msg = str(e)
        assert _SHAPE.match(msg), msg
        assert e.line is not None or e.field == "", msg   # a field's error has its line
        assert len(msg) < 2000, msg[:300]                 # a hostile value is cut, not echoed whole
        return None
    in_range(c)
    return c


# --- the examples that found bugs (each failed before its fix) ----------------

SVC = "services:\n  - name: a\n    frontend: %s\n    backends:\n      - address: 127.0.0.2:80\n        weight: %s\n"
SVC6 = "services:\n  - name: a\n    frontend: %s\n    backends:\n      - address: '[fd00::2]:80'\n"
FOUND = [
    SVC % ("127.0.0.1:80", "!foo 3"),                     # custom tag: ConstructorError escaped
    SVC % ("127.0.0.1:80", "9" * 5000),                   # 5,000-digit int: ValueError (int digits limit) escaped
    SVC % ("80", "1"),                                    # frontend a number: AttributeError ('int'.strip)
    "services: []\ntick: 2001-13-45\n",                   # a timestamp with month 13: ValueError escaped
    "[" * 3000 + "]" * 3000,                              # deep nesting: RecursionError escaped
    "services: []\ntick: " + "9" * 400 + "\n",            # OverflowError (int too large for a float)
    "services: []\nequilibrium: {deadband: 1.0e+300}\n",  # accepted: overflows the engine's sums
    SVC6 % '"[fe80::1%eth0]:80"',                         # a zone id the datapath cannot hold: accepted
    SVC6 % '"[::ffff:127.0.0.1]:80"',                     # IPv4-mapped IPv6 frontend: accepted
    SVC % ("255.255.255.255:80", "1"),                    # broadcast frontend: accepted
    "services: []\x00\n",                                 # a reader error had no line
]


def test_aliases_are_refused_where_they_are_used() -> None:
    """Not a crash before (the schema walk never expanded them), but a billion-laughs
    file is now refused at its first alias instead of being composed."""
    with pytest.raises(ConfigError) as ei:
        parse("services: &s []\nx: [*s, *s]\n", FILE)
    assert str(ei.value).startswith("f.yaml:2: ") and "aliases" in str(ei.value)


def test_a_reader_error_names_its_line() -> None:
    with pytest.raises(ConfigError) as ei:
        parse("services: []\ntick: 1s\x00\n", FILE)
    assert ei.value.line == 2, str(ei.value)


@pytest.mark.parametrize("text", FOUND)
def test_found_inputs_give_a_config_error_at_a_line(text: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse(text, FILE)
    assert _SHAPE.match(str(ei.value)), str(ei.value)
    check(text)


def test_negative_zero_weight_is_zero() -> None:
    c = parse(SVC % ("127.0.0.1:80", "-0.0"), FILE)
    assert math.copysign(1.0, c.services[0].backends[0].weight) == 1.0


# --- random text -------------------------------------------------------------

@FUZZ
@given(st.text(max_size=300))
@example("!!python/object/apply:os.system ['true']\n")
@example("services: !!binary aGVsbG8=\n")
@example("--- \nservices: []\n--- \nservices: []\n")
@example("services: []\nservices: []\n")
def test_any_text(text: str) -> None:
    check(text)


KEYS = ["tick", "policy", "balance", "enforce", "equilibrium", "rebalance", "services", "name", "frontend",
        "protocol", "backends", "address", "weight", "state", "mode", "max_closes", "min_age", "min_idle",
        "max_connection_age", "deadband", "patience", "slow_start", "regime_change", "<<", "?"]
VALUES = ["1", "0", "-1", "-0.0", "1.0e+308", "1.0e+400", ".nan", ".inf", "-.inf", "~", "yes", "off", "on",
          "0x10", "0o7", "1_000", "9" * 30, "2001-12-14", "'\\0'", '"\\0"', '"\\x00"', "0.5s", "500ms", "1h",
          "127.0.0.1:80", "127.0.0.2:80", "'[::1]:80'", "'[::2]:80'", "'[::ffff:1.2.3.4]:80'", "0.0.0.0:80",
          "127.0.0.1:0", "127.0.0.1:65536", "!!binary aGk=", "!!python/object:os.system {}", "!x 1", "&a 1", "*a",
          "[]", "{}", "[1, 2]", "{a: 1}", "!!set {a}", "!!float 1", "!!int 1.5", "tcp", "udp", "static", "p2c",
          "equilibrium", "active", "draining", "idle", "|", ">", "'", '"', "#", "%YAML 1.1", "---", "..."]


@st.composite
def yamlish(draw: Any) -> str:
    """Lines made of the schema's keys and hostile values at random indents:
    reaches the validation below the YAML parser far more often than raw text."""
    lines = []
    for _ in range(draw(st.integers(1, 14))):
        indent = " " * draw(st.sampled_from([0, 2, 4, 6, 8]))
        dash = draw(st.sampled_from(["", "- "]))
        key = draw(st.sampled_from(KEYS))
        value = draw(st.sampled_from(VALUES + [""]))
        lines.append("%s%s%s: %s" % (indent, dash, key, value))
    return "\n".join(lines) + "\n"


@FUZZ
@given(yamlish())
def test_schema_shaped_text(text: str) -> None:
    check(text)


# --- structured documents with hostile values ----------------------------------

hostile = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.integers(-2, 70000), st.sampled_from([2 ** 63, 2 ** 64, -(2 ** 63), 10 ** 400]),
    st.floats(), st.floats(0, 2e6),
    st.text(max_size=20),
    st.sampled_from(["0.5s", "500ms", "off", "1s", "3601s", "0.001s", "1e400s", "1.5", "tcp", "udp", "TCP",
                     "equilibrium", "static", "p2c", "weighted", "throttle", "idle", "draining", "a\x00",
                     "127.0.0.1:80\x00", "[::1]:80", "[fe80::1%lo]:80", "[::ffff:10.0.0.1]:80", "10.0.0.1:99999",
                     "255.255.255.255:80", "224.0.0.1:80", "0.1.2.3:80", "[::]:80", "10.0.0.1:80", "10.0.0.2:80"]),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
    st.just({"address": "127.0.0.9:80"}), st.just([{"address": "127.0.0.9:80"}] * 2),
)


EQ = limits.EquilibriumParams()
EQ_EDGES = {f.name: [getattr(EQ, f.name)] for f in dataclasses.fields(EQ) if f.name != "tolls"}
for _n in ("latency_floor", "error_penalty", "slow_start"):
    EQ_EDGES[_n] += [0.0, 3600.0]
for _n in ("deadband", "prior_regret", "prior_span", "escape_payoff", "little_min_inflight", "rise_headroom",
           "rise_floor", "regime_change"):
    EQ_EDGES[_n] += [1e6]
EQ_EDGES["patience"] += [1, cfg.MAX_PATIENCE]
EQ_EDGES["deadband"] += [0.0]


@st.composite
def good_document(draw: Any) -> dict[str, Any]:
    """A valid config (edges of every range included)."""
    doc: dict[str, Any] = {}
    if draw(st.booleans()):
        doc["tick"] = draw(st.sampled_from(["10ms", "0.5s", "3600s", 0.01, 3600, 1]))
    for key, choices in (("policy", cfg.POLICIES), ("balance", cfg.BALANCES), ("enforce", cfg.ENFORCE)):
        if draw(st.booleans()):
            doc[key] = draw(st.sampled_from(choices))
    if draw(st.booleans()):
        names = draw(st.lists(st.sampled_from(sorted(EQ_EDGES)), max_size=6, unique=True))
        doc["equilibrium"] = {n: draw(st.sampled_from(EQ_EDGES[n])) for n in names}
    if draw(st.booleans()):
        doc["rebalance"] = {"mode": draw(st.sampled_from(cfg.REBALANCE)),
                            "max_closes": draw(st.sampled_from([1, 8, cfg.MAX_CLOSES_LIMIT])),
                            "min_age": draw(st.sampled_from(["0s", "2s", "3600s"])),
                            "min_idle": draw(st.sampled_from(["0ms", "10ms", "3600s"])),
                            "max_connection_age": draw(st.sampled_from(["off", "1s", "3600s"]))}
    services = []
    for i in range(draw(st.integers(1, 3))):
        v6 = draw(st.booleans())
        fe = "[fd00::%x]:80" % (i + 1) if v6 else "127.0.0.%d:%d" % (i + 1, draw(st.sampled_from([1, 80, 65535])))
        bes = []
        for j in range(draw(st.integers(1, 4))):
            be: dict[str, Any] = {"address": "[fd00:1::%x]:8080" % (j + 1) if v6 else "127.0.1.%d:8080" % (j + 1)}
            if draw(st.booleans()):
                be["weight"] = draw(st.floats(0, 1e6) | st.integers(0, 10 ** 6))
            if draw(st.booleans()):
                be["state"] = draw(st.sampled_from(cfg.BACKEND_STATES))
            bes.append(be)
        svc: dict[str, Any] = {"name": "s%d" % i, "frontend": fe, "backends": bes}
        if draw(st.booleans()):
            svc["protocol"] = draw(st.sampled_from(cfg.PROTOCOLS))
        if draw(st.booleans()):
            svc["max_connection_age"] = draw(st.sampled_from(["off", "1s", "60s"]))
        services.append(svc)
    doc["services"] = services
    return doc




@st.composite
def hostile_document(draw: Any) -> dict[str, Any]:
    """A valid document with one or two of its values replaced by a hostile one."""
    doc = draw(good_document())
    for _ in range(draw(st.integers(0, 2))):
        where = paths(doc)
        put(doc, draw(st.sampled_from(where)), copy.deepcopy(draw(hostile)))   # st.just values are shared
    return doc


@FUZZ
@given(hostile_document(), st.sampled_from(["", "!!python/object:x ", "!t ", "!!binary "]), st.integers(0, 40))
def test_structured_documents(doc: dict[str, Any], tag: str, where: int) -> None:
    text = yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)
    lines = text.splitlines()
    values = [n for n, ln in enumerate(lines) if ": " in ln]
    if tag and values:   # a tag on one value of the document
        i = values[where % len(values)]
        k, v = lines[i].split(": ", 1)
        lines[i] = "%s: %s%s" % (k, tag, v)
    check("\n".join(lines) + "\n")


@fuzz_settings(40)
@given(st.lists(st.floats(0, 1e6), min_size=1, max_size=limits.MAX_BACKENDS_PER_SERVICE))
def test_valid_weights_always_apportion(weights: list[float]) -> None:
    rows = "".join("      - {address: 10.0.%d.%d:80, weight: %r}\n" % (i // 250, i % 250 + 1, w)
                   for i, w in enumerate(weights))
    c = check("services:\n  - name: a\n    frontend: 10.96.0.1:80\n    backends:\n" + rows)
    assert c is not None and [b.weight for b in c.services[0].backends] == weights


# --- bytes on disk ------------------------------------------------------------

@fuzz_settings(60)
@given(st.binary(max_size=200))
@example(b"services: []\n\xff\xfe")
@example(b"\xef\xbb\xbfservices: []\n")   # a UTF-8 byte order mark is fine
def test_any_bytes_on_disk(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    p = tmp_path_factory.mktemp("cfg") / "f.yaml"
    p.write_bytes(data)
    try:
        in_range(load(str(p)))
    except ConfigError as e:
        assert str(e).startswith(str(p) + ":"), str(e)


def test_bytes_that_are_not_utf8_are_an_error_at_their_line(tmp_path: Any) -> None:
    p = tmp_path / "f.yaml"
    p.write_bytes(b"services: []\ntick: 1s\n# caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8") as ei:
        load(str(p))
    assert ei.value.line == 3 and str(ei.value).startswith(str(p) + ":3: "), str(ei.value)


@fuzz_settings(25)
@given(good_document())
def test_a_valid_config_runs_in_the_agent(doc: dict[str, Any]) -> None:
    """The real agent on a MemoryDatapath applies any valid config and ticks: its
    weights become tables (apportionment) without an exception."""
    from control.test_metrics_memory import memory_agent

    c = check(yaml.safe_dump(doc, sort_keys=False))
    assert c is not None
    a = memory_agent(c)
    for _ in range(2):
        a.tick()
    assert sorted(a.rec.services) == sorted(s.name for s in c.services)


EXTREMES = {n: [0.0, 1e-9, 1.0, 3600.0 if n in cfg.EQUILIBRIUM_SECONDS else cfg.MAX_EQUILIBRIUM_CONSTANT]
            for n in ("deadband", "prior_regret", "prior_span", "escape_payoff", "little_min_inflight",
                      "rise_headroom", "rise_floor", "latency_floor", "error_penalty", "slow_start")}
EXTREMES["regime_change"] = [1.0, cfg.MAX_EQUILIBRIUM_CONSTANT]
EXTREMES["converged_exit"] = [0.3, cfg.MAX_EQUILIBRIUM_CONSTANT]


@fuzz_settings(15)
@given(st.dictionaries(st.sampled_from(sorted(EXTREMES)), st.integers(0, 3), max_size=6),
       st.lists(st.tuples(st.sampled_from([1e-7, 0.003, 0.3, 30.0]), st.integers(0, 50), st.booleans()),
                min_size=3, max_size=3))
def test_valid_extreme_constants_keep_the_weights_finite(pick: dict[str, int],
                                                         backends: list[tuple[float, int, bool]]) -> None:
    """Every `equilibrium:` constant at the edges of its range, and odd telemetry:
    the engine's weights stay finite probabilities (nothing the config lets
    through breaks the tables)."""
    from control.test_metrics_memory import memory_agent

    from equilibriumd.datapath.memory import MemoryDatapath

    consts = {n: EXTREMES[n][i % len(EXTREMES[n])] for n, i in pick.items()}
    text = ("policy: equilibrium\nequilibrium: {%s}\nservices:\n  - name: web\n    frontend: 10.96.0.1:80\n"
            "    backends: [{address: 10.0.0.1:80}, {address: 10.0.0.2:80}, {address: 10.0.0.3:80}]\n"
            % ", ".join("%s: %r" % kv for kv in consts.items()))
    c = check(text)
    assert c is not None
    dp = MemoryDatapath()
    a = memory_agent(c, dp)
    ids = list(a.rec.services["web"].backends.values())
    for _ in range(8):
        for bid, (lat, errors, closes) in zip(ids, backends):
            dp.add_telemetry(bid, requests=50, resp_2xx=50 - errors, resp_5xx=errors, req_ns_sum=int(50 * lat * 1e9),
                             attempts=50, established=50, closed=50 if closes else 0, req_open=50, req_done=50)
        a.tick()
        w = a.router.weights_now[a.router.layout.row["web"]][:3]
        assert np.isfinite(w).all() and (w >= 0).all() and abs(w.sum() - 1) < 1e-6, (consts, w)


def test_a_huge_file_is_refused_before_parsing(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cfg, "MAX_CONFIG_BYTES", 1000)
    p = tmp_path / "big.yaml"
    p.write_text("services: []\n" + "# padding\n" * 200)
    with pytest.raises(ConfigError, match="at most 1000"):
        load(str(p))


def test_too_many_nodes_is_an_error_at_a_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cfg, "MAX_NODES", 50)
    with pytest.raises(ConfigError, match="more than 50 YAML nodes") as ei:
        parse("services: []\nx: [" + ", ".join(["1"] * 100) + "]\n", FILE)
    assert ei.value.line == 2


def test_apportion_of_every_valid_weight_pair_sums_to_the_table() -> None:
    for w in ([cfg.MAX_WEIGHT] * limits.MAX_BACKENDS_PER_SERVICE, [0.0, cfg.MAX_WEIGHT], [5e-324, 1.0]):
        assert apportion(np.asarray(w)).sum() == SLOTS
