"""The agent's side of admission: gathers each period's per-service signals from
the ticks, runs the cooperation game (`policy.cooperation`), fair shedding and
the zero-sum flood defence (`policy.admission`), merges their per-caller
budgets (the smallest binds), writes, rewrites and deletes them in the kernel
(eq_lb_budget), and logs punishments, forgiveness, shedding and defence as they
change. Every service with `enforce: off` is left out of it.

A period is PERIOD_SECONDS of ticks (the signals summed over them), so the game
runs about once a second whatever the tick; between periods a tick pays only
the sums (a few numpy reductions over the (services x backends) matrices), and
per-backend sums for the few services admission watches.

Scale: per period, the stress test is vectorized over every service; only the
services it finds overloaded, or that admission already watches, cost Python
work (a capacity estimate, their callers' demands, shedding, the defence's LP).
A budget is written only when its rate moves by more than REWRITE or its mode
changes, keeping the kernel entry's counters (Datapath.set_budget_rate).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ..config import Config
from ..datapath import constants
from ..datapath.evidence import EvidenceSource
from ..datapath.maps import Datapath
from ..datapath.structs import Budget
from ..policy.admission import REASONS, Admission, Merged, merge
from ..policy.cooperation import Cooperation, ServiceRows, Standing
from .routing import Layout, Signals

#: seconds of ticks per period of the cooperation game
PERIOD_SECONDS = 1.0
#: a budget is rewritten when its rate moves by more than this fraction (or its mode changes)
REWRITE = 0.02
#: seconds of its budget a caller may use at once (CoopParams.burst)
BURST_SECONDS = 0.5


class Enforcer:
    def __init__(self, dp: Datapath, log: Any, evidence: EvidenceSource | None = None,
                 seed: int | None = None) -> None:
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
        # admission (shedding and defence) of the watched services
        self.admission = Admission(seed=seed)
        self._wrows: list[tuple[str, int]] = []      # (name, row) of the watched services: fed each tick
        self._recent: list[tuple[Signals, float]] = []   # the last two ticks (a newly watched service's first data)
        self._thr: dict[tuple[int, int], int] = {}    # (cgroup, svc id) -> throttled count seen last period
        self.written: dict[tuple[int, int], tuple[float, int]] = {}   # (cgroup, svc id) -> (rate, mode) in the kernel
        self.merged: dict[tuple[int, int], Merged] = {}                # ... and why
        self._fair: set[tuple[int, int]] = set()
        self.infeasible: set[str] = set()             #: services whose offered load is over their capacity
        self._status: dict[tuple[int, int], set[str]] = {}   # shed / defended against, for the log
        self.shed_total = 0
        self.defended_total = 0

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
        for name in [n for n in self.admission.watched if n not in layout.row]:
            del self.admission.watched[name]   # gone from the config
        self._watch_rows()

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
        self._recent = self._recent[-1:] + [(sig, dt)]   # references only
        for name, r in self._wrows:   # admission's watched services: their capacity estimates, tick by tick
            self._observe(name, lay.ids[r], sig, r, dt)
        if self._seconds >= PERIOD_SECONDS:
            self._period()

    def _period(self) -> None:
        lay = self.layout
        assert lay is not None
        s, secs = self._sums, self._seconds
        self._sums, self._seconds = np.zeros_like(s), 0.0
        watch = np.array([e != "off" for e in self.enforce], dtype=bool)
        if not watch.any():
            if self.written:
                self._apply({})   # every service is off now: no budgets
            return
        latency = np.divide(s[:, 0], s[:, 1], out=np.full(s.shape[0], np.nan), where=s[:, 1] > 0)
        latency[~watch] = np.nan   # an unwatched service is never overloaded here
        rows = ServiceRows(lay.names, self.sids, np.where(watch[:, None], lay.ids, -1), self.enforce, latency,
                           np.where(watch, s[:, 2], 0.0), np.where(watch, s[:, 3], 0.0), s[:, 1] / max(secs, 1e-9),
                           self._http)
        if self.evidence is None:
            self.evidence = self.dp.evidence()
        kb = self.dp.budgets()
        d = self.coop.period(secs, rows, self.evidence, kb)
        sources = self._admit(secs, watch, kb)
        sources["punished"] = {(cg, sid): rate for (cg, _), (sid, rate, _) in self.coop.budgets.items()}
        self._apply(merge(sources, self._fair), kb)
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
        """Cooperation's standings, with every budgeted caller's reason (a caller only shed
        or defended against has a standing of its own, as cooperating)."""
        out = dict(self.coop.standings)
        lay = self.layout
        names = {int(sid): lay.names[r] for r, sid in enumerate(self.sids.tolist())} \
            if lay is not None and self.merged else {}
        for (cg, sid), m in self.merged.items():
            key = (cg, names.get(sid, "svc-%d" % sid))
            st = out.get(key)
            if st is None:
                st = Standing(cgroup=cg, service=key[1], demand=0.0, share=None, state="cooperating",
                              reputation=1.0, punish_left=0, budget_rate=None)
            out[key] = dataclasses.replace(st, budget_rate=m.rate, reason=m.reason, reasons=m.reasons)
        return sorted(out.values(), key=lambda s: (s.service, s.cgroup))

    def budget_counts(self) -> dict[str, int]:
        """Callers budgeted now, by the reason that binds (every reason present)."""
        out = dict.fromkeys(REASONS, 0)
        for m in self.merged.values():
            out[m.reason] += 1
        return out

    # --- admission: shedding and defence ---------------------------------------------------
    def _watch_rows(self) -> None:
        """Feed the services admission watches from the next tick on."""
        lay = self.layout
        self._wrows = sorted(((n, lay.row[n]) for n in self.admission.watched if n in lay.row),
                             key=lambda x: x[1]) if lay is not None else []

    def _observe(self, name: str, ids: np.ndarray, sig: Signals, r: int, dt: float) -> None:
        cols = ids >= 0
        if cols.any() and r < sig.served.shape[0]:
            self.admission.observe(name, sig.served[r][cols], sig.latency[r][cols], dt,
                                   np.nan_to_num(sig.inflight[r][cols]))

    def _admit(self, secs: float, watch: np.ndarray, kb: dict[tuple[int, int], Budget]
               ) -> dict[str, dict[tuple[int, int], float]]:
        """Shedding and defence budgets of the watched services: those cooperation's stress
        test finds overloaded this period, and those admission already watches."""
        lay = self.layout
        assert lay is not None and self.evidence is not None
        stressed = self.coop.stressed
        cand = set(np.flatnonzero(stressed & watch).tolist()) if stressed.shape == watch.shape else set()
        cand |= {lay.row[n] for n in self.admission.watched if n in lay.row and watch[lay.row[n]]}
        for name in [n for n in self.admission.watched if n not in lay.row or not watch[lay.row[n]]]:
            del self.admission.watched[name]   # enforce: off now
        shed: dict[tuple[int, int], float] = {}
        defended: dict[tuple[int, int], float] = {}
        self._fair = set()   # this period's shed callers of an overload nobody alone causes (merge)
        if not cand and not self._thr:
            self.infeasible = set()
            self._status = {}
            if self._wrows:
                self._watch_rows()
            return {"shed": shed, "defended": defended}
        # what the kernel refused each budgeted caller this period (not in the evidence: refused
        # before a backend is picked): part of its offered rate
        refused: dict[int, dict[int, float]] = {}
        for key, b in kb.items():
            t = int(b.throttled)
            prev = self._thr.get(key)
            if prev is not None:
                refused.setdefault(key[1], {})[key[0]] = max(t - prev, 0) / max(secs, 1e-9)
            if key in self.written:
                self._thr[key] = t
        for key in [k for k in self._thr if k not in kb or k not in self.written]:
            del self._thr[key]
        fed = {r for _, r in self._wrows}
        infeasible = set()
        status: dict[tuple[int, int], set[str]] = {}   # shed, or the defence's suspect / held
        names: dict[int, str] = {}
        for r in sorted(cand):
            name, ids = lay.names[r], lay.ids[r]
            cols = ids >= 0
            if not cols.any():
                continue
            self.admission.watch(name, int(cols.sum()))
            if r not in fed:   # newly watched: its last two ticks (a backlog in both gives a capacity at once)
                for sig, dt in self._recent:
                    self._observe(name, ids, sig, r, dt)
            demand = self.coop._demands(ids, self.evidence, bool(self._http[r]) if self._http.size > r else False)
            sid = int(self.sids[r])
            for cg, x in refused.get(sid, {}).items():
                demand[cg] = demand.get(cg, 0.0) + x
            v = self.admission.decide(name, demand, bool(stressed[r]) if stressed.size > r else False, secs)
            if v.infeasible:
                infeasible.add(name)
            for cg, rate in v.shed.items():
                shed[(cg, sid)] = rate
                status.setdefault((cg, sid), set()).add("shed")
            self._fair.update((cg, sid) for cg in v.fair)
            for cg, rate in v.defended.items():
                defended[(cg, sid)] = rate
            w = self.admission.watched[name]
            for cg in set(w.defence.held) | ({v.game.suspect} if v.game is not None else set()):
                status.setdefault((cg, sid), set()).add("defended")   # the suspect, whatever level is drawn
            names[sid] = name
        for name in sorted(infeasible - self.infeasible):
            w = self.admission.watched[name]
            self.log.warning("service_infeasible", service=name, capacity_per_second=_r(w.capacity.total()))
        for name in sorted(self.infeasible - infeasible):
            self.log.info("service_feasible", service=name)
        self.infeasible = infeasible
        self._log_status(status, shed, defended, names)
        self.admission.release()
        self._watch_rows()
        return {"shed": shed, "defended": defended}

    def _log_status(self, status: dict[tuple[int, int], set[str]], shed: dict[tuple[int, int], float],
                    defended: dict[tuple[int, int], float], names: dict[int, str]) -> None:
        """Log a caller once when it starts being shed or defended against, and when it stops
        (not every period: the defence draws a level, possibly none, each period)."""
        for key, now in status.items():
            was = self._status.get(key, set())
            for why in sorted(now - was):
                rate = (shed if why == "shed" else defended).get(key)
                if why == "shed":
                    self.shed_total += 1
                else:
                    self.defended_total += 1
                self.log.warning("caller_shed" if why == "shed" else "caller_defended", service=names[key[1]],
                                 cgroup=key[0], budget_per_second=_r(rate))
        for key, was in self._status.items():
            if not status.get(key):
                self.log.info("caller_admitted", service=names.get(key[1], "svc-%d" % key[1]), cgroup=key[0],
                              was=sorted(was))
        self._status = status

    def _apply(self, wanted: dict[tuple[int, int], Merged], kb: dict[tuple[int, int], Budget] | None = None) -> None:
        """Write the budgets that are new or changed (counters kept), delete those nobody wants.
        `kb`: the kernel's budgets at the period's start (one gone behind our back, e.g. by
        Datapath.forget_services when a service id changed hands, is written anew)."""
        lay = self.layout
        assert lay is not None
        row_of_sid = {int(sid): r for r, sid in enumerate(self.sids.tolist())} if wanted or self.written else {}
        for key, m in wanted.items():
            r = row_of_sid.get(key[1])
            if r is None or self.enforce[r] == "off":
                continue
            mode = constants.ENFORCE_MODES.get(self.enforce[r], constants.ENFORCE_OBSERVE)
            old = self.written.get(key)
            if old is not None and kb is not None and key not in kb:
                old = None
            if old is None or old[1] != mode or abs(m.rate - old[0]) > REWRITE * old[0]:
                new = self.dp.set_budget_rate(key[0], key[1], int(1e9 / max(m.rate, 1e-3)),
                                              int(BURST_SECONDS * 1e9), mode)
                if new:
                    self._thr[key] = 0   # a new entry's counters start at 0
                self.written[key] = (m.rate, mode)
        for key in [k for k in self.written if k not in wanted or row_of_sid.get(k[1]) is None
                    or self.enforce[row_of_sid[k[1]]] == "off"]:
            self.dp.delete_budget(*key)
            del self.written[key]
            self._thr.pop(key, None)
        self.merged = {k: m for k, m in wanted.items() if k in self.written}


def _r(x: float | None) -> float | None:
    return None if x is None else round(float(x), 3)
