"""scripts/demo: real connections steered by the kernel, on a built-in topology.

Starts three HTTP backends on 127.0.0.0/8, writes a config with one service
(frontend 127.77.0.1:80, where nothing listens), runs the real agent
(`equilibriumd run`) attached to a child cgroup, and drives HTTP load from a
client inside that cgroup. It walks through phases, each a config reload
(SIGHUP), and shows the share of new connections each backend received next
to the share it should get:

  static 6/3/1  ->  round-robin  ->  backend 3 draining  ->  static 1/1/2

Everything it creates (cgroup, pins, processes) is removed at the end, also
on Ctrl-C. `--headless --duration S --summary FILE` runs without a TTY and
writes the results as JSON.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

FRONTEND = ("127.77.0.1", 80)
BACKENDS = [("127.0.0.11", 18081), ("127.0.0.12", 18082), ("127.0.0.13", 18083)]
PHASES: list[dict[str, Any]] = [
    {"name": "static 6/3/1", "policy": "static", "weights": [6, 3, 1], "states": ["active"] * 3},
    {"name": "round-robin", "policy": "round-robin", "weights": [1, 1, 1], "states": ["active"] * 3},
    {"name": "backend 3 draining", "policy": "round-robin", "weights": [1, 1, 1],
     "states": ["active", "active", "draining"]},
    {"name": "static 1/1/2", "policy": "static", "weights": [1, 1, 2], "states": ["active"] * 3},
]


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.server.hits += 1  # type: ignore[attr-defined]
        body = b"ok %s\n" % self.server.tag  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class Backend(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int]) -> None:
        super().__init__(addr, _Handler)
        self.hits = 0
        self.tag = ("%s:%d" % addr).encode()
        threading.Thread(target=self.serve_forever, daemon=True).start()


def expected_shares(phase: dict[str, Any]) -> list[float]:
    w = [wt if st == "active" else 0 for wt, st in zip(phase["weights"], phase["states"])]
    return [x / sum(w) for x in w]


def write_config(path: Path, phase: dict[str, Any], tick: float) -> None:
    svc = {"name": "demo", "frontend": "%s:%d" % FRONTEND, "protocol": "tcp",
           "backends": [{"address": "%s:%d" % a, "weight": w, "state": s}
                        for a, w, s in zip(BACKENDS, phase["weights"], phase["states"])]}
    path.write_text(yaml.safe_dump({"tick": "%gs" % tick, "policy": phase["policy"], "services": [svc]},
                                   sort_keys=False))


def client_main(cgroup: str, rate: float) -> int:
    """The load client: in the demo's cgroup, GET / at `rate` per second until stdin closes."""
    with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
    req = b"GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n"
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    ok = err = 0
    period, nxt, last = 1.0 / rate, time.monotonic(), time.monotonic()
    while not stop.is_set():
        try:
            with socket.create_connection(FRONTEND, timeout=2) as s:
                s.sendall(req)
                while s.recv(4096):
                    pass
            ok += 1
        except OSError:
            err += 1
        now = time.monotonic()
        if now - last >= 1.0:
            print(json.dumps({"ok": ok, "errors": err}), flush=True)
            last = now
        nxt += period
        if nxt > now:
            time.sleep(nxt - now)
        else:
            nxt = now  # open-loop pacing, but never a burst to catch up
    return 0


def cgroup2_root() -> str:
    with open("/proc/self/mounts") as f:
        for line in f:
            p = line.split()
            if p[2] == "cgroup2":
                return p[1]
    raise SystemExit("demo: no cgroup2 hierarchy mounted (scripts/setup mounts one)")


