"""Deployment backends: ONNX export (parity, zero patterns, atomic files), 2:4 semi-structured
conversion (eligibility rules, CPU behaviour, CUDA when present), and the torch.compile backend
(equal to eager sparsify, each parameter pruned once)."""
from __future__ import annotations

import copy
import json
from pathlib import Path
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import moonshot_fx
from moonshot_fx import BackendUnavailableError, ConfigError, MoonshotError
from moonshot_fx.backends import compile as compile_backend
from moonshot_fx import cli_export
from moonshot_fx.backends import onnx as onnx_backend
from moonshot_fx.backends import onnx_export
from moonshot_fx.backends import semi_structured as ss

onnx_ok, onnx_why = onnx_backend.is_available()
needs_onnx = pytest.mark.skipif(not onnx_ok, reason=onnx_why)


def prune_24(model: nn.Module) -> nn.Module:
    """Magnitude 2:4 on every Linear/Conv whose (out, in·k·k) view allows it."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d)) and mod.weight[0].numel() % 4 == 0:
                w, _ = moonshot_fx.prune_layer(mod.weight, None, "2:4", method="magnitude")
                mod.weight.copy_(w)
    return model


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


def assert_good(report: onnx_backend.OnnxReport, n_pruned: int) -> None:
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    assert report.example_max_abs_diff <= 1e-4
    assert report.optimized_max_abs_diff <= 1e-4
    assert len(report.pruned_params) == n_pruned
    assert report.not_found == {}, report.summary()
    assert report.zeros_ok and report.patterns_ok and report.ok
    for stage in ("export", "optimized"):
        assert sum(c.stage == stage for c in report.checks) == n_pruned
    # fresh inputs really had another shape than the export example
    assert report.verify_shapes != report.export_shapes


# ------------------------------------------------------------------------------------------- ONNX


@needs_onnx
def test_onnx_mlp_parity_zeros_and_files(tmp_path):
    import onnx
    from onnx import numpy_helper

    model = prune_24(mlp())
    out, opt, trt = tmp_path / "mlp.onnx", tmp_path / "mlp.opt.onnx", tmp_path / "trt.json"
    report = moonshot_fx.export_onnx(model, torch.randn(2, 16), out, optimized_path=opt,
                                     tensorrt_config_path=trt, patterns="2:4")
    assert_good(report, n_pruned=3)
    assert report.verify_shapes == {"input": [3, 16]} and report.dynamic_dims == {"input": [0]}
    assert out.stat().st_size == report.size_bytes > 0 and opt.exists()
    assert report.providers == ["CPUExecutionProvider"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx", "mlp.opt.onnx", "trt.json"]

    # independent check of the ORT-optimised file: the pruned positions are exact zeros
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(opt)).graph.initializer}
    for name, p in model.named_parameters():
        if p.dim() == 2:
            found = [a for a in inits.values() if a.shape == p.shape and np.allclose(a, p.detach().numpy())]
            found += [a.T for a in inits.values() if a.shape == p.shape[::-1] and np.allclose(a.T, p.detach().numpy())]
            assert found, name
            assert np.array_equal(found[0] == 0, p.detach().numpy() == 0)

    cfg = json.loads(trt.read_text())
    name, opts = cfg["providers"][0]
    assert name == "TensorrtExecutionProvider" and opts["trt_sparsity_enable"] == "True"
    assert cfg["model"].endswith("mlp.onnx")


@needs_onnx
def test_onnx_tiny_llama_dict_inputs(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 8))
    moonshot_fx.sparsify(model, {"input_ids": ids}, sparsity="2:4", method="magnitude", progress=False)
    report = moonshot_fx.export_onnx(model, {"input_ids": ids}, tmp_path / "llama.onnx", patterns="2:4")
    assert_good(report, n_pruned=7)  # 7 Linear per layer; embeddings and lm_head stay dense
    assert report.input_names == ["input_ids"] and report.output_names == ["logits"]
    assert report.dynamic_dims == {"input_ids": [0, 1]}
    assert report.verify_shapes == {"input_ids": [3, 11]}  # batch + 1, sequence + 3
    # MatMul weights are stored transposed by the exporter and found as such
    assert {c.layout for c in report.checks} == {"transposed"}


@needs_onnx
def test_onnx_resnet20_all_optimisations(tmp_path):
    data = pytest.importorskip("moonshot_fx.data")
    try:
        model = data.load_cifar_resnet(20)  # the real pretrained weights when the data are present
    except (FileNotFoundError, ValueError):
        torch.manual_seed(0)
        model = data.resnet_cifar(20).eval()
    prune_24(model)
    n_pruned = sum(1 for p in model.parameters() if p.dim() >= 2 and bool((p == 0).any()))
    report = moonshot_fx.export_onnx(model, torch.randn(2, 3, 32, 32), tmp_path / "r20.onnx",
                                     optimized_path=tmp_path / "r20.opt.onnx", patterns="2:4",
                                     optimization_level="all")
    assert_good(report, n_pruned=n_pruned)
    assert report.dynamic_dims == {"x": [0, 2, 3]} and report.verify_shapes == {"x": [3, 3, 48, 48]}
    # BatchNorm folded into the convs (rescaled rows); on x86 ORT also reorders them into NCHWc
    layouts = {c.layout for c in report.checks if c.stage == "optimized"}
    assert layouts <= {"same", "rescaled", "nchwc8", "nchwc16"}


@needs_onnx
def test_onnx_tiny_timm_vit(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              depth=2, num_classes=10).eval()
    prune_24(model)
    report = moonshot_fx.export_onnx(model, torch.randn(2, 3, 32, 32), tmp_path / "vit.onnx", patterns="2:4")
    # 2 blocks × (qkv, proj, fc1, fc2) + patch embedding conv (3·8·8 inputs) + head
    assert_good(report, n_pruned=10)
    assert report.verify_shapes["x"][0] == 3  # the image size is fixed by the model: batch varies


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow: torch.export refuses it
            return self.lin(x)
        return -self.lin(x)


@needs_onnx
def test_onnx_failed_export_leaves_no_file(tmp_path):
    out = tmp_path / "model.onnx"
    with pytest.raises(onnx_backend.OnnxExportError) as err:
        moonshot_fx.export_onnx(_DataDependent(), torch.randn(2, 4), out)
    assert isinstance(err.value, MoonshotError)
    assert list(tmp_path.iterdir()) == []
    # an existing file is left untouched
    out.write_bytes(b"previous")
    with pytest.raises(onnx_backend.OnnxExportError):
        moonshot_fx.export_onnx(_DataDependent(), torch.randn(2, 4), out)
    assert out.read_bytes() == b"previous" and list(tmp_path.iterdir()) == [out]


@needs_onnx
def test_onnx_failed_verification_leaves_no_file(tmp_path, monkeypatch):
    model = prune_24(mlp())
    out, opt = tmp_path / "m.onnx", tmp_path / "m.opt.onnx"
    monkeypatch.setattr(onnx_export, "_max_diff", lambda *a, **k: 0.5)  # an ORT model that disagrees
    with pytest.raises(onnx_backend.OnnxVerificationError) as err:
        moonshot_fx.export_onnx(model, torch.randn(2, 16), out, optimized_path=opt)
    assert err.value.report.max_abs_diff == 0.5 and not err.value.report.ok
    assert list(tmp_path.iterdir()) == []
    report = moonshot_fx.export_onnx(model, torch.randn(2, 16), out, optimized_path=opt, verify=False)
    assert not report.ok and out.exists() and opt.exists()


@needs_onnx
def test_onnx_tied_embedding_with_stray_zeros_is_not_a_pruned_weight():
    """SmolLM2's embedding (tied to lm_head) holds a few exact zeros; it must not be checked
    against the 2:4 pattern: the pruning report names the pruned weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[:5, :3] = 0.0  # stray zeros, no pattern
    ids = torch.randint(0, 128, (2, 8))
    moonshot_fx.sparsify(model, {"input_ids": ids}, sparsity="2:4", method="magnitude", progress=False)
    params = onnx_backend._pruned_params(model)
    assert len(params) == 7 and not any("embed" in n or "lm_head" in n for n in params)
    # without a report: only weights with a substantial zero fraction count
    del model.moonshot_report
    assert sorted(onnx_backend._pruned_params(model)) == sorted(params)


