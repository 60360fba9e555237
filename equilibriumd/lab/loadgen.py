"""Open-loop HTTP load generator: a new connection per request, or keep-alive pools.

    python -m equilibriumd.lab.loadgen --cgroup /sys/fs/cgroup/unified/eqdemo-1 \\
        --target bus=127.77.0.11:80@200 --target user=127.77.0.13:80@50 \\
        --duration 80 --out records.jsonl [--clients pooled --pools 8 --pool-size 8]

Moves itself into `--cgroup` first (so the datapath attached there steers its
connects), then starts requests at a fixed rate per target: Poisson arrivals
by default, or evenly spaced (`--arrivals constant`). Open loop: an arrival
starts its request on schedule whatever the earlier ones are doing, so a slow
backend cannot slow the offered load down (coordinated omission). Each
request is `GET / HTTP/1.1`, abandoned after `--timeout` seconds from its
arrival.

`--clients new` (the default): every request on a fresh TCP connection with
`Connection: close`, read to EOF, so every request is a routing decision.

`--clients pooled`: every target has `--pools` client pools (the client
processes of a service calling it) of at most `--pool-size` HTTP/1.1
keep-alive connections; an arrival goes to one pool at random. As urllib3
and Go's net/http do, a request takes the most recently returned idle
connection (LIFO), else opens a new one if the pool is below its size, else
waits (FIFO) for one to come back; the wait counts in its latency. An idle
connection is checked before reuse (poll for POLLIN|POLLERR|POLLHUP|POLLRDHUP:
a peer that closed or reset it, e.g. the agent's rebalancer): a dead one is
replaced without failing the request, which opens a new connection in its
place as urllib3 does (counted as `dead_replaced`, by the backend it was
connected to; a dead connection stays in the stack until a request takes it). A request that fails on a connection that
passed the check is a failed request like any other; nothing is retried. The
kernel steers only the connects, so the pools' new connections are the
routing decisions; records still carry the backend of every request.

Output (`--out`, default stdout): first `{"start": T}` (CLOCK_MONOTONIC when
sending began), then one JSON object per finished request, in completion order,

    {"t": 1234.5678, "s": "bus", "b": "bus-1", "lat": 0.0012, "st": 200}

t      CLOCK_MONOTONIC (time.monotonic(), shared by every process on the host)
       when the request arrived (before connect, or before asking its pool)
s      target name
b      the X-Backend response header (the backend that served it), null if none
lat    seconds from the arrival to the end of the response (EOF, or the end of
       its Content-Length on a pooled connection): connect or pool wait included
st     HTTP status, or 0 for a failure; then "err" names it (timeout, refused,
       unreachable, reset, closed, bad-response, ...)
reused (pooled only) true if the request went on a pooled connection that had
       carried a request before, false if on one opened for it
c      (pooled only) the connection's number (per target, from 1)

On exit (end of `--duration`, SIGTERM, SIGINT or EOF on stdin with
`--stdin-stop`) it waits up to `--timeout` for requests in flight, then writes
a last line `{"summary": {...}}` with per-target counts, achieved rates and the
scheduling lag (how late arrivals started: the proof the loop stayed open);
pooled, also connections opened, requests on reused connections, dead
connections replaced, waits for a connection and the pools' peak size.
Exit status 0, or 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import os
import random
import resource
import select
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import IO, Any

REQUEST = b"GET / HTTP/1.1\r\nHost: %s\r\nUser-Agent: equilibrium-loadgen\r\nConnection: close\r\n\r\n"
#: --clients pooled: HTTP/1.1 keeps the connection open by default
REQUEST_KEEPALIVE = b"GET / HTTP/1.1\r\nHost: %s\r\nUser-Agent: equilibrium-loadgen\r\n\r\n"
CLIENTS = ("new", "pooled")
#: poll events that make an idle keep-alive connection unusable: the peer closed (FIN: readable,
#: RDHUP), reset or aborted it (ERR, HUP), or sent bytes nobody asked for (readable)
_DEAD = select.POLLIN | select.POLLERR | select.POLLHUP | select.POLLNVAL | getattr(select, "POLLRDHUP", 0x2000)
#: Launch granularity: arrivals due within this many seconds start together.
TICK = 0.002
MAX_RESPONSE = 1 << 16


@dataclass
class Target:
    name: str
    host: str
    port: int
    rate: float
    sent: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    skipped: int = 0            # arrivals not started because max in-flight was reached
    inflight: int = 0
    max_inflight: int = 0
    lag_max: float = 0.0
    lag_sum: float = 0.0
    # --clients pooled
    pools: list["_Pool"] = field(default_factory=list, repr=False)
    opened: int = 0             # connections opened
    reused: int = 0             # requests sent on a connection that had carried one before
    dead_replaced: int = 0      # idle connections found closed or reset before reuse (not failures)
    dead_by_backend: dict[str, int] = field(default_factory=dict)
    waited: int = 0             # requests that waited for a connection (the pool full and busy)
    wait_max: float = 0.0

    @classmethod
    def parse(cls, text: str) -> "Target":
        """NAME=IP:PORT@RATE"""
        try:
            name, rest = text.split("=", 1)
            addr, rate = rest.rsplit("@", 1)
            host, port = addr.rsplit(":", 1)
            t = cls(name.strip(), host.strip("[]"), int(port), float(rate))
        except ValueError:
            raise argparse.ArgumentTypeError("target %r: expected NAME=IP:PORT@RATE" % text) from None
        if not t.name or t.rate <= 0 or not 0 < t.port < 65536:
            raise argparse.ArgumentTypeError("target %r: need a name, a port and a rate > 0" % text)
        return t

    def summary(self, seconds: float) -> dict[str, Any]:
        out = {"sent": self.sent, "ok": self.ok, "errors": dict(self.errors), "skipped": self.skipped,
               "offered_rate": self.rate, "achieved_rate": round(self.sent / seconds, 2) if seconds > 0 else 0.0,
               "max_inflight": self.max_inflight, "lag_max_seconds": round(self.lag_max, 4),
               "lag_mean_seconds": round(self.lag_sum / self.sent, 5) if self.sent else 0.0}
        if self.pools:
            out.update(pools=len(self.pools), pool_size=self.pools[0].size, connections_opened=self.opened,
                       requests_reused=self.reused, dead_replaced=self.dead_replaced,
                       dead_replaced_by_backend=dict(sorted(self.dead_by_backend.items())),
                       waited=self.waited, wait_max_seconds=round(self.wait_max, 4),
                       pool_peak=max(p.peak for p in self.pools))
        return out


class _Exchange(asyncio.Protocol):
    """One request on one connection: write it, read the response to EOF."""

    def __init__(self, request: bytes, done: asyncio.Future[bytes | None]) -> None:
        self.request = request
        self.done = done
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if len(self.buf) < MAX_RESPONSE:
            self.buf += data

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            if exc is not None and not self.buf:
                self.done.set_exception(exc)
            else:
                self.done.set_result(bytes(self.buf))


def parse_response(data: bytes) -> tuple[int, str | None]:
    """(status, X-Backend) of a raw HTTP/1.x response; status 0 if unparseable."""
    head = data.split(b"\r\n\r\n", 1)[0]
    lines = head.split(b"\r\n")
    parts = lines[0].split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        return 0, None
    backend = None
    for line in lines[1:]:
        k, sep, v = line.partition(b":")
        if sep and k.strip().lower() == b"x-backend":
            backend = v.strip().decode(errors="replace")
            break
    return int(parts[1]), backend


class PeerClosed(ConnectionError):
    """The peer closed a pooled connection before the response was complete."""


def response_head(buf: bytes | bytearray) -> tuple[int | None, bool] | None:
    """(total length or None without Content-Length, keep-alive) of the HTTP/1.x
    response at the start of `buf`; None while its head is incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    length = None
    keep = True
    for line in bytes(buf[:end]).split(b"\r\n")[1:]:
        k, sep, v = line.partition(b":")
        if not sep:
            continue
        k = k.strip().lower()
        if k == b"content-length" and v.strip().isdigit():
            length = int(v.strip())
        elif k == b"connection" and b"close" in v.lower():
            keep = False
    return (None if length is None else end + 4 + length), keep


