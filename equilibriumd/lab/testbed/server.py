"""Configurable HTTP/1.1 test backends: many listeners served by one asyncio
process, each with its own behaviour, changeable at run time over a control
socket.

    python -m equilibriumd.lab.testbed.server --listen 127.0.0.11:8080 \\
        --listen 127.0.0.12:0 --control /tmp/x/ctl.sock [--seed N] [--behaviour JSON]
    python -m equilibriumd.lab.testbed.server --spec backends.json --control ...

A spec file is {"seed": 0, "backends": [{"listen": "ip:port", "name": "...",
"behaviour": {...}}, ...]}. Once every listener is bound the server prints
one line on stdout, `ready <JSON list of {"index", "name", "addr"}>` (port 0
replaced by the port the kernel gave), then serves until SIGTERM/SIGINT.

HTTP: GET/POST/HEAD (any method is answered), keep-alive by default on
HTTP/1.1 and honouring `Connection: close`, HTTP/1.0 closes unless it asks
for keep-alive, request bodies by Content-Length (chunked request bodies get
501), pipelined requests answered in order. Every response carries
`X-Backend: <name>`; a 200 carries `body_bytes` bytes ("ok" by default).

Per request, in this order and from the backend's own seeded RNG (three
draws per request, so a run is reproducible): close_mid_request, error_ratio,
latency. The delay comes first; then the connection is closed without a byte,
or the error status is sent, or the 200. Latency is injected here, in user
space, because this kernel has no netem.

Probes (Prequal, NSDI 2024): `GET /.probe` is answered at once with a JSON
body {"rif": R, "latency": L}: R the backend's requests in flight now (read,
not yet answered, over all its connections), L its latency estimate at that
RIF in seconds: the median of the last PROBE_LATENCY_WINDOW (16) requests that
arrived while R others were in flight (read to first response byte), else of
the nearest RIF with samples, 0.0 before any (samples are kept however old).
A probe is never delayed, draws nothing from the RNG, is not a request (not in
`requests`, `responses` or RIF; counted in `probes`), ignores error_ratio and
close_mid_request, and is refused like anything else when `refuse` is set.
On a connection busy with a delayed request it waits its turn (HTTP order):
send probes on their own connection.

Bandwidth: the `bandwidth` behaviour paces each response body in user space
(per response, after the headers). A link-level limit shared by all
connections, with real TCP queueing, is a tbf qdisc on a test host's veth
(`testbed.hosts`); use that when the transport's behaviour matters.

Control protocol (unix socket, one JSON object per line each way):
    {"op": "ping"} | {"op": "list"}
    {"op": "set", "backend": B, "behaviour": {...}}   -> {"ok": true, "behaviour": {...}}
    {"op": "get", "backend": B}
    {"op": "stats", "backend": B | null}               (null: all backends)
    {"op": "reset_stats", "backend": B | null}
    {"op": "reseed", "backend": B, "seed": N}
B is an index, a name or "ip:port". Failures answer {"ok": false, "error": "..."}
and change nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import http
import json
import os
import random
import signal
import socket
import statistics
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from equilibriumd.lab.testbed.behaviour import Behaviour

MAX_HEADER_BYTES = 64 * 1024
#: Stop reading from a connection whose unanswered input exceeds this.
MAX_BUFFERED_BYTES = 1 << 20
#: Paced bodies are written in chunks of this many seconds of bandwidth.
PACE_INTERVAL = 0.02
ERROR_BODY = b"error"
PROBE_PATH = b"/.probe"
#: latencies kept per RIF for the probe's estimate: the same window as the simulator's
#: Prequal (equilibriumd.lab.sim.peers.PREQUAL_LAT_WINDOW; the paper keeps "recent" ones)
PROBE_LATENCY_WINDOW = 16


def parse_addr(text: str) -> tuple[str, int]:
    """"ip:port" or "[ipv6]:port" -> (ip, port); ValueError saying what is wrong."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError("listen address %r: expected ip:port or [ipv6]:port" % text)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        raise ValueError("listen address %r: %r is not an IP address" % (text, host)) from None
    return host, int(port)


def format_addr(host: str, port: int) -> str:
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


