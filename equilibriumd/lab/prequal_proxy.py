"""Prequal as an HTTP/1.1 reverse proxy, for the live subset of the routing benchmark.

    python -m equilibriumd.lab.prequal_proxy --listen 127.0.0.1:9000 \\
        --backend 127.0.0.11:8080 --backend 127.0.0.12:8080 [--seed N]

Prequal (Wydrowski, Kleinberg, Rumble, NSDI 2024) picks each query's server from a
pool of recent probe answers: every query sends `r_probe` asynchronous probes to
servers drawn at random (without replacement); each answer (the server's requests
in flight, RIF, and its latency estimate at that RIF) joins the pool, which keeps at
most `m` answers, each at most `max age` old and used at most `b_reuse` times. A
probe is hot when its RIF is above the `Q_RIF` quantile of the pool's RIFs; the pick
is the cold probe with the lowest latency (`sim.peers.hcl`). The parameters and the
rule are the simulator's (equilibriumd.lab.sim.peers: PREQUAL_*), imported, so the
proxy and the simulated policy cannot drift apart.

Probes go to the servers, not through a balancer: `GET /.probe` on each test backend
(equilibriumd.lab.testbed.server answers it at once with {"rif", "latency"}), over one
keep-alive connection per backend, pipelined; the answers arrive asynchronously and
serve later queries. With an empty pool (start-up, or no answer younger than 1 s) the
backend is drawn at random.

Forwarding: client connections may be kept alive; each request gets its own upstream
connection, sent with `Connection: close` (like the bench's HAProxy: `http-reuse
never`, `option http-server-close`); request bodies by Content-Length (chunked: 501).
The response is relayed as it comes (framed by Content-Length, or up to the
upstream's close, after which the client connection is closed too).

Errors: a refused, reset or timed-out upstream gives the client 502 (504 on the
server timeout) and never stops the proxy; there is no retry on another backend.
Not in the paper, a transport detail: a failed connect to a backend also closes its
probe connection and drops its probes, so a backend that stops accepting stops being
probed (its reconnects are refused) instead of looking idle.

Output: one line `ready <listen address>` on stdout once listening, nothing per
request; SIGTERM/SIGINT close the listener and exit 0 with one summary line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence

from equilibriumd.lab.sim.peers import PREQUAL_MAX_AGE, PREQUAL_POOL, PREQUAL_PROBES, PREQUAL_REUSE, Probe, hcl

#: the probe request (testbed.server.PROBE_PATH)
PROBE_REQUEST = b"GET /.probe HTTP/1.1\r\nHost: probe\r\n\r\n"
#: connect timeouts (probe and upstream) and the upstream's response timeout: the bench's HAProxy
#: (`timeout connect 5s`, `timeout server 30s`)
CONNECT_TIMEOUT = 5.0
SERVER_TIMEOUT = 30.0
#: a client connection idle this long between requests is closed (HAProxy's `timeout client 30s`)
CLIENT_TIMEOUT = 30.0
MAX_HEADER_BYTES = 64 * 1024
RELAY_CHUNK = 64 * 1024
#: connection-level headers not forwarded (RFC 9110 section 7.6.1); Connection is rewritten
HOP_HEADERS = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade"))


def parse_addr(text: str) -> tuple[str, int]:
    """"ip:port" -> (ip, port); ValueError naming the problem."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError("address %r: expected ip:port" % text)
    host = host.strip("[]")
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        raise ValueError("address %r: %r is not an IP address" % (text, host)) from None
    return host, int(port)


class Pool:
    """The probe pool of one Prequal client (this proxy)."""

    def __init__(self, nb: int, rng: random.Random) -> None:
        self.nb = nb
        self.rng = rng
        self.probes: list[Probe] = []     # arrival order: the oldest first

    def add(self, p: Probe) -> None:
        self.probes.append(p)
        if len(self.probes) > PREQUAL_POOL:
            del self.probes[:len(self.probes) - PREQUAL_POOL]    # the oldest leave first

    def drop(self, b: int) -> None:
        self.probes = [p for p in self.probes if p.backend != b]

    def pick(self, now: float) -> int | None:
        """The backend for a query at `now` by Prequal's rule; None when no probe is fresh."""
        self.probes = [p for p in self.probes if now - p.at <= PREQUAL_MAX_AGE]
        if not self.probes:
            return None
        p = hcl(self.probes)
        p.uses += 1
        if p.uses >= PREQUAL_REUSE:
            self.probes.remove(p)
        return p.backend

    def targets(self) -> list[int]:
        """The backends this query probes: r_probe of them at random, without replacement."""
        return self.rng.sample(range(self.nb), min(PREQUAL_PROBES, self.nb))


