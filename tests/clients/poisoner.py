"""A caller that poisons one backend's evidence (tests/datapath/test_caller_evidence.py).

Moves itself into the given child cgroup, prints 'ready', then probes the
frontend: it opens a TCP connection and asks the kernel which backend the
connection really reached. getpeername() cannot say (reverse translation shows
the frontend), so it reads the socket's real remote address with sock_diag,
as `ss` does, finding its own socket by inode among the ESTABLISHED ones
(/proc/net/tcp would also list every TIME_WAIT socket of the node on each
probe). When the kernel chose the victim, it sends `GET ` (4 bytes: a request
line that never completes) and closes at once, so the request is counted as
unanswered, a failure of the victim; any other backend it leaves quietly.
Connections are closed with RST (no TIME_WAIT pile-up); closing sends nothing
the telemetry counts as a failure unless a request is outstanding.

Probes are paced at --rate per second; poisoned connections are at most one
per --min-gap seconds, so the attack has about the same strength whatever
share of connections the victim gets. Stops after --seconds or on SIGTERM and
prints one JSON line: probes, connections per backend, poisoned, errors.
"""

from __future__ import annotations

import argparse
import collections
import errno
import json
import os
import signal
import socket
import struct
import sys
import time

RST = struct.pack("ii", 1, 0)  # SO_LINGER {on, 0}
POISON = b"GET "

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_ESTABLISHED = 1
NLMSG_HDR = struct.Struct("=IHHII")        # len, type, flags, seq, pid
# inet_diag_msg: family, state, timer, retrans, then inet_diag_sockid (sport and
# dport big-endian, src[16], dst[16], if, cookie[8]), expires, rqueue, wqueue, uid, inode
DIAG_MSG = struct.Struct("=BBBB2s2s16s16sI8sIIIII")


class SockDiag:
    """Real remote addresses of this network namespace's established IPv4 TCP sockets."""

    def __init__(self) -> None:
        self.nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
        self.seq = 0

    def remote_of(self, sock: socket.socket) -> tuple[str, int] | None:
        """(ip, port) the kernel connected `sock` to, or None if it is not established."""
        inode = os.fstat(sock.fileno()).st_ino
        self.seq += 1
        # inet_diag_req_v2: family, protocol, ext, pad, states, then an empty inet_diag_sockid (48 bytes)
        req = struct.pack("=BBBBI", socket.AF_INET, socket.IPPROTO_TCP, 0, 0, 1 << TCP_ESTABLISHED) + bytes(48)
        self.nl.send(NLMSG_HDR.pack(NLMSG_HDR.size + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP,
                                    self.seq, 0) + req)
        found = None
        while True:
            data = self.nl.recv(1 << 16)
            off = 0
            while off + NLMSG_HDR.size <= len(data):
                length, kind, _, seq, _ = NLMSG_HDR.unpack_from(data, off)
                if kind == NLMSG_DONE and seq == self.seq:
                    return found
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, off + NLMSG_HDR.size)[0]
                    raise OSError(code, "sock_diag: %s" % os.strerror(code))
                if seq == self.seq and kind == SOCK_DIAG_BY_FAMILY:
                    msg = DIAG_MSG.unpack_from(data, off + NLMSG_HDR.size)
                    if msg[-1] == inode:
                        found = (socket.inet_ntoa(msg[7][:4]), struct.unpack("!H", msg[5])[0])
                off += (length + 3) & ~3

    def close(self) -> None:
        self.nl.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cgroup", required=True, help="join this child cgroup first")
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--victim", required=True, help="ip:port of the backend to poison")
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--rate", type=float, default=200.0, help="probes per second")
    ap.add_argument("--min-gap", type=float, default=0.5, help="seconds between two poisoned connections")
    a = ap.parse_args()
    with open(os.path.join(a.cgroup, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
    host, _, port = a.victim.rpartition(":")
    victim = (host, int(port))
    stop: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    diag = SockDiag()
    print("ready", flush=True)
    start = time.monotonic()
    end = start + a.seconds
    by_backend: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    probes = poisoned = 0
    last_poison = float("-inf")
    while not stop and time.monotonic() < end:
        due = start + probes / a.rate
        if due > time.monotonic():
            time.sleep(due - time.monotonic())
        probes += 1
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(2.0)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
        try:
            s.connect((a.host, a.port))
            peer = diag.remote_of(s)
            by_backend["%s:%d" % peer if peer else "unknown"] += 1
            now = time.monotonic()
            if peer == victim and now - last_poison >= a.min_gap:
                s.sendall(POISON)
                poisoned += 1
                last_poison = now
        except OSError as e:
            errors[errno.errorcode.get(e.errno or 0, str(e))] += 1
        finally:
            s.close()
    diag.close()
    print(json.dumps({"seconds": round(time.monotonic() - start, 3), "probes": probes,
                      "by_backend": dict(by_backend), "poisoned": poisoned, "errors": dict(errors)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