@dataclasses.dataclass
class Stats:
    """Counters of one backend since start or the last reset."""

    connections: int = 0                 # accepted
    requests: int = 0                    # complete requests read
    responses: collections.Counter[int] = dataclasses.field(default_factory=collections.Counter)
    closed_mid_request: int = 0
    body_bytes_sent: int = 0
    probes: int = 0                      # GET /.probe answered (not requests)

    def to_json(self, active: int) -> dict[str, Any]:
        return {
            "connections": self.connections,
            "active_connections": active,
            "requests": self.requests,
            "responses": {str(k): v for k, v in sorted(self.responses.items())},
            "closed_mid_request": self.closed_mid_request,
            "body_bytes_sent": self.body_bytes_sent,
            "probes": self.probes,
        }


class Backend:
    """One listener, its behaviour, RNG and counters."""

    def __init__(self, index: int, host: str, port: int, name: str | None, seed: int) -> None:
        self.index = index
        self.host = host
        self.port = port
        self.name = name or format_addr(host, port)
        self.behaviour = Behaviour()
        self.rng = random.Random("%d:%d" % (seed, index))
        self.stats = Stats()
        self.server: asyncio.base_events.Server | None = None
        self.connections: set[HttpConnection] = set()
        self._body = b"ok"
        self.header_line = b""
        self.free_at = 0.0   #: with a capacity: when the backend's queue empties (loop time)
        self.rif = 0         #: requests read and not yet answered (for probes)
        #: RIF at a request's arrival -> latencies of the last PROBE_LATENCY_WINDOW such requests
        self.lat_by_rif: dict[int, collections.deque[float]] = {}

    @property
    def addr(self) -> str:
        return format_addr(self.host, self.port)

    def body(self) -> bytes:
        """The 200 body: 'ok' when 2 bytes, else that many 'x' (cached)."""
        n = self.behaviour.body_bytes
        if len(self._body) != n:
            self._body = b"ok" if n == 2 else b"x" * n
        return self._body

    async def listen(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: HttpConnection(self), self.host, self.port, reuse_address=True, backlog=4096)
        self.port = self.server.sockets[0].getsockname()[1]
        if self.name == format_addr(self.host, 0):
            self.name = self.addr
        self.header_line = b"X-Backend: " + self.name.encode() + b"\r\n"

    def stop_listening(self) -> None:
        """Close the listening socket (pending accepts are reset); connections
        already accepted keep being served."""
        if self.server is not None:
            self.server.close()
            self.server = None

    async def apply(self, changes: Mapping[str, Any]) -> Behaviour:
        """Validate and apply a behaviour change; on any error nothing changes."""
        new = self.behaviour.updated(changes)
        if new.refuse and not self.behaviour.refuse:
            self.stop_listening()
        elif not new.refuse and self.behaviour.refuse:
            try:
                await self.listen()
            except OSError as e:
                raise ValueError("refuse=false: cannot listen again on %s: %s" % (self.addr, e)) from None
        self.behaviour = new
        return new

    def info(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "addr": self.addr}

    def observed(self, rif: int, latency: float) -> None:
        """A request that arrived with `rif` others in flight was answered after `latency` s."""
        q = self.lat_by_rif.get(rif)
        if q is None:
            q = self.lat_by_rif[rif] = collections.deque(maxlen=PROBE_LATENCY_WINDOW)
        q.append(latency)

    def estimate(self, rif: int) -> float:
        """Latency estimate at this RIF: the median of its window, else of the nearest RIF
        with samples (the lower on a tie), 0.0 before any sample."""
        if not self.lat_by_rif:
            return 0.0
        if rif not in self.lat_by_rif:
            rif = min(self.lat_by_rif, key=lambda r: (abs(r - rif), r))
        return float(statistics.median(self.lat_by_rif[rif]))

    def probe_body(self) -> bytes:
        return json.dumps({"rif": self.rif, "latency": round(self.estimate(self.rif), 6)}).encode()


_STATUS_LINES: dict[int, bytes] = {}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        try:
            reason = http.HTTPStatus(status).phrase
        except ValueError:
            reason = "Status"
        line = _STATUS_LINES[status] = ("HTTP/1.1 %d %s\r\n" % (status, reason)).encode()
    return line


