"""MOONSHOT through sparsify_checkpoint: the streamed gradient pass (forward in order, backward
layer by layer in reverse) gives the in-memory run's weights."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import moonshot_fx
from moonshot_fx.masks import check_pattern

from test_streaming import _calib, _tiny_llama


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_llama(tmp_path_factory.mktemp("ckpt") / "tiny-llama")


def _in_memory(src: Path, calib: list[torch.Tensor], **opts) -> dict[str, torch.Tensor]:
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM.from_pretrained(src)
    moonshot_fx.sparsify(ref, calibration=[{"input_ids": c} for c in calib], sparsity="2:4", progress=False, **opts)
    return ref.state_dict()


@pytest.mark.parametrize("base,fisher,exact", [("sparsegpt", "row", True), ("optima", "token", True),
                                               ("sparsegpt", "kron", False)])
def test_streamed_moonshot_equals_in_memory(src: Path, tmp_path: Path, base: str, fisher: str, exact: bool) -> None:
    from transformers import LlamaForCausalLM

    calib = _calib()
    opts = dict(method="moonshot", base=base, fisher=fisher, alpha=0.5)
    report = moonshot_fx.sparsify_checkpoint(src, tmp_path / "out", calibration=calib, sparsity="2:4", **opts)
    a = _in_memory(src, calib, **opts)
    b = LlamaForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    plain = _in_memory(src, calib, method=base)  # the base alone: MOONSHOT must have changed the result
    pruned = [s.name for s in report.sites]
    assert len(pruned) == 3 * 7
    for k in pruned:
        assert check_pattern(b[k], "2:4"), k
        assert torch.equal(a[k] == 0, b[k] == 0), k  # identical masks
        if exact:  # same ops in the same order: bit for bit
            assert torch.equal(a[k], b[k]), k
        else:  # the Kronecker factor sums over a whole batch here, one sample at a time in memory
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    assert sum(int(((a[k] == 0) != (plain[k] == 0)).sum()) for k in pruned) > 0
    body = json.loads((tmp_path / "out" / "moonshot_report.json").read_text())
    assert body["config"]["fisher"] == fisher and body["alpha"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # scratch files removed


def test_gradient_pass_failure_leaves_nothing(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import moonshot_fx.streaming_fisher as sf

    def broken_head(*args, **kwargs):
        raise RuntimeError("injected head failure")

    monkeypatch.setattr(sf, "head_gradients", broken_head)
    with pytest.raises(RuntimeError, match="injected"):
        moonshot_fx.sparsify_checkpoint(src, tmp_path / "out", calibration=_calib(), sparsity="2:4",
                                         method="moonshot", alpha=0.5)
    assert list(tmp_path.iterdir()) == []  # neither output, temporary nor scratch directory
