"""Evidence per caller (issue 12), against the real kernel and the real agent.

The kernel attributes every observation to the caller's cgroup
(bpf_get_current_cgroup_id, the leaf cgroup of the calling process). Routing
must be judged from many callers' evidence, combined robustly, so that no
single caller on a node can move routing for the others, while a backend
that really fails or slows down for everyone is still left.

Each caller here is its own child cgroup of the one the agent is attached to:
a load generator (`equilibriumd.lab.loadgen`, a new connection per request,
so every request is a routing decision) is an honest caller, and
tests/clients/poisoner.py is a caller that fakes failures of one backend
with requests it never lets the backend answer. Backends are the testbed's
HTTP servers on 127.0.0.0/8; each answers with its name in X-Backend.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest

from equilibriumd.lab.demo.analysis import Requests, shift_seconds
from equilibriumd.lab.testbed import TestBackends

from helpers import PY, REPO, AgentProc, Cgroup, rmdir_when_empty, stop, write_config
from test_steering import svc

pytestmark = pytest.mark.root

NAMES = ["b0", "b1", "b2"]
TICK = "0.5s"  # the demo's tick
POISONER = REPO / "tests" / "clients" / "poisoner.py"


class Callers:
    """Child cgroups of the agent's cgroup, one per caller, and the processes
    started in them. close() stops every process still running (by its PID),
    then removes the cgroups once they are empty."""

    def __init__(self, parent: str, log_dir: Path) -> None:
        self.parent = parent
        self.log_dir = log_dir
        self.cgroups: list[str] = []
        self.procs: list[subprocess.Popen[str]] = []

    def cgroup(self, name: str) -> str:
        path = os.path.join(self.parent, name)
        os.mkdir(path)
        self.cgroups.append(path)
        return path

    def start(self, name: str, args: list[str]) -> subprocess.Popen[str]:
        """Start `args` (which joins a caller cgroup by itself); stderr goes to a log named `name`."""
        with open(self.log_dir / ("%s.err" % name), "w") as err:
            p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True,
                                 cwd=REPO)
        self.procs.append(p)
        return p

    def loadgen(self, name: str, frontend: str, rate: float, seconds: float) -> tuple[subprocess.Popen[str], Path]:
        """An honest caller in cgroup `name`: `rate` requests/s for `seconds`; records go to the returned file."""
        out = self.log_dir / ("%s.jsonl" % name)
        p = self.start(name, [PY, "-m", "equilibriumd.lab.loadgen", "--cgroup", self.cgroup(name), "--target",
                              "web=%s@%g" % (frontend, rate), "--duration", str(seconds), "--out", str(out)])
        return p, out

    def close(self) -> None:
        for p in self.procs:
            stop(p)
            if p.stdout is not None:
                p.stdout.close()
        for path in reversed(self.cgroups):
            rmdir_when_empty(path)


@pytest.fixture
def callers(cgroup: Cgroup, tmp_path: Path) -> Iterator[Callers]:
    c = Callers(cgroup.path, tmp_path)
    try:
        yield c
    finally:
        c.close()


def _start_agent(tmp_path: Path, testbed: Callable[..., TestBackends], agent: Callable[[Path], AgentProc],
                 frontend: str) -> TestBackends:
    """Three equal, healthy backends behind `frontend`, routed by the real agent (policy equilibrium)."""
    tb = testbed(3, names=NAMES)
    cfg = write_config(tmp_path / "c.yaml", [svc("web", frontend, tb.addrs)], policy="equilibrium", tick=TICK)
    agent(cfg).start()
    return tb


def _records(p: subprocess.Popen[str], out: Path, timeout: float) -> tuple[float, list[dict[str, Any]],
                                                                            dict[str, Any]]:
    """Wait for a load generator; (its start time, its request records, its summary for target web)."""
    assert p.wait(timeout=timeout) == 0, (out.parent / (out.stem + ".err")).read_text()[-2000:]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    return lines[0]["start"], [x for x in lines if "s" in x], lines[-1]["summary"]["targets"]["web"]


def _window_shares(req: Requests, start: float, end: float, width: float) -> list[float]:
    """Backend 0's share of the requests started in each `width`-second window of [start, end)."""
    out = []
    for s in np.arange(start, end - width + 1e-9, width):
        sh = req.shares(s, s + width)
        out.append(round(float(sh[0]), 3) if sh is not None else float("nan"))
    return out


# Timeline of the attack test, in seconds from the honest caller's start.
HONEST_SECONDS = 30.0
ATTACK_FROM = 5.0
JUDGED_FROM = 10.0  # the last 20 s of the honest run: the attack has been running for 5 s


