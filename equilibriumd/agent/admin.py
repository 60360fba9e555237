"""The agent's root-only admin socket: equilibriumctl status / explain / watch.

A unix stream socket (mode 0600 under /run/equilibrium) speaking one JSON
request line and one JSON response line per connection:

    {"cmd": "status"}                 -> {"ok": true, "agent": {...}, "services": [...]}
    {"cmd": "explain", "service": S}  -> {"ok": true, "explain": {...}}
    anything else                     -> {"ok": false, "error": "..."}

Connections are bounded: at most MAX_CONNECTIONS are served at once (a thread
each); one more is answered {"ok": false, "error": "busy: ..."} and closed at
once. A request line must arrive within READ_TIMEOUT seconds and hold at most
MAX_REQUEST bytes; idle or oversized clients get an error, not a thread for ever.

The agent publishes an immutable snapshot after every tick; the server only
reads that reference, so a slow client never stalls the control loop.
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import threading
from typing import Any, Callable

from .lock import RUN_DIR, lock_path

MAX_REQUEST = 4096
#: connections served at once (a thread each); `equilibriumctl` opens one at a time
MAX_CONNECTIONS = 8
#: seconds a client has to send its request line
READ_TIMEOUT = 2.0
#: seconds a client has to take the answer (a node's status is megabytes)
WRITE_TIMEOUT = 10.0


def socket_path(pin_dir: str) -> str:
    return lock_path(pin_dir)[:-len(".pid")] + ".sock"


class _Handler(socketserver.StreamRequestHandler):
    server: "_Server"

    def handle(self) -> None:
        self.request.settimeout(READ_TIMEOUT)
        try:
            line = self.rfile.readline(MAX_REQUEST + 1)
            if len(line) > MAX_REQUEST:
                raise ValueError("request longer than %d bytes" % MAX_REQUEST)
            req = json.loads(line or b"{}")
            if not isinstance(req, dict):
                raise ValueError("request must be a JSON object")
            resp = self.server.answer(req)
        except socket.timeout:
            resp = {"ok": False, "error": "bad request: no request line within %g s" % READ_TIMEOUT}
        except (ValueError, OSError, RecursionError) as e:   # RecursionError: JSON nested too deep
            resp = {"ok": False, "error": "bad request: %s" % e}
        except Exception as e:   # a value `answer` did not expect (a list as a service name): an answer, not a drop
            resp = {"ok": False, "error": "bad request: %s: %s" % (type(e).__name__, e)}
        try:
            self.request.settimeout(WRITE_TIMEOUT)
            self.wfile.write(json.dumps(resp, default=_default).encode() + b"\n")
        except OSError:
            pass


BUSY = (json.dumps({"ok": False, "error": "busy: the agent is serving %d connections; try again"
                   % MAX_CONNECTIONS}) + "\n").encode()


def _default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, answer: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self.answer = answer
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.refused = 0   #: connections answered "busy"
        super().__init__(path, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """A thread per connection, at most MAX_CONNECTIONS at once; beyond that the
        connection is told it is busy and closed on the accepting thread (one short
        non-blocking send: a client that does not read cannot hold it)."""
        if not self.slots.acquire(blocking=False):
            self.refused += 1
            try:
                request.setblocking(False)
                request.send(BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()   # no thread started: it would never give the slot back
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class AdminServer:
    def __init__(self, pin_dir: str, answer: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self.path = socket_path(pin_dir)
        os.makedirs(RUN_DIR, mode=0o755, exist_ok=True)
        try:
            os.unlink(self.path)  # a stale socket of a dead agent (we hold the agent lock)
        except FileNotFoundError:
            pass
        old = os.umask(0o177)  # created 0600: root only
        try:
            self.server = _Server(self.path, answer)
        finally:
            os.umask(old)
        self.thread = threading.Thread(target=self.server.serve_forever, name="admin", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class AgentUnavailable(RuntimeError):
    pass


def ask(pin_dir: str, request: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """One request to the agent of `pin_dir`; AgentUnavailable if none answers."""
    path = socket_path(pin_dir)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(json.dumps(request).encode() + b"\n")
        parts: list[bytes] = []   # a node's status is megabytes: join once, not per chunk
        while not parts or not parts[-1].endswith(b"\n"):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            parts.append(chunk)
        buf = b"".join(parts)
    except FileNotFoundError:
        raise AgentUnavailable("no agent is running for %s (no socket %s)" % (pin_dir, path)) from None
    except (ConnectionRefusedError, socket.timeout) as e:
        raise AgentUnavailable("the agent for %s does not answer on %s: %s" % (pin_dir, path, e)) from None
    except PermissionError:
        raise AgentUnavailable("permission denied on %s: run as root" % path) from None
    finally:
        s.close()
    try:
        out = json.loads(buf)
    except (ValueError, RecursionError):
        raise AgentUnavailable("the agent sent no valid answer") from None
    if not isinstance(out, dict):   # callers read it with .get
        raise AgentUnavailable("the agent sent no valid answer (not a JSON object)")
    return out
