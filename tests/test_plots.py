"""Figures: the per-layer error plot of a report, its missing-matplotlib error, and the benchmark
figures drawn from the committed result files."""
from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

import moonshot_fx
from moonshot_fx.cli import main as cli_main
from moonshot_fx.plots import plot_site_errors, short_site_name, site_errors

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"


def _report() -> moonshot_fx.SparsityReport:
    """A real report: SparseGPT on an MLP with correlated inputs (two hidden layers; the head stays dense)."""
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 8))
    x = torch.randn(64, 16, generator=g) @ torch.randn(16, 16, generator=g)
    moonshot_fx.sparsify(model, x[:4], calibration=[x[:32], x[32:]], sparsity="2:4", method="sparsegpt",
                         progress=False)
    return model.moonshot_report


def test_site_errors_read_every_form_of_a_report(tmp_path: Path) -> None:
    report = _report()
    errs = site_errors(report)
    assert [n for n, _ in errs] == [s.name for s in report.sites] and len(errs) == 2
    assert all(0 < e < 1 for _, e in errs)
    assert site_errors(json.loads(report.to_json())) == errs  # the moonshot_report.json form
    assert math.isnan(site_errors({"a.weight": None})[0][1])
    assert short_site_name("model.layers.12.mlp.down_proj.weight") == "12.down_proj"
    assert short_site_name("fc.weight") == "fc"


def test_plot_site_errors_writes_one_png_atomically(tmp_path: Path) -> None:
    report = _report()
    one = plot_site_errors(report, tmp_path / "one.png")
    two = plot_site_errors({"a": report, "b": {s.name: 2 * s.rel_error for s in report.sites}}, tmp_path / "two.png")
    for p in (one, two):
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 5_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.png", "two.png"]  # no temp file left
    with pytest.raises(ValueError, match="no site has a finite"):
        plot_site_errors({"x.weight": None, "y.weight": float("nan")}, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_without_matplotlib_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with pytest.raises(moonshot_fx.MissingExtraError, match=r"moonshot-fx\[plots\]"):
        plot_site_errors({"a.weight": 0.1}, tmp_path / "x.png")
    # the CLI says so before loading or pruning anything
    assert cli_main(["prune", "--model", "stories260k", "--sparsity", "2:4", "--plot", str(tmp_path / "x.png")]) == 2
    assert "MissingExtraError" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_benchmark_figures_from_the_committed_results(tmp_path: Path) -> None:
    """plots.py draws the sweep and the llm-compressor figures from the real result files."""
    results = ROOT / "benchmarks" / "results"
    for f in ["sweep_smollm2.json", *(p.name for p in results.glob("peers_smollm2*.json"))]:
        shutil.copy(results / f, tmp_path / f)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import plots
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    written = sorted(p.name for p in plots.render_figures(tmp_path))
    assert written == ["peers_smollm2.png", "sweep_smollm2.png"]
    for name in written:
        assert (tmp_path / name).read_bytes()[:8] == PNG and (tmp_path / name).stat().st_size > 20_000
