"""scripts/demo's main job, headless: real traffic follows each phase's weights."""

from __future__ import annotations

import json
import subprocess

import pytest

from helpers import PY, REPO

pytestmark = pytest.mark.root


def test_demo_headless(tmp_path):
    out = tmp_path / "summary.json"
    r = subprocess.run([PY, "-m", "equilibriumd.demo", "--headless", "--duration", "16", "--summary", str(out)],
                       capture_output=True, text=True, cwd=REPO, timeout=240)
    assert out.exists(), r.stdout + r.stderr
    s = json.loads(out.read_text())
    assert s["client_errors"] == 0
    assert [p["phase"] for p in s["phases"]] == ["static 6/3/1", "round-robin", "backend 3 draining", "static 1/1/2"]
    for p in s["phases"]:
        assert p["connections"] > 300
        assert p["max_gap"] < 0.1, p  # ~800 connections a phase: a 10-point gap is > 5 sigma
    drained = s["phases"][2]["observed"][2]
    assert drained == 0.0
