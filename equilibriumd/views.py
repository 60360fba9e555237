"""What equilibriumctl shows, built from the pinned maps alone (so it answers
while the agent is down). Pure data in, dicts out; rendering is separate."""

from __future__ import annotations

from typing import Any

import numpy as np

from .datapath import constants
from .datapath import pick as rule
from .datapath.maps import Datapath, PinnedService
from .datapath.slots import shares as slot_shares
from .datapath.telemetry import CONNECT_FAILED, COUNTER, FAILED, TRIED, hist_quantile, total


class UnknownService(LookupError):
    pass


def services(dp: Datapath) -> list[dict[str, Any]]:
    sel = dp.selections()
    errs = dp.service_errors()
    by_svc: dict[int, list[int]] = {}
    for b in dp.backends():
        by_svc.setdefault(b.svc, []).append(b.id)
    out = []
    for s in dp.services():
        ids = by_svc.get(s.id, [])
        out.append({
            "name": s.name,
            "id": s.id,
            "frontend": str(s.frontend),
            "protocol": s.protocol,
            "backends_total": len(ids),
            "backends_available": s.n_avail,
            "balance": _balance(dp, s.id),
            "selections_total": int(sum(int(sel[i]) for i in ids)),
            "no_backend_total": int(errs[s.id, 0]),
            "stale_slot_total": int(errs[s.id, 1]),
            "revnat_update_errors_total": int(errs[s.id, 2]),
        })
    return out


def _service(dp: Datapath, name: str) -> PinnedService:
    """The pinned service called `name`, or UnknownService naming the known ones."""
    svcs = dp.services()
    svc = next((s for s in svcs if s.name == name), None)
    if svc is None:
        known = ", ".join(sorted(s.name for s in svcs)) or "none"
        raise UnknownService("no service %r (known: %s)" % (name, known))
    return svc


def backends(dp: Datapath, name: str) -> dict[str, Any]:
    svc = _service(dp, name)
    share = slot_shares(dp.read_slots(svc.id, svc.gen))
    sel = dp.selections()
    active = dp.active()
    bes = sorted((b for b in dp.backends() if b.svc == svc.id), key=lambda b: b.id)
    tel, conn_hist, req_hist = dp.telemetry().totals(max([b.id for b in bes] + [-1]) + 1)
    # the one definition of each failure count (datapath.telemetry), for every id at once
    conn_errs, fails, tries = total(tel, CONNECT_FAILED), total(tel, FAILED), total(tel, TRIED)
    moved = dp.rebalanced(max([b.id for b in bes] + [-1]) + 1)   # None: no rebalancer loaded
    rows = []
    for b in bes:
        t = {k: int(tel[b.id, i]) for k, i in COUNTER.items()}
        conn_err, failed, tried = int(conn_errs[b.id]), int(fails[b.id]), int(tries[b.id])
        rows.append({
            "address": str(b.address),
            "id": b.id,
            "state": constants.STATE_NAMES.get(b.state, str(b.state)),
            "weight": b.weight / 1000.0,
            "share": round(float(share.get(b.id, 0.0)), 6),
            "selections_total": int(sel[b.id]),
            "connections_total": t["established"],
            "open_connections": max(t["established"] - t["closed"], 0),
            # the kernel's own count (also without telemetry): what balance p2c compares
            "active_connections": int(active[b.id]),
            "connect_errors_total": conn_err,
            "connect_refused_total": t["refused"],
            "connect_reset_total": t["reset"],
            "connect_timeouts_total": t["timed_out"],
            "requests_total": t["requests"],
            "responses_2xx_total": t["resp_2xx"],
            "responses_3xx_total": t["resp_3xx"],
            "responses_4xx_total": t["resp_4xx"],
            "responses_5xx_total": t["resp_5xx"],
            "requests_unanswered_total": t["req_errors"],
            # failed requests and connects over everything tried
            "error_ratio": round(failed / tried, 6) if tried else 0.0,
            "latency_p50_seconds": _num(hist_quantile(req_hist[b.id], 0.5)),
            "latency_p99_seconds": _num(hist_quantile(req_hist[b.id], 0.99)),
            "connect_latency_p50_seconds": _num(hist_quantile(conn_hist[b.id], 0.5)),
            "rtt_seconds": round(t["rtt_sum_us"] / t["rtt_samples"] * 1e-6, 9) if t["rtt_samples"] else None,
            "retransmits_total": t["retrans"],
            "bytes_sent_total": t["bytes_sent"],
            "bytes_received_total": t["bytes_recv"],
            # connections the rebalancer closed (their pools reconnected by the weights), by reason
            "rebalanced": None if moved is None else dict(zip(constants.RB_REASONS, moved[b.id].tolist())),
            "rebalanced_total": None if moved is None else int(moved[b.id].sum()),
        })
    return {"name": svc.name, "frontend": str(svc.frontend), "protocol": svc.protocol,
            "balance": _balance(dp, svc.id), "backends": rows}


