"""Load client for the datapath tests: moves itself into the given child
cgroup, prints 'ready', then connects to a frontend as fast as it can.

Prints one JSON line: ok, failures by errno name, and how many peers did not
read back as the frontend (reverse translation). TCP connections are closed
with RST so 10,000s of them leave no TIME_WAIT behind.
"""

import argparse
import collections
import errno
import json
import os
import socket
import struct
import sys
import time

RST = struct.pack("ii", 1, 0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cgroup", required=True)
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--count", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=0.0)
    ap.add_argument("--udp", action="store_true")
    ap.add_argument("--expect", action="append", default=[])
    a = ap.parse_args()
    with open(os.path.join(a.cgroup, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
    fam = socket.AF_INET6 if ":" in a.host else socket.AF_INET
    print("ready", flush=True)
    ok, wrong_peer, fails = 0, 0, collections.Counter()
    frontend = (a.host, a.port)
    deadline = time.monotonic() + a.seconds if a.seconds else None
    n = 0
    while (a.count and n < a.count) or (deadline and time.monotonic() < deadline):
        n += 1
        s = socket.socket(fam, socket.SOCK_DGRAM if a.udp else socket.SOCK_STREAM)
        s.settimeout(2.0)
        try:
            if a.udp:
                s.sendto(b"x", frontend)
                _, peer = s.recvfrom(64)
            else:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
                s.connect(frontend)
                peer = s.getpeername()
            if peer[:2] != frontend:
                wrong_peer += 1
            ok += 1
        except OSError as e:
            fails[errno.errorcode.get(e.errno or 0, str(e))] += 1
        finally:
            s.close()
    print(json.dumps({"attempts": n, "ok": ok, "failures": dict(fails), "wrong_peer": wrong_peer}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