def test_onnx_tolerance_scales_with_the_outputs():
    r = onnx_backend._empty_report(Path("x.onnx"))
    r.max_abs_diff = r.example_max_abs_diff = r.optimized_max_abs_diff = 1.5e-4
    assert r.tolerance == pytest.approx(1e-4) and not r.ok  # outputs of size ~0: absolute bound
    r.output_scale = 30.0  # LM logits: fp32 rounding after many layers
    assert r.tolerance == pytest.approx(1e-4 + 3e-4) and r.ok
    r.rtol = 0.0
    assert not r.ok


@needs_onnx
def test_onnx_lost_zeros_are_detected():
    p = np.array([[1.0, 0.0, 2.0, 0.0], [0.0, 3.0, 0.0, 4.0]], dtype=np.float32)
    a = p.copy()
    a[0, 1] = 0.5  # a pruned position that came back
    checks = onnx_backend._check_zeros("export", {"w": p}, {"w": a}, "", "2:4")
    assert checks[0].layout == "same" and checks[0].zeros_preserved is False
    assert checks[0].pattern_ok is False
    # transposed and per-row rescaled (folded BatchNorm) copies are recognised
    inits = {"t": np.ascontiguousarray(p.T), "s": p * np.array([[2.0], [-0.5]], dtype=np.float32)}
    assert onnx_backend._locate("w", p, {"t": inits["t"]}, "")[1] == "transposed"
    assert onnx_backend._locate("w", p, {"s": inits["s"]}, "")[1] == "rescaled"
    assert onnx_backend._locate("w", p, {}, "")[1] == "not found"


