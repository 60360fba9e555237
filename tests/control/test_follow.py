"""The agent's side of the coordinator (agent/follow.py) without a kernel: a
Layout from a real config, synthetic per-tick signals, and an in-memory
channel. The live twin (two agents, a coordinator process, the real kernel)
is tests/test_coordination_live.py."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pytest
import structlog

from control.support import config, service_yaml
from equilibriumd.agent.follow import HANDOVER, MAX_BACKENDS, Follower
from equilibriumd.agent.routing import Layout, Signals, build_layout
from equilibriumd.discovery.channel_types import Listing, Message, Outcome, recommendation_name, summary_name
from equilibriumd.policy import bundle
from equilibriumd.policy import coordination as co

BES = ["10.2.0.1:80", "10.2.0.2:80", "10.2.0.3:80"]
NODE = "node-a"


class MemChannel:
    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.fail_reads = False

    def publish(self, name: str, payload: dict[str, Any], channel: str) -> Outcome:
        self.objects[name] = json.loads(json.dumps(payload))
        return "written"

    def read(self, name: str) -> Message:
        if self.fail_reads:
            return Message(name, None, "api: 503 injected")
        p = self.objects.get(name)
        return Message(name, p, None if p is not None else "not found")

    def read_all(self, channel: str) -> Listing:
        return Listing([])


def layout(*extra: str) -> Layout:
    cfg = config(service_yaml("web", "127.0.0.1:80", list(BES)), *extra, top="policy: equilibrium\n")
    ids = {s.name: list(range(10 * i, 10 * i + len(s.backends))) for i, s in enumerate(cfg.services)}
    return build_layout(cfg, ids)


def signals(lay: Layout, lat: float = 0.004, req: float = 20.0) -> Signals:
    shape = lay.shape
    z = np.zeros(shape)
    return Signals(np.where(lay.present, lat, np.nan), np.where(lay.present, req, 0.0), z, z, z,
                   np.where(lay.present, req, 0.0), np.zeros(shape[0], dtype=bool))


def rec(weights: tuple[float, ...], *, issued: float | None = None, ttl: float = 5.0,
        backends: tuple[str, ...] = tuple(BES), node: str = NODE) -> co.Recommendation:
    """A real recommendation from `recommend`, its split replaced by `weights`."""
    now = time.time() if issued is None else issued
    s = [co.NodeSummary(n, now, {"web": co.ServiceSummary(backends, (20.0,) * len(backends),
                                                          (0.004,) * len(backends))}) for n in (node, "node-b")]
    r = next(x for x in co.recommend(s, now, ttl) if x.node == node)
    return co.Recommendation(**{**r.__dict__, "weights": weights})


def follower(ch: MemChannel, **kw: Any) -> Follower:
    return Follower(ch, NODE, structlog.get_logger(), period=1.0, **kw)


def own_weights(lay: Layout) -> np.ndarray:
    w = np.zeros(lay.shape)
    w[lay.present] = 1.0
    return w / w.sum(axis=1, keepdims=True)


def test_the_summary_holds_smoothed_load_and_latency_of_learning_services() -> None:
    lay = layout(service_yaml("fixed", "127.0.0.2:80", ["10.3.0.1:80"], policy="static"),
                 service_yaml("wide", "127.0.0.3:80", ["10.4.0.%d:80" % i for i in range(MAX_BACKENDS + 1)]))
    ch = MemChannel()
    f = follower(ch)
    f.set_layout(lay)
    w = own_weights(lay)
    for _ in range(20):
        f.tick(signals(lay, lat=0.004, req=10.0), w, 0.5)     # 10 per 0.5 s tick = 20 req/s
    f.exchange()
    got = co.NodeSummary.from_json(json.dumps(ch.objects[summary_name(NODE)]))
    assert list(got.services) == ["web"]   # static policies and services over MAX_BACKENDS are not coordinated
    s = got.services["web"]
    assert s.backends == tuple(BES)
    assert s.load == pytest.approx((20.0,) * 3, rel=0.01) and s.latency == pytest.approx((0.004,) * 3)


def test_a_fresh_obedient_recommendation_is_written_and_an_expired_one_is_dropped() -> None:
    lay = layout()
    ch = MemChannel()
    f = follower(ch)
    f.set_layout(lay)
    w = own_weights(lay)
    f.tick(signals(lay), w, 0.5)
    r = rec((0.6, 0.3, 0.1), ttl=0.6)
    ch.objects[recommendation_name(NODE)] = bundle.pack(NODE, [r], coordinator="c", epoch=1, issued=r.issued)
    f.exchange()
    out = f.tick(signals(lay), w, 0.5)
    assert out[0] == pytest.approx([0.6, 0.3, 0.1], abs=1e-6)
    assert f.state == {"web": "following"} and np.allclose(w, own_weights(lay))   # its input untouched
    time.sleep(0.65)                                  # past the recommendation's expiry
    out = f.tick(signals(lay), w, 0.5)
    assert f.state == {"web": "expired"} and f.stats.fallbacks["expired"] == 1
    # it eases back to its own weights (HANDOVER per tick), it does not jump
    assert out[0] == pytest.approx(HANDOVER * np.array([0.6, 0.3, 0.1]) + (1 - HANDOVER) * w[0])
    for _ in range(80):
        out = f.tick(signals(lay), w, 0.5)
    assert out[0] == pytest.approx(w[0])


def test_a_recommendation_this_node_would_not_obey_is_not_followed() -> None:
    lay = layout()
    ch = MemChannel()
    f = follower(ch)
    f.set_layout(lay)
    w = own_weights(lay)
    # this node sees backend 0 at 300 ms: a split that sends it most of the load does not pay here
    for _ in range(10):
        f.tick(signals(lay, lat=0.004), w, 0.5)
    lat = np.where(lay.present, 0.004, np.nan)
    lat[0, 0] = 0.3
    sig = signals(lay)
    sig.latency[:] = lat
    for _ in range(30):
        f.tick(sig, w, 0.5)
    f.exchange()                                       # publishes the summary with 300 ms on backend 0
    own = co.NodeSummary.from_json(json.dumps(ch.objects[summary_name(NODE)])).services["web"]
    r = rec((0.9, 0.05, 0.05))
    assert co.obedience_gain(r, own) > co.TOLERANCE     # the check says: deviating pays for this node
    ch.objects[recommendation_name(NODE)] = bundle.pack(NODE, [r], coordinator="c", epoch=1, issued=r.issued)
    f.exchange()
    out = f.tick(sig, w, 0.5)
    assert f.state["web"].startswith("not incentive-compatible") and np.allclose(out, w)


def test_backends_it_cannot_route_to_get_nothing_and_unknown_ones_void_it() -> None:
    cfg = config(service_yaml("web", "127.0.0.1:80", [BES[0], BES[1], {"address": BES[2], "state": "draining"}]),
                 top="policy: equilibrium\n")
    lay = build_layout(cfg, {"web": [0, 1, 2]})
    ch = MemChannel()
    f = follower(ch)
    f.set_layout(lay)
    w = own_weights(lay)
    r = rec((0.5, 0.25, 0.25))
    ch.objects[recommendation_name(NODE)] = bundle.pack(NODE, [r], coordinator="c", epoch=1, issued=r.issued)
    f.exchange()
    out = f.tick(signals(lay), w, 0.5)
    assert out[0] == pytest.approx([2 / 3, 1 / 3, 0.0])   # the draining one dropped, the rest renormalised
    other = rec((0.5, 0.25, 0.25), backends=(BES[0], BES[1], "10.9.9.9:80"))
    ch.objects[recommendation_name(NODE)] = bundle.pack(NODE, [other], coordinator="c", epoch=2,
                                                        issued=other.issued)
    f.exchange()
    f.tick(signals(lay), w, 0.5)
    assert f.state["web"].startswith("backends differ")


def test_a_bundle_for_another_node_or_malformed_entries_is_refused() -> None:
    lay = layout()
    ch = MemChannel()
    f = follower(ch)
    f.set_layout(lay)
    w = own_weights(lay)
    r = rec((0.6, 0.3, 0.1), node="node-b")
    payload = bundle.pack(NODE, [r], coordinator="c", epoch=1, issued=r.issued)
    payload["recommendations"].append({"service": "web", "joint_nz": [[10 ** 9, 1.0]], "menu": [], "loads": []})
    ch.objects[recommendation_name(NODE)] = payload
    f.exchange()
    out = f.tick(signals(lay), w, 0.5)
    assert f.stats.refused == 2 and np.allclose(out, w) and f.state.get("web") != "following"


def test_a_channel_outage_keeps_following_until_expiry() -> None:
    lay = layout()
    ch = MemChannel()
    f = follower(ch)
    f.set_layout(lay)
    w = own_weights(lay)
    r = rec((0.6, 0.3, 0.1), ttl=5.0)
    ch.objects[recommendation_name(NODE)] = bundle.pack(NODE, [r], coordinator="c", epoch=1, issued=r.issued)
    f.exchange()
    ch.fail_reads = True
    f.exchange()                                       # the read fails: what it has still stands
    f.tick(signals(lay), w, 0.5)
    assert f.state == {"web": "following"} and f.stats.read_failures == 1
    del ch.objects[recommendation_name(NODE)]          # the coordinator withdrew it
    ch.fail_reads = False
    f.exchange()
    f.tick(signals(lay), w, 0.5)
    assert f.state == {"web": "no recommendation"} and f.stats.fallbacks["no_recommendation"] == 1


def test_a_skewed_clock_can_only_shorten_a_recommendation() -> None:
    """expires is the coordinator's clock; the node also counts ttl from when it read
    it on its own monotonic clock, so a node whose clock runs behind stops in time."""
    lay = layout()
    ch = MemChannel()
    behind = [time.time() - 3600.0]
    f = Follower(ch, NODE, structlog.get_logger(), period=1.0, clock=lambda: behind[0])
    f.set_layout(lay)
    w = own_weights(lay)
    r = rec((0.6, 0.3, 0.1), ttl=0.3)
    ch.objects[recommendation_name(NODE)] = bundle.pack(NODE, [r], coordinator="c", epoch=1, issued=r.issued)
    f.exchange()
    f.tick(signals(lay), w, 0.5)
    assert f.state == {"web": "following"}
    time.sleep(0.35)
    f.tick(signals(lay), w, 0.5)
    assert f.state == {"web": "expired"}


def test_the_agent_writes_the_followed_split_and_shows_it_in_status_and_metrics() -> None:
    """The real Agent on an in-memory datapath, with a Follower on a MemChannel:
    the tick's weights (what reaches the reconciler) carry the recommendation,
    `equilibriumctl status` names it and /metrics exports the coordination series."""
    from control.test_metrics_memory import memory_agent, samples, scrape
    from equilibriumd.cli.ctl import _status_text

    cfg = config(service_yaml("web", "127.0.0.1:80", list(BES)), top="policy: equilibrium\n")
    a = memory_agent(cfg)
    ch = MemChannel()
    a.follower = follower(ch)
    a.apply(cfg)                                    # the layout reaches the follower
    a.tick()
    r = rec((0.7, 0.2, 0.1))
    ch.objects[recommendation_name(NODE)] = bundle.pack(NODE, [r], coordinator="c", epoch=1, issued=r.issued)
    a.follower.exchange()
    written: list[np.ndarray] = []
    real = a.rec.write_weights   # type: ignore[union-attr]

    def spy(w: np.ndarray) -> int:
        written.append(w.copy())
        return real(w)

    a.rec.write_weights = spy   # type: ignore[union-attr, method-assign]
    a.tick()
    assert written[-1][0] == pytest.approx([0.7, 0.2, 0.1], abs=1e-6)
    text = _status_text(a.answer({"cmd": "status"}))
    assert "COORDINATOR" in text and "following" in text and "node node-a follows it for 1 of 1" in text
    fams = scrape(a)
    assert samples(fams, "equilibrium_coordination_state") == {("web",): 1.0}
    assert samples(fams, "equilibrium_coordination_following")[()] == 1.0
    assert samples(fams, "equilibrium_coordination_summaries_published")[()] == 1.0
    age = samples(fams, "equilibrium_coordination_recommendation_age_seconds")[()]
    assert 0 <= age < 5
    a.follower._verdicts.clear()                   # withdrawn: the next tick stops following
    a.tick()
    fams = scrape(a)
    assert samples(fams, "equilibrium_coordination_state") == {("web",): 0.0}
    assert samples(fams, "equilibrium_coordination_fallbacks")[("no_recommendation",)] == 1.0
    assert "alone: no recommendation" in _status_text(a.answer({"cmd": "status"}))
