"""The API server goes away: routing goes on over the last listed objects, and
the operator sees it (`equilibriumctl status`, `/metrics`). Before, an outage
showed only as `watch_failed` log lines. The real kubernetes client and
reflectors run against the loopback list/watch server, whose next requests
are made to fail with 500s (tests/discovery/fakeapi.py)."""

from __future__ import annotations

from typing import Any

from control.support import config
from control.test_metrics_memory import memory_agent, samples, scrape

from equilibriumd.agent import daemon
from equilibriumd.cli.ctl import _status_text

from .fakeapi import FakeAPIServer
from .test_watch import _seed, make_source, wait_for  # noqa: F401 - the fixture

WEB = """  - name: web
    frontend: 127.77.0.1:80
    backends:
      - address: 127.0.0.11:80
"""


def test_an_api_outage_is_seen_and_routing_keeps_the_last_services(api: FakeAPIServer,
                                                                   make_source: Any) -> None:  # noqa: F811
    _seed(api)
    src, rec = make_source()
    src.wait_for_first(5)
    before = rec.last
    assert before is not None and len(before.services) == 2
    assert daemon._admission_view(src)["discovery_failing_for"] == 0

    api.fail("Service", *([500] * 50))
    api.fail("EndpointSlice", *([500] * 50))
    api.disconnect()
    wait_for(lambda: daemon._admission_view(src)["discovery_failing_for"] >= 3, what="failures counted")
    view = daemon._admission_view(src)
    assert view["discovery_errors_total"] >= 3 and "500" in view["discovery_last_error"]
    assert rec.last == before   # nothing was taken away while the API server failed

    a = memory_agent(config(WEB))
    a.kube = src
    a.tick()   # the status snapshot is built at a tick
    snap = a.answer({"cmd": "status"})
    assert "kubernetes API: " in _status_text(snap)
    fams = scrape(a)
    assert samples(fams, "equilibrium_discovery_errors")[()] >= 3
    assert samples(fams, "equilibrium_discovery_consecutive_failures")[()] >= 3

    with api.cond:   # nothing more fails: the count goes back to 0
        for k in ("Service", "EndpointSlice"):
            api._k(k).fail_next.clear()
    wait_for(lambda: daemon._admission_view(src)["discovery_failing_for"] == 0, what="recovery", timeout=10)
    a.tick()
    assert "kubernetes API" not in _status_text(a.answer({"cmd": "status"}))