def response_end(buf: bytes | bytearray) -> tuple[int, bool] | None:
    """(length, keep-alive) of the complete response at the start of `buf`, None while
    incomplete (a response without Content-Length ends at EOF: not here)."""
    head = response_head(buf)
    if head is None or head[0] is None or len(buf) < head[0]:
        return None
    return head[0], head[1]


class _PooledConn(asyncio.Protocol):
    """One keep-alive connection of a pool: one request at a time, responses by Content-Length."""

    def __init__(self, cid: int) -> None:
        self.id = cid
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[bytes, bool]] | None = None
        self.dead = False
        self.dropped = False      # no longer counted in its pool
        self.backend: str | None = None
        self.uses = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send(self, request: bytes) -> asyncio.Future[tuple[bytes, bool]]:
        """Write a request; the future is (response bytes, connection reusable)."""
        assert self.transport is not None and (self.waiter is None or self.waiter.done())
        self.waiter = asyncio.get_running_loop().create_future()
        self.buf.clear()
        self.uses += 1
        self.transport.write(request)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        w = self.waiter
        if w is None or w.done():   # bytes nobody asked for: the connection is unusable
            self._die()
            return
        self.buf += data
        got = response_end(self.buf)
        if got is not None:
            n, keep = got
            w.set_result((bytes(self.buf[:n]), keep and len(self.buf) == n))
            del self.buf[:n]
        elif len(self.buf) > MAX_RESPONSE:
            w.set_result((bytes(self.buf), False))

    def eof_received(self) -> bool:
        w = self.waiter
        if w is not None and not w.done():
            head = response_head(self.buf)
            if head is not None and head[0] is None:
                w.set_result((bytes(self.buf), False))   # no Content-Length: the body ends at EOF
            else:
                w.set_exception(PeerClosed("the peer closed the connection"))
        self._die()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_exception(exc if exc is not None else PeerClosed("the connection was closed"))
        self._die()

    def _die(self) -> None:
        """Closed or broken (peer FIN, RST, abort). An idle one stays where it is in its
        pool's stack, as in urllib3: the check before reuse finds it."""
        self.abort()

    def usable(self) -> bool:
        """The check before reuse: open, and nothing to read or report on the socket."""
        if self.dead or self.transport is None or self.transport.is_closing():
            return False
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return False
        p = select.poll()
        p.register(sock.fileno(), _DEAD)
        return not p.poll(0)

    def abort(self) -> None:
        self.dead = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()


