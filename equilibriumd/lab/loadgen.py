"""Open-loop HTTP load generator: every request a new connection, a routing decision.

    python -m equilibriumd.lab.loadgen --cgroup /sys/fs/cgroup/unified/eqdemo-1 \\
        --target bus=127.77.0.11:80@200 --target user=127.77.0.13:80@50 \\
        --duration 80 --out records.jsonl

Moves itself into `--cgroup` first (so the datapath attached there steers its
connects), then starts requests at a fixed rate per target: Poisson arrivals
by default, or evenly spaced (`--arrivals constant`). Open loop: an arrival
starts its request on schedule whatever the earlier ones are doing, so a slow
backend cannot slow the offered load down (coordinated omission). Each
request is `GET / HTTP/1.1` with `Connection: close` on a fresh TCP
connection, read to EOF, abandoned after `--timeout` seconds.

Output (`--out`, default stdout): first `{"start": T}` (CLOCK_MONOTONIC when
sending began), then one JSON object per finished request, in completion order,

    {"t": 1234.5678, "s": "bus", "b": "bus-1", "lat": 0.0012, "st": 200}

t      CLOCK_MONOTONIC (time.monotonic(), shared by every process on the host)
       when the request was started (before connect)
s      target name
b      the X-Backend response header (the backend that served it), null if none
lat    seconds from connect() to the end of the response (EOF)
st     HTTP status, or 0 for a failure; then "err" names it (timeout, refused,
       unreachable, reset, closed, bad-response, ...)

On exit (end of `--duration`, SIGTERM, SIGINT or EOF on stdin with
`--stdin-stop`) it waits up to `--timeout` for requests in flight, then writes
a last line `{"summary": {...}}` with per-target counts, achieved rates and the
scheduling lag (how late arrivals started: the proof the loop stayed open).
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
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import IO, Any

REQUEST = b"GET / HTTP/1.1\r\nHost: %s\r\nUser-Agent: equilibrium-loadgen\r\nConnection: close\r\n\r\n"
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
        return {"sent": self.sent, "ok": self.ok, "errors": dict(self.errors), "skipped": self.skipped,
                "offered_rate": self.rate, "achieved_rate": round(self.sent / seconds, 2) if seconds > 0 else 0.0,
                "max_inflight": self.max_inflight, "lag_max_seconds": round(self.lag_max, 4),
                "lag_mean_seconds": round(self.lag_sum / self.sent, 5) if self.sent else 0.0}


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


def _error_name(e: BaseException) -> str:
    if isinstance(e, (asyncio.TimeoutError, TimeoutError)):
        return "timeout"
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
                 max_inflight: int = 4000, seed: int | None = None) -> None:
        self.targets = targets
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
        flusher.cancel()
        self._flush()
        secs = t_stop - t_start
        return {"seconds": round(secs, 3), "arrivals": self.arrivals, "timeout_seconds": self.timeout,
                "targets": {t.name: t.summary(secs) for t in self.targets}}

    def _launch(self, t: Target, due: float, now: float) -> None:
        if self.inflight >= self.max_inflight:
            t.skipped += 1
            return
        lag = now - due
        t.lag_max = max(t.lag_max, lag)
        t.lag_sum += lag
        t.sent += 1
        task = asyncio.get_running_loop().create_task(self._one(t))
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
    ap.add_argument("--seed", type=int, help="RNG seed for the Poisson arrivals")
    ap.add_argument("--out", help="write records here (default stdout)")
    ap.add_argument("--stdin-stop", action="store_true", help="stop when stdin reaches EOF")
    a = ap.parse_args(argv)
    names = [t.name for t in a.target]
    if len(set(names)) != len(names):
        ap.error("target names must be unique")
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
    gen = LoadGen(a.target, out, timeout=a.timeout, arrivals=a.arrivals, max_inflight=a.max_inflight, seed=a.seed)
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
