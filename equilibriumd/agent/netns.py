"""The network namespaces whose clients the datapath steers, and running code in them.

A socket iterator walks the sockets of the namespace it is read in. The
programs attach to a cgroup: every process under it may hold steered
connections, and on a Kubernetes node each pod has a namespace of its own.
`Namespaces` finds them (rescanned every RESCAN_SECONDS) from two places:
* the runtimes' namespace files (/run/netns: containerd, CRI-O and `ip
  netns`): what the DaemonSet mounts, read-only;
* the processes under the cgroup (/proc/<pid>/ns/net), when the agent sees
  them (standalone on a host, or a pod with hostPID).
`enter` moves the calling thread into one: setns(2) moves only the calling
thread, so a thread of its own (agent.rebalance's walker) visits them and the
rest of the agent never leaves its namespace.

Entering another namespace needs CAP_SYS_ADMIN. Without it only the agent's
own namespace is walked, and `denied` says why.
"""

from __future__ import annotations

import errno
import os
import time

from ..cgroups import cgroup2_root

#: How often the list of namespaces is rebuilt (pods come and go).
RESCAN_SECONDS = 10.0


def own_netns() -> int:
    return os.stat("/proc/self/ns/net").st_ino


#: Where container runtimes bind-mount the network namespaces they create.
NETNS_DIRS = ("/run/netns",)


class Namespaces:
    def __init__(self, cgroup: str, proc: str = "/proc", dirs: tuple[str, ...] = NETNS_DIRS) -> None:
        rel = os.path.relpath(os.path.realpath(cgroup), cgroup2_root())
        self.cgroup = "/" if rel == "." else "/" + rel   # as /proc/<pid>/cgroup names it
        self.proc = proc
        self.dirs = dirs
        self._at = -RESCAN_SECONDS
        self._foreign: dict[int, str] = {}
        self.denied: str | None = None        #: why other namespaces cannot be entered (None: they can)
        self._own_fd = os.open("/proc/self/ns/net", os.O_RDONLY)   # the way back, whoever asks

    def close(self) -> None:
        os.close(self._own_fd)

    def foreign(self) -> dict[int, str]:
        """netns inode -> a path that opens it, for the namespaces other than ours."""
        now = time.monotonic()
        if now - self._at >= RESCAN_SECONDS:
            self._foreign = self._scan()
            self._at = now
        return self._foreign

    def _scan(self) -> dict[int, str]:
        mine = own_netns()
        out: dict[int, str] = {}
        for d in self.dirs:
            try:
                names = os.listdir(d)
            except OSError:
                continue
            for name in names:
                path = os.path.join(d, name)
                try:
                    ino = os.stat(path).st_ino
                except OSError:
                    continue
                if ino != mine:
                    out.setdefault(ino, path)
        prefix = self.cgroup.rstrip("/") + "/"
        for name in os.listdir(self.proc):
            if not name.isdigit():
                continue
            path = "%s/%s/ns/net" % (self.proc, name)
            try:
                ino = os.stat(path).st_ino
                if ino == mine or ino in out:
                    continue
                with open("%s/%s/cgroup" % (self.proc, name)) as f:
                    cg = next((ln.split(":", 2)[2].strip() for ln in f if ln.startswith("0::")), "")
            except OSError:
                continue   # gone, or not ours to look at
            if self.cgroup == "/" or cg == self.cgroup or cg.startswith(prefix):
                out[ino] = path
        return out

    def enter(self, path: str | None) -> bool:
        """Move the calling thread into the namespace at `path` (None: the agent's own).
        Only for a thread of the caller's own that does nothing else (agent.rebalance's
        walker). False when it could not: the namespace is gone, or entering is not
        permitted (then `denied` says why)."""
        from pyroute2.netns import setns  # only here: needed only where there are namespaces to enter

        try:
            fd = os.open(path, os.O_RDONLY) if path is not None else os.dup(self._own_fd)
        except OSError:
            return False   # the pod went away
        try:
            setns(fd, flags=0)
        except OSError as e:
            if e.errno == errno.EPERM:
                self.denied = ("entering other network namespaces is not permitted (it needs "
                               "CAP_SYS_ADMIN): only the agent's own namespace is rebalanced")
            return False
        finally:
            os.close(fd)
        return True
