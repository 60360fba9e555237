"""The real agent as a child process for the live benchmarks (routing_live, pools_live)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .datapath import stop_process


def start_agent(res: Any, cfg: Path, cg: str, pin: str, log: Path,
                error: type[Exception] = RuntimeError) -> subprocess.Popen[Any]:
    """`equilibriumd run` on `cfg`, attached to `cg` (a child cgroup), stopped by PID when
    `res` unwinds; returns once it logs "running", raises `error` if it exits or hangs."""
    # --state-file off: each run starts from nothing, not from the last run's learning
    cmd = [sys.executable, "-m", "equilibriumd", "run", "--config", str(cfg), "--cgroup", cg, "--pin-dir", pin,
           "--metrics-addr", "off", "--state-file", "off"]
    with open(log, "w") as lf:
        p = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    res.defer("stop agent %d" % p.pid, lambda: stop_process(p, "agent"))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise error("agent exited (%d): %s" % (p.returncode, log.read_text()[-2000:]))
        if '"running"' in log.read_text():
            return p
        time.sleep(0.1)
    raise error("agent not running after 120 s: %s" % log.read_text()[-2000:])
