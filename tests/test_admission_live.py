"""Admission on the real kernel (issue 15, items 2-3): the agent's shedding and
zero-sum flood defence, merged with cooperation's punishment into eq_lb_budget.

The service has three testbed backends of CAPACITY requests/s each (a FIFO
queue: latency grows when they are overrun), enforce: throttle. Callers are
load generators (a new connection per request) in child cgroups of the test's
cgroup.

* Flood: an honest caller for the whole run; after a calm phase a second
  cgroup floods at twice the service's capacity. The flooder must get a budget
  (the kernel's eq_lb_budget has an entry for its cgroup id, `equilibriumctl
  callers -o json` names why: punished, defended or shed), its connects over it
  are refused (ECONNREFUSED), and the honest caller's success and p99 during the
  flood stay close to the calm phase. The benchmark target is the issue's
  1.2x p99 (the simulator measures 1.03x); on this 2-core machine shared with
  other runs, where the p99 of a few hundred requests moves with one CPU stall,
  the CI bound is 2.5x (or 50 ms over the calm p99) once the flood is held, and 99 %
  success then (90 % over the whole flood, whose first seconds precede any budget).
* Overload: four callers with unequal demands, 1.3x the capacity together:
  the two within their max-min fair shares keep >= 99 % success; the one over
  it is shed to about its share (not punished to a trickle); Jain's index.
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

from equilibriumd.lab.testbed import TestBackends

from helpers import PY, REPO, AgentProc, Cgroup, rmdir_when_empty, stop, write_config

pytestmark = pytest.mark.root

CAPACITY = 100.0    # requests/s per backend, 3 backends
TICK = "0.5s"


class Callers:
    """Child cgroups of the agent's cgroup (never the root), one per caller, and their load
    generators; close() stops the processes (by PID) and removes the cgroups."""

    def __init__(self, parent: str, log_dir: Path) -> None:
        self.parent, self.log_dir = parent, log_dir
        self.cgroups: list[str] = []
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, name: str, frontend: str, rate: float, seconds: float) -> tuple[subprocess.Popen[str], Path, int]:
        path = os.path.join(self.parent, name)
        os.mkdir(path)
        self.cgroups.append(path)
        out = self.log_dir / ("%s.jsonl" % name)
        with open(self.log_dir / ("%s.err" % name), "w") as err:
            p = subprocess.Popen([PY, "-m", "equilibriumd.lab.loadgen", "--cgroup", path, "--target",
                                  "web=%s@%g" % (frontend, rate), "--duration", str(seconds), "--out", str(out)],
                                 stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL, text=True, cwd=REPO)
        self.procs.append(p)
        return p, out, os.stat(path).st_ino   # the cgroup id is its inode

    def close(self) -> None:
        for p in self.procs:
            stop(p)
        for path in reversed(self.cgroups):
            rmdir_when_empty(path)


@pytest.fixture
def callers(cgroup: Cgroup, tmp_path: Path) -> Iterator[Callers]:
    c = Callers(cgroup.path, tmp_path)
    try:
        yield c
    finally:
        c.close()


def records(p: subprocess.Popen[str], out: Path, timeout: float) -> tuple[float, list[dict[str, Any]]]:
    assert p.wait(timeout=timeout) == 0, (out.parent / (out.stem + ".err")).read_text()[-2000:]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    return lines[0]["start"], [x for x in lines if "s" in x]


def ctl_callers(pin_dir: str) -> list[dict[str, Any]]:
    r = subprocess.run([PY, "-m", "equilibriumd.cli.ctl", "callers", "--pin-dir", pin_dir, "-o", "json"],
                       capture_output=True, text=True, cwd=REPO, timeout=30)
    assert r.returncode == 0, r.stderr
    return list(json.loads(r.stdout)["callers"])


def start(tmp_path: Path, testbed: Callable[..., TestBackends], agent: Callable[[Path], AgentProc],
          frontend: str) -> AgentProc:
    tb = testbed(3, names=["a0", "a1", "a2"])
    for i in range(3):
        tb.set(i, capacity=CAPACITY, latency=0.005)
    svc = {"name": "web", "frontend": frontend, "protocol": "tcp",
           "backends": [{"address": a, "weight": 1} for a in tb.addrs]}
    conf = write_config(tmp_path / "c.yaml", [svc], policy="equilibrium", tick=TICK)
    conf.write_text(conf.read_text().replace("services:", "enforce: throttle\nservices:", 1))
    return agent(conf).start()


def window(recs: list[dict[str, Any]], t0: float, a: float, b: float) -> tuple[np.ndarray, np.ndarray]:
    """(latencies, ok) of the requests that arrived in [a, b) seconds from t0."""
    sel = [r for r in recs if a <= r["t"] - t0 < b]
    return np.array([r["lat"] for r in sel]), np.array([r.get("st") == 200 for r in sel], dtype=bool)


def p99(lat: np.ndarray, ok: np.ndarray) -> float:
    return float(np.percentile(lat[ok], 99)) if ok.any() else float("nan")


HONEST, FLOOD = 60.0, 600.0
CALM_S, FLOOD_S = 14.0, 24.0


@pytest.mark.timeout(150)
def test_a_flooder_is_budgeted_and_the_honest_caller_keeps_its_latency(
        tmp_path: Path, testbed: Callable[..., TestBackends], agent: Callable[[Path], AgentProc], frontend_ip: str,
        callers: Callers, pin_dir: str) -> None:
    fe = frontend_ip + ":80"
    a = start(tmp_path, testbed, agent, fe)
    hp, hout, honest = callers.start("honest", fe, HONEST, CALM_S + FLOOD_S + 2)
    time.sleep(CALM_S)
    fp, fout, flooder = callers.start("flooder", fe, FLOOD, FLOOD_S)
    f_mono = time.monotonic()
    seen: dict[str, Any] | None = None
    budgeted_after = None
    while hp.poll() is None:   # the flood, and the honest caller alone after it
        time.sleep(1.0)
        rows = {r["cgroup_id"]: r for r in ctl_callers(pin_dir) if r["service"] == "web"}
        f = rows.get(flooder)
        if f is not None and f["budget_per_second"] is not None:
            if budgeted_after is None:
                budgeted_after = time.monotonic() - f_mono
            seen = f      # the latest: the kernel's entry (rate, counters) and the agent's reason
        assert honest not in rows or rows[honest]["budget_per_second"] is None, rows[honest]
    t_h, hrecs = records(hp, hout, timeout=60)
    _, frecs = records(fp, fout, timeout=30)
    f0 = f_mono - t_h
    calm_lat, calm_ok = window(hrecs, t_h, 3.0, f0)
    flood_lat, flood_ok = window(hrecs, t_h, f0, f0 + FLOOD_S)
    held = f0 + (budgeted_after or 0.0) + 5.0      # the backlog of the flood's first seconds served
    held_lat, held_ok = window(hrecs, t_h, held, f0 + FLOOD_S)
    refused = sum(1 for r in frecs if r.get("err") == "refused")
    events = [(e["event"], e.get("cgroup")) for e in a.events()
              if e.get("event") in ("caller_punished", "caller_defended", "caller_shed", "service_infeasible")]
    calm_p99, held_p99 = p99(calm_lat, calm_ok), p99(held_lat, held_ok)
    report = ("budgeted after %s s: %s; honest calm p99 %.1f ms, whole flood %.1f ms, held %.1f ms (ratio %.2f); "
              "honest success calm %.4f flood %.4f; flooder refused %d of %d; events %s" % (
                  None if budgeted_after is None else round(budgeted_after, 1),
                  None if seen is None else {k: seen.get(k) for k in ("reason", "reasons", "budget_per_second",
                                                                      "throttled_total")},
                  calm_p99 * 1e3, p99(flood_lat, flood_ok) * 1e3, held_p99 * 1e3, held_p99 / calm_p99,
                  calm_ok.mean(), flood_ok.mean(), refused, len(frecs), events))
    print(report)
    assert seen is not None and budgeted_after is not None and budgeted_after <= 6.0, report
    assert seen["reason"] in ("punished", "defended", "shed") and seen["reason"] in seen["reasons"], report
    assert seen["budget_mode"] == "throttle" and seen["throttled_total"] > 0, report
    assert refused > 0.5 * FLOOD * FLOOD_S * 0.5, report                 # over its budget: refused
    assert all(c != honest for _, c in events), report                   # never the honest caller
    # once held, the honest caller is served as before the flood; over the whole flood the
    # backlog of its first ~2 s (before any budget exists) costs some requests their timeout
    # (99.7-100 % succeeded on a quiet machine, 95.9 % once with other runs sharing its 2 cores)
    assert held_ok.mean() >= 0.99 and calm_ok.mean() >= 0.99 and flood_ok.mean() >= 0.9, report
    assert held_p99 <= max(2.5 * calm_p99, calm_p99 + 0.05), report


@pytest.mark.timeout(150)
def test_overload_keeps_the_callers_within_their_share(
        tmp_path: Path, testbed: Callable[..., TestBackends], agent: Callable[[Path], AgentProc], frontend_ip: str,
        callers: Callers, pin_dir: str) -> None:
    """60 + 70 + 80 + 180 = 390/s on 300/s (1.3x). Max-min shares of the 270/s shedding admits
    (0.9 x 300): 60, 70, 70, 70; of the whole 300: 60, 70, 80, 90. Without the big caller the
    others are 210/s, 0.7 of the capacity: an overload, not a flood (the defence stays out). The
    big caller is shed to about its share (cooperation would punish it to a trickle: shedding's
    share replaces that, `policy.admission.merge`); the two within their shares keep >= 99 %
    success (the benchmark target; the simulator: 0.996) and are never budgeted below 0.9x their
    demand; Jain's index over throughput / share
    of the whole capacity is the issue's >= 0.95 target (simulator 0.99); CI asserts >= 0.9 on
    this noisy machine and prints the value."""
    fe = frontend_ip + ":80"
    start(tmp_path, testbed, agent, fe)
    run = 30.0
    demands = {"small": 60.0, "mid": 70.0, "near": 80.0, "big": 180.0}
    procs = {n: callers.start(n, fe, d, run) for n, d in demands.items() if n != "big"}
    time.sleep(4.0)
    procs["big"] = callers.start("big", fe, demands["big"], run - 4)
    seen: dict[int, set[tuple[str, int]]] = {}
    t_end = time.monotonic() + run - 6
    while time.monotonic() < t_end:
        time.sleep(1.5)
        for r in ctl_callers(pin_dir):
            if r["budget_per_second"] is not None:
                seen.setdefault(r["cgroup_id"], set()).add((r["reason"], round(r["budget_per_second"])))
    out = {}
    steady = (10.0, run - 2.0)       # the big caller's first seconds (before its budget) left out
    for name, (p, path, cg) in procs.items():
        t0, recs = records(p, path, timeout=60)
        lat, ok = window(recs, t0 - (4.0 if name == "big" else 0.0), *steady)
        out[name] = (cg, ok.mean(), ok.size, int(ok.sum()) / (steady[1] - steady[0]), p99(lat, ok))
    share = {"small": 60.0, "mid": 70.0, "near": 80.0, "big": 90.0}   # of the whole 300/s
    x = np.array([out[n][3] / share[n] for n in demands])
    jain = float(x.sum() ** 2 / (len(x) * (x ** 2).sum()))
    report = ("per caller (cgroup, success, requests, answered/s, p99): %s; Jain %.3f; budgets seen "
              "(cgroup: reason, rate): %s" % (out, jain, {k: sorted(v) for k, v in seen.items()}))
    print(report)
    assert out["small"][1] >= 0.99 and out["mid"][1] >= 0.99, report
    big = out["big"][0]
    # the callers within their shares are never held below their demand: a budget may flicker on
    # for a period when the capacity estimate dips under the true 300/s (their share of it is then
    # below their demand; CI saw mid at 70/s budgeted 68 once, with 100 % success), but never one
    # that binds (under 0.9 x demand)
    assert big in seen, report
    for name in ("small", "mid"):
        assert all(rate >= 0.9 * demands[name] for _, rate in seen.get(out[name][0], ())), report
    # held to about its share, not to a trickle: shed is what binds, at tens of connects a second
    assert any(reason == "shed" and rate >= 35 for reason, rate in seen[big]), report
    assert out["big"][1] < 0.9 and out["big"][3] >= 35, report
    assert jain >= 0.9, report
