"""Fuzz suite (hypothesis). In CI every test runs a fixed number of examples,
derandomized and without an example database: the same inputs every run, so a
failure reproduces. EQ_FUZZ_EXAMPLES=N runs N random examples per test instead
(a longer local hunt); a failure it finds is kept as an @example."""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, settings

_HUNT = int(os.environ.get("EQ_FUZZ_EXAMPLES", "0") or 0)


def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=_HUNT or examples, deadline=None, derandomize=not _HUNT, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.function_scoped_fixture])


def paths(doc: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a document (dicts and lists) a value sits, maps and lists included."""
    out = [path] if path else []
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        out += paths(v, path + (k,))
    return out


def put(doc: Any, path: tuple[Any, ...], value: Any) -> None:
    """Replace the value at `path` (one of `paths(doc)`)."""
    for k in path[:-1]:
        doc = doc[k]
    doc[path[-1]] = value
