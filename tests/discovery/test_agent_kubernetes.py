"""`equilibriumd run --kubernetes` end to end: the real agent, the real
kernel (attached to a child cgroup the test creates, never the root), real
TCP backends on 127.0.0.0/8, and the cluster played by the loopback API
server of fakeapi.py through a kubeconfig (no API server can be installed on
these machines).

The EndpointSlices give each backend its own port (one slice per pod, as the
controller does when pods declare a named port differently), a terminating
endpoint must stop receiving new connections, and a Service that is not
opted in must not be touched.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest

from .fakeapi import FakeAPIServer
from .objects import endpoint_slice, service
from helpers import AgentProc, Backends, ClientProc  # type: ignore[import-not-found]  # tests/ (conftest.py)


def _kubeconfig(path: Path, url: str) -> Path:
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": url}}], "users": [{"name": "u", "user": {}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u"}}]}))
    return path


def _slices(b: Backends, states: list[str]) -> list[dict[str, Any]]:
    out = []
    for i, st in enumerate(states):
        ip, port = b.addrs[i]
        out.append(endpoint_slice("bus", "bus-%d" % i, [(ip, st)], port=port, port_name="http"))
    return out


@pytest.mark.root
@pytest.mark.timeout(120)
def test_agent_follows_the_cluster(api: FakeAPIServer, tmp_path: Path, cgroup: Any, pin_dir: str,
                                   backends: Callable[..., Backends], frontend_ip: str,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    b = backends(3)
    api.put("Service", service("bus", ip=frontend_ip, ports=[("http", 80, "http", "TCP")]))
    api.put("Service", service("other", ip="127.77.255.254", enabled=None))
    for s in _slices(b, ["ready", "ready", "ready"]):
        api.put("EndpointSlice", s)
    monkeypatch.setenv("KUBECONFIG", str(_kubeconfig(tmp_path / "kubeconfig", api.url)))
    monkeypatch.setenv("NODE_NAME", "node-a")
    base = tmp_path / "base.yaml"
    base.write_text("tick: 0.2s\npolicy: round-robin\nservices: []\n")
    agent = AgentProc(base, cgroup.path, pin_dir, tmp_path / "agent.log")
    agent.cmd.append("--kubernetes")
    try:
        agent.start()
        applied = agent.wait_event("config_applied")
        assert applied["added"] == ["bus.urbanmove"]

        r = ClientProc(cgroup.path, frontend_ip, 80, count=300).result()
        assert r["ok"] == 300 and r["wrong_peer"] == 0
        assert all(b.accepts[i] >= 60 for i in range(3)), dict(b.accepts)

        # backend 2 terminates: draining, no new connections
        seen = agent.count("config_reloaded")
        api.put("EndpointSlice", _slices(b, ["ready", "ready", "terminating"])[2])
        agent.wait_event("config_reloaded", after=seen)
        before = dict(b.accepts)
        r = ClientProc(cgroup.path, frontend_ip, 80, count=200).result()
        assert r["ok"] == 200 and b.accepts[2] == before.get(2, 0)
    finally:
        agent.stop()
