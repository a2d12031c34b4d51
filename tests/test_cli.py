"""``moonshot-fx`` command line: prune → save → eval round trips on the bundled models (tiny settings)."""
from __future__ import annotations

import importlib.util
import json
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import moonshot_fx
from moonshot_fx import cli

warnings.filterwarnings("ignore", category=UserWarning)


def _data_or_skip(*names: str, files: tuple[str, ...] = ()) -> Any:
    try:
        from moonshot_fx import data
    except ImportError as e:
        pytest.skip(f"moonshot_fx.data unavailable: {e}")
    missing = [n for n in names if not hasattr(data, n)]
    if missing:
        pytest.skip(f"moonshot_fx.data lacks {missing}")
    try:
        for f in files:
            data.data_file(f)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return data


def _metric(out: str, label: str) -> float:
    m = re.search(rf"^{label} \(.*\): ([0-9.]+)%?", out, flags=re.M)
    assert m, f"no line starting with {label!r} in:\n{out}"
    return float(m.group(1))


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert rc == 0, f"exit {rc}\nstdout:\n{out}\nstderr:\n{err}"
    return out, err


# ----------------------------------------------------------------------------- stories260K


def test_prune_eval_stories260k(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("sentencepiece")
    data = _data_or_skip("load_stories260k", "calibration_windows", "eval_windows", "perplexity", "load_text",
                         files=("lm/stories260K/stories260K.bin", "text/tinystories_sample.txt"))
    ckpt = tmp_path / "sub" / "pruned.pt"
    report = tmp_path / "report.json"
    out, err = _run(capsys, "-v", "prune", "--model", "stories260k", "--sparsity", "2:4", "--method", "sparsegpt",
                    "--calib-windows", "4", "--seqlen", "64", "--eval", "--eval-windows", "2",
                    "--out", str(ckpt), "--report", str(report), "--plot", str(tmp_path / "layers.png"))
    assert "calibration: 4 windows x 64 tokens" in out
    assert f"per-layer error figure written to {tmp_path / 'layers.png'}" in out
    assert (tmp_path / "layers.png").read_bytes()[:4] == b"\x89PNG"
    dense = _metric(out, "dense  perplexity")
    pruned = _metric(out, "pruned perplexity")
    assert 1.0 < dense < 10.0, out  # the 260K model is good at TinyStories
    assert dense < pruned < 1e4, out
    assert "pruned: 35 layers to 2:4 with sparsegpt" in out
    assert f"saved state_dict to {ckpt}" in out
    assert "INFO" in err  # -v logging reaches stderr
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["pruned.pt"]  # no temp file left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layers.png", "report.json", "sub"]
    assert '"overall_sparsity": 0.5' in report.read_text()

    sd = torch.load(ckpt, weights_only=True)
    ref, _ = data.load_stories260k()
    assert sd.keys() == ref.state_dict().keys()
    layers = [k for k in sd if re.search(r"(proj)\.weight$", k)]
    assert len(layers) == 35
    for k in layers:
        assert moonshot_fx.check_pattern(sd[k], "2:4"), k
    for k in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(sd[k], ref.state_dict()[k]), k  # embeddings / tied head stay dense

    out, _ = _run(capsys, "eval", "--model", "stories260k", "--checkpoint", str(ckpt), "--eval-windows", "2")
    assert f"checkpoint: {ckpt}" in out
    assert _metric(out, "perplexity") == pytest.approx(pruned, abs=2e-3)
    assert "50.0% of 226,560 layer weights are zero" in out
    out, _ = _run(capsys, "eval", "--model", "stories260k", "--eval-windows", "2")
    assert _metric(out, "perplexity") == pytest.approx(dense, abs=2e-3)


def test_prune_stories260k_moonshot_alpha_per_block(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--alpha auto on a sequential LM chooses alpha block by block (--alpha-block-search grid: every
    grid point); the choices reach the output and the report, and --alpha-search model keeps the
    whole-model search."""
    pytest.importorskip("transformers")
    pytest.importorskip("sentencepiece")
    _data_or_skip("load_stories260k", "calibration_windows", files=("lm/stories260K/stories260K.bin",))
    report = tmp_path / "report.json"
    out, _ = _run(capsys, "prune", "--model", "stories260k", "--sparsity", "2:4", "--method", "moonshot",
                  "--alpha", "auto", "--fisher", "kron", "--alpha-block-search", "grid", "--calib-windows", "4",
                  "--seqlen", "64", "--report", str(report), "--no-progress")
    rep = json.loads(report.read_text())
    assert len(rep["block_alphas"]) == 5 and rep["config"]["alpha_search"] == "block", rep["block_alphas"]
    assert rep["config"]["alpha_block_search"] == "grid"  # every grid point scored in every block
    assert all(len(v["held_out_error"]) == len(rep["config"]["alpha_grid"]) for v in rep["block_alphas"].values())
    assert rep["kron_sites"] and "alpha per block (" in out and " blocks)" in out
    assert rep["config"]["base"] == "admm"  # --method moonshot without --base: the best measured base
    out, _ = _run(capsys, "prune", "--model", "stories260k", "--sparsity", "2:4", "--method", "moonshot",
                  "--alpha", "auto", "--alpha-search", "model", "--calib-windows", "4", "--seqlen", "64",
                  "--report", str(report), "--no-progress")
    rep = json.loads(report.read_text())
    assert not rep["block_alphas"] and rep["config"]["alpha_search"] == "model" and rep["alpha_search"]


# ----------------------------------------------------------------------------- CIFAR ResNet-20


def test_prune_eval_resnet20(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _data_or_skip("load_cifar_resnet", "load_cifar", "top1",
                         files=("vision/cifar10/resnet20-12fca82f.th", "vision/cifar10/test.npz",
                                "vision/cifar10/calib.npz"))
    ckpt = tmp_path / "r20.pt"
    ckpt.write_bytes(b"an older file that must be replaced atomically")
    out, _ = _run(capsys, "prune", "--model", "resnet20", "--sparsity", "2:4", "--calib-images", "64",
                  "--eval", "--eval-images", "500", "--out", str(ckpt), "--no-progress")
    assert "calibration: 64 CIFAR-10 calibration images" in out
    # the 3x3x3 stem conv (27 inputs) cannot be 2:4: kept dense, and said so
    assert "keeping 1 layer(s) dense" in out and "conv1.weight" in out
    dense = _metric(out, "dense  top-1")
    pruned = _metric(out, "pruned top-1")
    assert 50.0 < dense <= 100.0 and 10.0 < pruned <= 100.0, out
    assert "pruned: 18 layers to 2:4" in out

    sd = torch.load(ckpt, weights_only=True)
    ref = data.load_cifar_resnet(20).state_dict()
    assert sd.keys() == ref.keys()
    convs = [k for k in sd if k.endswith("conv1.weight") or k.endswith("conv2.weight")]
    assert len(convs) == 19
    for k in convs:
        if k == "conv1.weight":
            assert torch.equal(sd[k], ref[k])
        else:
            assert moonshot_fx.check_pattern(sd[k], "2:4"), k
    assert torch.equal(sd["linear.weight"], ref["linear.weight"])  # classifier stays dense
    # BatchNorm statistics re-estimated by default (a BatchNorm model given calibration data)
    assert "BatchNorm statistics re-estimated" in out and "--no-recalibrate-norms" in out
    assert not torch.equal(sd["bn1.running_mean"], ref["bn1.running_mean"])
    assert torch.equal(sd["bn1.weight"], ref["bn1.weight"])  # the affine parameters are not touched

    out, _ = _run(capsys, "eval", "--model", "resnet20", "--checkpoint", str(ckpt), "--eval-images", "500")
    assert _metric(out, "top-1") == pytest.approx(pruned)


def test_prune_resnet20_recalibrate_norms(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """At 90 % the BatchNorm statistics of the dense model no longer fit: --recalibrate-norms
    re-estimates them (the checkpoint carries them) and recovers top-1 that plain pruning loses."""
    data = _data_or_skip("load_cifar_resnet", "load_cifar", "top1",
                         files=("vision/cifar10/resnet20-12fca82f.th", "vision/cifar10/test.npz",
                                "vision/cifar10/calib.npz"))
    common = ("prune", "--model", "resnet20", "--sparsity", "0.9", "--calib-images", "128", "--eval",
              "--eval-images", "500", "--no-progress")
    plain, _ = _run(capsys, *common, "--no-recalibrate-norms")
    assert "re-estimated" not in plain
    ckpt = tmp_path / "r20bn.pt"
    out, _ = _run(capsys, *common, "--out", str(ckpt))  # the default for a BatchNorm model
    assert _metric(out, "pruned top-1") > _metric(plain, "pruned top-1") + 5.0, (plain, out)
    sd = torch.load(ckpt, weights_only=True)
    ref = data.load_cifar_resnet(20).state_dict()
    moved = [k for k in sd if k.endswith("running_mean") and not torch.equal(sd[k], ref[k])]
    assert len(moved) >= 18, moved  # every BatchNorm after a pruned conv


# ----------------------------------------------------------------------------- errors and plumbing


def test_bad_arguments_fail_fast(capsys: pytest.CaptureFixture[str]) -> None:
    """Bad patterns/options are reported before any model is loaded (exit 2, one clear line)."""
    assert cli.main(["prune", "--model", "resnet20", "--sparsity", "half"]) == 2
    err = capsys.readouterr().err
    assert "PatternError" in err and "'half'" in err
    assert cli.main(["prune", "--model", "resnet20", "--sparsity", "1.5"]) == 2
    assert "PatternError" in capsys.readouterr().err
    assert cli.main(["prune", "--model", "resnet20", "--method", "moonshot", "--alpha", "1.5"]) == 2
    assert "ConfigError" in capsys.readouterr().err
    for argv in (["prune", "--model", "resnet20", "--method", "obs"], ["prune", "--model", "vgg"],
                 ["prune", "--model", "resnet20", "--alpha", "x"], ["eval"], [],
                 ["prune", "--model", "resnet20", "--bogus"]):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2, argv
    capsys.readouterr()


def test_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _data_or_skip("load_cifar_resnet", "load_cifar", "top1", files=("vision/cifar10/resnet20-12fca82f.th",))
    assert cli.main(["eval", "--model", "resnet20", "--checkpoint", str(tmp_path / "nope.pt")]) == 1
    assert "nope.pt" in capsys.readouterr().err


def test_checkpoint_is_saved_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = torch.nn.Linear(4, 4)
    dest = tmp_path / "w.pt"
    cli.save_state_dict(model, dest)
    first = dest.read_bytes()
    assert set(torch.load(dest, weights_only=True)) == {"weight", "bias"}

    def broken(obj: Any, f: Any, *a: Any, **k: Any) -> None:
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        cli.save_state_dict(torch.nn.Linear(4, 4), dest)
    assert dest.read_bytes() == first  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["w.pt"]  # and no temp file is left


def test_export_delegates_to_onnx_backend(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    onnx_backend = cli._onnx_backend()
    if isinstance(onnx_backend, Exception) or not hasattr(onnx_backend, "export_main"):
        pytest.skip("moonshot_fx.backends.onnx.export_main is not available")
    seen: list[Any] = []
    monkeypatch.setattr(onnx_backend, "export_main", lambda args: seen.append(args) or 0)
    assert cli.main(["export", "--model", "resnet20", "--out", "x.onnx", "--pattern", "2:4"]) == 0
    (args,) = seen
    assert args.model == "resnet20" and args.out == "x.onnx" and args.pattern == "2:4"
    monkeypatch.setattr(onnx_backend, "export_main", lambda args: 1)
    assert cli.main(["export", "--model", "resnet20", "--out", "x.onnx"]) == 1


def test_export_without_backend_is_a_clear_error(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "_onnx_backend", lambda: ImportError("No module named 'onnx'"))
    assert cli.main(["export", "--model", "resnet20", "--out", "x.onnx"]) == 2
    err = capsys.readouterr().err
    assert "ONNX export is not available" in err and "No module named 'onnx'" in err


def test_console_script_is_declared() -> None:
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    assert 'moonshot-fx = "moonshot_fx.cli:main"' in pyproject.read_text()
    assert importlib.util.find_spec("moonshot_fx.cli") is not None
