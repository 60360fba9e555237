"""Fuzz the admin socket protocol against a real AdminServer (unix socket in a
temporary run directory) answering for the real agent on a MemoryDatapath:
random bytes, JSON of any shape, oversized, deeply nested and partial
requests. The server answers one JSON error line or closes, never dies,
leaves no thread behind, and a good request afterwards still works. The
client side (`admin.ask`, what equilibriumctl uses) is fuzzed against a fake
server sending random answers: a dict or AgentUnavailable, nothing else. No root."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
from typing import Any, Iterator

import pytest
from control.support import config, service_yaml
from control.test_metrics_memory import memory_agent
from hypothesis import example, given
from hypothesis import strategies as st

from equilibriumd.agent import admin, lock

from . import fuzz_settings

FUZZ = fuzz_settings(120)


class Served:
    def __init__(self, pin_dir: str, server: admin.AdminServer) -> None:
        self.pin_dir, self.server = pin_dir, server


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    """An AdminServer for a memory agent, its socket under a temporary RUN_DIR."""
    saved = (lock.RUN_DIR, admin.RUN_DIR)
    with tempfile.TemporaryDirectory(prefix="eq-admin-fuzz-") as run:
        lock.RUN_DIR = admin.RUN_DIR = run
        try:
            agent = memory_agent(config(service_yaml("web", "10.96.0.1:80", ["10.0.0.1:80", "10.0.0.2:80"])))
            agent.tick()
            server = admin.AdminServer(os.path.join(run, "pins"), agent.answer)
            try:
                yield Served(os.path.join(run, "pins"), server)
            finally:
                server.close()
        finally:
            lock.RUN_DIR, admin.RUN_DIR = saved


def exchange(path: str, data: bytes, close_write: bool = True, timeout: float = 10.0) -> bytes:
    """Send `data` (then EOF), return everything the server sends until it closes."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        try:
            s.sendall(data)
            if close_write:
                s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass   # the server closed first (oversized): what it sent is still readable
        out = []
        while True:
            try:
                chunk = s.recv(1 << 16)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out.append(chunk)
        return b"".join(out)
    finally:
        s.close()


def handler_threads() -> int:
    """Threads serving a connection (socketserver names them Thread-N (process_request_thread))."""
    return sum(1 for t in threading.enumerate() if "process_request_thread" in t.name)


def answered_well_or_closed(resp: bytes) -> dict[str, Any] | None:
    if not resp:
        return None   # closed without an answer: allowed
    assert resp.endswith(b"\n") and resp.count(b"\n") == 1, resp[:200]
    out = json.loads(resp)
    assert isinstance(out, dict) and isinstance(out.get("ok"), bool), out
    if not out["ok"]:
        assert isinstance(out.get("error"), str) and out["error"], out
    return out


def still_serves(sv: Served) -> None:
    assert sv.server.thread.is_alive()
    r = admin.ask(sv.pin_dir, {"cmd": "ticks"}, timeout=10)
    assert r["ok"] and r["ticks"] >= 1
    deadline = time.monotonic() + 5
    while handler_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert handler_threads() == 0, [t.name for t in threading.enumerate()]


json_value = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                          lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                          max_leaves=8)
request = st.fixed_dictionaries(
    {"cmd": st.sampled_from(["status", "explain", "ticks", "memory", "callers", "nope", ""]) | json_value},
    optional={"service": st.sampled_from(["web", "nope"]) | json_value, "top": json_value, "by": json_value,
              "reset_peak": json_value})
payload = st.one_of(
    st.binary(max_size=300),
    request.map(lambda r: json.dumps(r).encode() + b"\n"),
    json_value.map(lambda v: json.dumps(v).encode() + b"\n"),
    st.integers(admin.MAX_REQUEST - 20, admin.MAX_REQUEST * 3).map(
        lambda n: b'{"cmd": "status", "pad": "' + b"x" * n + b'"}\n'),
    st.sampled_from([b"[" * 4000 + b"\n", b'{"cmd": ' * 1000 + b"\n", b'{"cmd": "status"', b"\xff\xfe\n",
                     b'{"cmd": "explain", "service": ["web"]}\n', b'{"cmd": "explain", "service": {}}\n',
                     b"1" * 4090 + b"\n", b'{"cmd": "status"}\n{"cmd": "status"}\n', b"\n", b""]),
)


