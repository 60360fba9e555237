"""`TestBackends`: start a test-backend server process and steer it from Python.

    with TestBackends(3, behaviour={"latency": 0.01}) as tb:
        tb.addrs                       # ["127.0.42.11:40001", ...]
        tb.set(1, error_ratio=0.3)     # applied (and acknowledged) before it returns
        tb.set("127.0.42.13:40003", refuse=True)
        tb.stats(1)["responses"]       # {"200": 70, "503": 30}

The server (`equilibriumd.lab.testbed.server`) runs in its own process so tests
and load generators in this one do not compete with it for the GIL; it is
stopped by its PID only, on close(), on leaving the `with` block and when
start-up fails. Control goes over a unix socket (JSON lines) in a private
temporary directory, which also works for a server in another network
namespace (`netns=`: started with `ip netns exec NAME`).
"""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[3])


class TestBackendsError(RuntimeError):
    """The server process failed to start or stopped answering."""


class TestBackends:
    """A set of configurable HTTP backends served by one child process.

    listen      number of backends (on 127.0.R.11, .12, ... with a random R and
                ephemeral ports) or explicit "ip:port" addresses (port 0: any)
    behaviour   initial behaviour of every backend (see testbed.behaviour.Behaviour)
    behaviours  initial behaviour per backend (overrides `behaviour` key by key)
    names       backend names (the X-Backend response header); default "ip:port"
    seed        RNG seed: backend i draws from (seed, i)
    netns       run the server inside this network namespace
    """

    __test__ = False  # a library class, not a pytest test class

    def __init__(self, listen: int | Sequence[str] = 3, *, behaviour: Mapping[str, Any] | None = None,
                 behaviours: Sequence[Mapping[str, Any]] | None = None, names: Sequence[str] | None = None,
                 seed: int = 0, netns: str | None = None, startup_timeout: float = 10.0,
                 python: str = sys.executable) -> None:
        if isinstance(listen, int):
            net = random.randint(1, 254)
            listen = ["127.0.%d.%d:0" % (net, 11 + i) for i in range(listen)]
        listen = list(listen)
        if behaviours is not None and len(behaviours) != len(listen):
            raise ValueError("behaviours: %d given for %d backends" % (len(behaviours), len(listen)))
        if names is not None and len(names) != len(listen):
            raise ValueError("names: %d given for %d backends" % (len(names), len(listen)))
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._ctl: socket.socket | None = None
        self._ctl_in: Any = None
        self._dir = tempfile.mkdtemp(prefix="eqtb-")
        self.netns = netns
        try:
            spec = {"seed": seed, "backends": [
                {"listen": addr,
                 "name": names[i] if names else None,
                 "behaviour": {**(behaviour or {}), **(behaviours[i] if behaviours else {})}}
                for i, addr in enumerate(listen)]}
            spec_path = os.path.join(self._dir, "spec.json")
            with open(spec_path, "w") as f:
                json.dump(spec, f)
            self.control_path = os.path.join(self._dir, "ctl.sock")
            self._log_path = os.path.join(self._dir, "server.log")
            cmd = [python, "-m", "equilibriumd.lab.testbed.server", "--spec", spec_path,
                   "--control", self.control_path]
            if netns:
                cmd = ["ip", "netns", "exec", netns] + cmd  # ip execs the command: same PID
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                p for p in (_PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p))
            with open(self._log_path, "wb") as log:
                self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                              env=env)
            ready = self._read_ready(startup_timeout)
            self.backends: list[dict[str, Any]] = json.loads(ready)
            self._connect()
        except BaseException:
            self.close()
            raise

    # -- start and stop -----------------------------------------------------

    def _read_ready(self, timeout: float) -> str:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        data = b""
        while b"\n" not in data:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TestBackendsError("test backends not ready after %.1fs%s" % (timeout, self._log_tail()))
            r, _, _ = select.select([fd], [], [], left)
            if r:
                chunk = os.read(fd, 65536)
                if not chunk:
                    self._proc.wait(timeout=5)
                    raise TestBackendsError("test backend server exited (rc=%s) before it was ready%s"
                                            % (self._proc.returncode, self._log_tail()))
                data += chunk
        line = data.split(b"\n", 1)[0].decode()
        if not line.startswith("ready "):
            raise TestBackendsError("test backend server said %r instead of 'ready ...'%s" % (line, self._log_tail()))
        return line[len("ready "):]

    def _connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10.0)
        s.connect(self.control_path)
        self._ctl = s
        self._ctl_in = s.makefile("rb")

    def _log_tail(self, n: int = 2000) -> str:
        try:
            with open(self._log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - n))
                tail = f.read().decode(errors="replace").strip()
        except OSError:
            return ""
        return (": " + tail) if tail else ""

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def close(self) -> None:
        """Stop the server (SIGTERM to its PID, SIGKILL after 5 s) and remove
        the temporary directory. Idempotent."""
        if self._ctl_in is not None:
            self._ctl_in.close()
            self._ctl_in = None
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
            if proc.stdout is not None:
                proc.stdout.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "TestBackends":
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- control ------------------------------------------------------------

    def _call(self, msg: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock:
            if self._ctl is None:
                raise TestBackendsError("test backends are closed")
            try:
                self._ctl.sendall(json.dumps(msg).encode() + b"\n")
                line = self._ctl_in.readline()
            except OSError as e:
                raise TestBackendsError("control socket: %s%s" % (e, self._log_tail())) from None
            if not line:
                raise TestBackendsError("test backend server closed the control socket%s" % self._log_tail())
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise ValueError(reply.get("error", "control request failed"))
        return reply

    @property
    def addrs(self) -> list[str]:
        """"ip:port" of every backend, in index order."""
        return [b["addr"] for b in self.backends]

    @property
    def names(self) -> list[str]:
        return [b["name"] for b in self.backends]

    def address(self, i: int) -> tuple[str, int]:
        """(ip, port) of backend i, for socket.connect()."""
        host, _, port = self.backends[i]["addr"].rpartition(":")
        return host.strip("[]"), int(port)

    def set(self, i: int | str, **behaviour: Any) -> dict[str, Any]:
        """Change backend i (index, name or "ip:port"); returns the whole
        behaviour now in force. ValueError (nothing changed) on a bad key or value."""
        return self._call({"op": "set", "backend": i, "behaviour": behaviour})["behaviour"]  # type: ignore[no-any-return]

    def set_all(self, **behaviour: Any) -> None:
        for i in range(len(self.backends)):
            self.set(i, **behaviour)

    def get(self, i: int | str) -> dict[str, Any]:
        return self._call({"op": "get", "backend": i})["behaviour"]  # type: ignore[no-any-return]

    def stats(self, i: int | str) -> dict[str, Any]:
        """Counters of backend i: connections, active_connections, requests,
        responses (by status, as strings), closed_mid_request, body_bytes_sent."""
        return self._call({"op": "stats", "backend": i})["stats"][0]  # type: ignore[no-any-return]

    def stats_all(self) -> list[dict[str, Any]]:
        return self._call({"op": "stats", "backend": None})["stats"]  # type: ignore[no-any-return]

    def reset_stats(self, i: int | str | None = None) -> None:
        """Zero the counters of backend i, or of all backends."""
        self._call({"op": "reset_stats", "backend": i})

    def reseed(self, i: int | str, seed: int) -> None:
        """Restart backend i's RNG from (seed, i)."""
        self._call({"op": "reseed", "backend": i, "seed": seed})