class HttpConnection(asyncio.Protocol):
    """One client connection: parse requests, answer them in order."""

    __slots__ = ("backend", "transport", "buf", "busy", "timer", "loop", "paused", "eof", "started")

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.busy = False          # a response is delayed or being paced
        self.timer: asyncio.TimerHandle | None = None
        self.loop = asyncio.get_running_loop()
        self.paused = False
        self.eof = False           # the client has sent FIN
        self.started: tuple[float, int] | None = None   # the request in flight: (read at, RIF then)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.backend.stats.connections += 1
        self.backend.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.backend.connections.discard(self)
        if self.started is not None:   # dropped unanswered: no longer in flight, no latency sample
            self.started = None
            self.backend.rif -= 1
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._process()
        elif len(self.buf) > MAX_BUFFERED_BYTES and self.transport is not None:
            self.transport.pause_reading()
            self.paused = True

    def eof_received(self) -> bool:
        # Half-close from the client: answer what it sent, then close.
        self.eof = True
        if not self.busy and self.transport is not None:
            self.transport.close()
        return True

    def _bad(self, status: int) -> None:
        assert self.transport is not None
        self.backend.stats.responses[status] += 1
        self.transport.write(_status_line(status) + b"Content-Length: 0\r\nConnection: close\r\n\r\n")
        self.transport.close()
        self.buf.clear()

    def _process(self) -> None:
        """Answer complete requests in the buffer until one must wait."""
        while self.transport is not None and not self.busy:
            buf = self.buf
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEADER_BYTES:
                    self._bad(431)
                return
            lines = bytes(buf[:end]).split(b"\r\n")
            parts = lines[0].split()
            if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
                self._bad(400)
                return
            method, target, version = parts
            length = 0
            conn_tokens = b""
            for line in lines[1:]:
                name, sep, value = line.partition(b":")
                if not sep:
                    self._bad(400)
                    return
                name = name.strip().lower()
                if name == b"content-length":
                    value = value.strip()
                    if not value.isdigit():
                        self._bad(400)
                        return
                    length = int(value)
                elif name == b"connection":
                    conn_tokens = value.lower()
                elif name == b"transfer-encoding" and value.strip().lower() != b"identity":
                    self._bad(501)
                    return
            total = end + 4 + length
            if len(buf) < total:
                return
            del buf[:total]
            if version == b"HTTP/1.1":
                keep_alive = b"close" not in conn_tokens
            else:
                keep_alive = b"keep-alive" in conn_tokens
            if method == b"GET" and target == PROBE_PATH:
                self._probe(keep_alive)
            else:
                self._request(method == b"HEAD", keep_alive)
        if self.paused and self.transport is not None and len(self.buf) <= MAX_BUFFERED_BYTES:
            self.transport.resume_reading()
            self.paused = False

    def _probe(self, keep_alive: bool) -> None:
        assert self.transport is not None
        b = self.backend
        b.stats.probes += 1
        body = b.probe_body()
        self.transport.write(b"".join((
            _status_line(200), b"Content-Type: application/json\r\n",
            b"Content-Length: %d\r\n" % len(body), b.header_line,
            b"" if keep_alive else b"Connection: close\r\n", b"\r\n", body)))
        if not keep_alive:
            self.transport.close()

    def _request(self, head: bool, keep_alive: bool) -> None:
        b = self.backend
        beh = b.behaviour
        b.stats.requests += 1
        self.started = (self.loop.time(), b.rif)
        b.rif += 1
        rng = b.rng
        close = rng.random() < beh.close_mid_request
        error = rng.random() < beh.error_ratio
        delay = beh.latency.sample(rng)
        if beh.capacity is not None:   # a FIFO server: wait for the requests ahead, then 1/capacity
            now = self.loop.time()
            b.free_at = max(b.free_at, now) + 1.0 / beh.capacity
            delay += b.free_at - now
        status = -1 if close else (beh.error_status if error else 200)
        if delay > 0:
            self.busy = True
            self.timer = self.loop.call_later(delay, self._respond, status, head, keep_alive, beh.bandwidth)
        else:
            self._respond(status, head, keep_alive, beh.bandwidth)

    def _respond(self, status: int, head: bool, keep_alive: bool, bandwidth: float | None) -> None:
        self.timer = None
        b = self.backend
        if self.started is not None:
            at, rif = self.started
            self.started = None
            b.rif -= 1
            b.observed(rif, self.loop.time() - at)
        t = self.transport
        if t is None or t.is_closing():
            return
        if status < 0:
            b.stats.closed_mid_request += 1
            t.close()
            return
        body = b.body() if status == 200 else ERROR_BODY
        b.stats.responses[status] += 1
        head_bytes = b"".join((
            _status_line(status),
            b"Content-Length: %d\r\n" % len(body),
            b.header_line,
            b"" if keep_alive else b"Connection: close\r\n",
            b"\r\n",
        ))
        if head or not body:
            t.write(head_bytes)
        elif bandwidth is None:
            t.write(head_bytes + body)
            b.stats.body_bytes_sent += len(body)
        else:
            t.write(head_bytes)
            self.busy = True
            chunk = max(1024, int(bandwidth * PACE_INTERVAL))
            self._pace(memoryview(body), 0, self.loop.time(), bandwidth, chunk, keep_alive)
            return
        self._done(keep_alive)

    def _pace(self, body: memoryview, sent: int, t0: float, bandwidth: float, chunk: int,
              keep_alive: bool) -> None:
        self.timer = None
        t = self.transport
        if t is None or t.is_closing():
            return
        end = min(len(body), sent + chunk)
        t.write(body[sent:end])
        self.backend.stats.body_bytes_sent += end - sent
        if end >= len(body):
            self._done(keep_alive)
            return
        # Chunk k leaves at t0 + (bytes before it) / bandwidth.
        self.timer = self.loop.call_at(t0 + end / bandwidth, self._pace, body, end, t0, bandwidth, chunk,
                                       keep_alive)

    def _done(self, keep_alive: bool) -> None:
        assert self.transport is not None
        if not keep_alive:
            self.transport.close()
            return
        if self.busy:
            self.busy = False
            self._process()
            if self.eof and not self.busy and self.transport is not None:
                self.transport.close()


