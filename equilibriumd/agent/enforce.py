"""The agent's side of the cooperation game: gathers each period's per-service
signals from the ticks, runs `policy.cooperation`, writes and clears the
admission budgets of punished callers in the kernel, and logs punishments and
forgiveness. Every service with `enforce: off` is left out of it.

A period is PERIOD_SECONDS of ticks (the signals summed over them), so the game
runs about once a second whatever the tick; between periods a tick pays only
the sums (a few numpy reductions over the (services x backends) matrices).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..config import Config
from ..datapath.evidence import EvidenceSource
from ..datapath.maps import Datapath
from ..policy.cooperation import Cooperation, ServiceRows, Standing
from .routing import Layout, Signals

#: seconds of ticks per period of the cooperation game
PERIOD_SECONDS = 1.0


class Enforcer:
    def __init__(self, dp: Datapath, log: Any, evidence: EvidenceSource | None = None) -> None:
        self.dp = dp
        self.evidence = evidence   #: the agent's mapped reader (mapping anew each period costs ms)
        self.log = log
        self.coop = Cooperation()
        self.layout: Layout | None = None
        self.sids = np.zeros(0, dtype=np.int64)
        self.enforce: list[str] = []
        self._sums = np.zeros((0, 4))     # per row: latency x served, served, tried, failed
        self._seconds = 0.0
        self._http = np.zeros(0, dtype=bool)
        self._row_of_id = np.zeros(0, dtype=np.int64)   # backend id -> layout row (-1: none)
        self.punished_total = 0
        self.forgiven_total = 0

    def start(self) -> int:
        """A fresh game: budgets a previous agent left are lifted (forgiven). Returns how many."""
        return self.dp.lift_budgets()

    def set_layout(self, config: Config, layout: Layout, sids: np.ndarray) -> None:
        by_name = {s.name: s for s in config.services}
        self.layout, self.sids = layout, np.asarray(sids, dtype=np.int64)
        self.enforce = [config.enforce_of(by_name[n]) for n in layout.names]
        self._sums = np.zeros((len(layout.names), 4))
        self._seconds = 0.0
        ids = layout.ids
        self._row_of_id = np.full(int(ids.max()) + 1 if ids.size and ids.max() >= 0 else 0, -1, dtype=np.int64)
        r, _ = np.nonzero(ids >= 0)
        self._row_of_id[ids[ids >= 0]] = r

    def tick(self, sig: Signals, dt: float) -> None:
        """Add one tick's signals; run a period when PERIOD_SECONDS have gathered."""
        lay = self.layout
        if lay is None or sig.latency.shape[0] != self._sums.shape[0]:
            return
        lat = np.where(np.isnan(sig.latency), 0.0, sig.latency)
        self._sums += np.stack([(lat * sig.served).sum(axis=1), sig.served.sum(axis=1), sig.requests.sum(axis=1),
                                sig.errors.sum(axis=1)], axis=1)
        self._seconds += dt
        self._http = sig.http
        if self._seconds >= PERIOD_SECONDS:
            self._period()

    def _period(self) -> None:
        lay = self.layout
        assert lay is not None
        s, secs = self._sums, self._seconds
        self._sums, self._seconds = np.zeros_like(s), 0.0
        watch = np.array([e != "off" for e in self.enforce], dtype=bool)
        if not watch.any():
            return
        latency = np.divide(s[:, 0], s[:, 1], out=np.full(s.shape[0], np.nan), where=s[:, 1] > 0)
        latency[~watch] = np.nan   # an unwatched service is never overloaded here
        rows = ServiceRows(lay.names, self.sids, np.where(watch[:, None], lay.ids, -1), self.enforce, latency,
                           np.where(watch, s[:, 2], 0.0), np.where(watch, s[:, 3], 0.0), s[:, 1] / max(secs, 1e-9),
                           self._http)
        if self.evidence is None:
            self.evidence = self.dp.evidence()
        d = self.coop.period(secs, rows, self.evidence, self.dp.budgets())
        for cg, sid, budget in d.set:
            self.dp.set_budget(cg, sid, budget)
        for cg, sid in d.clear:
            self.dp.delete_budget(cg, sid)
        for st in d.punished:
            self.punished_total += 1
            self.log.warning("caller_punished", service=st.service, cgroup=st.cgroup,
                             demand_per_second=round(st.demand, 1), fair_share_per_second=_r(st.share),
                             budget_per_second=_r(st.budget_rate), punish_periods=st.punish_left,
                             reputation=round(st.reputation, 3),
                             min_discount_factor=_r(self.coop.min_delta.get((st.cgroup, st.service))),
                             mode=self.enforce[lay.row[st.service]])
        for st in d.forgiven:
            self.forgiven_total += 1
            self.log.info("caller_forgiven", service=st.service, cgroup=st.cgroup, reputation=round(st.reputation, 3))

    def note_disputed(self, backend_ids: np.ndarray, cgroups: np.ndarray, amounts: np.ndarray) -> None:
        """Failures the other callers did not corroborate (policy.evidence), by backend id:
        bad for those callers' reputations with the backends' services."""
        lay = self.layout
        if lay is None or backend_ids.size == 0:
            return
        ok = backend_ids < self._row_of_id.size
        rows = np.where(ok, self._row_of_id[np.minimum(backend_ids, max(self._row_of_id.size - 1, 0))], -1) \
            if self._row_of_id.size else np.full(backend_ids.shape, -1)
        keep = rows >= 0
        if keep.any():
            self.coop.note_uncorroborated(cgroups[keep], [lay.names[int(r)] for r in rows[keep]], amounts[keep])

    def standings(self) -> list[Standing]:
        return sorted(self.coop.standings.values(), key=lambda s: (s.service, s.cgroup))


def _r(x: float | None) -> float | None:
    return None if x is None else round(float(x), 3)
