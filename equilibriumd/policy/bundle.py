"""What the coordinator writes for one node: all of that node's
recommendations in one compact JSON object (one channel object per node).

    {"node": N, "coordinator": ID, "epoch": E, "issued": T,
     "recommendations": [<Recommendation>, ...]}

Each recommendation is `Recommendation.to_json`'s object with two savings
that keep a node's object far below a ConfigMap's 1 MiB: the model's numbers
(not the times) to 6 significant digits, and the joint distribution sparse (`joint_nz`: [[index,
p], ...] in place of `joint`: an LP's vertex solution has a few non-zero
entries out of K^players, e.g. 729). `unpack` restores `joint` and
validates every entry with `Recommendation.from_json`; an entry that fails
is reported, not raised, so one bad entry costs only its service.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from .coordination import Recommendation

#: at most this many recommendations in one node's bundle (hostile input bound)
MAX_ENTRIES = 4096
DIGITS = 6
#: the model's numbers, rounded (never the times: 6 digits of a unix time are ~1 day)
ROUNDED = ("weights", "loads", "base", "capacity", "observed_load")


def _r(x: float) -> float:
    return float("%.*g" % (DIGITS, x))


def pack_one(rec: Recommendation) -> dict[str, Any]:
    """`rec` as `Recommendation.from_json` reads it, with the model's numbers rounded
    and the joint distribution sparse (built field by field: a round packs thousands)."""
    d: dict[str, Any] = {}
    for f in fields(rec):
        v = getattr(rec, f.name)
        if f.name == "joint":
            d["joint_nz"] = [[i, _r(p)] for i, p in enumerate(v) if p > 0]
        elif f.name == "menu":
            d["menu"] = [[_r(x) for x in m] for m in v]
        elif f.name in ROUNDED:
            d[f.name] = [_r(x) for x in v] if isinstance(v, tuple) else _r(v)
        else:
            d[f.name] = list(v) if isinstance(v, tuple) else v
    return d


def pack(node: str, recs: Sequence[Recommendation], *, coordinator: str, epoch: int, issued: float) -> dict[str, Any]:
    return {"node": node, "coordinator": coordinator, "epoch": int(epoch), "issued": float(issued),
            "recommendations": [pack_one(r) for r in recs]}


@dataclass(frozen=True)
class Unpacked:
    recommendations: dict[str, Recommendation]   #: service -> its recommendation for this node
    errors: list[str]                            #: entries refused, and why
    epoch: int = 0
    coordinator: str = ""


def unpack_one(d: object) -> Recommendation:
    if not isinstance(d, dict):
        raise ValueError("recommendation: expected an object")
    nz = d.get("joint_nz")
    menu, loads = d.get("menu"), d.get("loads")
    if not isinstance(nz, list) or not isinstance(menu, list) or not isinstance(loads, list):
        raise ValueError("recommendation: joint_nz, menu and loads must be lists")
    size = len(menu) ** len(loads)
    if size > 1 << 22:
        raise ValueError("recommendation: joint too large (%d entries)" % size)
    joint = [0.0] * size
    for e in nz:
        if (not isinstance(e, list) or len(e) != 2 or isinstance(e[0], bool) or not isinstance(e[0], int)
                or not 0 <= e[0] < size):
            raise ValueError("recommendation: joint_nz entries must be [index < %d, p]" % size)
        joint[e[0]] = e[1]
    full = {k: v for k, v in d.items() if k != "joint_nz"}
    full["joint"] = joint
    return Recommendation.from_json(json.dumps(full))


def unpack(payload: object, node: str) -> Unpacked:
    """A node's bundle -> its valid recommendations by service (entries for
    another node are refused: a bundle is read for the node it names)."""
    if not isinstance(payload, dict):
        return Unpacked({}, ["bundle: expected an object"])
    recs = payload.get("recommendations")
    if not isinstance(recs, list) or len(recs) > MAX_ENTRIES:
        return Unpacked({}, ["bundle: recommendations must be a list of at most %d" % MAX_ENTRIES])
    out: dict[str, Recommendation] = {}
    errors: list[str] = []
    for i, d in enumerate(recs):
        try:
            r = unpack_one(d)
        except (ValueError, TypeError, OverflowError) as e:
            errors.append("recommendations[%d]: %s" % (i, e))
            continue
        if r.node != node:
            errors.append("recommendations[%d]: for node %s, not %s" % (i, r.node, node))
            continue
        out[r.service] = r
    epoch = payload.get("epoch")
    coord = payload.get("coordinator")
    return Unpacked(out, errors, epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else 0,
                    coord if isinstance(coord, str) else "")