def pick(dp: Datapath, name: str, n: int = 1000, seed: int | None = None) -> dict[str, Any]:
    """Where the next `n` connects to service `name` would go, by the kernel's own
    rule (datapath.pick) on what the kernel would read now: the live table half,
    the shares its slots carry, the open-connection counts and the service's
    flags, with up to pick.TRIES draws per connect past stale slots.

    A snapshot: the counts are held fixed at their current values, while in the
    kernel each connect that stays open adds to its backend's count (Katran's
    "where does this flow go" simulator answers from a snapshot the same way).
    Sampled with numpy's RNG (`seed` for a repeatable answer); a sweeping service's
    first draws are one CPU's next `n` points of its sweep, from a random start."""
    if n < 1:
        raise ValueError("n must be >= 1")
    svc = _service(dp, name)
    table = dp.read_slots(svc.id, svc.gen)
    mine = sorted((b for b in dp.backends() if b.svc == svc.id), key=lambda b: b.id)
    in_table = {int(i) for i in np.unique(table) if i < constants.MAX_BACKENDS}
    ids = sorted(in_table | {b.id for b in mine})
    shares = np.zeros(constants.MAX_BACKENDS, dtype=np.uint32)
    shares[ids] = dp.read_shares(svc.id, svc.gen, ids)
    active = dp.active()
    # what eq_pick_once accepts: the service's own backends, active (else a stale slot)
    usable = np.zeros(constants.MAX_BACKENDS, dtype=bool)
    usable[[b.id for b in mine if b.state == constants.BE_ACTIVE]] = True
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, 1 << 32, size=(n, rule.TRIES), dtype=np.uint32)
    if svc.flags & constants.SVC_SWEEP and svc.n_avail > 0:   # one CPU's next n connects, from a random point
        k = int(rng.integers(0, 1 << 32)) + np.arange(n, dtype=np.uint64)
        draws[:, 0] = (draws[:, 0] & np.uint32(~rule.SLOT_MASK & 0xFFFFFFFF)) | \
            rule.sweep_slot(k, int(svc.n_avail)).astype(np.uint32)
    if svc.n_avail == 0:            # the kernel fails such a service before drawing
        got = np.full(n, constants.NO_BACKEND, dtype=np.uint32)
    else:
        got = rule.pick(table, shares, active, svc.flags, draws, usable)
    routed = got[got != constants.NO_BACKEND].astype(np.int64)
    count = np.bincount(routed, minlength=constants.MAX_BACKENDS)
    share = slot_shares(table)
    rows = [{
        "address": str(b.address),
        "id": b.id,
        "state": constants.STATE_NAMES.get(b.state, str(b.state)),
        "share": round(float(share.get(b.id, 0.0)), 6),
        "active_connections": int(active[b.id]),
        "predicted_connects": int(count[b.id]),
        "predicted_share": round(int(count[b.id]) / n, 6),
    } for b in mine]
    return {"name": svc.name, "frontend": str(svc.frontend), "protocol": svc.protocol,
            "balance": _balance(dp, svc.id), "connects": n, "seed": seed,
            # connects that would fail (EHOSTUNREACH): nothing available, or stale slots only
            "unrouted_connects": int(n - routed.size), "backends": rows}


