"""The UrbanMove topology: five services, three backends each, on loopback.

Read from `daemonset/examples/urbanmove/standalone.yaml` (validated with the
agent's own config parser); the same topology is built in here for an
installed package without the repository around it. The demo serves exactly
those backend addresses with the test backends, or, when a fixed port is
taken, the same IPs on ports the kernel picks (and then writes the runtime
config with the ports it got).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ... import config as cfg

STANDALONE = Path(__file__).resolve().parents[3] / "daemonset" / "examples" / "urbanmove" / "standalone.yaml"

#: name, third octet of its addresses, base latency of its backends (seconds)
SERVICES = (("gateway", 10, 0.002), ("bus", 11, 0.005), ("trajet", 12, 0.008), ("user", 13, 0.003),
            ("ticket", 14, 0.004))
BASE_LATENCY = {name: lat for name, _, lat in SERVICES}


@dataclass
class Service:
    name: str
    frontend: str                     # "ip:port"
    backends: list[str]               # "ip:port" as configured
    base_latency: float = 0.005
    served: list[str] = field(default_factory=list)   # "ip:port" actually bound

    def backend_names(self) -> list[str]:
        """X-Backend names: bus-1, bus-2, ..."""
        return ["%s-%d" % (self.name, i + 1) for i in range(len(self.backends))]

    def frontend_addr(self) -> tuple[str, int]:
        host, _, port = self.frontend.rpartition(":")
        return host.strip("[]"), int(port)


def builtin() -> list[Service]:
    return [Service(name, "127.77.0.%d:80" % net, ["127.0.%d.%d:8080" % (net, 11 + i) for i in range(3)], lat)
            for name, net, lat in SERVICES]


def load(path: str | Path | None = None) -> tuple[list[Service], str]:
    """(services, where they came from)."""
    p = Path(path) if path else STANDALONE
    if not p.exists():
        if path:
            raise SystemExit("demo: no topology file %s" % p)
        return builtin(), "built-in (no %s)" % p
    c = cfg.load(str(p))  # ConfigError names file:line: field
    return [Service(s.name, str(s.frontend), [str(b.address) for b in s.backends],
                    BASE_LATENCY.get(s.name, 0.005)) for s in c.services], str(p)


def behaviour(base: float, extra: float = 0.0) -> dict[str, Any]:
    """Latency uniform in [0.5, 1.5] x base, plus `extra` seconds."""
    return {"latency": {"dist": "uniform", "low": round(extra + 0.5 * base, 6), "high": round(extra + 1.5 * base, 6)}}


def runtime_config(services: list[Service], tick: float = 0.5, policy: str = "equilibrium",
                   enforce: dict[str, str] | None = None, rebalance: str | None = None) -> str:
    """The agent's config for the backends as served (actual ports); `enforce`: per
    service name, its `enforce:` mode (the others get the default); `rebalance`: the
    top-level `rebalance.mode` (None: not written, the agent's default)."""
    doc: dict[str, Any] = {"tick": "%gs" % tick, "policy": policy}
    if rebalance is not None:
        doc["rebalance"] = {"mode": rebalance}
    doc["services"] = [
        {"name": s.name, "frontend": s.frontend, "protocol": "tcp",
         **({"enforce": enforce[s.name]} if enforce and s.name in enforce else {}),
         "backends": [{"address": a, "weight": 1} for a in (s.served or s.backends)]} for s in services]
    return yaml.safe_dump(doc, sort_keys=False)