class Testbed:
    """All backends of the process and the control socket that changes them."""

    def __init__(self, backends: list[Backend]) -> None:
        self.backends = backends

    def find(self, key: object) -> Backend:
        if isinstance(key, int) and not isinstance(key, bool):
            if 0 <= key < len(self.backends):
                return self.backends[key]
            raise ValueError("no backend %d (there are %d)" % (key, len(self.backends)))
        for b in self.backends:
            if key in (b.name, b.addr):
                return b
        raise ValueError("no backend %r (known: %s)" % (key, ", ".join(b.name for b in self.backends)))

    def _selected(self, key: object) -> list[Backend]:
        return self.backends if key is None else [self.find(key)]

    async def handle(self, msg: Mapping[str, Any]) -> dict[str, Any]:
        """Answer one control request (ValueError -> an error reply, by the caller)."""
        op = msg.get("op")
        if op == "ping":
            return {"ok": True, "pid": os.getpid()}
        if op == "list":
            return {"ok": True, "backends": [b.info() for b in self.backends]}
        if op == "set":
            changes = msg.get("behaviour")
            if not isinstance(changes, Mapping):
                raise ValueError("set: 'behaviour' must be an object of behaviour keys")
            b = self.find(msg.get("backend"))
            return {"ok": True, "behaviour": (await b.apply(changes)).to_json()}
        if op == "get":
            return {"ok": True, "behaviour": self.find(msg.get("backend")).behaviour.to_json()}
        if op == "stats":
            sel = self._selected(msg.get("backend"))
            return {"ok": True, "stats": [dict(b.info(), **b.stats.to_json(len(b.connections))) for b in sel]}
        if op == "reset_stats":
            for b in self._selected(msg.get("backend")):
                b.stats = Stats()
            return {"ok": True}
        if op == "reseed":
            seed = msg.get("seed")
            if not isinstance(seed, int) or isinstance(seed, bool):
                raise ValueError("reseed: 'seed' must be an integer, got %r" % (seed,))
            b = self.find(msg.get("backend"))
            b.rng = random.Random("%d:%d" % (seed, b.index))
            return {"ok": True}
        raise ValueError("unknown op %r; known: ping, list, set, get, stats, reset_stats, reseed" % (op,))

    async def control_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    msg = json.loads(line)
                    if not isinstance(msg, dict):
                        raise ValueError("control request must be a JSON object")
                    reply = await self.handle(msg)
                except (ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
                    reply = {"ok": False, "error": str(e)}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


@dataclasses.dataclass
class BackendSpec:
    listen: str
    name: str | None = None
    behaviour: dict[str, Any] = dataclasses.field(default_factory=dict)


def load_spec(path: str) -> tuple[int, list[BackendSpec]]:
    """(seed, backends) from a JSON spec file; ValueError naming the problem."""
    with open(path) as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError("%s: not JSON: %s" % (path, e)) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("backends"), list):
        raise ValueError("%s: expected {\"backends\": [...]}" % path)
    specs = []
    for i, item in enumerate(doc["backends"]):
        if not isinstance(item, dict) or "listen" not in item:
            raise ValueError("%s: backends[%d]: expected an object with 'listen'" % (path, i))
        unknown = set(item) - {"listen", "name", "behaviour"}
        if unknown:
            raise ValueError("%s: backends[%d]: unknown keys %s" % (path, i, ", ".join(sorted(unknown))))
        specs.append(BackendSpec(item["listen"], item.get("name"), dict(item.get("behaviour") or {})))
    return int(doc.get("seed", 0)), specs


