"""Weights stored (in, out): pattern checks along the input dimension, the layout in the report and
in ``inspect``, the ONNX pattern check per layout, and ONNX export that stays dynamic from a
size-1 example (GPT-2's Conv1D is the real case)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import moonshot_fx
from moonshot_fx import check_pattern
from moonshot_fx.backends import onnx as onnx_backend
from moonshot_fx.errors import PatternError
from moonshot_fx.masks import nm_mask, pattern_violations

onnx_ok, onnx_why = onnx_backend.is_available()
needs_onnx = pytest.mark.skipif(not onnx_ok, reason=onnx_why)


def in_out_24(inp: int, out: int, seed: int = 0) -> torch.Tensor:
    """A random (in, out) weight pruned 2:4 along dimension 0 (its input dimension)."""
    w = torch.randn(inp, out, generator=torch.Generator().manual_seed(seed))
    keep = nm_mask(w.T.abs(), 2, 4).T
    return w * keep


class BareMatmul(nn.Module):
    """A user module on bare parameters: ``x @ P`` with ``P`` stored (in, out), then a Linear."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.P = nn.Parameter(torch.randn(16, 32, generator=g) / 4)
        self.out = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(x @ self.P))


def tiny_gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def conv1d_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    from transformers.pytorch_utils import Conv1D

    return {f"{n}.weight": m.weight for n, m in model.named_modules() if isinstance(m, Conv1D)}


# ---------------------------------------------------------------------------------- check_pattern


def test_check_pattern_in_out_weight_along_dim0():
    w = in_out_24(16, 12)
    assert check_pattern(w, "2:4", transposed=True)
    assert check_pattern(w.T, "2:4")  # the same thing, stated on the (out, in) view
    assert not check_pattern(w, "2:4")  # the stored layout's rows are not the groups
    (msg,) = pattern_violations(w, "2:4")
    assert "dim 1 of the (out, in) weight" in msg
    # an (out, in) weight pruned correctly fails when read as (in, out)
    assert not check_pattern(w.T.contiguous(), "2:4", transposed=True)
    assert "dim 0 of the (in, out)" in pattern_violations(w.T.contiguous(), "2:4", transposed=True)[0]
    # input size not a multiple of M, stated on the input dimension
    assert "in_features 10" in pattern_violations(torch.ones(10, 8), "2:4", transposed=True)[0]
    with pytest.raises(PatternError):
        check_pattern(torch.zeros(4, 4, 3, 3), "2:4", transposed=True)


def test_bare_parameter_module_sparsify_reports_in_out_layout():
    model = BareMatmul().eval()
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    moonshot_fx.sparsify(model, x, calibration=[x], sparsity="2:4", method="sparsegpt", prune_head=True)
    report = model.moonshot_report
    layouts = {s.name: s.layout for s in report.sites}
    assert layouts == {"P": "in_out", "out.weight": "out_in"}
    params = dict(model.named_parameters())
    for s in report.sites:
        assert check_pattern(params[s.name], s.pattern, transposed=s.transposed), s.name
    assert not check_pattern(model.P, "2:4")  # proves the layout matters for this weight
    assert {s["name"]: s["layout"] for s in json.loads(report.to_json())["sites"]} == layouts
    assert "| P | in_out | 2:4 |" in report.to_markdown()
    rows = {r["name"]: r for r in moonshot_fx.inspect(model, x)}
    assert rows["P"]["layout"] == "in_out" and rows["out.weight"]["layout"] == "out_in"


def test_gpt2_sparsify_24_conv1d_passes_along_input_dim():
    model = tiny_gpt2()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    moonshot_fx.sparsify(model, {"input_ids": ids}, calibration=[{"input_ids": ids}], sparsity="2:4",
                         method="sparsegpt")
    weights = conv1d_weights(model)
    assert len(weights) == 8
    sites = {s.name: s for s in model.moonshot_report.sites}
    assert set(weights) <= set(sites)
    for name, w in weights.items():
        assert sites[name].layout == "in_out"
        assert check_pattern(w, "2:4", transposed=True), name
    assert any(not check_pattern(w, "2:4") for w in weights.values())
    rows = {r["name"]: r for r in moonshot_fx.inspect(model, {"input_ids": ids})}
    assert all(rows[n]["layout"] == "in_out" for n in weights)


# ------------------------------------------------------------------------------------------- ONNX


@needs_onnx
def test_gpt2_24_onnx_export_checks_layout_and_stays_dynamic(tmp_path):
    import onnxruntime as ort

    model = tiny_gpt2()
    calib = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    moonshot_fx.sparsify(model, {"input_ids": calib}, calibration=[{"input_ids": calib}], sparsity="2:4",
                         method="sparsegpt")
    # a batch-1 example, as users export: torch.export would tie the graph to batch 1
    ids = torch.randint(0, 128, (1, 35), generator=torch.Generator().manual_seed(1))
    out = tmp_path / "gpt2.onnx"
    report = moonshot_fx.export_onnx(model, {"input_ids": ids}, out, patterns="2:4")
    assert out.exists() and report.ok and report.patterns_ok, report.summary()
    assert report.export_shapes["input_ids"] == [2, 35]  # widened from 1
    assert report.dynamic_dims["input_ids"] == [0, 1]
    conv = set(conv1d_weights(model))
    checked = [c for c in report.checks if c.param in conv]
    assert len(checked) == 2 * len(conv)  # export and optimised
    assert all(c.pattern_ok and c.weight_layout == "in_out" and c.layout_source == "report" for c in checked)

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for shape in ((2, 21), (1, 35), (3, 7)):
        x = torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(2))
        got = sess.run(None, {"input_ids": x.numpy()})[0]
        with torch.no_grad():
            ref = model(input_ids=x, use_cache=False).logits.numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


@needs_onnx
def test_onnx_layout_without_report_from_module_and_graph(tmp_path):
    """Pruned by hand (no report): the Linear's layout comes from its module, the bare ``x @ P``
    parameter's from the ONNX graph (a MatMul reduces over its weight's dimension 0)."""
    model = BareMatmul().eval()
    with torch.no_grad():
        model.P.copy_(in_out_24(16, 32) / 4)
        w = model.out.weight
        w.mul_(nm_mask(w.abs(), 2, 4))
    report = moonshot_fx.export_onnx(model, torch.randn(2, 16), tmp_path / "bare.onnx", patterns="2:4")
    assert report.ok, report.summary()
    src = {(c.param, c.stage): (c.weight_layout, c.layout_source) for c in report.checks}
    assert src[("P", "export")] == ("in_out", "graph")
    assert src[("out.weight", "export")] == ("out_in", "module")
    assert all(c.pattern_ok for c in report.checks)


@needs_onnx
def test_onnx_rejects_linear_pruned_along_output_dim(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    with torch.no_grad():
        w = model[0].weight  # (out 32, in 16): groups of 4 along dim 0 are the wrong groups
        w.mul_(nm_mask(w.T.abs(), 2, 4).T)
    assert not check_pattern(w, "2:4") and check_pattern(w, "2:4", transposed=True)
    out = tmp_path / "bad.onnx"
    with pytest.raises(onnx_backend.OnnxVerificationError) as info:
        moonshot_fx.export_onnx(model, torch.randn(2, 16), out, patterns="2:4")
    msg = str(info.value)
    assert "0.weight" in msg and "not 2:4" in msg and "along the input dimension" in msg
    assert "out_in (from the module type)" in msg
    assert not out.exists() and list(tmp_path.iterdir()) == []
    bad = [c for c in info.value.report.checks if c.pattern_ok is False]
    assert bad and all(c.param == "0.weight" for c in bad)
