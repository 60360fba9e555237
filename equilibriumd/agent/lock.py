"""One agent per pin directory: an flock'ed pid file under /run/equilibrium.

Two agents writing the same maps would fight over generations and ids;
teardown under a running agent would pull the maps from under it.
"""

from __future__ import annotations

import fcntl
import os

from ..digest import sha256

RUN_DIR = os.environ.get("EQUILIBRIUM_RUN_DIR", "/run/equilibrium")


class AlreadyRunning(RuntimeError):
    pass


def lock_path(pin_dir: str) -> str:
    tag = sha256(os.path.realpath(pin_dir).encode()).hexdigest()[:12]
    return os.path.join(RUN_DIR, "agent-%s.pid" % tag)


class AgentLock:
    def __init__(self, pin_dir: str) -> None:
        self.path = lock_path(pin_dir)
        self.fd = -1

    def acquire(self) -> None:
        os.makedirs(RUN_DIR, mode=0o755, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                raise AlreadyRunning("another agent (pid %s) already manages this pin directory"
                                     % (pid or "?")) from None
            # The holder before us removes the file when it stops (release): a lock
            # taken on a file no longer at the path locks nothing. Open it again.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, b"%d\n" % os.getpid(), 0)
        self.fd = fd

    def release(self) -> None:
        """Remove the pid file (still locked, so no one takes a lock on it meanwhile) and unlock."""
        if self.fd >= 0:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = -1


def holder(pin_dir: str) -> int | None:
    """PID of the agent holding the lock, or None."""
    path = lock_path(pin_dir)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            txt = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(txt) if txt.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