async def build(specs: Sequence[BackendSpec], seed: int) -> Testbed:
    """Create, configure and bind every backend (a refusing one is not bound,
    so it needs an explicit port)."""
    backends = []
    for i, spec in enumerate(specs):
        host, port = parse_addr(spec.listen)
        b = Backend(i, host, port, spec.name, seed)
        try:
            b.behaviour = Behaviour().updated(spec.behaviour)
        except ValueError as e:
            raise ValueError("backend %s: %s" % (spec.listen, e)) from None
        if b.behaviour.refuse:
            if port == 0:
                raise ValueError("backend %s: refuse=true at start needs an explicit port" % spec.listen)
            b.header_line = b"X-Backend: " + b.name.encode() + b"\r\n"
        else:
            try:
                await b.listen()
            except OSError as e:
                raise ValueError("backend %s: cannot listen: %s" % (spec.listen, e)) from None
        backends.append(b)
    return Testbed(backends)


async def serve(specs: Sequence[BackendSpec], seed: int, control: str | None) -> None:
    bed = await build(specs, seed)
    ctl = None
    if control:
        if os.path.exists(control):
            os.unlink(control)
        ctl = await asyncio.start_unix_server(bed.control_client, control)
    print("ready " + json.dumps([b.info() for b in bed.backends]), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for b in bed.backends:
        b.stop_listening()
        for c in list(b.connections):
            if c.transport is not None:
                c.transport.abort()
    if ctl is not None:
        ctl.close()
        try:
            os.unlink(control)  # type: ignore[arg-type]
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m equilibriumd.lab.testbed.server", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", action="append", default=[], metavar="IP:PORT",
                    help="a backend listening on IP:PORT (port 0: any); repeatable")
    ap.add_argument("--spec", metavar="FILE", help="JSON spec file with backends, names and behaviours")
    ap.add_argument("--behaviour", metavar="JSON", default="{}",
                    help="initial behaviour of the --listen backends, e.g. '{\"latency\": 0.01}'")
    ap.add_argument("--seed", type=int, default=0, help="RNG seed; backend i draws from seed:i")
    ap.add_argument("--control", metavar="PATH", help="unix socket for run-time control (JSON lines)")
    args = ap.parse_args(argv)
    try:
        seed = args.seed
        specs: list[BackendSpec] = []
        if args.spec:
            seed, specs = load_spec(args.spec)
            if args.seed:
                seed = args.seed
        initial = json.loads(args.behaviour)
        if not isinstance(initial, dict):
            raise ValueError("--behaviour: expected a JSON object")
        specs += [BackendSpec(a, None, dict(initial)) for a in args.listen]
        if not specs:
            raise ValueError("no backends: give --listen IP:PORT or --spec FILE")
        asyncio.run(serve(specs, seed, args.control))
    except (ValueError, OSError) as e:
        print("testbed server: %s" % e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
