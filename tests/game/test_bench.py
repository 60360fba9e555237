"""The game benchmark runs, prints its table and writes JSON (timing is not asserted)."""

import json
from pathlib import Path

import pytest

from equilibriumd.lab.bench import game


def test_bench_writes_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sub" / "game.json"
    assert game.main(["--json", str(out), "--repeat", "2"]) == 0
    printed = capsys.readouterr().out
    assert "median ms" in printed and "1000" in printed
    data = json.loads(out.read_text())
    assert [r["services"] for r in data["rows"]] == [10, 100, 1000]
    assert all(r["median_ms"] > 0 and r["backends"] == 64 for r in data["rows"])