class ProbeChannel:
    """One keep-alive connection to a backend's probe endpoint; answers go to `on_answer`."""

    def __init__(self, index: int, host: str, port: int, on_answer: Callable[[int, int, float], None]) -> None:
        self.index, self.host, self.port = index, host, port
        self.on_answer = on_answer
        self.writer: asyncio.StreamWriter | None = None
        self.pending = 0              # probes asked for while (re)connecting
        self.task: asyncio.Task[None] | None = None
        self.sent = self.answered = self.failed_connects = 0

    def send(self) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(PROBE_REQUEST)
            self.sent += 1
            return
        self.pending += 1
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run())

    def reset(self) -> None:
        """Close the connection (the next probe reconnects)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    async def _run(self) -> None:
        try:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port),
                                                        CONNECT_TIMEOUT)
            except (OSError, asyncio.TimeoutError):
                self.failed_connects += 1
                self.pending = 0                  # those probes are lost, as on a dead server
                return
            self.writer = writer
            writer.write(PROBE_REQUEST * self.pending)
            self.sent += self.pending
            self.pending = 0
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = 0
                    for line in head.split(b"\r\n")[1:]:
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value)
                    d = json.loads(await reader.readexactly(length))
                    self.answered += 1
                    self.on_answer(self.index, int(d["rif"]), float(d["latency"]))
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, KeyError,
                    TypeError):
                pass
            finally:
                writer.close()
                if self.writer is writer:
                    self.writer = None
        finally:
            self.task = None


class PrequalProxy:
    """The proxy: a listener, the probe pool, one probe channel per backend."""

    def __init__(self, backends: Sequence[tuple[str, int]], seed: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not backends:
            raise ValueError("no backends")
        self.backends = list(backends)
        self.clock = clock
        self.rng = random.Random(seed)
        self.pool = Pool(len(self.backends), self.rng)
        self.channels = [ProbeChannel(i, h, p, self._answer) for i, (h, p) in enumerate(self.backends)]
        self.server: asyncio.base_events.Server | None = None
        self.clients: set[asyncio.Task[None]] = set()
        self.requests = [0] * len(self.backends)   # forwarded, per backend
        self.failed = [0] * len(self.backends)     # answered 502/504 for this backend
        self.random_picks = 0

    def _answer(self, b: int, rif: int, latency: float) -> None:
        self.pool.add(Probe(b, rif, latency, self.clock()))

    def choose(self) -> int:
        """This query's backend (Prequal's pick, random on an empty pool), then its probes."""
        b = self.pool.pick(self.clock())
        if b is None:
            b = self.rng.randrange(len(self.backends))
            self.random_picks += 1
        for x in self.pool.targets():
            self.channels[x].send()
        return b

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._client, host, port, reuse_address=True, backlog=4096,
                                                 limit=MAX_HEADER_BYTES)
        addr = self.server.sockets[0].getsockname()
        return addr[0], addr[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for t in list(self.clients):
            t.cancel()
        await asyncio.gather(*self.clients, return_exceptions=True)
        for c in self.channels:
            c.reset()
            if c.task is not None:
                c.task.cancel()

    def summary(self) -> str:
        return ("prequal_proxy: requests %s, 5xx from the proxy %s, random picks %d, probes sent %d answered %d"
                % (self.requests, self.failed, self.random_picks, sum(c.sent for c in self.channels),
                   sum(c.answered for c in self.channels)))

    # -- one client connection ------------------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.clients.add(task)
        try:
            while await self._one(reader, writer):
                pass
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError):
            pass
        finally:
            self.clients.discard(task)
            writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; True to read another on this connection."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CLIENT_TIMEOUT)
        except asyncio.IncompleteReadError:
            return False                           # the client closed between requests
        lines = head[:-4].split(b"\r\n")
        parts = lines[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            await self._error(writer, 400)
            return False
        method, version = parts[0], parts[2]
        length, conn, headers = 0, b"", []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                await self._error(writer, 400)
                return False
            key = name.strip().lower()
            if key == b"content-length":
                if not value.strip().isdigit():
                    await self._error(writer, 400)
                    return False
                length = int(value)
            elif key == b"transfer-encoding" and value.strip().lower() != b"identity":
                await self._error(writer, 501)
                return False
            if key == b"connection":
                conn = value.lower()
            if key not in HOP_HEADERS:
                headers.append(line)
        body = await reader.readexactly(length) if length else b""
        keep = b"close" not in conn if version == b"HTTP/1.1" else b"keep-alive" in conn
        request = b"\r\n".join([lines[0]] + headers + [b"Connection: close", b"", b""]) + body
        b = self.choose()
        self.requests[b] += 1
        return await self._forward(b, request, method == b"HEAD", writer, keep)

    async def _forward(self, b: int, request: bytes, head_only: bool, writer: asyncio.StreamWriter,
                       keep: bool) -> bool:
        host, port = self.backends[b]
        try:
            ur, uw = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT)
        except (OSError, asyncio.TimeoutError):
            self.failed[b] += 1
            self.channels[b].reset()        # stop trusting this backend's probe connection
            self.pool.drop(b)
            await self._error(writer, 502)
            return False
        try:
            uw.write(request)
            try:
                rhead = await asyncio.wait_for(ur.readuntil(b"\r\n\r\n"), SERVER_TIMEOUT)
            except asyncio.TimeoutError:
                self.failed[b] += 1
                await self._error(writer, 504)
                return False
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                self.failed[b] += 1         # reset or closed before a response
                await self._error(writer, 502)
                return False
            rlines = rhead[:-4].split(b"\r\n")
            status_parts = rlines[0].split()
            status = int(status_parts[1]) if len(status_parts) > 1 and status_parts[1].isdigit() else 502
            length: int | None = None
            out = [rlines[0]]
            for line in rlines[1:]:
                key = line.partition(b":")[0].strip().lower()
                if key == b"content-length":
                    length = int(line.partition(b":")[2])
                elif key == b"transfer-encoding":
                    length = None   # relayed up to the close: the client connection closes after it
                if key not in HOP_HEADERS:
                    out.append(line)
            if head_only or status in (204, 304) or 100 <= status < 200:
                length = 0
            keep = keep and length is not None
            out += [b"Connection: keep-alive" if keep else b"Connection: close", b"", b""]
            writer.write(b"\r\n".join(out))
            left = length
            while left is None or left > 0:
                chunk = await asyncio.wait_for(ur.read(RELAY_CHUNK if left is None else min(left, RELAY_CHUNK)),
                                               SERVER_TIMEOUT)
                if not chunk:
                    if left is not None:           # cut short: the client cannot reuse this connection
                        keep = False
                    break
                writer.write(chunk)
                if left is not None:
                    left -= len(chunk)
                await writer.drain()
            await writer.drain()
            return keep
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ValueError):
            return False                           # mid-response: the head is out, only closing is left
        finally:
            uw.close()

    @staticmethod
    async def _error(writer: asyncio.StreamWriter, status: int) -> None:
        reason = {400: "Bad Request", 501: "Not Implemented", 502: "Bad Gateway", 504: "Gateway Timeout"}[status]
        writer.write(b"HTTP/1.1 %d %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n" % (status, reason.encode()))
        try:
            await writer.drain()
        except OSError:
            pass


async def serve(listen: tuple[str, int], backends: Sequence[tuple[str, int]], seed: int) -> None:
    proxy = PrequalProxy(backends, seed)
    host, port = await proxy.start(*listen)
    print("ready %s:%d" % (host, port), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await proxy.close()
    print(proxy.summary(), file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m equilibriumd.lab.prequal_proxy",
                                 description=(__doc__ or "").split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", required=True, metavar="IP:PORT", help="where clients connect (port 0: any)")
    ap.add_argument("--backend", action="append", default=[], metavar="IP:PORT",
                    help="a test backend (answers GET /.probe); repeatable")
    ap.add_argument("--seed", type=int, default=0, help="seed of the probe targets and the random picks")
    args = ap.parse_args(argv)
    try:
        listen = parse_addr(args.listen)
        backends = [parse_addr(b) for b in args.backend]
        if not backends:
            raise ValueError("no backends: give --backend IP:PORT")
        asyncio.run(serve(listen, backends, args.seed))
    except (ValueError, OSError) as e:
        print("prequal_proxy: %s" % e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
