"""Real servers, real clients, real cgroups for the datapath tests.

Everything here stays on 127.0.0.0/8 and in child cgroups created by the
tests; nothing is ever attached to the root cgroup.
"""

from __future__ import annotations

import collections
import json
import os
import random
import selectors
import signal
import socket
import string
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from equilibriumd.cgroups import cgroup2_root

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
RST = struct.pack("ii", 1, 0)  # SO_LINGER {on, 0}: close with RST, no TIME_WAIT pile-up


def stop(p: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    """Stop a process this test started (by its PID): SIGTERM, then SIGKILL after `timeout`."""
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def rand_tag(n: int = 6) -> str:
    return "".join(random.choice(string.ascii_lowercase) for _ in range(n))


def own_cgroup() -> str:
    with open("/proc/self/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return os.path.join(cgroup2_root(), line.strip()[3:].lstrip("/"))
    return cgroup2_root()


def rmdir_when_empty(path: str, timeout: float = 5.0) -> None:
    """Remove a (child) cgroup directory once its exited processes have left it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Cgroup:
    """A child cgroup (never the root) that this process can step into."""

    def __init__(self) -> None:
        root = cgroup2_root()
        self.path = os.path.join(root, "eqtest-" + rand_tag(8))
        assert os.path.realpath(self.path) != os.path.realpath(root)
        os.mkdir(self.path)

    def enter(self) -> "_Inside":
        return _Inside(self.path)

    def remove(self) -> None:
        parent = own_cgroup() if own_cgroup() != self.path else cgroup2_root()
        for _ in range(50):
            try:
                with open(os.path.join(self.path, "cgroup.procs")) as f:
                    pids = [p for p in f.read().split() if p]
                for p in pids:  # move stragglers out (only processes can be in it)
                    try:
                        with open(os.path.join(parent, "cgroup.procs"), "w") as f:
                            f.write(p)
                    except OSError:
                        pass
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("could not remove %s" % self.path)


class _Inside:
    def __init__(self, path: str) -> None:
        self.path = path
        self.prev = own_cgroup()

    def __enter__(self) -> None:
        with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    def __exit__(self, *exc: object) -> None:
        with open(os.path.join(self.prev, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))


#: connections a Backends listener accepts per readiness event (see Backends._run)
ACCEPT_BATCH = 16


class Backends:
    """TCP (and UDP) servers on 127.0.0.x: count accepts, echo what they read.

    One selector thread serves them all, so thousands of short connections
    cost no thread each. UDP servers answer each datagram with its payload.
    """

    def __init__(self, n: int, base_ip: int = 21, udp: bool = False) -> None:
        self.sel = selectors.DefaultSelector()
        self.addrs: list[tuple[str, int]] = []
        self.accepts: collections.Counter[int] = collections.Counter()
        self.udp_seen: collections.Counter[int] = collections.Counter()
        self.errors: collections.Counter[tuple[str, str]] = collections.Counter()   #: (kind, error) seen
        self.listeners: list[socket.socket] = []
        self._stop = False
        ip_base = random.randint(1, 200)
        for i in range(n):
            ip = "127.0.%d.%d" % (ip_base, base_ip + i)
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((ip, 0))
            if not udp:
                s.listen(4096)
            s.setblocking(False)
            self.sel.register(s, selectors.EVENT_READ, ("udp" if udp else "listen", i))
            self.listeners.append(s)
            self.addrs.append(s.getsockname())
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def addr(self, i: int) -> str:
        return "%s:%d" % self.addrs[i]

    def _run(self) -> None:
        while not self._stop:
            for key, _ in self.sel.select(timeout=0.1):
                kind, i = key.data
                s = key.fileobj
                try:
                    if kind == "listen":
                        # a bounded batch, then the open connections get their turn: what waits
                        # stays in the kernel's accept queue, not as thousands of fds of this
                        # process (a test that forks, tests/faults/test_kill_apply.py, copies them
                        # all into its child, which then hit EMFILE)
                        for _ in range(ACCEPT_BATCH):
                            try:
                                c, _ = s.accept()
                            except BlockingIOError:
                                break
                            self.accepts[i] += 1
                            c.setblocking(False)
                            self.sel.register(c, selectors.EVENT_READ, ("conn", i))
                    elif kind == "udp":
                        data, peer = s.recvfrom(65535)
                        self.udp_seen[i] += 1
                        s.sendto(data, peer)
                    else:
                        data = s.recv(65536)
                        if data:
                            s.sendall(data)
                        else:
                            self.sel.unregister(s)
                            s.close()
                except (ConnectionError, OSError) as e:
                    self.errors[(kind, type(e).__name__)] += 1
                    if kind != "conn":   # a listener or UDP server stays: one failed accept
                        continue         # (or an ICMP error on UDP) must not close a backend for good
                    try:
                        self.sel.unregister(s)
                    except (KeyError, ValueError):
                        pass
                    s.close()

    def total(self) -> int:
        return sum(self.accepts.values())

    def settle(self, n: int, timeout: float = 5.0) -> int:
        """Wait until the accept loop (one thread for all listeners, behind the
        clients on a busy machine) has counted `n` connections; returns the total."""
        end = time.monotonic() + timeout
        while self.total() < n and time.monotonic() < end:
            time.sleep(0.05)
        return self.total()

    def close(self) -> None:
        self._stop = True
        self.t.join(timeout=2)
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self.sel.close()


def connect(host: str, port: int, timeout: float = 2.0) -> socket.socket:
    c = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    c.settimeout(timeout)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
    c.connect((host, port))
    return c


def write_config(path: Path, services: list[dict[str, Any]], policy: str = "static", tick: str = "0.2s") -> Path:
    path.write_text(yaml.safe_dump({"tick": tick, "policy": policy, "services": services}, sort_keys=False))
    return path


class AgentProc:
    """`equilibriumd run` as a real child process, stopped by its own PID."""

    def __init__(self, config: Path, cgroup: str, pin_dir: str, log: Path) -> None:
        # /metrics off: agents of concurrent runs would fight over the default port
        # (tests/test_metrics.py covers the metrics server on a free port)
        self.cmd = [PY, "-m", "equilibriumd", "run", "--config", str(config), "--cgroup", cgroup,
                    "--pin-dir", pin_dir, "--metrics-addr", "off"]
        self.log_path = log
        self.pin_dir = pin_dir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> "AgentProc":
        self._logf = open(self.log_path, "ab")
        seen = self.count("running") if self.log_path.exists() else 0
        self.proc = subprocess.Popen(self.cmd, stdout=self._logf, stderr=subprocess.STDOUT, cwd=REPO)
        if wait:
            self.wait_event("running", timeout=90, after=seen)
        return self

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def wait_event(self, event: str, timeout: float = 10, after: int = 0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            evs = [e for e in self.events() if e.get("event") == event]
            if len(evs) > after:
                return evs[after]
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError("agent exited (%s) before %r:\n%s" % (
                    self.proc.returncode, event, self.log_path.read_text()[-3000:]))
            time.sleep(0.05)
        raise AssertionError("no %r event within %ss:\n%s" % (event, timeout, self.log_path.read_text()[-3000:]))

    def count(self, event: str) -> int:
        return sum(1 for e in self.events() if e.get("event") == event)

    def hup(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._logf.close()
        self.proc = None
        return rc


class ClientProc:
    """A load client in its own process, inside the test cgroup: tests/clients/connector.py."""

    def __init__(self, cgroup: str, host: str, port: int, *, count: int = 0, seconds: float = 0.0,
                 udp: bool = False, expect: list[str] | None = None, cpu: int | None = None) -> None:
        cmd = [PY, str(REPO / "tests" / "clients" / "connector.py"), "--cgroup", cgroup, "--host", host,
               "--port", str(port), "--count", str(count), "--seconds", str(seconds)]
        if cpu is not None:     # one CPU: its connects are one sweep (the kernel's cursor is per CPU)
            cmd = ["taskset", "-c", str(cpu)] + cmd
        if udp:
            cmd.append("--udp")
        for e in expect or []:
            cmd += ["--expect", e]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        assert line.strip() == "ready", (line, self.proc.stderr.read() if self.proc.stderr else "")

    def result(self, timeout: float = 120) -> dict[str, Any]:
        out, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, err
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def bpftool_ids(kind: str) -> set[int]:
    out = subprocess.run(["bpftool", "-j", kind, "show"], capture_output=True, text=True, check=True).stdout
    return {int(o["id"]) for o in json.loads(out or "[]")}
