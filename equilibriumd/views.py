"""What equilibriumctl shows, built from the pinned maps alone (so it answers
while the agent is down). Pure data in, dicts out; rendering is separate."""

from __future__ import annotations

from typing import Any

import numpy as np

from .datapath import constants
from .datapath.maps import Datapath


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
            "selections_total": int(sum(int(sel[i]) for i in ids)),
            "no_backend_total": int(errs[s.id, 0]),
            "stale_slot_total": int(errs[s.id, 1]),
            "revnat_update_errors_total": int(errs[s.id, 2]),
        })
    return out


def backends(dp: Datapath, name: str) -> dict[str, Any]:
    svc = next((s for s in dp.services() if s.name == name), None)
    if svc is None:
        known = ", ".join(sorted(s.name for s in dp.services())) or "none"
        raise UnknownService("no service %r (known: %s)" % (name, known))
    table = dp.read_slots(svc.id, svc.gen)
    ids, counts = np.unique(table[table != constants.NO_BACKEND], return_counts=True)
    share = {int(i): float(c) / constants.SLOTS for i, c in zip(ids, counts)}
    sel = dp.selections()
    rows = []
    for b in sorted((b for b in dp.backends() if b.svc == svc.id), key=lambda b: b.id):
        rows.append({
            "address": str(b.address),
            "id": b.id,
            "state": constants.STATE_NAMES.get(b.state, str(b.state)),
            "weight": b.weight / 1000.0,
            "share": round(share.get(b.id, 0.0), 6),
            "selections_total": int(sel[b.id]),
        })
    return {"name": svc.name, "frontend": str(svc.frontend), "protocol": svc.protocol, "backends": rows}


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
