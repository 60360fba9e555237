"""Which discovered services get the datapath's room, and how many backends each.

The maps hold MAX_SERVICES services and MAX_BACKENDS backends. When the
cluster offers more, admission is stable and fair:

* services already admitted keep their place: `order` lists what was
  admitted last time, then what was waiting, oldest first; a new service
  queues behind them (by name among those new at once), so a newcomer whose
  name sorts first never evicts an established one, and a waiting one is
  admitted as room frees up;
* the backend budget is water-filled: every admitted service gets up to the
  same cap, the largest that fits, before any gets more (a service with
  thousands of endpoints cannot starve the others);
* a service cut to fewer backends than it has (its fair cap, or the
  datapath's MAX_BACKENDS_PER_SERVICE) keeps its active backends first and,
  among them, a per-node subset by rendezvous hashing (`subset`): every node
  keeps a different, stable subset, so the cluster as a whole still spreads
  over every endpoint, and an endpoint joining or leaving moves at most one
  backend in or out of a node's subset.

What is left out or capped is returned for the caller to report.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Sequence

from .. import config as cfg
from .. import types as limits


@dataclass
class Admitted:
    services: list[cfg.ServiceConfig] = field(default_factory=list)   #: in admission order
    #: names not admitted for lack of room, in the order they wait
    left_out: list[str] = field(default_factory=list)
    #: name -> (backends kept, backends offered) for services cut to the fair cap
    capped: dict[str, tuple[int, int]] = field(default_factory=dict)


def subset(backends: Sequence[cfg.BackendConfig], k: int, key: str) -> tuple[cfg.BackendConfig, ...]:
    """`k` of `backends`, active ones first, then by the highest rendezvous
    hash of (`key`, address) - `key` is the node's name - in their given order."""
    def rank(i: int) -> tuple[bool, bytes]:
        b = backends[i]
        h = hashlib.blake2b(("%s|%s" % (key, b.address)).encode(), digest_size=8).digest()
        return (b.state != "active", bytes(255 - x for x in h))   # highest hash first
    keep = sorted(range(len(backends)), key=rank)[:k]
    return tuple(backends[i] for i in sorted(keep))


def fair_cap(counts: Sequence[int], budget: int) -> int:
    """The largest c with sum(min(n, c)) <= budget (max(counts) if all fit)."""
    if sum(counts) <= budget:
        return max(counts, default=0)
    left, k = budget, len(counts)
    for i, n in enumerate(sorted(counts)):
        share = left // (k - i)
        if n > share:
            return share
        left -= n
    return max(counts, default=0)


def admit(node: cfg.ServiceSet, found: Sequence[tuple[str, cfg.ServiceConfig]], errors: list[str],
          order: Sequence[str] = (), subset_key: str = "") -> Admitted:
    """Admit `found` ((the Service's namespace/name, what it gives)) onto `node`
    (holding the static services, which always win). Problems go to `errors`;
    `subset_key` (the node's name) picks which backends a cut service keeps."""
    rank = {n: i for i, n in enumerate(order)}
    queue = sorted(found, key=lambda ks: (rank.get(ks[1].name, len(rank)), ks[1].name))
    out = Admitted()
    names: dict[str, str] = {}                   # admitted or waiting: name -> where it was given
    fronts: dict[tuple[object, str], str] = {}   # (frontend, protocol) -> service name
    ok: list[tuple[str, cfg.ServiceConfig]] = []
    room = limits.MAX_SERVICES - len(node)
    budget = limits.MAX_BACKENDS - node.n_backends
    for key, s in queue:
        try:
            cfg.check_service(s)
            node.check_name(s.name)
            node.check_frontend(s.frontend, s.protocol)
            if s.name in names:   # the words of cfg.ServiceSet
                raise ValueError("duplicate service name %r (first %s)" % (s.name, names[s.name]))
            if (s.frontend, s.protocol) in fronts:
                raise ValueError("duplicate frontend %s/%s (already used by service %r)"
                                 % (s.frontend, s.protocol, fronts[(s.frontend, s.protocol)]))
        except ValueError as e:
            errors.append("service %s (as %s): %s" % (key, s.name, e))
            continue
        names[s.name] = "in service %s" % key
        fronts[(s.frontend, s.protocol)] = s.name
        if len(ok) >= min(room, budget):   # every admitted service needs a backend slot at least
            out.left_out.append(s.name)
            errors.append("service %s (as %s): not admitted: the datapath holds %d services and %d backends; "
                          "it is admitted when room frees up" % (key, s.name, limits.MAX_SERVICES,
                                                                 limits.MAX_BACKENDS))
            continue
        ok.append((key, s))
    cap = fair_cap([len(s.backends) for _, s in ok], budget)
    spare = budget - sum(min(len(s.backends), cap) for _, s in ok)
    for key, s in ok:
        n = len(s.backends)
        mine = cap
        if n > cap and spare > 0:   # what the cap leaves over: one more each, in admission order
            mine, spare = cap + 1, spare - 1
        if n > mine:
            s = dataclasses.replace(s, backends=subset(s.backends, mine, subset_key))
            out.capped[s.name] = (mine, n)
            errors.append("service %s (as %s): %d of its %d endpoints used: the node's %d backend slots are "
                          "shared fairly between its services" % (key, s.name, mine, n, limits.MAX_BACKENDS))
        try:
            node.add(s, "in service %s" % key)
        except ValueError as e:   # cannot happen after the checks above; said, not raised
            errors.append("service %s (as %s): %s" % (key, s.name, e))
            continue
        out.services.append(s)
    return out