@FUZZ
@given(payload)
@example(b"[" * 4000 + b"\n")                              # RecursionError in json: no answer, a traceback
@example(b'{"cmd": "explain", "service": ["web"]}\n')      # unhashable service: TypeError, no answer
@example(b'{"cmd": "explain", "service": {"a": 1}}\n')
def test_any_request_gets_an_answer_or_a_close_and_the_server_goes_on(served: Served, data: bytes) -> None:
    resp = exchange(admin.socket_path(served.pin_dir), data)
    # one client at a time, each with its line (or EOF) at once: every one gets an answer
    assert answered_well_or_closed(resp) is not None, data[:100]
    still_serves(served)


@pytest.mark.parametrize("data", [b"[" * 4000 + b"\n", b'{"cmd": "explain", "service": ["web"]}\n'])
def test_found_requests_that_broke_the_handler_get_an_error(served: Served, data: bytes) -> None:
    out = answered_well_or_closed(exchange(admin.socket_path(served.pin_dir), data))
    assert out is not None and out["ok"] is False and "bad request" in out["error"], out
    still_serves(served)


def test_a_partial_request_held_open_is_answered_and_its_thread_ends(served: Served) -> None:
    t0 = time.monotonic()
    resp = exchange(admin.socket_path(served.pin_dir), b'{"cmd": "sta', close_write=False)
    out = answered_well_or_closed(resp)
    assert out is not None and out["ok"] is False and time.monotonic() - t0 < 10
    still_serves(served)


def test_good_requests_between_hostile_ones(served: Served) -> None:
    path = admin.socket_path(served.pin_dir)
    for data in (b"\x00" * 100, b'{"cmd": "status"}\n', b"{" * 3000, b'{"cmd": "explain", "service": "web"}\n'):
        answered_well_or_closed(exchange(path, data))
    st_ = admin.ask(served.pin_dir, {"cmd": "status"})
    assert st_["ok"] and st_["services"][0]["name"] == "web"
    ex = admin.ask(served.pin_dir, {"cmd": "explain", "service": "web"})
    assert ex["ok"] and ex["explain"]["name"] == "web"


# --- the client: whatever a socket answers, ask() returns a dict or raises AgentUnavailable

@pytest.fixture(scope="module")
def fake_agent() -> Iterator[tuple[str, list[bytes]]]:
    """A unix socket at the path `ask` uses that answers each connection with the next reply."""
    saved = (lock.RUN_DIR, admin.RUN_DIR)
    replies: list[bytes] = []
    with tempfile.TemporaryDirectory(prefix="eq-ask-fuzz-") as run:
        lock.RUN_DIR = admin.RUN_DIR = run
        pin_dir = os.path.join(run, "pins")
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(admin.socket_path(pin_dir))
        srv.listen(4)
        srv.settimeout(0.1)   # accept wakes up to see `stop`
        stop = threading.Event()

        def serve() -> None:
            while not stop.is_set():
                try:
                    c, _ = srv.accept()
                except socket.timeout:
                    continue
                except OSError:
                    return
                with c:
                    c.settimeout(5)
                    try:
                        c.recv(4096)
                        c.sendall(replies.pop(0) if replies else b"")
                    except OSError:
                        pass
        t = threading.Thread(target=serve, daemon=True)
        t.start()
        try:
            yield pin_dir, replies
        finally:
            stop.set()
            t.join(5)
            srv.close()
            lock.RUN_DIR, admin.RUN_DIR = saved


@FUZZ
@given(st.one_of(st.binary(max_size=200), json_value.map(lambda v: json.dumps(v).encode() + b"\n"),
                 st.sampled_from([b"[" * 5000 + b"\n", b"null\n", b"[1]\n", b"", b"\xff\n"])))
@example(b"null\n")           # a JSON value that is not an object: ctl's resp.get raised AttributeError
@example(b"[" * 5000 + b"\n")  # RecursionError out of ask
def test_ask_returns_a_dict_or_says_the_agent_is_unavailable(fake_agent: tuple[str, list[bytes]],
                                                             reply: bytes) -> None:
    pin_dir, replies = fake_agent
    replies.append(reply)
    try:
        out = admin.ask(pin_dir, {"cmd": "status"}, timeout=5)
    except admin.AgentUnavailable as e:
        assert str(e)
        return
    assert isinstance(out, dict)
