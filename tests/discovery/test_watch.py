"""KubernetesSource with the real `kubernetes` client against a loopback API server.

No Kubernetes API server can be installed on the machines these tests run on
(no container runtime, no etcd, no kind), so `fakeapi.FakeAPIServer` plays
one on 127.0.0.1: it speaks the list/watch wire protocol (paged lists with
resourceVersion and continue, chunked watch streams of JSON events,
bookmarks, 410 Gone for a compacted history). The client, its
configuration, its HTTP stack and the reflectors are the real ones.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterator

import pytest
from structlog.testing import capture_logs

from equilibriumd import config as cfg
from equilibriumd.discovery.build import config_to_yaml
from equilibriumd.discovery.client import api_client_for
from equilibriumd.discovery.reflector import Backoff
from equilibriumd.discovery.source import KubernetesSource

from .fakeapi import FakeAPIServer
from .objects import endpoint_slice, service

pytestmark = pytest.mark.timeout(30)


def wait_for(pred: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.01)
    raise AssertionError("timed out waiting for %s" % what)


class Recorder:
    def __init__(self) -> None:
        self.configs: list[cfg.Config] = []
        self.lock = threading.Lock()

    def __call__(self, c: cfg.Config) -> None:
        with self.lock:
            self.configs.append(c)

    @property
    def last(self) -> cfg.Config | None:
        with self.lock:
            return self.configs[-1] if self.configs else None

    def backends(self) -> dict[str, list[tuple[str, str]]]:
        c = self.last
        return {s.name: [(str(b.address), b.state) for b in s.backends] for s in c.services} if c else {}




@pytest.fixture
def make_source(api: FakeAPIServer) -> Iterator[Callable[..., tuple[KubernetesSource, Recorder]]]:
    made: list[KubernetesSource] = []

    def make(backoff_base: float = 0.05, start: bool = True, **kw: Any) -> tuple[KubernetesSource, Recorder]:
        rec = Recorder()
        kw.setdefault("debounce", 0.05)
        kw.setdefault("max_delay", 0.5)
        kw.setdefault("watch_timeout", 10)
        src = KubernetesSource("node-a", rec, api_client_for(api.url),
                               backoff=lambda: Backoff(base=backoff_base, cap=4 * backoff_base), **kw)
        made.append(src)
        if start:
            src.start()
        return src, rec

    yield make
    for s in made:
        s.stop()


def _seed(api: FakeAPIServer) -> None:
    api.put("Service", service("bus", ip="10.96.0.10"))
    api.put("Service", service("user", ip="10.96.0.11"))
    api.put("EndpointSlice", endpoint_slice("bus", "bus-1", ["10.244.0.1", "10.244.0.2"]))
    api.put("EndpointSlice", endpoint_slice("user", "user-1", ["10.244.1.1"]))


def test_list_then_watch_from_the_list_resource_version(api: FakeAPIServer, make_source: Any) -> None:
    _seed(api)
    src, rec = make_source()
    first = src.wait_for_first(5)
    assert [s.name for s in first.services] == ["bus.urbanmove", "user.urbanmove"]
    assert rec.backends()["bus.urbanmove"] == [("10.244.0.1:8080", "active"), ("10.244.0.2:8080", "active")]
    api.wait_watching("Service")
    assert api.stats("Service").lists == 1 and api.stats("Service").watches == [src.services.resource_version]
    # a change arrives through the watch
    api.put("EndpointSlice", endpoint_slice("bus", "bus-1", ["10.244.0.1", ("10.244.0.2", "terminating")]))
    wait_for(lambda: rec.backends().get("bus.urbanmove") == [("10.244.0.1:8080", "active"),
                                                             ("10.244.0.2:8080", "draining")], what="draining")
    assert api.stats("EndpointSlice").lists == 1


def test_nothing_is_delivered_until_both_kinds_are_listed(api: FakeAPIServer, make_source: Any) -> None:
    """An agent restarting on a pinned datapath must never apply "no services"
    just because the EndpointSlices have not arrived yet."""
    _seed(api)
    api.fail("EndpointSlice", 500, 503, 500)
    src, rec = make_source()
    wait_for(src.services.synced.is_set, what="services listed")
    time.sleep(0.1)
    assert rec.configs == [] and not src.slices.synced.is_set()
    src.wait_for_first(5)
    assert len(rec.configs[0].services) == 2 and rec.configs[0].services[0].backends
    assert src.slices.stats.errors == 3


def test_wait_for_first_times_out_naming_what_is_missing(api: FakeAPIServer, make_source: Any) -> None:
    api.fail("EndpointSlice", *([500] * 100))
    src, _ = make_source()
    with pytest.raises(TimeoutError, match="endpointslices"):
        src.wait_for_first(0.3)


def test_watch_restart_resumes_from_last_resource_version_and_loses_nothing(
        api: FakeAPIServer, make_source: Any) -> None:
    _seed(api)
    src, rec = make_source(backoff_base=0.1)
    src.wait_for_first(5)
    api.wait_watching("Service")
    api.wait_watching("EndpointSlice")
    # The connection drops, and the next watch attempts fail: the reflectors are
    # disconnected while these changes happen.
    api.fail("Service", 500, 500)
    api.fail("EndpointSlice", 500, 500)
    api.disconnect()
    api.put("EndpointSlice", endpoint_slice("bus", "bus-1", ["10.244.0.1", "10.244.0.2", "10.244.0.3"]))
    api.delete("Service", "urbanmove", "user")
    api.put("Service", service("ticket", ip="10.96.0.14"))
    api.put("EndpointSlice", endpoint_slice("ticket", "ticket-1", ["10.244.4.1"]))
    want = {"bus.urbanmove": [("10.244.0.1:8080", "active"), ("10.244.0.2:8080", "active"),
                              ("10.244.0.3:8080", "active")],
            "ticket.urbanmove": [("10.244.4.1:8080", "active")]}
    wait_for(lambda: rec.backends() == want, what="the changes made while disconnected")
    for kind, r in (("Service", src.services), ("EndpointSlice", src.slices)):
        st = api.stats(kind)
        assert st.lists == 1, "%s was relisted: the watch should have resumed" % kind
        assert r.stats.errors == 2 and r.stats.gone == 0
        assert [int(v) for v in st.watches] == sorted(int(v) for v in st.watches)


def test_watch_timeouts_by_the_server_are_just_restarted(api: FakeAPIServer, make_source: Any) -> None:
    _seed(api)
    src, rec = make_source(watch_timeout=1)
    src.wait_for_first(5)
    api.wait_watching("Service", 2, timeout=5)
    api.put("EndpointSlice", endpoint_slice("user", "user-1", ["10.244.1.2"]))
    wait_for(lambda: rec.backends().get("user.urbanmove") == [("10.244.1.2:8080", "active")])
    assert src.services.stats.errors == 0 and api.stats("Service").lists == 1


def test_410_gone_relists_and_sees_deletions_made_in_the_gap(api: FakeAPIServer, make_source: Any) -> None:
    _seed(api)
    src, rec = make_source(backoff_base=0.3)
    src.wait_for_first(5)
    api.wait_watching("Service")
    api.fail("Service", 500)
    api.disconnect()
    api.delete("Service", "urbanmove", "user")
    api.put("Service", service("trajet", ip="10.96.0.12"))
    api.put("EndpointSlice", endpoint_slice("trajet", "trajet-1", ["10.244.2.1"]))
    api.compact()  # etcd compaction: the history the reflectors would resume from is gone
    wait_for(lambda: set(rec.backends()) == {"bus.urbanmove", "trajet.urbanmove"}, what="relisted state")
    assert src.services.stats.gone >= 1 and api.stats("Service").lists == 2
    assert src.services.stats.errors == 1  # the injected 500; the 410 is not an error


def test_410_on_an_expired_continue_token_restarts_the_list(api: FakeAPIServer, make_source: Any) -> None:
    for i in range(5):
        api.put("Service", service("s%d" % i, ip="10.96.0.%d" % (20 + i)))
        api.put("EndpointSlice", endpoint_slice("s%d" % i, "s%d-1" % i, ["10.244.9.%d" % (i + 1)]))
    api.fail("Service", 0, 0, 410)  # pages 1 and 2 fine, page 3: continue token expired
    src, rec = make_source(page_size=2)
    src.wait_for_first(5)
    assert len(rec.last.services) == 5  # type: ignore[union-attr]
    assert src.services.stats.gone == 1 and src.services.stats.lists == 1
    assert api.stats("Service").lists == 2 + 3  # two pages, (the 410), then a complete list of three


def test_bookmarks_move_the_resume_point(api: FakeAPIServer, make_source: Any) -> None:
    _seed(api)
    src, _ = make_source()
    src.wait_for_first(5)
    api.wait_watching("Service")
    listed_rv = int(src.services.resource_version)
    api.put("EndpointSlice", endpoint_slice("bus", "bus-1", ["10.244.0.1"]))  # other kinds move the revision
    bm = api.bookmark("Service")
    wait_for(lambda: src.services.resource_version == str(bm), what="bookmark applied")
    assert bm > listed_rv and src.services.stats.bookmarks == 1
    # Compact up to the bookmark and reconnect: resuming from the bookmark is
    # still valid, resuming from the listed version would be 410.
    api.compact("Service")
    api.disconnect()
    api.wait_watching("Service", 2)
    time.sleep(0.2)
    assert api.stats("Service").watches[-1] == str(bm)
    assert src.services.stats.gone == 0 and api.stats("Service").lists == 1


def test_endpoints_flapping_is_debounced_and_ends_in_the_last_state(api: FakeAPIServer, make_source: Any) -> None:
    _seed(api)
    src, rec = make_source(debounce=0.1, max_delay=1.0)
    src.wait_for_first(5)
    n0 = len(rec.configs)
    states = ["ready", "notready", "terminating"]
    for i in range(60):
        api.put("EndpointSlice", endpoint_slice("bus", "bus-1", ["10.244.0.1", ("10.244.0.2", states[i % 3])]))
        time.sleep(0.002)
    final = [("10.244.0.1:8080", "active"), ("10.244.0.2:8080", "draining")]  # i = 59 -> terminating
    wait_for(lambda: rec.backends().get("bus.urbanmove") == final, what="final state")
    time.sleep(0.3)
    assert rec.backends()["bus.urbanmove"] == final
    assert len(rec.configs) - n0 <= 6, "60 changes in ~0.2 s should give a handful of applies, got %d" % (
        len(rec.configs) - n0)
    for c in rec.configs:  # every delivered state is a valid config, as a file would be
        assert cfg.parse(config_to_yaml(c)) == c
    assert api.stats("EndpointSlice").lists == 1


def test_malformed_objects_and_lines_are_logged_and_ignored(api: FakeAPIServer, make_source: Any) -> None:
    _seed(api)
    broken = service("broken", ip="10.96.0.50")
    broken["spec"] = "garbage"
    with capture_logs() as logs:
        src, rec = make_source()
        src.wait_for_first(5)
        api.wait_watching("Service")
        api.put("Service", broken)
        api.raw_event("Service", "this is not json {")
        api.raw_event("Service", '{"type": "ADDED", "object": 42}')
        api.raw_event("Service", '{"type": "ADDED", "object": {"metadata": {"namespace": "x"}}}')
        api.raw_event("Service", '{"object": {}}')
        api.raw_event("EndpointSlice", '{"type": "MODIFIED", "object": {"metadata": {"name": "e", '
                                       '"namespace": "urbanmove", "resourceVersion": "%d", "labels": '
                                       '{"kubernetes.io/service-name": "bus"}}, "addressType": "IPv4", '
                                       '"endpoints": 17}}' % (api.rv + 1))
        api.put("EndpointSlice", endpoint_slice("user", "user-1", ["10.244.1.7"]))  # still flowing
        wait_for(lambda: rec.backends().get("user.urbanmove") == [("10.244.1.7:8080", "active")])
        wait_for(lambda: src.last_result and any("urbanmove/broken" in e for e in src.last_result.errors))
    assert set(rec.backends()) == {"bus.urbanmove", "user.urbanmove"}
    assert src.services.stats.malformed == 4 and src.services.stats.errors == 0
    assert all(t.is_alive() for t in (src.services._thread, src.slices._thread, src._thread))  # type: ignore[union-attr]
    errors = [e for e in logs if e["log_level"] == "error"]
    assert sum(e["event"] == "malformed_object_ignored" for e in errors) == 4
    skipped = [e["problem"] for e in errors if e["event"] == "kubernetes_object_skipped"]
    assert any(p.startswith("service urbanmove/broken:") for p in skipped)
    assert any(p.startswith("endpointslice urbanmove/e (service urbanmove/bus):") for p in skipped)
    # each problem is logged once, not on every rebuild
    assert len(skipped) == len(set(skipped))


def test_error_events_back_off_and_resume(api: FakeAPIServer, make_source: Any) -> None:
    _seed(api)
    src, rec = make_source()
    src.wait_for_first(5)
    api.wait_watching("Service")
    api.raw_event("Service", '{"type": "ERROR", "object": {"kind": "Status", "code": 500, "message": "etcd"}}')
    api.wait_watching("Service", 2)
    api.put("Service", service("ticket", ip="10.96.0.14"))
    api.put("EndpointSlice", endpoint_slice("ticket", "t", ["10.244.4.1"]))
    wait_for(lambda: "ticket.urbanmove" in rec.backends())
    assert src.services.stats.errors == 1 and api.stats("Service").lists == 1


def test_set_base_rebuilds_with_the_new_file(api: FakeAPIServer, make_source: Any) -> None:
    _seed(api)
    src, rec = make_source()
    src.wait_for_first(5)
    src.set_base(cfg.parse("tick: 2s\npolicy: round-robin\nservices: []\n"))
    wait_for(lambda: rec.last is not None and rec.last.tick == 2.0 and rec.last.policy == "round-robin")
    assert len(rec.last.services) == 2  # type: ignore[union-attr]


def test_an_unchanged_state_is_not_redelivered(api: FakeAPIServer, make_source: Any) -> None:
    _seed(api)
    src, rec = make_source()
    src.wait_for_first(5)
    n = len(rec.configs)
    api.put("Service", service("bus", ip="10.96.0.10"))  # same content, new resourceVersion
    api.put("Service", service("other", ip="10.96.0.77", enabled="false"))  # not opted in
    time.sleep(0.4)
    assert len(rec.configs) == n


def test_stop_is_prompt_with_watches_open(api: FakeAPIServer, make_source: Any) -> None:
    _seed(api)
    src, _ = make_source(watch_timeout=300)
    src.wait_for_first(5)
    api.wait_watching("Service")
    api.wait_watching("EndpointSlice")
    t0 = time.monotonic()
    src.stop()
    assert time.monotonic() - t0 < 2.0
    assert not any(t.is_alive() for t in (src.services._thread, src.slices._thread, src._thread))  # type: ignore[union-attr]
