"""Fixtures for tests against the real kernel.

Tests marked `root` need root and a kernel with cgroup BPF. In CI (CI=true)
they must run: a missing privilege is a failure there, never a skip.
Every cgroup, pin directory and process a fixture creates is removed by it,
also when the test fails.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import AgentProc, Backends, Cgroup, rand_tag  # noqa: E402

if TYPE_CHECKING:
    from equilibriumd.lab.testbed import TestBackends

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(autouse=True)
def _root_guard(request: pytest.FixtureRequest) -> None:
    """Root-marked tests: fail in CI without root; elsewhere, say why they did not run."""
    if request.node.get_closest_marker("root") is None or os.geteuid() == 0:
        return
    if IN_CI:
        pytest.fail("this test needs root and CI=true: privileged tests must run in CI")
    pytest.skip("needs root (runs in CI as root)")


@pytest.fixture
def cgroup() -> Iterator[Cgroup]:
    cg = Cgroup()
    try:
        yield cg
    finally:
        cg.remove()


@pytest.fixture
def pin_dir() -> Iterator[str]:
    from equilibriumd.agent import lock, persist
    from equilibriumd.datapath import lifecycle

    d = "/sys/fs/bpf/eqtest-" + rand_tag(8)
    try:
        yield d
    finally:
        lifecycle.teardown(d)
        for path in (persist.default_path(d), lock.lock_path(d)):   # the agent's files under /run
            if os.path.exists(path):
                os.unlink(path)


@pytest.fixture
def backends() -> Iterator[Callable[..., Backends]]:
    made: list[Backends] = []

    def make(n: int = 3, **kw: object) -> Backends:
        b = Backends(n, **kw)  # type: ignore[arg-type]
        made.append(b)
        return b

    try:
        yield make
    finally:
        for b in made:
            b.close()


@pytest.fixture
def agent(tmp_path: Path, cgroup: Cgroup, pin_dir: str) -> Iterator[Callable[[Path], AgentProc]]:
    procs: list[AgentProc] = []

    def make(config: Path) -> AgentProc:
        a = AgentProc(config, cgroup.path, pin_dir, tmp_path / "agent.log")
        procs.append(a)
        return a

    try:
        yield make
    finally:
        for a in procs:
            a.stop()


@pytest.fixture
def testbed() -> Iterator[Callable[..., "TestBackends"]]:
    """HTTP test backends in their own process (equilibriumd.lab.testbed), closed after the test."""
    from equilibriumd.lab.testbed import TestBackends

    made: list[TestBackends] = []

    def make(n: int = 2, **kw: object) -> TestBackends:
        tb = TestBackends(n, **kw)  # type: ignore[arg-type]
        made.append(tb)
        return tb

    try:
        yield make
    finally:
        for tb in made:
            tb.close()


@pytest.fixture
def frontend_ip() -> str:
    """A fresh frontend in 127.77.0.0/16: nothing listens there, so a missed
    rewrite is refused instead of reaching anything."""
    import random
    return "127.77.%d.%d" % (random.randint(0, 255), random.randint(1, 254))