class _Pool:
    """A client's pool of at most `size` keep-alive connections to one target, as urllib3's
    HTTPConnectionPool: a LIFO stack of idle connections, FIFO waiters, connections opened
    on demand. A connection that dies while idle stays in the stack until a request takes
    it: the check then fails, and that request opens a new connection in its place."""

    def __init__(self, target: Target, size: int) -> None:
        self.target = target
        self.size = size
        self.idle: list[_PooledConn] = []          # the top (most recently returned) is last
        self.n = 0                                 # connections counted: idle, busy or connecting
        self.peak = 0
        self.waiters: deque[asyncio.Future[_PooledConn | None]] = deque()
        self.all: set[_PooledConn] = set()

    async def acquire(self) -> tuple[_PooledConn, bool]:
        """(a connection, reused?): an idle one that passes the check, a new one, or the
        next one returned (None handed over: a slot freed, so open one)."""
        t = self.target
        waited_since: float | None = None
        while True:
            if self.idle:
                c = self.idle.pop()
                if c.usable():
                    return self._took(c, waited_since)
                self._replace(c)
                return await self._open(waited_since), False
            if self.n < self.size:
                return await self._open(waited_since), False
            fut: asyncio.Future[_PooledConn | None] = asyncio.get_running_loop().create_future()
            self.waiters.append(fut)
            if waited_since is None:
                waited_since = time.monotonic()
                t.waited += 1
            try:
                got = await fut
            except BaseException:
                if fut.done() and not fut.cancelled():   # handed over as we were cancelled: pass it on
                    c0 = fut.result()
                    if c0 is None:
                        self._hand(None)
                    else:
                        self.release(c0, True)
                else:
                    fut.cancel()
                raise
            if got is None:
                continue
            if got.usable():
                return self._took(got, waited_since)
            self._replace(got)
            return await self._open(waited_since), False

    def _took(self, c: _PooledConn, waited_since: float | None) -> tuple[_PooledConn, bool]:
        if waited_since is not None:
            self.target.wait_max = max(self.target.wait_max, time.monotonic() - waited_since)
        return c, c.uses > 0

    async def _open(self, waited_since: float | None) -> _PooledConn:
        t = self.target
        self.n += 1
        self.peak = max(self.peak, self.n)
        t.opened += 1
        c = _PooledConn(t.opened)
        try:
            await asyncio.get_running_loop().create_connection(lambda: c, t.host, t.port)
        except BaseException:
            c.dead = True
            self._drop(c)
            raise
        self.all.add(c)
        if waited_since is not None:
            t.wait_max = max(t.wait_max, time.monotonic() - waited_since)
        return c

    def _replace(self, c: _PooledConn) -> None:
        """An idle connection found dead before reuse: counted by its backend, dropped."""
        t = self.target
        t.dead_replaced += 1
        key = c.backend or "?"
        t.dead_by_backend[key] = t.dead_by_backend.get(key, 0) + 1
        c.abort()
        self._drop(c)

    def _drop(self, c: _PooledConn) -> None:
        if c.dropped:
            return
        c.dropped = True
        self.all.discard(c)
        self.n -= 1
        self._hand(None)             # a waiter may open a connection in its place

    def _hand(self, c: _PooledConn | None) -> bool:
        while self.waiters:
            f = self.waiters.popleft()
            if not f.done():
                f.set_result(c)
                return True
        return False

    def release(self, c: _PooledConn, keep: bool) -> None:
        """A request is done with `c`: back to the pool, or closed if it cannot carry another."""
        if not keep or c.dead:
            c.abort()
            self._drop(c)
            return
        if not self._hand(c):
            self.idle.append(c)

    def close(self) -> None:
        for c in list(self.all):
            if c.transport is not None and not c.transport.is_closing():
                c.dead = True
                c.transport.close()


