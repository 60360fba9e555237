"""In-kernel telemetry against the real kernel: sockops, cgroup_skb HTTP
parsing, the reset tracepoint, per-caller counts. Backends are the testbed's
HTTP servers (a separate process) on 127.0.0.0/8; clients run in child cgroups.
"""

from __future__ import annotations

import ctypes as ct
import os
import socket
import time

import numpy as np
import pytest

from equilibriumd.datapath import constants, libbpf, pins
from equilibriumd.datapath.maps import Datapath
from equilibriumd.datapath.structs import Cb
from equilibriumd.datapath.telemetry import COUNTER, TelemetryReader, bucket_bounds, hist_quantile

from helpers import RST, write_config
from test_steering import ctl_json, svc

pytestmark = pytest.mark.root

REQ = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"


def read_response(sock: socket.socket) -> bytes:
    """One HTTP/1.1 response (headers + Content-Length body); b'' on EOF."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return buf
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head


def requests(host: str, port: int, n: int, keepalive: bool = False) -> list[bytes]:
    """n GETs: one connection each, or all on one keep-alive connection."""
    status = []
    s = None
    for _ in range(n):
        if s is None:
            s = socket.create_connection((host, port), timeout=5)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
        s.sendall(REQ if keepalive else REQ.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
        status.append(read_response(s)[:12])
        if not keepalive:
            s.close()
            s = None
    if s is not None:
        s.close()
    return status


def wait_backend(pin_dir: str, name: str, key: str, want: int, timeout: float = 5.0) -> list[dict]:
    """Counters settle as soon as the last close is processed; poll briefly."""
    deadline = time.monotonic() + timeout
    while True:
        rows = ctl_json(pin_dir, "backends", name)["backends"]
        if sum(r[key] for r in rows) >= want or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def test_requests_counted_exactly(tmp_path, cgroup, testbed, agent, frontend_ip, pin_dir):
    tb = testbed(2)
    cfg = write_config(tmp_path / "c.yaml", [svc("web", frontend_ip + ":80", tb.addrs)])
    agent(cfg).start()
    with cgroup.enter():
        st = requests(frontend_ip, 80, 300)
    assert all(x.startswith(b"HTTP/1.1 200") for x in st)
    rows = wait_backend(pin_dir, "web", "connections_total", 300)
    assert sum(r["requests_total"] for r in rows) == 300
    assert sum(r["responses_2xx_total"] for r in rows) == 300
    assert sum(r["connections_total"] for r in rows) == 300
    assert sum(r["selections_total"] for r in rows) == 300
    served = sum(tb.stats(i)["requests"] for i in range(2))
    assert served == 300
    for r in rows:  # each backend's count matches what that server saw
        assert r["requests_total"] == tb.stats(r["address"])["requests"]
        assert r["connect_errors_total"] == 0 and r["error_ratio"] == 0.0
        assert r["rtt_seconds"] is not None and 0 < r["rtt_seconds"] < 0.05
        assert r["bytes_received_total"] > 0 and r["bytes_sent_total"] > 0
        assert r["open_connections"] == 0
    with Datapath(pin_dir) as dp:  # every socket's entry went with its socket
        assert dp.open_sockets() == 0


def test_200ms_backend_lands_in_its_bucket(tmp_path, cgroup, testbed, agent, frontend_ip, pin_dir):
    tb = testbed(1, behaviour={"latency": 0.2})
    cfg = write_config(tmp_path / "c.yaml", [svc("slow", frontend_ip + ":80", tb.addrs)])
    agent(cfg).start()
    with Datapath(pin_dir) as dp:
        reader = dp.telemetry()
        reader.tick()
        with cgroup.enter():
            requests(frontend_ip, 80, 10)
        time.sleep(0.2)
        d = reader.tick()
        _, _, req_hist = reader.totals()   # cumulative: the backend is new, so these 10 requests
    bid = [b for b in ctl_json(pin_dir, "backends", "slow")["backends"]][0]["id"]
    hist = req_hist[bid]
    assert d.req_timed[bid] == 10
    bucket = int(np.log2(200_000))  # 200 ms = 200,000 µs -> bucket 17: [131 ms, 262 ms)
    lo, hi = bucket_bounds(bucket)
    assert lo <= 0.2 < hi
    assert hist.sum() == 10 and hist[bucket] == 10, hist
    p50 = float(hist_quantile(hist, 0.5))
    assert bucket_bounds(bucket - 1)[0] <= p50 < bucket_bounds(bucket + 1)[1]
    assert d["requests"][bid] == 10
    row = ctl_json(pin_dir, "backends", "slow")["backends"][0]
    assert 0.131 <= row["latency_p50_seconds"] <= 0.263


def test_5xx_refusals_and_unanswered_counted_exactly(tmp_path, cgroup, testbed, agent, frontend_ip, pin_dir):
    tb = testbed(3)
    tb.set(0, error_ratio=1.0)
    tb.set(1, refuse=True)
    tb.set(2, close_mid_request=1.0)
    cfg = write_config(tmp_path / "c.yaml", [
        svc("err", frontend_ip + ":80", [tb.addrs[0]]),
        svc("refuse", frontend_ip + ":81", [tb.addrs[1]]),
        svc("hangup", frontend_ip + ":82", [tb.addrs[2]]),
    ])
    agent(cfg).start()
    refused = 0
    with cgroup.enter():
        st = requests(frontend_ip, 80, 40)
        for _ in range(25):
            try:
                requests(frontend_ip, 81, 1)
            except ConnectionRefusedError:
                refused += 1
        hung = requests(frontend_ip, 82, 15)
    assert all(x.startswith(b"HTTP/1.1 503") for x in st) and refused == 25 and hung == [b""] * 15
    err = wait_backend(pin_dir, "err", "responses_5xx_total", 40)[0]
    assert err["requests_total"] == 40 and err["responses_5xx_total"] == 40 and err["error_ratio"] == 1.0
    ref = wait_backend(pin_dir, "refuse", "connect_refused_total", 25)[0]
    assert ref["connect_refused_total"] == 25 and ref["connect_errors_total"] == 25
    assert ref["connections_total"] == 0 and ref["connect_timeouts_total"] == 0
    hang = wait_backend(pin_dir, "hangup", "requests_unanswered_total", 15)[0]
    assert hang["requests_total"] == 15 and hang["requests_unanswered_total"] == 15
    assert hang["responses_2xx_total"] == 0
    # the same observations, attributed to the caller (the cgroup the client ran in),
    # in the evidence slots of each backend (counts decay: read at once, compared loosely)
    with Datapath(pin_dir) as dp:
        ev = dp.evidence().read(constants.MAX_BACKENDS)
    me = ev.cgroups == os.stat(cgroup.path).st_ino
    assert me.sum() == 3 and (ev.cgroups[~me] == 0).all()
    assert 20 <= ev["resp_5xx"][me].sum() <= 40 and 12 <= ev["refused"][me].sum() <= 25
    assert 7 <= ev["req_errors"][me].sum() <= 15 and ev["responses"][me].sum() == ev["resp_5xx"][me].sum()


def test_inflight_is_live_sockets_only(tmp_path, cgroup, testbed, agent, frontend_ip, pin_dir):
    """Requests the parser never sees answered do not pile up in the in-flight gauge:
    two requests sent in separate segments before reading (pipelining: only the
    first response is matched), and requests left unanswered when the connection
    closes. Counted from requests - answers, 20 pipelined pairs leaked 20 for ever."""
    tb = testbed(2)
    tb.set(0, latency=0.05)               # both requests leave before the first answer
    tb.set(1, close_mid_request=1.0)
    cfg = write_config(tmp_path / "c.yaml", [svc("pipe", frontend_ip + ":80", [tb.addrs[0]]),
                                             svc("hangup", frontend_ip + ":81", [tb.addrs[1]])])
    agent(cfg).start()
    with cgroup.enter():
        for _ in range(20):
            s = socket.create_connection((frontend_ip, 80), timeout=5)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(REQ)
            time.sleep(0.01)              # a second segment that starts with a method
            s.sendall(REQ.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
            assert read_response(s).startswith(b"HTTP/1.1 200") and read_response(s).startswith(b"HTTP/1.1 200")
            s.close()
        assert requests(frontend_ip, 81, 10) == [b""] * 10
    pipe = wait_backend(pin_dir, "pipe", "requests_total", 40)[0]
    assert pipe["requests_total"] == 40 and pipe["responses_2xx_total"] == 20   # the second answer goes unmatched
    hang = wait_backend(pin_dir, "hangup", "requests_unanswered_total", 10)[0]
    assert hang["requests_unanswered_total"] == 10
    with Datapath(pin_dir) as dp:
        d = dp.telemetry().tick()
    assert d.inflight.max() == 0, np.nonzero(d.inflight)


def test_keepalive_counts_each_request(tmp_path, cgroup, testbed, agent, frontend_ip, pin_dir):
    tb = testbed(1)
    cfg = write_config(tmp_path / "c.yaml", [svc("ka", frontend_ip + ":80", tb.addrs)])
    agent(cfg).start()
    with cgroup.enter():
        st = requests(frontend_ip, 80, 100, keepalive=True)
    assert len(st) == 100 and all(x.startswith(b"HTTP/1.1 200") for x in st)
    row = wait_backend(pin_dir, "ka", "connections_total", 1)[0]
    assert row["requests_total"] == 100 and row["responses_2xx_total"] == 100
    assert row["connections_total"] == 1 and tb.stats(0)["connections"] == 1


def test_per_caller_counts_separate_cgroups(tmp_path, cgroup, testbed, agent, frontend_ip, pin_dir):
    tb = testbed(2)
    cfg = write_config(tmp_path / "c.yaml", [svc("api", frontend_ip + ":80", tb.addrs)])
    agent(cfg).start()
    # Two "pods": child cgroups of the one the programs are attached to.
    kids = [os.path.join(cgroup.path, "pod-%d" % i) for i in range(2)]
    for k in kids:
        os.mkdir(k)
    back = open("/proc/self/cgroup").read().split("::")[-1].strip()
    from helpers import cgroup2_root
    try:
        for k, n in zip(kids, (7, 13)):
            with open(os.path.join(k, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
            try:
                requests(frontend_ip, 80, n)
            finally:
                with open(os.path.join(cgroup2_root(), back.lstrip("/"), "cgroup.procs"), "w") as f:
                    f.write(str(os.getpid()))
        deadline = time.monotonic() + 5
        while True:
            rows = {r["cgroup_id"]: r for r in ctl_json(pin_dir, "callers", "api")["callers"]}
            ids = [os.stat(k).st_ino for k in kids]
            if all(i in rows and rows[i]["requests_total"] >= n for i, n in zip(ids, (7, 13))) \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert set(rows) == set(ids)
        for i, n in zip(ids, (7, 13)):
            assert rows[i]["connections_total"] == n and rows[i]["requests_total"] == n
            assert rows[i]["errors_total"] == 0
        # evidence per (caller, backend): each pod in its own slot of each backend it
        # reached, its requests answered and timed (counts decay: compared loosely)
        with Datapath(pin_dir) as dp:
            ev = dp.evidence().read(constants.MAX_BACKENDS)
        assert set(ev.cgroups[ev.cgroups != 0].tolist()) == set(ids)
        for i, n in zip(ids, (7, 13)):
            m = ev.cgroups == i
            assert n / 4 <= ev["requests"][m].sum() <= n and ev["responses"][m].sum() == ev["requests"][m].sum()
            assert ev["req_errors"][m].sum() == 0 and (ev["req_ns_sum"][m] > 0).all()
    finally:
        for k in kids:
            os.rmdir(k)


# --- the reader's arithmetic, on synthetic per-CPU snapshots (no kernel needed) -----------

def _reader(snapshots):
    """A reader whose counter reads return the next snapshot, one per tick (read in chunks)."""
    r = TelemetryReader(-1, 2)  # no map: the chunk read is replaced below
    it = iter(snapshots)
    cur: dict[str, np.ndarray] = {}
    tick = r.tick

    def next_tick(*args, **kw):
        cur["s"] = next(it)
        return tick(*args, **kw)

    def read_chunk(which, k, start=0):
        assert which == "counters"   # the tick never reads the histograms
        g = constants.TEL_GROUP      # a key of eq_tel_be holds g backends, per CPU
        ids = cur["s"][start * g:(start + k) * g]                      # (k * g, cpus, counters)
        return ids.reshape(k, g, 2, -1).transpose(0, 2, 1, 3).reshape(k, 2, -1).view(np.uint32)

    r._read_chunk = read_chunk  # type: ignore[method-assign]
    r.tick = next_tick  # type: ignore[method-assign]
    return r


def _snap(values):
    a = np.zeros((constants.MAX_BACKENDS, 2, len(COUNTER)), dtype=np.uint64)
    for (bid, cpu, field, v) in values:
        a[bid, cpu, COUNTER[field]] = v
    return a


@pytest.mark.parametrize("cpu", [0, 1])
def test_reader_handles_wrap_and_id_reuse(cpu):
    u64max = 2**64 - 1
    other = 1 - cpu
    s0 = _snap([(5, cpu, "requests", u64max - 4), (5, other, "requests", 10), (5, cpu, "resp_2xx", u64max - 1),
                (5, other, "resp_5xx", 5), (9, cpu, "requests", 1000)])
    s1 = _snap([(5, cpu, "requests", 3), (5, other, "requests", 12), (5, cpu, "resp_2xx", 2),
                (5, other, "resp_5xx", 9), (9, cpu, "requests", 7)])  # id 9 reset and reused: 7 since
    r = _reader([s0, s1])
    epochs = np.zeros(constants.MAX_BACKENDS, dtype=np.int64)
    first = r.tick(epochs)
    assert first["requests"].sum() == 0  # the first tick only takes a baseline
    epochs[9] += 1
    d = r.tick(epochs)
    assert d["requests"][5] == 8 + 2  # wrapped u64 on one CPU, plain on the other
    assert d.req_timed[5] == 4 + 4    # responses (each timed): a wrapped 2xx count and the 5xx
    assert d["requests"][9] == 7      # not 7 - 1000


def test_resets_and_timeouts_told_apart(tmp_path, cgroup, agent, frontend_ip, pin_dir):
    """A backend that answers with RST after the handshake counts as reset; a
    SYN that is never answered (full accept queue) and given up counts as a
    timeout, not as refused."""
    import struct
    import threading

    rst = socket.socket()
    rst.bind(("127.0.0.1", 0))
    rst.listen(64)
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)  # never accepted: once its queue is full, further SYNs are dropped

    def rst_server():
        while True:
            try:
                c, _ = rst.accept()
            except OSError:
                return
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()  # RST

    threading.Thread(target=rst_server, daemon=True).start()
    fillers = []
    try:
        for _ in range(4):  # fill the accept queue directly (not through the frontend)
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(full.getsockname())
            fillers.append(f)
        time.sleep(0.2)
        cfg = write_config(tmp_path / "c.yaml", [
            svc("rst", frontend_ip + ":80", ["127.0.0.1:%d" % rst.getsockname()[1]]),
            svc("blackhole", frontend_ip + ":81", ["127.0.0.1:%d" % full.getsockname()[1]]),
        ])
        agent(cfg).start()
        with cgroup.enter():
            for _ in range(5):
                c = socket.socket()
                c.settimeout(2)
                try:  # on loopback the RST can beat connect() back to user space
                    c.connect((frontend_ip, 80))
                    c.sendall(REQ)
                    c.recv(100)
                except ConnectionResetError:
                    pass
                c.close()
            c = socket.socket()
            c.settimeout(1.5)
            with pytest.raises(OSError):
                c.connect((frontend_ip, 81))
            c.close()
        r = wait_backend(pin_dir, "rst", "connect_reset_total", 5)[0]
        assert r["connect_reset_total"] == 5 and r["connections_total"] == 5 and r["connect_refused_total"] == 0
        b = wait_backend(pin_dir, "blackhole", "connect_timeouts_total", 1)[0]
        assert b["connect_timeouts_total"] == 1 and b["connect_refused_total"] == 0
        assert b["connections_total"] == 0
    finally:
        for f in fillers:
            f.close()
        rst.close()
        full.close()


def test_evidence_rows_read_back_exactly_wherever_they_are(tmp_path, agent, frontend_ip, pin_dir):
    """EvidenceReader maps only the pages of the rows asked for (offsets into the
    array), in runs: rows at the ends of the map, in neighbouring and in far
    pages, asked in any order and twice, come back as the kernel holds them."""
    agent(write_config(tmp_path / "c.yaml", [svc("x", frontend_ip + ":80", ["127.0.0.9:80"])])).start()
    top = constants.MAX_BACKENDS - 1
    ids = np.array([top, 3, 9000, 0, 11, 9001, 4000, top, 3], dtype=np.intp)
    words = ct.sizeof(Cb) // 8
    want = {}
    fd = libbpf.obj_get(pins.map_pin(pin_dir, "eq_tel_cb"))
    try:
        now = time.monotonic_ns()
        for i in sorted(set(ids.tolist())):
            v = np.arange(words, dtype=np.uint64) + np.uint64(i * 1000 + 1)   # cgroup words non-zero: slots in use
            v.reshape(constants.CB_SLOTS, -1)[:, 1] = now      # last_ns: nothing to decay
            want[i] = v.reshape(constants.CB_SLOTS, -1)
            libbpf.map_update(fd, ct.c_uint32(i), Cb.from_buffer_copy(v.tobytes()))
        with Datapath(pin_dir) as dp:
            ev = dp.evidence().read_ids(ids)
        assert ev.words.shape == (ids.size, constants.CB_SLOTS, words // constants.CB_SLOTS)
        for k, i in enumerate(ids.tolist()):
            assert (ev.words[k] == want[i]).all(), i
        assert (ev.scale == 1).all()
    finally:
        for i in want:
            libbpf.map_update(fd, ct.c_uint32(i), Cb())
        os.close(fd)
