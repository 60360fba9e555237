"""The image, built once per session by daemonset/build-image.sh (or reused from its
cache) and unpacked once: the agent's and the coordinator's tests run from the same one."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
from runcbox import CACHE, DS, TAG, run

from helpers import rand_tag


@pytest.fixture(scope="session")
def image() -> tuple[str, str]:
    """(digest, layout): built by the script, or reused from its cache."""
    t0 = time.monotonic()
    r = subprocess.run([str(DS / "build-image.sh"), "--cache", CACHE], capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-4000:]
    digest = r.stdout.strip().splitlines()[-1]
    assert digest.startswith("sha256:") and len(digest) == 71, r.stdout
    print("build-image.sh: %.0fs\n%s" % (time.monotonic() - t0, r.stderr))
    return digest, os.path.join(CACHE, "current", "oci")


@pytest.fixture(scope="session")
def bundle(image: tuple[str, str]) -> Iterator[Path]:
    """The image unpacked by umoci: rootfs/ and the image's own config.json (env, cwd)."""
    d = Path("/var/tmp") / ("eqtest-bundle-" + rand_tag(8))
    try:
        run("umoci", "unpack", "--image", "%s:%s" % (image[1], TAG), str(d), timeout=600)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