def test_one_caller_cannot_starve_a_backend_for_the_others(
        tmp_path: Path, testbed: Callable[..., TestBackends], agent: Callable[[Path], AgentProc], frontend_ip: str,
        callers: Callers) -> None:
    """The attack of issue 12: one process poisons backend 0 for everyone.

    An honest caller sends 100 requests/s, each on a new connection, to three
    equal, healthy backends. From 5 s on, an attacker in its own cgroup probes
    the frontend and, whenever the kernel gives it backend 0, sends `GET ` and
    closes at once: an unanswered request, which the telemetry counts as a
    failure of backend 0. It probes 300 times a second and poisons at most
    twice a second, so it keeps poisoning (>= 20 times, asserted: the test
    cannot pass without an attack) even when backend 0 gets only ~1 % of its
    connections. Those failures are the attacker's own evidence; backend 0
    serves the honest caller perfectly well. So over the last 20 s of the
    honest run backend 0 must keep its share of the honest caller's requests
    (>= 0.20 in every 5 s window; even is 1/3), and every honest request must
    succeed. With all callers' evidence pooled, 34 poisoned connections in
    30 s drove that share from 0.30 to 0.014 (the report of issue 12).
    """
    fe = frontend_ip + ":80"
    tb = _start_agent(tmp_path, testbed, agent, fe)
    honest, honest_out = callers.loadgen("honest", fe, rate=100, seconds=HONEST_SECONDS)
    time.sleep(ATTACK_FROM)
    attacker = callers.start("attacker", [
        PY, str(POISONER), "--cgroup", callers.cgroup("attacker"), "--host", frontend_ip, "--port", "80",
        "--victim", tb.addrs[0], "--seconds", str(HONEST_SECONDS - ATTACK_FROM), "--rate", "300",
        "--min-gap", "0.5"])
    assert attacker.stdout is not None and attacker.stdout.readline().strip() == "ready"

    t0, recs, summary = _records(honest, honest_out, timeout=HONEST_SECONDS + 15)
    attack = json.loads(attacker.communicate(timeout=15)[0].strip().splitlines()[-1])
    req = Requests.from_records(recs, NAMES, t0)
    before = req.shares(0.0, ATTACK_FROM)
    windows = _window_shares(req, JUDGED_FROM, HONEST_SECONDS, 5.0)
    during = req.shares(JUDGED_FROM, HONEST_SECONDS)
    assert before is not None and during is not None
    report = ("honest share of b0: %.3f before the attack, %.3f over %g-%g s, per 5 s %s; attacker: %s"
              % (before[0], during[0], JUDGED_FROM, HONEST_SECONDS, windows, attack))
    print(report)

    # Every honest request was answered with 200, by a named backend ...
    assert summary["errors"] == {} and len(recs) == summary["sent"] >= 0.9 * 100 * HONEST_SECONDS, summary
    assert req.ok.all() and (req.backend >= 0).all()
    # ... the honest caller kept using backend 0 ...
    assert min(windows) >= 0.20, report
    # ... although the attack really happened: poisoned connections reached backend 0.
    assert attack["errors"] == {} and attack["poisoned"] >= 20, report


# Timeline of the all-callers test, in seconds from the first caller's start.
ALL_SECONDS = 20.0
DEGRADE_AT = 8.0
SHIFT_LIMIT = 5.0  # the demo's shift target is ~2 s


@pytest.mark.parametrize("degrade", [{"error_ratio": 1.0, "error_status": 500}, {"latency": 0.2}],
                         ids=["answers-500", "200ms-slower"])
def test_a_backend_bad_for_every_caller_is_left(
        tmp_path: Path, testbed: Callable[..., TestBackends], agent: Callable[[Path], AgentProc], frontend_ip: str,
        callers: Callers, degrade: dict[str, Any]) -> None:
    """Evidence per caller must not protect a backend that is bad for everyone.

    Two honest callers, each in its own cgroup, send 60 requests/s each (a new
    connection per request) to three equal backends. At 8 s backend 0 starts
    answering 500 (or 200 ms later) for both. Within 5 s its share of the new
    requests must fall below 0.1, over the trailing 1 s and for the following
    3 s (the demo's shift_seconds definition with a 0.1 threshold), and from
    5 s after the change to the end it must be below 0.1 for each caller.
    """
    fe = frontend_ip + ":80"
    tb = _start_agent(tmp_path, testbed, agent, fe)
    runs = [callers.loadgen(name, fe, rate=60, seconds=ALL_SECONDS) for name in ("caller-a", "caller-b")]
    time.sleep(DEGRADE_AT)
    tb.set(0, **degrade)
    t_degrade = time.monotonic()

    results = [_records(p, out, timeout=ALL_SECONDS + 15) for p, out in runs]
    t0 = min(r[0] for r in results)
    t_bad = t_degrade - t0
    both = Requests.from_records([rec for r in results for rec in r[1]], NAMES, t0)
    end = float(both.t[-1])
    before = both.shares(2.0, t_bad)
    shift = shift_seconds(both, 0, t_bad, end, threshold=0.1, hold=3.0)
    per_caller = [Requests.from_records(r[1], NAMES, t0).shares(t_bad + SHIFT_LIMIT, end) for r in results]
    report = ("b0 share before %s, 1 s windows after %s, shift %s s, per caller after %g s: %s"
              % (None if before is None else round(float(before[0]), 3),
                 _window_shares(both, t_bad, end, 1.0), shift, SHIFT_LIMIT,
                 [None if s is None else round(float(s[0]), 3) for s in per_caller]))
    print(report)

    assert before is not None and before[0] >= 0.2, report  # backend 0 was in use: there was something to leave
    assert shift is not None and shift <= SHIFT_LIMIT, report
    assert all(s is not None and s[0] < 0.1 for s in per_caller), report
