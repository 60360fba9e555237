"""Running the built image under runc: shared by the container tests (agent, coordinator)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
from pathlib import Path
from typing import Any

from helpers import REPO, rand_tag

DS = REPO / "daemonset"
TAG = "0.1.0"
CACHE = os.environ.get("EQUILIBRIUM_IMAGE_CACHE", "/var/cache/equilibrium/image")


def run(*cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError("%s failed (%d):\n%s\n%s" % (" ".join(cmd), r.returncode, r.stdout, r.stderr))
    return r


class Container:
    """One runc container, stopped and deleted by its id."""

    def __init__(self, bundle: Path, spec: dict[str, Any], log: Path) -> None:
        self.id = "eqtest-" + rand_tag(8)
        self.dir = bundle.parent / (bundle.name + "-" + self.id)
        self.dir.mkdir()
        (self.dir / "config.json").write_text(json.dumps(spec, indent=1))
        self.log = log
        self._logf = open(log, "ab")
        self.proc = subprocess.Popen(["runc", "run", "--bundle", str(self.dir), self.id],
                                     stdin=subprocess.DEVNULL, stdout=self._logf, stderr=subprocess.STDOUT)

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def wait_event(self, event: str, timeout: float) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for e in self.events():
                if e.get("event") == event:
                    return e
            if self.proc.poll() is not None:
                raise AssertionError("the container exited (%s) before %r:\n%s"
                                     % (self.proc.returncode, event, self.log.read_text()[-4000:]))
            time.sleep(0.1)
        raise AssertionError("no %r within %ss:\n%s" % (event, timeout, self.log.read_text()[-4000:]))

    def pid(self) -> int:
        return int(json.loads(run("runc", "state", self.id).stdout)["pid"])

    def exec(self, *argv: str, timeout: float = 60, user: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run argv inside the container, with the container's process settings (caps, user, env)."""
        opts = ["--user", user] if user is not None else []
        return run("runc", "exec", *opts, self.id, *argv, timeout=timeout, check=False)

    def stop(self) -> None:
        if self._logf.closed:
            return
        if self.proc.poll() is None:
            run("runc", "kill", self.id, "TERM", check=False)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                run("runc", "kill", self.id, "KILL", check=False)
                self.proc.wait(timeout=10)
        run("runc", "delete", "--force", self.id, check=False)
        self._logf.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def proc_status(pid: int) -> dict[str, str]:
    with open("/proc/%d/status" % pid) as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def metrics_addr(args: list[str], default_port: int = 9500) -> tuple[str, int]:
    """Where a probe inside the pod reaches --metrics-addr (0.0.0.0 is the pod's loopback too)."""
    (addr,) = [a.split("=", 1)[1] for a in args if a.startswith("--metrics-addr=")]
    u = urllib.parse.urlsplit("//" + addr)
    host = u.hostname or "127.0.0.1"
    return ("127.0.0.1" if host in ("0.0.0.0", "::", "") else host), int(u.port or default_port)