@needs_onnx
def test_onnx_nchwc_layout_is_undone():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    w[w < 0] = 0
    b = 8  # OIHW -> OIHW8i8o, as ORT's NCHWc transformer stores Conv filters
    blocked = w.reshape(2, b, 2, b, 3, 3).transpose(0, 2, 4, 5, 3, 1).copy()
    name, layout, view = onnx_backend._locate("w", w, {"reorder": blocked.reshape(16, 16, 3, 3)}, "")
    assert (name, layout) == ("reorder", "nchwc8") and np.array_equal(view, w)


@needs_onnx
def test_export_main_cli_helper(tmp_path, monkeypatch, capsys):
    model = prune_24(mlp())
    ckpt = tmp_path / "pruned.pt"
    torch.save(model.state_dict(), ckpt)
    monkeypatch.setattr(cli_export, "_load_cli_model", lambda name, pretrained=True: (mlp(seed=1), torch.randn(2, 16)))
    code = onnx_backend.export_main(["--model", "resnet20", "--checkpoint", str(ckpt), "--out",
                                     str(tmp_path / "o.onnx"), "--optimized-out", str(tmp_path / "o.opt.onnx"),
                                     "--pattern", "2:4"])
    assert code == 0 and (tmp_path / "o.onnx").exists() and (tmp_path / "o.opt.onnx").exists()
    assert "zeros preserved: True" in capsys.readouterr().out


def test_onnx_is_available_contract():
    ok, reason = onnx_backend.is_available()
    assert isinstance(ok, bool) and isinstance(reason, str) and reason


# ------------------------------------------------------------------------------- semi-structured

GOOD = dict(is_2_4=True, cuda_available=True, capability=(8, 0))


@pytest.mark.parametrize("shape,dtype,env,backend,ok,why", [
    ((64, 64), torch.float16, GOOD, "cusparselt", True, "ok"),
    ((64, 64), torch.bfloat16, dict(GOOD, capability=(9, 0)), "cusparselt", True, "ok"),
    ((64, 64), torch.float16, dict(GOOD, cuda_available=False, capability=None), "cusparselt", False, "CUDA is not available"),
    ((64, 64), torch.float16, dict(GOOD, capability=(7, 5)), "cusparselt", False, "compute capability 7.5"),
    ((64, 64), torch.float32, GOOD, "cusparselt", False, "dtype float32"),
    ((64, 64), torch.float32, GOOD, "cutlass", True, "ok"),
    ((8, 64), torch.float16, GOOD, "cusparselt", False, "multiple of (16, 16)"),
    ((48, 40), torch.float16, GOOD, "cusparselt", False, "multiple of (16, 16)"),
    ((48, 64), torch.float16, GOOD, "cusparselt", True, "ok"),
    ((48, 64), torch.float16, GOOD, "cutlass", False, "multiple of (32, 64)"),
    ((64, 64, 3), torch.float16, GOOD, "cusparselt", False, "only 2-D"),
    ((64, 64), torch.float16, dict(GOOD, is_2_4=False), "cusparselt", False, "not 2:4"),
])
def test_semi_structured_eligibility(shape, dtype, env, backend, ok, why):
    got, reason = ss.semi_structured_eligibility(shape, dtype, backend=backend, **env)
    assert got is ok and why in reason


