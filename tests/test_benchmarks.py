"""The benchmark scripts run end to end at tiny size, so they never rot (results go to a temp dir)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, args: list[str], out: Path) -> None:
    env = {**os.environ, "MOONSHOT_FX_RESULTS": str(out)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_quality_and_speed_scripts_write_their_results(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    _run("quality.py", ["--model", "stories260k", "--patterns", "2:4", "--methods", "magnitude", "wanda"], tmp_path)
    _run("speed.py", ["--model", "stories260k", "--methods", "sparsegpt", "magnitude"], tmp_path)
    quality = json.loads((tmp_path / "quality_stories260k.json").read_text())
    assert [r["method"] for r in quality["rows"]] == ["magnitude", "wanda"]
    assert all(r["sparsity"] == pytest.approx(0.5, abs=0.01) and r["quality"] > quality["dense"]["quality"]
               for r in quality["rows"])
    speed = json.loads((tmp_path / "speed_stories260k.json").read_text())
    assert [r["method"] for r in speed["rows"]] == ["sparsegpt", "magnitude"]
    assert all(r["wall"] > 0 and r["peak_rss_mb"] > 0 for r in speed["rows"])
    md = (tmp_path / "RESULTS.md").read_text()
    assert "quality_stories260k.json" in md and "speed_stories260k.json" in md
    assert (ROOT / "README.md").read_text() == readme  # only the real results are rendered into it
