"""Every example runs at tiny size, so none of them rots."""
import importlib.util
from pathlib import Path

import pytest

import moonshot_fx

pytest.importorskip("transformers")
EX = Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EX / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_prune_llm_example(capsys):
    model = _load("prune_llm").main(["--model", "stories260k", "--windows", "4", "--seqlen", "64", "--eval-windows", "2"])
    assert "MOONSHOT 2:4" in capsys.readouterr().out
    assert all(moonshot_fx.check_pattern(model.get_parameter(s.name), "2:4", transposed=s.transposed) for s in model.moonshot_report.sites)


def test_prune_cnn_example(capsys):
    model = _load("prune_cnn").main(["--calib", "64", "--test", "100", "--sparsity", "0.5", "--alpha", "0.25"])
    assert "MOONSHOT 0.5" in capsys.readouterr().out
    assert model.moonshot_report.alpha == 0.25
    assert all(moonshot_fx.check_pattern(model.get_parameter(s.name), 0.5) for s in model.moonshot_report.sites)


def test_export_onnx_example(tmp_path):
    pytest.importorskip("onnxruntime")
    report = _load("export_onnx").main(["--out", str(tmp_path / "r20.onnx"), "--calib", "32"])
    assert (tmp_path / "r20.onnx").exists() and report.ok


def test_compile_time_pruning_example(capsys):
    compiled = _load("compile_time_pruning").main(["--calib", "32", "--test", "100", "--inner", "eager"])
    assert "compiled + pruned" in capsys.readouterr().out
    convs = {n: p for n, p in compiled._orig_mod.named_parameters() if p.dim() == 4 and n != "conv1.weight"}
    assert convs and all(moonshot_fx.check_pattern(p, 0.5) for p in convs.values())
