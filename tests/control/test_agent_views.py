"""The agent's tick builds no view: the snapshot is built when status or a
scrape asks, at most once per tick; explain builds one service's; other admin
requests build none. And the engine's learning survives a reload that adds a
service (the real Agent on an in-memory datapath; no kernel, no root)."""

from __future__ import annotations

from unittest import mock

from equilibriumd.agent import daemon
from equilibriumd.datapath.memory import MemoryDatapath

from .support import config, service_yaml
from .test_metrics_memory import memory_agent

WEB = service_yaml("web", "10.96.0.1:80", ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"])


def test_views_are_built_when_asked_and_once_per_tick():
    a = memory_agent(config(WEB))
    with mock.patch.object(daemon, "build_snapshot", wraps=daemon.build_snapshot) as built:
        for _ in range(3):
            a.tick()
        assert built.call_count == 0                      # ticks build nothing
        assert a.answer({"cmd": "ticks"})["ok"] and built.call_count == 0
        assert a.answer({"cmd": "status"})["services"][0]["name"] == "web"
        a.answer({"cmd": "status"})
        assert built.call_count == 1                      # once per tick, whoever asks
        ex = a.answer({"cmd": "explain", "service": "web"})
        assert ex["ok"] and built.call_args.kwargs.get("only") == "web"
        a.tick()
        a.answer({"cmd": "status"})
        assert built.call_count == 3                      # a new tick, a new snapshot
    assert not a.answer({"cmd": "explain", "service": "nope"})["ok"]


def test_a_reload_that_adds_a_service_keeps_what_was_learned():
    dp = MemoryDatapath()
    a = memory_agent(config(WEB), dp)
    slow = a.rec.services["web"].backends[next(iter(a.rec.services["web"].backends))]
    for _ in range(30):   # backend 1 answers in 300 ms, the others in 3 ms
        for bid in a.rec.services["web"].backends.values():
            lat = 0.3 if bid == slow else 0.003
            dp.add_telemetry(bid, requests=50, resp_2xx=50, req_ns_sum=int(50 * lat * 1e9), attempts=50,
                             established=50, closed=50)
        a.tick()
    before = a.router.weights_now[a.router.layout.row["web"]].copy()
    assert before[0] < 0.05, before   # learned: the slow backend is at the floor
    a.apply(config(WEB, service_yaml("db", "10.96.0.2:5432", ["10.0.1.1:5432"])))
    after = a.router.weights_now[a.router.layout.row["web"]]   # the engine's, not a copy of the last shares
    assert (abs(after[:3] - before[:3]) < 1e-9).all(), (before, after)


def test_a_node_where_every_service_moves_logs_a_bounded_number_of_lines():
    import numpy as np
    from structlog.testing import capture_logs

    svcs = [service_yaml("s%02d" % i, "10.96.1.%d:80" % i, ["10.1.%d.1:80" % i, "10.1.%d.2:80" % i])
            for i in range(30)]
    a = memory_agent(config(*svcs))
    a.log_transitions()                          # remembers the shares now
    a.router.shares = np.tile([0.9, 0.1], (30, 1))
    a._seen["_shares"] = np.tile([0.5, 0.5], (30, 1))
    with capture_logs() as logs:
        a.log_transitions()
    events = [e["event"] for e in logs]
    assert events.count("weights_changed") == daemon.NAMES_LOGGED
    more = [e for e in logs if e["event"] == "weights_changed_more"]
    assert len(more) == 1 and more[0]["services"] == 30 - daemon.NAMES_LOGGED
