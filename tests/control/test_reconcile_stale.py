"""After a write that fails part-way, the reconciler never writes a live table
half: the next apply or tick re-reads what is live from the maps (no kernel:
MemoryDatapath records every write, and each slot-table write is checked
against the generation live at that instant).

Fault injection on the map-update calls: a batch that stops part-way (the
kernel's EIO "wrote i of n") cannot be provoked from user space on demand."""

from __future__ import annotations

from typing import Any

import numpy as np

from equilibriumd.agent.reconcile import Reconciler
from equilibriumd.agent.routing import build_layout
from equilibriumd.datapath import constants
from equilibriumd.datapath.memory import MemoryDatapath
from equilibriumd.datapath.slots import apportion_rows

from .support import KernelView, config, configured, ids_of, service_yaml

SERVICES = [service_yaml("s%d" % i, "10.96.0.%d:80" % (i + 1), ["10.0.%d.1:80" % i, "10.0.%d.2:80" % i,
                                                                   "10.0.%d.3:80" % i]) for i in range(6)]


def live_half_writes(dp: MemoryDatapath) -> list[str]:
    """Slot-table writes that hit the half live at the time (replaying the record)."""
    live: dict[int, int] = {}
    out = []
    for w in dp.writes:
        if w.map == "eq_lb_svc":
            for k, v in zip(w.keys, w.values):
                live[int(k)] = int(v[0] if isinstance(v, tuple) else v.gen) & 1
        elif w.map == "eq_lb_slots":
            for k in w.keys:
                sid, half = divmod(int(k), 2)
                if sid in live and live[sid] == half:
                    out.append("svc %d half %d" % (sid, half))
    return out


def fail_once(dp: MemoryDatapath, method: str, after: int, monkeypatch: Any) -> list[int]:
    """`method` fails once: a batch stops after `after` entries; single calls fail at the `after`-th."""
    real = getattr(dp, method)
    calls = [0]

    def flaky(*args: Any) -> None:
        calls[0] += 1
        if calls[0] < 0:
            return real(*args)
        if method == "set_services_batch":
            ids, svcs = args
            real(ids[:after], svcs[:after])
            calls[0] = -10 ** 9
            raise OSError(5, "wrote %d of %d" % (after, len(ids)))
        if calls[0] == after:
            calls[0] = -10 ** 9
            raise OSError(5, "injected")
        return real(*args)

    monkeypatch.setattr(dp, method, flaky)
    return calls


def ready() -> tuple[MemoryDatapath, Reconciler, Any, Any]:
    dp = MemoryDatapath()
    rec = Reconciler(dp)
    cfg = config(*SERVICES)
    rec.apply(cfg, configured(cfg))
    lay = build_layout(cfg, ids_of(rec, cfg))
    rec.set_layout(lay)
    return dp, rec, cfg, lay


def check_tables(dp: MemoryDatapath, rec: Reconciler, cfg: Any, weights: np.ndarray) -> None:
    want = apportion_rows(weights, constants.SLOTS)
    for r, s in enumerate(cfg.services):
        a = rec.services[s.name]
        gen = dp.service(a.id).gen & 1
        table = dp.read_slots(a.id, gen)
        got = [int((table == i).sum()) for i in ids_of(rec, cfg)[s.name]]
        assert got == want[r, :3].tolist(), (s.name, got, want[r])


def test_a_tick_after_a_partly_failed_flip_writes_only_standby_halves(monkeypatch: Any) -> None:
    dp, rec, cfg, lay = ready()
    w1 = np.tile([0.8, 0.1, 0.1], (6, 1))
    w2 = np.tile([0.1, 0.1, 0.8], (6, 1))
    fail_once(dp, "set_services_batch", 3, monkeypatch)
    try:
        rec.write_weights(w1)
        raise AssertionError("the injected failure did not fire")
    except OSError:
        pass
    assert rec.write_weights(w2) == 6
    assert live_half_writes(dp) == []
    check_tables(dp, rec, cfg, w2)
    view = KernelView()
    for w in dp.writes:
        view.apply(w)
    assert view.problems() == []


def test_an_apply_after_a_partly_failed_apply_writes_only_standby_halves(monkeypatch: Any) -> None:
    dp, rec, cfg, lay = ready()
    # a new config: every service's weights change (one table per service) ...
    cfg2 = config(*[s.replace("backends: [", "backends: [{address: 10.9.9.%d:80, weight: 3}, " % i)
                    for i, s in enumerate(SERVICES)])
    fail_once(dp, "set_service", 4, monkeypatch)   # ... and the 4th flip fails
    try:
        rec.apply(cfg2, configured(cfg2))
        raise AssertionError("the injected failure did not fire")
    except OSError:
        pass
    rec.apply(cfg2, configured(cfg2))
    assert live_half_writes(dp) == []
    lay2 = build_layout(cfg2, ids_of(rec, cfg2))
    rec.set_layout(lay2)
    w = np.tile([0.4, 0.2, 0.2, 0.2], (6, 1))
    rec.write_weights(w)
    assert live_half_writes(dp) == []
    want = apportion_rows(w, constants.SLOTS)
    for r, s in enumerate(cfg2.services):
        a = rec.services[s.name]
        table = dp.read_slots(a.id, dp.service(a.id).gen & 1)
        assert [int((table == i).sum()) for i in ids_of(rec, cfg2)[s.name]] == want[r].tolist()
    view = KernelView()
    for x in dp.writes:
        view.apply(x)
    assert view.problems() == []