def _balance(dp: Datapath, svc_id: int) -> str:
    p2c = dp.service(svc_id).flags & constants.SVC_P2C
    return constants.BALANCE_P2C if p2c else constants.BALANCE_WEIGHTED


def callers(dp: Datapath, name: str | None = None) -> list[dict[str, Any]]:
    """Per (caller cgroup, service): its counts; the evidence it holds lately about the
    service's backends (eq_tel_cb: requests, failures, mean time to first byte);
    and its admission budget if it is punished (eq_lb_budget). Callers are cgroup
    ids (pods on a node); the agent adds reputation and standing (admin `callers`)."""
    names = {s.id: s.name for s in dp.services()}
    if name is not None and name not in names.values():
        raise UnknownService("no service %r (known: %s)" % (name, ", ".join(sorted(names.values())) or "none"))
    rows: dict[tuple[int, int], dict[str, Any]] = {}

    def row(cg: int, sid: int) -> dict[str, Any]:
        return rows.setdefault((cg, sid), {
            "cgroup_id": cg, "service": names.get(sid, "svc-%d" % sid), "connections_total": 0, "requests_total": 0,
            "errors_total": 0, "evidence_requests": 0.0, "evidence_failures": 0.0, "evidence_latency_seconds": None,
            "budget_per_second": None, "budget_mode": None, "throttled_total": 0, "observed_total": 0})

    for cg, sid, c, r, e in dp.callers():
        row(cg, sid).update(connections_total=c, requests_total=r, errors_total=e)
    by_svc: dict[int, list[int]] = {}
    for b in dp.backends():
        by_svc.setdefault(b.svc, []).append(b.id)
    for sid, ids in by_svc.items():
        if name is not None and names.get(sid) != name:
            continue
        ev = dp.evidence().read_ids(np.array(sorted(ids)))
        req, bad = ev.total(("requests",)), ev.total(("resp_5xx", "req_errors", "refused", "timed_out"))
        ns, resp = ev.total(("req_ns_sum",)), ev.total(("responses",))
        for cg in {int(c) for c in ev.cgroups[ev.live].tolist()}:
            m = (ev.cgroups == cg) & ev.live
            rr = row(cg, sid)
            rr["evidence_requests"] = round(float(req[m].sum()), 1)
            rr["evidence_failures"] = round(float(bad[m].sum()), 1)
            n_resp = float(resp[m].sum())
            rr["evidence_latency_seconds"] = round(float(ns[m].sum()) * 1e-9 / n_resp, 6) if n_resp > 0 else None
    modes = {v: k for k, v in constants.ENFORCE_MODES.items()}
    for (cg, sid), bud in dp.budgets().items():
        rr = row(cg, sid)
        rr["budget_per_second"] = round(1e9 / bud.interval_ns, 3) if bud.interval_ns else None
        rr["budget_mode"] = modes.get(int(bud.mode), str(bud.mode))
        rr["throttled_total"], rr["observed_total"] = int(bud.throttled), int(bud.observed)
    out = [r for r in rows.values() if name is None or r["service"] == name]
    return sorted(out, key=lambda r: (r["service"], -r["connections_total"], r["cgroup_id"]))


def _num(x: Any) -> float | None:
    v = float(x)
    return None if np.isnan(v) else round(v, 9)


def render_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """Plain aligned columns, one row per thing (like `cilium-dbg service list`)."""
    cells = [[title for _, title in columns]]
    for r in rows:
        cells.append([_fmt(r.get(k)) for k, _ in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "%.3f" % v if abs(v) < 1000 else "%.0f" % v
    return "-" if v is None else str(v)
