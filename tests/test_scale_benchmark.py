"""benchmarks/scale.py end to end at tiny size: synthetic checkpoint → streamed 2:4 → result file."""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

ROOT = Path(__file__).resolve().parent.parent


def _scale_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module("scale")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def test_checkpoint_then_stream_tiny(tmp_path: Path) -> None:
    scale = _scale_module()
    cache, results, out = tmp_path / "cache", tmp_path / "results", tmp_path / "pruned"
    scale.main(["checkpoint", "--shape", "tiny", "--cache", str(cache), "--shard-gb", "0.0001"])
    src = cache / "tiny"
    shards = sorted(src.glob("*.safetensors"))
    assert len(shards) > 1 and not [p for p in cache.iterdir() if p.name.startswith(".")]
    stamp = [p.stat().st_mtime_ns for p in shards]
    scale.main(["checkpoint", "--shape", "tiny", "--cache", str(cache)])  # complete: reused, not rewritten
    assert [p.stat().st_mtime_ns for p in shards] == stamp
    dense = _tensors(src)
    assert all(v.dtype == torch.bfloat16 for v in dense.values())
    assert torch.equal(dense["model.norm.weight"], torch.ones(64, dtype=torch.bfloat16))

    scale.main(["stream", "--shape", "tiny", "--cache", str(cache), "--windows", "2", "--seq", "16",
                "--max-blocks", "2", "--out", str(out), "--results", str(results)])
    doc = json.loads((results / "scale_tiny.json").read_text())
    assert doc["blocks_run"] == 2 and doc["blocks_total"] == 3 and doc["partial"] is True
    assert len(doc["blocks"]) == 2 and doc["sites"] == 2 * 7 and doc["nonfinite_errors"] == 0
    assert 0 < doc["baseline_rss_mb"] <= doc["peak_rss_mb"] and doc["peak_rss_sampled_mb"] <= doc["peak_rss_mb"] + 1
    assert set(doc["phases_s"]) == set(scale.PHASES) and all(v >= 0 for v in doc["phases_s"].values())
    for row in doc["blocks"]:
        assert sum(row[p] for p in scale.PHASES) <= row["total"] + 1e-6
    assert doc["wall_all_blocks_extrapolated"] and doc["wall_all_blocks_s"] > doc["outside_blocks_s"]
    assert "extrapolated" in doc["markdown"] and "peak RSS" in doc["markdown"]
    assert not [p for p in cache.iterdir() if p.name != "tiny"]  # the temporary view was removed

    pruned = _tensors(out)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    assert not any(k.startswith("model.layers.2.") for k in pruned)
    for name, w in pruned.items():
        if "proj" in name:  # 2:4 along the input dimension (each row's consecutive groups of 4)
            assert w.dtype == torch.bfloat16 and w.shape == dense[name].shape
            assert ((w.view(w.shape[0], -1, 4) != 0).sum(-1) == 2).all(), name
        else:  # norms, embeddings and head are copied unchanged
            assert torch.equal(w, dense[name]), name