def test_semi_structured_eligibility_device_and_overrides():
    ok, reason = ss.semi_structured_eligibility((64, 64), torch.float16, device_type="cpu", **GOOD)
    assert not ok and "model.cuda()" in reason
    ok, reason = ss.semi_structured_eligibility((64, 64), torch.float16, contiguous=False, **GOOD)
    assert not ok and "contiguous" in reason
    ok, _ = ss.semi_structured_eligibility((64, 64), torch.float16, constraints={torch.float16: (128, 128)}, **GOOD)
    assert not ok
    with pytest.raises(ConfigError):
        ss.semi_structured_eligibility((64, 64), torch.float16, backend="nope", **GOOD)


def test_semi_structured_constraints_match_installed_torch():
    # the built-in copy of the table agrees with the installed torch's own constraints
    for backend in ("cusparselt", "cutlass"):
        assert ss._constraints(backend) == ss.SHAPE_CONSTRAINTS[backend]


def test_semi_structured_is_available_contract():
    ok, reason = ss.is_available()
    assert isinstance(ok, bool) and reason
    if not torch.cuda.is_available():
        assert not ok and "CUDA" in reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_semi_structured_on_cpu_raises_or_warns():
    model = prune_24(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(BackendUnavailableError, match="CUDA is not available"):
        moonshot_fx.to_semi_structured(model)
    with pytest.warns(RuntimeWarning, match="model is unchanged"):
        report = moonshot_fx.to_semi_structured(model, on_unsupported="warn")
    assert report.model is model and report.converted == [] and not report.available
    assert set(report.skipped) == {"0", "2"}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(type(p) is nn.Parameter and p.layout == torch.strided for p in model.parameters())
    with pytest.raises(ConfigError):
        moonshot_fx.to_semi_structured(model, on_unsupported="ignore")


def test_semi_structured_torchao_missing_is_explicit():
    ok, why = ss.torchao_status()
    if ok:
        pytest.skip(f"a compatible torchao is installed ({why})")
    with pytest.raises(BackendUnavailableError, match="torchao"):
        moonshot_fx.to_semi_structured(nn.Linear(64, 64), use_torchao=True)


cuda_sm80 = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
    reason="needs a CUDA GPU with compute capability >= 8.0")


@pytest.mark.cuda
@cuda_sm80
def test_semi_structured_cuda_converts_24_linears():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    prune_24(model[0]), prune_24(model[2])
    model = model.half().cuda().eval()
    x = torch.randn(64, 128, dtype=torch.float16, device="cuda")
    with torch.no_grad():
        dense = model(x)
    report = moonshot_fx.to_semi_structured(model, on_unsupported="raise", use_torchao=False)
    assert report.converted == ["0", "2"]
    assert "4" in report.skipped  # (10, 128): too few rows, and dense
    assert type(model[0].weight.data).__name__.startswith("SparseSemiStructured")
    with torch.no_grad():
        sparse = model(x)
    torch.testing.assert_close(sparse, dense, rtol=1e-2, atol=1e-2)


@pytest.mark.cuda
@cuda_sm80
def test_semi_structured_cuda_skips_non_24_and_fp32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)).cuda()
    prune_24(model[0])
    with pytest.warns(RuntimeWarning, match="no eligible"):
        report = moonshot_fx.to_semi_structured(model, on_unsupported="warn", use_torchao=False)
    assert report.converted == [] and "dtype float32" in report.skipped["0"]
    model = model.half()
    report = moonshot_fx.to_semi_structured(model, use_torchao=False)
    assert report.converted == ["0"] and "not 2:4" in report.skipped["1"]


# -------------------------------------------------------------------------------- compile backend


def test_compile_backend_equals_eager_sparsify():
    model = mlp()
    eager = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(8, 16, generator=g) for _ in range(4)]
    be = moonshot_fx.backend(sparsity=0.5, method="sparsegpt", calibration=calib, inner="eager")
    compiled = torch.compile(model, backend=be)
    x = torch.randn(3, 16, generator=g)
    with torch.no_grad():
        y = compiled(x)
    moonshot_fx.sparsify(eager, calibration=calib, sparsity=0.5, method="sparsegpt", progress=False)
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert torch.equal(p, q), name
    with torch.no_grad():
        torch.testing.assert_close(y, eager(x), rtol=0, atol=1e-6)
    # same sites (the head stays dense in both), half of each pruned weight is zero
    assert [s.name for s in be.records[0].report.sites] == [s.name for s in eager.moonshot_report.sites]
    assert be.records[0].calibration == "calibration"
    assert float((model[0].weight == 0).float().mean()) == 0.5