def _error_name(e: BaseException) -> str:
    if isinstance(e, (asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(e, PeerClosed):
        return "closed"
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, ConnectionResetError):
        return "reset"
    if isinstance(e, OSError):
        if e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return "unreachable"
        if e.errno == errno.EADDRNOTAVAIL:
            return "no-port"
        if e.errno == errno.EMFILE:
            return "no-fd"
        return errno.errorcode.get(e.errno or 0, "oserror").lower()
    return type(e).__name__


class LoadGen:
    def __init__(self, targets: list[Target], out: IO[str], timeout: float = 2.0, arrivals: str = "poisson",
                 max_inflight: int = 4000, seed: int | None = None, clients: str = "new", pools: int = 8,
                 pool_size: int = 8) -> None:
        if clients not in CLIENTS:
            raise ValueError("clients must be one of %s" % ", ".join(CLIENTS))
        self.targets = targets
        self.clients = clients
        if clients == "pooled":
            for t in targets:
                t.pools = [_Pool(t, pool_size) for _ in range(pools)]
        self.out = out
        self.timeout = timeout
        self.arrivals = arrivals
        self.max_inflight = max_inflight
        self.rng = random.Random(seed)
        self.inflight = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.stop = asyncio.Event()
        self.lines: list[str] = []

    def _gap(self, t: Target) -> float:
        return self.rng.expovariate(t.rate) if self.arrivals == "poisson" else 1.0 / t.rate

    async def run(self, duration: float | None) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        t_start = time.monotonic()
        nxt = {t.name: t_start + self._gap(t) for t in self.targets}
        end = t_start + duration if duration else float("inf")
        self.out.write(json.dumps({"start": round(t_start, 6)}) + "\n")
        self.out.flush()
        flusher = loop.create_task(self._flush_every(0.2))
        while not self.stop.is_set():
            now = time.monotonic()
            if now >= end:
                break
            for t in self.targets:
                due = nxt[t.name]
                while due <= now and due < end:
                    self._launch(t, due, now)
                    due += self._gap(t)
                nxt[t.name] = due
            wake = min(min(nxt.values()), end)
            try:
                await asyncio.wait_for(self.stop.wait(), max(TICK, wake - time.monotonic()))
            except asyncio.TimeoutError:
                pass
        t_stop = time.monotonic()
        if self.tasks:  # let the requests in flight finish (they time out by themselves)
            await asyncio.wait(set(self.tasks), timeout=self.timeout + 1.0)
        for t in self.targets:
            for p in t.pools:
                p.close()
        flusher.cancel()
        self._flush()
        secs = t_stop - t_start
        return {"seconds": round(secs, 3), "arrivals": self.arrivals, "timeout_seconds": self.timeout,
                "clients": self.clients, "targets": {t.name: t.summary(secs) for t in self.targets}}

    def _launch(self, t: Target, due: float, now: float) -> None:
        if self.inflight >= self.max_inflight:
            t.skipped += 1
            return
        lag = now - due
        t.lag_max = max(t.lag_max, lag)
        t.lag_sum += lag
        t.sent += 1
        coro = self._one_pooled(t, self.rng.choice(t.pools)) if t.pools else self._one(t)
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _one(self, t: Target) -> None:
        loop = asyncio.get_running_loop()
        self.inflight += 1
        t.inflight += 1
        t.max_inflight = max(t.max_inflight, t.inflight)
        t0 = time.monotonic()
        rec: dict[str, Any] = {"t": round(t0, 6), "s": t.name}
        transport: asyncio.Transport | None = None
        done: asyncio.Future[bytes | None] = loop.create_future()
        try:
            req = REQUEST % t.name.encode()
            async with asyncio.timeout(self.timeout) if hasattr(asyncio, "timeout") else _Timeout(self.timeout):
                tr, _ = await loop.create_connection(lambda: _Exchange(req, done), t.host, t.port)
                transport = tr  # type: ignore[assignment]
                data = await done
            status, backend = parse_response(data or b"")
            rec.update(b=backend, lat=round(time.monotonic() - t0, 6), st=status)
            if status == 0:
                rec["err"] = "closed" if not data else "bad-response"
        except (OSError, asyncio.TimeoutError, TimeoutError) as e:
            rec.update(b=None, lat=round(time.monotonic() - t0, 6), st=0, err=_error_name(e))
        finally:
            if transport is not None and not transport.is_closing():
                transport.abort()
            if done.done() and not done.cancelled():
                done.exception()  # retrieved: no "never retrieved" warning after a timeout
            self.inflight -= 1
            t.inflight -= 1
        self._record(t, rec)

    async def _one_pooled(self, t: Target, pool: _Pool) -> None:
        """One request on a pooled keep-alive connection (see the module docstring)."""
        self.inflight += 1
        t.inflight += 1
        t.max_inflight = max(t.max_inflight, t.inflight)
        t0 = time.monotonic()
        rec: dict[str, Any] = {"t": round(t0, 6), "s": t.name}
        conn: _PooledConn | None = None
        fut: asyncio.Future[tuple[bytes, bool]] | None = None
        try:
            req = REQUEST_KEEPALIVE % t.name.encode()
            async with asyncio.timeout(self.timeout) if hasattr(asyncio, "timeout") else _Timeout(self.timeout):
                conn, reused = await pool.acquire()
                rec.update(reused=reused, c=conn.id)
                if reused:
                    t.reused += 1
                fut = conn.send(req)   # right after the check in acquire(): no await in between
                data, keep = await fut
            status, backend = parse_response(data)
            rec.update(b=backend, lat=round(time.monotonic() - t0, 6), st=status)
            if backend is not None:
                conn.backend = backend
            if status == 0:
                rec["err"] = "bad-response"
            pool.release(conn, keep and status != 0)
            conn = None
        except (OSError, asyncio.TimeoutError, TimeoutError) as e:
            rec.update(b=None, lat=round(time.monotonic() - t0, 6), st=0, err=_error_name(e))
        finally:
            if conn is not None:   # failed or abandoned mid-request: it cannot carry another one
                pool.release(conn, False)
            if fut is not None and fut.done() and not fut.cancelled():
                fut.exception()  # retrieved: no "never retrieved" warning after a timeout
            self.inflight -= 1
            t.inflight -= 1
        # keep the record's first fields in the order of --clients new
        self._record(t, {k: rec[k] for k in ("t", "s", "b", "lat", "st", "err", "reused", "c") if k in rec})

    def _record(self, t: Target, rec: dict[str, Any]) -> None:
        if rec["st"] == 200:
            t.ok += 1
        else:
            key = rec.get("err") or str(rec["st"])
            t.errors[key] = t.errors.get(key, 0) + 1
        self.lines.append(json.dumps(rec, separators=(",", ":")))

    async def _flush_every(self, period: float) -> None:
        while True:
            await asyncio.sleep(period)
            self._flush()

    def _flush(self) -> None:
        if self.lines:
            self.out.write("\n".join(self.lines) + "\n")
            self.out.flush()
            self.lines.clear()


class _Timeout:
    """asyncio.timeout for Python < 3.11."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.handle: asyncio.TimerHandle | None = None
        self.fired = False

    async def __aenter__(self) -> "_Timeout":
        task = asyncio.current_task()
        assert task is not None

        def fire() -> None:
            self.fired = True
            task.cancel()
        self.handle = asyncio.get_running_loop().call_later(self.seconds, fire)
        return self

    async def __aexit__(self, et: Any, ev: Any, tb: Any) -> bool:
        assert self.handle is not None
        self.handle.cancel()
        if self.fired and et is asyncio.CancelledError:
            raise asyncio.TimeoutError()
        return False


def join_cgroup(path: str) -> None:
    """Move this process into the cgroup `path` (a child of a cgroup2 hierarchy)."""
    with open(os.path.join(path, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
    with open("/proc/self/cgroup") as f:
        mine = [line.strip()[3:] for line in f if line.startswith("0::")]
    if mine and not path.rstrip("/").endswith(mine[0].rstrip("/")):
        raise SystemExit("loadgen: still in cgroup %s after joining %s" % (mine[0], path))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m equilibriumd.lab.loadgen", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", action="append", type=Target.parse, required=True,
                    help="NAME=IP:PORT@RATE (requests per second); repeat for several services")
    ap.add_argument("--cgroup", help="join this cgroup (a directory in a cgroup2 hierarchy) before sending")
    ap.add_argument("--duration", type=float, default=0.0, help="seconds to send for (0: until signalled)")
    ap.add_argument("--timeout", type=float, default=2.0, help="seconds before a request is abandoned (default 2)")
    ap.add_argument("--arrivals", choices=("poisson", "constant"), default="poisson")
    ap.add_argument("--max-inflight", type=int, default=4000, help="arrivals beyond this many in flight are skipped")
    ap.add_argument("--seed", type=int, help="RNG seed for the Poisson arrivals (and the pool each one goes to)")
    ap.add_argument("--clients", choices=CLIENTS, default="new",
                    help="new: a new connection per request (Connection: close; the default); pooled: keep-alive "
                         "pools per target, connections reused (see above)")
    ap.add_argument("--pools", type=int, default=8, help="--clients pooled: pools per target (default 8)")
    ap.add_argument("--pool-size", type=int, default=8,
                    help="--clients pooled: most connections a pool holds (default 8)")
    ap.add_argument("--out", help="write records here (default stdout)")
    ap.add_argument("--stdin-stop", action="store_true", help="stop when stdin reaches EOF")
    a = ap.parse_args(argv)
    names = [t.name for t in a.target]
    if len(set(names)) != len(names):
        ap.error("target names must be unique")
    if a.pools < 1 or a.pool_size < 1:
        ap.error("--pools and --pool-size must be at least 1")
    if a.cgroup:
        join_cgroup(a.cgroup)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    out = open(a.out, "w", buffering=1 << 16) if a.out else sys.stdout
    try:
        return asyncio.run(_amain(a, out))
    finally:
        if a.out:
            out.close()


async def _amain(a: argparse.Namespace, out: IO[str]) -> int:
    loop = asyncio.get_running_loop()
    gen = LoadGen(a.target, out, timeout=a.timeout, arrivals=a.arrivals, max_inflight=a.max_inflight, seed=a.seed,
                  clients=a.clients, pools=a.pools, pool_size=a.pool_size)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, gen.stop.set)
    if a.stdin_stop:
        loop.add_reader(sys.stdin.fileno(), lambda: None if os.read(sys.stdin.fileno(), 4096) else gen.stop.set())
    summary = await gen.run(a.duration or None)
    out.write(json.dumps({"summary": summary}, separators=(",", ":")) + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