def run(duration: float, headless: bool, summary: str | None, rate: float) -> int:
    root = cgroup2_root()
    cg = os.path.join(root, "eqdemo-%d" % os.getpid())
    pin_dir = "/sys/fs/bpf/eqdemo-%d" % os.getpid()
    work = Path(tempfile.mkdtemp(prefix="eqdemo-"))
    cfg = work / "demo.yaml"
    procs: list[subprocess.Popen[Any]] = []
    servers = [Backend(a) for a in BACKENDS]
    os.mkdir(cg)
    phase_seconds = max(duration / len(PHASES), 3.0)
    results: list[dict[str, Any]] = []
    py = sys.executable
    try:
        write_config(cfg, PHASES[0], 0.5)
        log = open(work / "agent.log", "w")
        agent = subprocess.Popen([py, "-m", "equilibriumd", "run", "--config", str(cfg), "--cgroup", cg,
                                  "--pin-dir", pin_dir], stdout=log, stderr=subprocess.STDOUT)
        procs.append(agent)
        _wait_for(work / "agent.log", '"running"', agent, 120)
        client = subprocess.Popen([py, "-m", "equilibriumd.demo", "--client", cg, "--rate", str(rate)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(client)
        print("demo: agent pid %d on %s, client in %s, frontend %s:%d -> %s" % (
            agent.pid, pin_dir, cg, *FRONTEND, ", ".join("%s:%d" % a for a in BACKENDS)))
        print("%-20s %8s  %-26s %-26s %s" % ("phase", "conns", "observed share", "expected share", "max gap"))
        for i, phase in enumerate(PHASES):
            if i:
                write_config(cfg, phase, 0.5)
                agent.send_signal(signal.SIGHUP)
                time.sleep(0.3)  # the reload applies within a tick; count from here
            before = [s.hits for s in servers]
            time.sleep(phase_seconds)
            got = [s.hits - b for s, b in zip(servers, before)]
            total = sum(got) or 1
            obs = [g / total for g in got]
            exp = expected_shares(phase)
            gap = max(abs(o - e) for o, e in zip(obs, exp))
            results.append({"phase": phase["name"], "connections": sum(got), "observed": obs, "expected": exp,
                            "max_gap": gap})
            print("%-20s %8d  %-26s %-26s %.3f" % (phase["name"], sum(got), " ".join("%.3f" % x for x in obs),
                                                   " ".join("%.3f" % x for x in exp), gap), flush=True)
        assert client.stdin is not None
        client.stdin.close()
        client.wait(timeout=10)
        lines = [json.loads(x) for x in (client.stdout.read() if client.stdout else "").splitlines() if x.strip()]
        errors = lines[-1]["errors"] if lines else None
        ctl = subprocess.run([py, "-m", "equilibriumd.cli.ctl", "backends", "demo", "--pin-dir", pin_dir],
                             capture_output=True, text=True)
        print("\n$ equilibriumctl backends demo\n" + ctl.stdout.strip())
        out = {"phases": results, "client_errors": errors, "rate_per_second": rate,
               "ok": bool(results) and all(r["max_gap"] < 0.05 for r in results) and not errors}
        print("\ndemo: %s (every phase within 5 points of its weights; %s client errors)"
              % ("OK" if out["ok"] else "NOT OK", errors))
        if summary:
            Path(summary).write_text(json.dumps(out, indent=2))
        return 0 if out["ok"] else 1
    finally:
        for p in reversed(procs):  # only what we started, by PID
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
        subprocess.run([py, "-m", "equilibriumd", "teardown", "--pin-dir", pin_dir], capture_output=True)
        for s in servers:
            s.shutdown()
            s.server_close()
        try:
            os.rmdir(cg)
        except OSError as e:
            print("demo: could not remove %s: %s" % (cg, e), file=sys.stderr)


def _wait_for(path: Path, needle: str, proc: subprocess.Popen[Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in path.read_text():
            return
        if proc.poll() is not None:
            raise SystemExit("demo: the agent exited:\n" + path.read_text()[-2000:])
        time.sleep(0.1)
    raise SystemExit("demo: the agent did not start within %ds" % timeout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=40.0, help="seconds in total (default 40)")
    ap.add_argument("--headless", action="store_true", help="no live terminal view (for CI and scripts)")
    ap.add_argument("--summary", help="write the results as JSON to this file")
    ap.add_argument("--rate", type=float, default=200.0, help="client requests per second (default 200)")
    ap.add_argument("--client", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.client:
        return client_main(a.client, a.rate)
    if os.geteuid() != 0:
        print("scripts/demo: run as root (it loads BPF programs)", file=sys.stderr)
        return 2
    return run(a.duration, a.headless, a.summary, a.rate)


if __name__ == "__main__":
    sys.exit(main())
