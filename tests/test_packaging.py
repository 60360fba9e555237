"""The runtime ships no lab code: the wheel (what daemonset/Dockerfile installs)
holds equilibriumd without equilibriumd/lab, and needs no lab-only package.

The wheel is built from a copy of what the Dockerfile copies into the image
(setup.cfg, pyproject.toml, README.md, equilibriumd/, ...), lab included, so
the exclusion tested is setup.cfg's, and nothing is written to the work tree
(an in-tree build would leave build/, whose stale files can end up in a wheel).
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "daemonset" / "Dockerfile"
#: what only the lab needs (setup.cfg's `lab` extra); pyroute2 is the runtime's (agent.netns)
LAB_ONLY = ("matplotlib",)
#: what must be in the wheel: every runtime package and the typing marker
RUNTIME = ("__init__.py", "py.typed", "types.py", "cgroups.py", "config.py", "logs.py", "metrics.py", "views.py",
           "agent/__init__.py", "cli/__init__.py", "datapath/__init__.py", "datapath/loader.py",
           "discovery/__init__.py", "game/__init__.py", "policy/__init__.py")


def _dockerfile_copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY in the Dockerfile."""
    out = []
    for line in DOCKERFILE.read_text().splitlines():
        parts = line.split()
        if parts[:1] == ["COPY"] and not any(p.startswith("--") for p in parts[1:]):
            out.append((parts[1:-1], parts[-1]))
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    copies = _dockerfile_copies()
    dests = {d for _, d in copies}
    root = min(dests, key=len).rstrip("/")  # where the Dockerfile puts setup.cfg: the project root in the image
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for sources, dest in copies:
        rel = dest.rstrip("/")[len(root):].lstrip("/")
        for s in sources:
            target = src / rel / Path(s).name if dest.endswith("/") else src / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if (REPO / s).is_dir():
                shutil.copytree(REPO / s, target, ignore=ignore)
            else:
                shutil.copy2(REPO / s, target)
    assert (src / "equilibriumd" / "lab").is_dir(), "the copy must hold the lab, or the test proves nothing"
    out = tmp / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "--no-index", "-w", str(out), "."],
                       cwd=src, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    wheels = list(out.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_the_dockerfile_copies_the_package_and_its_metadata() -> None:
    copied = {s for sources, _ in _dockerfile_copies() for s in sources}
    assert {"setup.cfg", "pyproject.toml", "README.md", "equilibriumd"} <= copied


def test_wheel_holds_the_runtime_and_no_lab(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    pkg = [n for n in names if n.startswith("equilibriumd/")]
    lab = [n for n in pkg if n.startswith("equilibriumd/lab/")]
    assert not lab, "lab files in the wheel: %s" % lab[:10]
    missing = [f for f in RUNTIME if "equilibriumd/" + f not in names]
    assert not missing, "runtime files missing from the wheel: %s" % missing
    assert not [n for n in names if n.startswith("tests/")]


def _requires(wheel: Path) -> list[tuple[str, str]]:
    """(distribution name, marker) of each Requires-Dist of the wheel."""
    zf = zipfile.ZipFile(wheel)
    meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
    out = []
    for line in zf.read(meta).decode().splitlines():
        if line.startswith("Requires-Dist:"):
            spec, _, marker = line.split(":", 1)[1].partition(";")
            name = spec.strip().split()[0].split("(")[0]
            for op in "<>=!~[":
                name = name.split(op)[0]
            out.append((name.lower(), marker.strip()))
    return out


def test_install_requires_has_no_lab_only_dependency(wheel: Path) -> None:
    required = [n for n, marker in _requires(wheel) if "extra" not in marker]
    assert required, "no Requires-Dist in the wheel's METADATA"
    assert not set(required) & set(LAB_ONLY), required
    # and the same in setup.cfg, the source of truth
    cp = configparser.ConfigParser()
    cp.read(REPO / "setup.cfg")
    install = cp.get("options", "install_requires").lower()
    assert not [d for d in LAB_ONLY if d in install]
    assert "equilibriumd.lab" in cp.get("options.packages.find", "exclude")


def test_the_image_build_context_leaves_the_lab_out() -> None:
    """.dockerignore keeps the lab (and caches, the venv) out of what `docker build` sends."""
    rules = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    assert "equilibriumd/lab" in rules
    # everything not allowed back in is left out: the venv, .git, bench results
    assert rules[0] == "*"


def test_the_agent_process_loads_no_openssl_until_it_needs_it():
    """structlog imports asyncio (and so ssl and OpenSSL, ~6 MB of RSS) for async
    logging the agent never does, and hashlib loads OpenSSL for two short digests:
    the agent defers the one and does without the other. asyncio still works
    when something uses it."""
    code = (
        "import sys\n"
        "import equilibriumd.cli.daemon, equilibriumd.agent.daemon\n"
        "from equilibriumd.agent.lock import lock_path\n"
        "lock_path('/sys/fs/bpf/x')\n"
        "print(sorted(m for m in ('ssl', '_ssl', '_hashlib', 'hashlib') if m in sys.modules))\n"
        "import asyncio\n"
        "async def f():\n"
        "    return 7\n"
        "print(asyncio.run(f()), sys.modules['asyncio'].get_running_loop.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "7 get_running_loop", out
