"""The admin socket bounds what clients can hold: idle connections beyond
MAX_CONNECTIONS are told "busy" and closed (no thread each), an idle client is
dropped after READ_TIMEOUT, an oversized request gets an error, and a real
`equilibriumctl status` answers through it all (the real Agent on an in-memory
datapath behind a real unix socket; no kernel)."""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

import pytest
from click.testing import CliRunner

from equilibriumd.agent import admin
from equilibriumd.cli.ctl import cli

from .support import config, service_yaml
from .test_metrics_memory import memory_agent

WEB = service_yaml("web", "10.96.0.1:80", ["10.0.0.1:80", "10.0.0.2:80"])


@pytest.fixture
def served(tmp_path: Any, monkeypatch: Any) -> Any:
    monkeypatch.setattr(admin, "RUN_DIR", str(tmp_path))
    monkeypatch.setattr("equilibriumd.agent.lock.RUN_DIR", str(tmp_path))
    pin = str(tmp_path / "pins")
    a = memory_agent(config(WEB))
    srv = admin.AdminServer(pin, a.answer)
    conns: list[socket.socket] = []
    try:
        yield pin, srv, conns
    finally:
        for c in conns:
            c.close()
        srv.close()


def _idle(path: str, n: int, conns: list[socket.socket]) -> None:
    for _ in range(n):
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(path)
        conns.append(c)


def test_idle_connections_beyond_the_bound_take_no_thread_and_status_answers(served: Any) -> None:
    pin, srv, conns = served
    before = threading.active_count()
    _idle(srv.path, 4 * admin.MAX_CONNECTIONS, conns)
    time.sleep(0.3)
    assert threading.active_count() - before <= admin.MAX_CONNECTIONS
    # the ones over the bound were answered "busy" and closed
    busy = 0
    for c in conns[admin.MAX_CONNECTIONS:]:
        c.settimeout(1.0)
        got = c.recv(4096)
        assert json.loads(got)["error"].startswith("busy") and c.recv(1) == b""
        busy += 1
    assert busy == 3 * admin.MAX_CONNECTIONS and srv.server.refused >= busy
    # while the bound is held, a status gets a clear "busy", never a hang
    t0 = time.monotonic()
    r = CliRunner().invoke(cli, ["status", "--pin-dir", pin])
    assert time.monotonic() - t0 < 2 and (r.exit_code == 0 or "busy" in r.output), r.output
    # the idle ones are dropped after READ_TIMEOUT: then status answers
    deadline = time.monotonic() + admin.READ_TIMEOUT + 3
    while True:
        r = CliRunner().invoke(cli, ["status", "--pin-dir", pin])
        if r.exit_code == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.exit_code == 0 and "web" in r.output, r.output
    for c in conns[:admin.MAX_CONNECTIONS]:
        c.settimeout(1.0)
        assert "no request line" in json.loads(c.recv(4096))["error"]
    assert threading.active_count() - before <= 1


def test_an_oversized_request_gets_an_error(served: Any) -> None:
    pin, srv, conns = served
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conns.append(c)
    c.settimeout(3)
    c.connect(srv.path)
    c.sendall(b'{"cmd": "status", "pad": "' + b"x" * (2 * admin.MAX_REQUEST) + b'"}\n')
    resp = json.loads(c.recv(4096))
    assert not resp["ok"] and "longer than %d bytes" % admin.MAX_REQUEST in resp["error"]
    assert admin.ask(pin, {"cmd": "ticks"})["ok"]
