"""Shared by the control-plane unit tests: configs, and what a connect would see
at every instant of a MemoryDatapath's recorded writes (no kernel, no root)."""

from __future__ import annotations

from typing import Any

import numpy as np

from equilibriumd.agent.reconcile import Reconciler
from equilibriumd.config import Config, parse
from equilibriumd.datapath import constants
from equilibriumd.datapath.memory import MemoryDatapath, Write
from equilibriumd.datapath.slots import unpack

NO_BACKEND = constants.NO_BACKEND


def service_yaml(name: str, frontend: str, backends: list[str | dict[str, Any]], **extra: str) -> str:
    """One `services:` entry; a backend is an address or a dict of its fields."""
    rows = []
    for b in backends:
        d = {"address": b} if isinstance(b, str) else b
        rows.append("{" + ", ".join("%s: %s" % kv for kv in d.items()) + "}")
    more = "".join("\n  %s: %s" % kv for kv in extra.items())
    return "- name: %s\n  frontend: %s%s\n  backends: [%s]\n" % (name, frontend, more, ", ".join(rows))


def config(*services: str, top: str = "") -> Config:
    return parse(top + ("services:\n" + "".join(services) if services else "services: []\n"), "<test>")


def configured(cfg: Config) -> dict[str, list[float]]:
    """The configured weights, as the agent hands them to apply before anything is learned."""
    return {s.name: [b.weight for b in s.backends] for s in cfg.services}


def ids_of(rec: Reconciler, cfg: Config) -> dict[str, list[int]]:
    """Backend ids per service in config order (what the agent hands build_layout)."""
    return {s.name: [rec.services[s.name].backends[b.address] for b in s.backends] for s in cfg.services}


class KernelView:
    """The maps a connect reads, rebuilt one recorded write at a time."""

    def __init__(self) -> None:
        self.fe: dict[Any, int] = {}
        self.svc: dict[int, tuple[int, int, int, int]] = {}
        self.slots: dict[int, np.ndarray] = {}
        self.be: dict[int, tuple[int, Any, int, int]] = {}

    def apply(self, w: Write) -> None:
        if w.map in ("eq_lb4_fe", "eq_lb6_fe"):
            if w.op == "delete":
                self.fe.pop(w.keys[0], None)
            else:
                self.fe[w.keys[0]] = w.values[0]
            return
        store = {"eq_lb_svc": self.svc, "eq_lb_slots": self.slots, "eq_lb_be": self.be}.get(w.map)
        if store is not None:
            store.update(zip(w.keys, w.values))

    def problems(self) -> list[str]:
        """What a connect could hit now: a reachable service whose live half names a
        backend that is not its own active entry (a stale slot), shares that do not
        match that half, or an n_avail that disagrees with it."""
        out = []
        for key, sid in self.fe.items():
            gen, n_avail = self.svc.get(sid, (0, 0, 0, 0))[:2]
            table, share = unpack(self.slots.get(sid * 2 + (gen & 1), np.zeros(constants.SLOTS, dtype=np.uint32)))
            ids, counts = np.unique(table[table != NO_BACKEND], return_counts=True)
            for i, c in zip(ids.tolist(), counts.tolist()):
                be = self.be.get(i)
                if be is None or be[0] != sid or be[2] != constants.BE_ACTIVE:
                    out.append("%s -> svc %d: slot names backend %d, entry %s" % (key, sid, i, be))
                said = set(share[table == i].tolist())
                if said != {c}:   # every slot of the backend carries the slots it holds
                    out.append("%s -> svc %d: backend %d holds %d slots, its slots say %s" % (key, sid, i, c, said))
            if (n_avail == 0) != (ids.size == 0):
                out.append("%s -> svc %d: n_avail %d with %d backends in the table" % (key, sid, n_avail, ids.size))
        return out


def check_every_instant(dp: MemoryDatapath) -> KernelView:
    """Replay every write from an empty datapath; fail at the first instant a
    connect could see an inconsistent service."""
    view = KernelView()
    for i, w in enumerate(dp.writes):
        view.apply(w)
        bad = view.problems()
        assert not bad, "after write %d %s: %s" % (i, (w.map, w.op, w.keys), bad)
    return view


def index(dp: MemoryDatapath, since: int = 0, **match: Any) -> list[int]:
    """Indexes of the writes (from `since`) whose fields equal `match`; `key=` matches one of the keys."""
    key = match.pop("key", None)
    return [i for i, w in enumerate(dp.writes) if i >= since
            and all(getattr(w, k) == v for k, v in match.items()) and (key is None or key in w.keys)]
