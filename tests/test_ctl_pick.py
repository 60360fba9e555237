"""`equilibriumctl pick`: views.pick and the click command over an in-memory
stand-in for the pinned maps (the methods the view reads, nothing else), and
one root test that holds its prediction against real connects."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from equilibriumd import views
from equilibriumd.cli import ctl
from equilibriumd.datapath import constants, pick
from equilibriumd.datapath.maps import Datapath, PinnedBackend, PinnedService
from equilibriumd.datapath.slots import build_table
from equilibriumd.datapath.slots import counts as slot_counts
from equilibriumd.datapath.structs import Svc
from equilibriumd.types import Addr

from helpers import PY, REPO, connect, write_config

ACTIVE, DRAINING = constants.BE_ACTIVE, constants.BE_DRAINING


class MemDatapath:
    """One service's slot table, shares, states and open counts, read through the
    same methods as equilibriumd.datapath.maps.Datapath."""

    def __init__(self, weights: list[float], open_: dict[int, int] | None = None, flags: int = constants.SVC_P2C,
                 states: dict[int, int] | None = None, gen: int = 1, first_id: int = 5) -> None:
        self.ids = [first_id + i for i in range(len(weights))]
        self.table = build_table(self.ids, weights)
        self.gen = gen
        self.counts = dict(zip(self.ids, slot_counts(self.table, self.ids).tolist()))
        self.open = np.zeros(constants.MAX_BACKENDS, dtype=np.int64)
        for i, k in (open_ or {}).items():
            self.open[self.ids[i]] = k
        states = states or {}
        avail = sum(1 for i in range(len(weights)) if states.get(i, ACTIVE) == ACTIVE and weights[i] > 0)
        self.svc = PinnedService(3, "bus", Addr(4, "127.77.0.1", 80), "tcp", gen, avail, len(weights), flags)
        self.bes = [PinnedBackend(bid, 3, Addr(4, "127.0.0.%d" % (21 + i), 8080), states.get(i, ACTIVE), 1000)
                    for i, bid in enumerate(self.ids)]

    def __enter__(self) -> "MemDatapath":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def services(self) -> list[PinnedService]:
        return [self.svc]

    def service(self, svc_id: int) -> Svc:
        return Svc(gen=self.gen, n_avail=self.svc.n_avail, n_backends=self.svc.n_backends, flags=self.svc.flags)

    def backends(self) -> list[PinnedBackend]:
        return list(self.bes)

    def read_slots(self, svc_id: int, gen: int) -> np.ndarray:
        assert (svc_id, gen) == (3, self.gen), "the view must read the live half"
        return self.table.copy()

    def read_shares(self, svc_id: int, gen: int, ids: list[int]) -> list[int]:
        assert (svc_id, gen) == (3, self.gen), "the view must read the live half"
        return [self.counts.get(i, 0) for i in ids]

    def active(self, n: int = constants.MAX_BACKENDS) -> np.ndarray:
        return np.maximum(self.open[:n], 0)


def _exact(dp: MemDatapath) -> np.ndarray:
    """Exact P(backend) for one draw over every pair of slots (no stale slots)."""
    r = pick.compose(np.repeat(np.arange(constants.SLOTS), constants.SLOTS),
                     np.tile(np.arange(constants.SLOTS), constants.SLOTS))
    shares = np.zeros(constants.MAX_BACKENDS, dtype=np.uint32)
    shares[dp.ids] = [dp.counts[i] for i in dp.ids]
    got = pick.pick_once(dp.table, shares, dp.open, dp.svc.flags, r)
    return np.array([(got == i).mean() for i in dp.ids])


def test_prediction_follows_the_rule_on_the_live_half():
    dp = MemDatapath([1, 1, 1], open_={0: 20, 1: 4})
    data = views.pick(dp, "bus", 40_000, seed=3)  # type: ignore[arg-type]
    got = np.array([b["predicted_share"] for b in data["backends"]])
    want = _exact(dp)
    # binomial sd at 40,000 draws is at most 0.0025: 0.012 is ~5 sd
    assert np.abs(got - want).max() < 0.012, (got, want)
    assert want[2] > 0.5 > 1 / 3, "the idle backend takes most: this is not the weighted split"
    assert [b["active_connections"] for b in data["backends"]] == [20, 4, 0]
    assert [b["share"] for b in data["backends"]] == pytest.approx([342 / 1024, 341 / 1024, 341 / 1024], abs=1e-6)
    assert sum(b["predicted_connects"] for b in data["backends"]) == 40_000 and data["unrouted_connects"] == 0
    # the same seed gives the same answer
    assert views.pick(dp, "bus", 40_000, seed=3) == data  # type: ignore[arg-type]


def test_weighted_service_ignores_open_counts():
    dp = MemDatapath([3, 1], open_={0: 50}, flags=0)
    data = views.pick(dp, "bus", 20_000, seed=1)  # type: ignore[arg-type]
    assert data["balance"] == constants.BALANCE_WEIGHTED
    assert data["backends"][0]["predicted_share"] == pytest.approx(0.75, abs=0.015)


def test_stale_slots_draw_again_and_nothing_available_fails():
    # backend 1 was drained after its slots were written: a draw that lands there tries
    # again, at most three draws in all, so 1/27 of connects still fail
    dp = MemDatapath([1, 1, 1], states={1: DRAINING}, flags=0)
    data = views.pick(dp, "bus", 60_000, seed=2)  # type: ignore[arg-type]
    assert data["backends"][1]["predicted_connects"] == 0
    assert data["unrouted_connects"] / 60_000 == pytest.approx((341 / 1024) ** 3, abs=0.004)
    empty = MemDatapath([0, 0])
    assert views.pick(empty, "bus", 100, seed=0)["unrouted_connects"] == 100  # type: ignore[arg-type]


def _run(dp: MemDatapath, monkeypatch: pytest.MonkeyPatch, *args: str) -> Any:
    monkeypatch.setattr(ctl, "_open", lambda pin_dir: dp)
    return CliRunner().invoke(ctl.cli, ["pick", *args])


def test_ctl_pick_json_table_and_errors(monkeypatch):
    dp = MemDatapath([2, 1], open_={0: 9})
    r = _run(dp, monkeypatch, "bus", "-n", "500", "--seed", "4", "-o", "json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["connects"] == 500 and data["balance"] == "p2c" and data["seed"] == 4
    assert set(data["backends"][0]) == {"address", "id", "state", "share", "active_connections",
                                        "predicted_connects", "predicted_share"}
    assert sum(b["predicted_connects"] for b in data["backends"]) == 500

    r = _run(dp, monkeypatch, "bus", "--seed", "4")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].startswith("bus  127.77.0.1:80/tcp  balance p2c  next 1000 connects (open counts held fixed)")
    assert lines[1].split() == ["ID", "ADDRESS", "STATE", "SHARE", "OPEN", "NEXT", "NEXT-SHARE"]
    assert lines[2].split()[:5] == ["5", "127.0.0.21:8080", "active", "0.667", "9"]

    r = _run(dp, monkeypatch, "nope")
    assert r.exit_code == 1 and "no service 'nope' (known: bus)" in r.stderr and r.stdout == ""
    r = _run(dp, monkeypatch, "bus", "-n", "0")
    assert r.exit_code == 2
    help_ = " ".join(CliRunner().invoke(ctl.cli, ["pick", "--help"]).stdout.split())
    assert "holds the current open counts fixed" in help_


def _svc(fe: str, addrs: list[str], weights: list[float]) -> dict[str, Any]:
    return {"name": "bus", "frontend": fe, "protocol": "tcp",
            "backends": [{"address": a, "weight": w} for a, w in zip(addrs, weights)]}


def _write(cfg: Path, fe: str, addrs: list[str], weights: list[float]) -> None:
    write_config(cfg, [_svc(fe, addrs, weights)])
    cfg.write_text("balance: p2c\n" + cfg.read_text())


@pytest.mark.root
def test_prediction_matches_real_connects(tmp_path, cgroup, backends, agent, frontend_ip, pin_dir):
    """Hold 12 connections open on backend 0, then give all three equal weights: `pick`
    (the real command on the real maps) predicts about 1/9, 4/9, 4/9, and real connects,
    each closed at once so the open counts stay as predicted, must follow it.

    Bound: a chi-square test of 1,200 connects against the predicted shares, failing at
    p < 1e-4 (chi2 > 18.4 with 2 degrees of freedom). The prediction itself is sampled
    from 200,000 draws: its error (sd <= 0.0011 per share) is a tenth of the connects'
    (sd ~ 0.014), too small to matter. Against the weighted split (1/3 each) the same
    connects would give chi2 near 180: the test tells the two rules apart."""
    be = backends(3)
    addrs = [be.addr(i) for i in range(3)]
    fe = frontend_ip + ":80"
    cfg = tmp_path / "c.yaml"
    _write(cfg, fe, addrs, [1, 0, 0])
    a = agent(cfg).start()
    held: list[socket.socket] = []
    try:
        with cgroup.enter():
            held = [connect(frontend_ip, 80) for _ in range(12)]
        _wait(lambda: be.total() == 12)
        assert be.accepts[0] == 12
        _write(cfg, fe, addrs, [1, 1, 1])
        n = a.count("config_reloaded")
        a.hup()
        a.wait_event("config_reloaded", after=n)

        r = subprocess.run([PY, "-m", "equilibriumd.cli.ctl", "pick", "bus", "-n", "200000", "--seed", "11",
                            "-o", "json", "--pin-dir", pin_dir], capture_output=True, text=True, cwd=REPO, timeout=60)
        assert r.returncode == 0, r.stderr
        pred = json.loads(r.stdout)
        rows = sorted(pred["backends"], key=lambda b: b["id"])
        assert [b["active_connections"] for b in rows] == [12, 0, 0]
        assert [b["share"] for b in rows] == pytest.approx([342 / 1024, 341 / 1024, 341 / 1024], abs=1e-6)
        # what pick reads is the live half the agent wrote: one contiguous run per backend,
        # each as long as the share written beside it (a read shifted by even one slot fails)
        with Datapath(pin_dir) as dp:
            sv = next(x for x in dp.services() if x.name == "bus")
            ids = [b["id"] for b in rows]
            table = dp.read_slots(sv.id, sv.gen)
            shares = dp.read_shares(sv.id, sv.gen, ids)
        runs = 1 + int(np.count_nonzero(np.diff(table.astype(np.int64))))
        assert runs == 3 and [int((table == i).sum()) for i in ids] == shares, \
            "Datapath.read_slots(%d, %d) is not the live table half" % (sv.id, sv.gen)
        want = np.array([b["predicted_share"] for b in rows])
        q = np.array([342, 341, 341]) / 1024
        assert want == pytest.approx([q[0] ** 2, q[1] * (1 + q[0]), q[2] * (1 + q[0])], abs=0.005)

        new = 1200
        with cgroup.enter():
            for _ in range(new):
                connect(frontend_ip, 80).close()      # RST: its count is gone before the next connect
        _wait(lambda: be.total() == 12 + new)
        seen = np.array([be.accepts[0] - 12, be.accepts[1], be.accepts[2]])
        chi2 = float((((seen - new * want) ** 2) / (new * want)).sum())
        assert chi2 < 18.4, (seen.tolist(), (new * want).round(1).tolist(), chi2)
    finally:
        for s in held:
            s.close()


def _wait(cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert cond()
