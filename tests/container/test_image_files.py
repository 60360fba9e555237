"""The image's recipe and its reference in the manifests, without building anything:
the build script installs what the Dockerfile does, and the manifests name the image
by digest, never by a mutable tag."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DS = REPO / "daemonset"
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def _script_array(name: str) -> list[str]:
    text = (DS / "build-image.sh").read_text()
    m = re.search(r"^%s=\(([^)]*)\)" % name, text, re.M)
    assert m, "build-image.sh: no %s=(...)" % name
    return m.group(1).split()


def _dockerfile_packages() -> list[str]:
    text = (DS / "Dockerfile").read_text().replace("\\\n", " ")
    m = re.search(r"apt-get install -y --no-install-recommends ([^&]*)&&", text)
    assert m, "Dockerfile: no apt-get install line"
    return m.group(1).split()


def test_the_script_installs_what_the_dockerfile_does() -> None:
    assert _script_array("PACKAGES") == _dockerfile_packages()
    env = dict(e.split("=", 1) for e in _script_array("ENV"))
    docker = (DS / "Dockerfile").read_text()
    for k in ("PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "EQUILIBRIUM_BPF_DIR"):
        assert "%s=%s" % (k, env[k]) in docker, k
    assert env["PATH"].startswith("/opt/venv/bin:") and "PATH=/opt/venv/bin:$PATH" in docker


def test_the_manifests_pin_the_image_by_digest() -> None:
    """A tag can be moved to other contents; a digest cannot (build-image.sh --pin writes it)."""
    (ds,) = [d for d in yaml.safe_load_all((DS / "daemonset.yaml").read_text()) if d and d["kind"] == "DaemonSet"]
    images = [c["image"] for c in ds["spec"]["template"]["spec"]["containers"]]
    for img in images:
        name, sep, digest = img.partition("@")
        assert sep and DIGEST.fullmatch(digest), "%s: not pinned by digest" % img
        assert ":" not in name.rsplit("/", 1)[-1], "%s: a tag beside the digest" % img
    kust = yaml.safe_load((DS / "kustomization.yaml").read_text())
    (entry,) = [i for i in kust["images"] if i["name"] == "equilibrium/equilibriumd"]
    assert "newTag" not in entry and DIGEST.fullmatch(entry["digest"]), entry
    assert images == ["equilibrium/equilibriumd@" + entry["digest"]]   # the two say the same


def test_the_build_script_says_what_is_wrong() -> None:
    script = str(DS / "build-image.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    r = subprocess.run([script, "--nope"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown argument '--nope'" in r.stderr
    r = subprocess.run([script, "--pin", "/nonexistent-eqtest"], capture_output=True, text=True)
    assert r.returncode == 2 and "no daemonset.yaml" in r.stderr
    r = subprocess.run([script, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--pin DIR" in r.stdout
