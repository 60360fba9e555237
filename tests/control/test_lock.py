"""The agent's pid-file lock: one agent per pin directory, no file left behind."""

from __future__ import annotations

import os

import pytest

from equilibriumd.agent import lock


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "RUN_DIR", str(tmp_path))
    return tmp_path


def test_second_agent_is_refused_and_release_removes_the_file(run_dir):
    a = lock.AgentLock("/sys/fs/bpf/eq-lock-test")
    a.acquire()
    assert lock.holder("/sys/fs/bpf/eq-lock-test") == os.getpid()
    with pytest.raises(lock.AlreadyRunning, match="pid %d" % os.getpid()):
        lock.AgentLock("/sys/fs/bpf/eq-lock-test").acquire()
    assert lock.AgentLock("/sys/fs/bpf/eq-other").acquire() is None   # another pin directory: its own lock
    a.release()
    assert not os.path.exists(a.path)
    assert lock.holder("/sys/fs/bpf/eq-lock-test") is None
    b = lock.AgentLock("/sys/fs/bpf/eq-lock-test")
    b.acquire()
    b.release()
    assert sorted(os.listdir(run_dir)) == [os.path.basename(lock.lock_path("/sys/fs/bpf/eq-other"))]


def test_a_lock_on_a_removed_file_is_not_kept(run_dir, monkeypatch):
    """An agent that opened the pid file just before its holder removed it must not
    lock the removed file (two agents would then run): it opens the path again."""
    path = lock.lock_path("/sys/fs/bpf/eq-race")
    stale = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.unlink(path)     # the holder released between our open and our flock
    real_open = os.open
    opened = []

    def open_once_stale(p, flags, mode=0o777):
        if p == path and not opened:
            opened.append(p)
            return stale
        return real_open(p, flags, mode)

    monkeypatch.setattr(lock.os, "open", open_once_stale)
    a = lock.AgentLock("/sys/fs/bpf/eq-race")
    a.acquire()
    assert os.fstat(a.fd).st_ino == os.stat(path).st_ino
    a.release()


def test_tags_are_sha256_as_before(run_dir):
    """equilibrium.digest gives hashlib's SHA-256: the lock, socket and state file
    names of agents already running stay where they were."""
    import hashlib

    want = hashlib.sha256(os.path.realpath("/sys/fs/bpf/equilibrium").encode()).hexdigest()[:12]
    assert os.path.basename(lock.lock_path("/sys/fs/bpf/equilibrium")) == "agent-%s.pid" % want