def test_compile_backend_prunes_each_parameter_once_across_recompiles():
    model = mlp()
    g = torch.Generator().manual_seed(2)
    calib = [torch.randn(8, 16, generator=g) for _ in range(2)]
    seen = []

    def inner(gm, example_inputs):
        seen.append(len(example_inputs))
        return gm.forward

    be = moonshot_fx.backend(sparsity="2:4", method="sparsegpt", calibration=calib, inner=inner)
    compiled = torch.compile(model, backend=be, dynamic=False)  # every new shape recompiles
    with torch.no_grad():
        compiled(torch.randn(2, 16, generator=g))
        after_first = {n: p.detach().clone() for n, p in model.named_parameters()}
        compiled(torch.randn(5, 16, generator=g))
    assert be.compilations == 2 and len(seen) == 2
    assert set(be.prune_counts.values()) == {1}
    assert be.records[1].new_params == [] and set(be.records[1].already_handled) == set(after_first)
    for n, p in model.named_parameters():
        assert torch.equal(p, after_first[n]), n  # not pruned a second time
    assert moonshot_fx.check_pattern(model[0].weight, "2:4") and moonshot_fx.check_pattern(model[2].weight, "2:4")


def test_compile_backend_without_calibration_warns():
    model = mlp()
    be = moonshot_fx.backend(sparsity=0.5, method="wanda", inner="eager")
    with pytest.warns(UserWarning, match="no calibration data"):
        torch.compile(model, backend=be)(torch.randn(4, 16))
    assert be.records[0].calibration == "example inputs"
    assert float((model[0].weight == 0).float().mean()) == 0.5


class _Broken(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        torch._dynamo.graph_break()
        return self.head(torch.relu(self.b(h)))


def test_compile_backend_graph_break_with_model_reference():
    torch.manual_seed(0)
    model = _Broken().eval()
    eager = copy.deepcopy(model)
    calib = [torch.randn(8, 16) for _ in range(2)]
    be = moonshot_fx.backend(sparsity=0.5, method="sparsegpt", calibration=calib, inner="eager", model=model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            torch.compile(model, backend=be)(torch.randn(3, 16))
    assert not [w for w in caught if "moonshot_fx" in str(w.message)]  # exact: no fallback warning
    assert be.compilations == 2 and set(be.prune_counts.values()) == {1}
    moonshot_fx.sparsify(eager, calibration=calib, sparsity=0.5, method="sparsegpt", progress=False)
    for p, q in zip(model.parameters(), eager.parameters()):
        assert torch.equal(p, q)


def test_compile_backend_graph_break_without_model_falls_back_with_warning():
    torch.manual_seed(0)
    model = _Broken().eval()
    calib = [torch.randn(8, 16) for _ in range(2)]
    be = moonshot_fx.backend(sparsity=0.5, method="magnitude", calibration=calib, inner="eager", prune_head=True)
    with pytest.warns(UserWarning, match="graph break"):
        torch.compile(model, backend=be)(torch.randn(3, 16))
    assert [r.calibration for r in be.records] == ["calibration", "example inputs"]
    assert set(be.prune_counts) >= {"a.weight", "b.weight", "head.weight"}
    assert set(be.prune_counts.values()) == {1}


def test_compile_backend_helpers():
    f = compile_backend._fqn_from_source
    assert f("L['self']._modules['model']._modules['layers']._modules['0']._parameters['weight']") == "model.layers.0.weight"
    assert f("L['fn']._modules['0']._parameters['bias']") == "0.bias"
    p = compile_backend._input_path
    assert p("L['args'][0]") == ("args", 0, ())
    assert p("L['kwargs']['input_ids']") == ("kwargs", "input_ids", ())
    assert p("L['x']") == ("local", "x", ())
    assert p("L['stack0'].foo") is None
    with pytest.raises(ConfigError):
        moonshot_fx.backend(inner="no-such-backend")
    ok, reason = compile_backend.is_available()
    assert ok and reason
