"""Idle connections to /metrics cannot block a scrape: they hold a thread each
(bounded by CONNECTIONS_AT_ONCE, one more is closed at once), but a scrape's
slot is only taken when a GET arrives (no root: the real agent on an
in-memory datapath, the real server on 127.0.0.1)."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request

from equilibriumd import metrics

from .test_metrics_memory import C, memory_agent, serving


def test_idle_connections_do_not_block_a_scrape_and_are_bounded() -> None:
    srv, port = serving(memory_agent(C))
    idle: list[socket.socket] = []
    before = threading.active_count()
    try:
        for _ in range(2 * metrics.SCRAPES_AT_ONCE):   # more than the scrapes served at once
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(0.2)
        t0 = time.monotonic()
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=5) as r:
            page = r.read().decode()
        assert "equilibrium_agent_ticks_total" in page and time.monotonic() - t0 < 3
        # beyond the connection bound: closed at once, no thread each
        for _ in range(metrics.CONNECTIONS_AT_ONCE + 10):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(0.5)
        assert threading.active_count() - before <= metrics.CONNECTIONS_AT_ONCE
        idle[-1].settimeout(2)
        assert idle[-1].recv(1) == b""
    finally:
        for c in idle:
            c.close()
        srv.close()
