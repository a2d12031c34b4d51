"""``moonshot-fx`` on the user's own models: a saved Hugging Face directory, timm/torchvision with a
checkpoint, user text files; the saved directory loads in transformers; errors exit 2 and say why.

Everything is built in the test (tiny random configs, a word-level tokenizer trained on the text)."""
from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import moonshot_fx
from moonshot_fx import cli

warnings.filterwarnings("ignore", category=UserWarning)
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

WORDS = ("the cat sat on a mat while the dog ran to the park and a bird sang in the tall green tree "
         "near the old house by the river where children played all day long").split()


def _corpus(n_words: int = 3000, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    words = [WORDS[i] for i in rng.integers(0, len(WORDS), n_words)]
    lines = [" ".join(words[i:i + 12]) + " ." for i in range(0, n_words, 12)]
    return "\n".join(lines) + "\n"


def _tokenizer(text: str) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.WordLevelTrainer(special_tokens=["[UNK]", "<s>", "</s>"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>",
                                                eos_token="</s>")


def _llama_dir(tmp_path: Path, *, with_tokenizer: bool = True, name: str = "tiny-llama") -> Path:
    tok = _tokenizer(_corpus())
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    out = tmp_path / name
    model.save_pretrained(out)
    if with_tokenizer:
        tok.save_pretrained(out)
    return out


def _hashes(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert rc == 0, f"exit {rc}\nstdout:\n{out}\nstderr:\n{err}"
    return out


def _fails(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert rc == 2, f"exit {rc}\nstdout:\n{out}\nstderr:\n{err}"
    last = err.strip().splitlines()[-1]  # (transformers' progress bars may come before it)
    assert last.startswith("moonshot-fx: error: "), err
    return last


def _ppl(out: str, label: str) -> float:
    m = re.search(rf"^{label} \(.*\): ([0-9.e+]+|nan|inf)", out, flags=re.M)
    assert m, f"no {label!r} line in:\n{out}"
    return float(m.group(1))


LM_ARGS = ("--sparsity", "2:4", "--method", "sparsegpt", "--calib-windows", "8", "--seqlen", "32", "--no-progress")


def test_prune_hf_directory_on_user_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 16's Done-when: a saved tiny Llama dir + a user text file -> an OUTDIR transformers loads."""
    src = _llama_dir(tmp_path)
    before = _hashes(src)
    calib = tmp_path / "calib.txt"
    calib.write_text(_corpus(seed=1), encoding="utf-8")
    outdir = tmp_path / "pruned"
    out = _run(capsys, "prune", "--model", str(src), "--calibration", str(calib), *LM_ARGS, "--out", str(outdir))
    assert f"calibration: 8 windows x 32 tokens ({calib})" in out
    assert "pruned: 14 layers to 2:4 with sparsegpt; 50.0%" in out
    assert f"saved Hugging Face directory to {outdir}" in out
    assert _hashes(src) == before  # the input directory is untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dir left

    config = json.loads((outdir / "config.json").read_text())
    assert "sparsity_config" not in config and "quantization_config" not in config
    assert (outdir / "tokenizer.json").is_file() and list(outdir.glob("*.safetensors"))
    report = json.loads((outdir / "moonshot_report.json").read_text())
    sites = {s["name"]: s for s in report["sites"]}
    assert len(sites) == 14 and all(s["pattern"] == "2:4" and s["sparsity"] == 0.5 for s in sites.values())
    assert report["command"].startswith("moonshot-fx prune --model ") and str(outdir) in report["command"]

    pruned = transformers.AutoModelForCausalLM.from_pretrained(outdir)
    dense = transformers.AutoModelForCausalLM.from_pretrained(src)
    linears = {n: m.weight for n, m in pruned.named_modules() if isinstance(m, torch.nn.Linear)}
    assert len(linears) == 15
    for name, w in linears.items():
        if name == "lm_head":
            assert torch.equal(w, dense.lm_head.weight)  # the head stays dense
        else:
            assert moonshot_fx.check_pattern(w, "2:4"), name
            assert f"{name}.weight" in sites, name
    assert torch.equal(pruned.model.embed_tokens.weight, dense.model.embed_tokens.weight)
    tok = transformers.AutoTokenizer.from_pretrained(outdir)
    assert tok("the cat sat")["input_ids"] == transformers.AutoTokenizer.from_pretrained(src)("the cat sat")["input_ids"]

    # eval --text on the saved directory: a finite perplexity, same as the pruned model in memory
    held_out = tmp_path / "held.txt"
    held_out.write_text(_corpus(seed=2), encoding="utf-8")
    out = _run(capsys, "eval", "--model", str(outdir), "--text", str(held_out), "--eval-windows", "4",
               "--eval-seqlen", "32")
    ppl = _ppl(out, "perplexity")
    assert math.isfinite(ppl) and 1.0 < ppl < len(tok) * 2, out
    assert f"({held_out}, 4 x 32 tokens)" in out
    assert "note:" not in out  # the default window lengths are clipped to the 128 positions silently
    head = pruned.lm_head.weight.numel()
    assert f"{100 * 36864 / (73728 + head):.1f}% of {73728 + head:,} layer weights are zero" in out


def test_prune_hf_directory_on_jsonl_with_eval_and_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _llama_dir(tmp_path)
    jsonl = tmp_path / "calib.jsonl"
    docs = [{"text": line, "id": i} for i, line in enumerate(_corpus(seed=3).splitlines())]
    jsonl.write_text("\n".join(json.dumps(d) for d in docs) + "\n\n", encoding="utf-8")
    outdir = tmp_path / "out"
    outdir.mkdir()
    (outdir / "keep.txt").write_text("an older directory")
    argv = ("prune", "--model", str(src), "--calibration", str(jsonl), *LM_ARGS, "--out", str(outdir))
    err = _fails(capsys, *argv)  # an existing OUTDIR without --overwrite: refused before any work
    assert "SaveError" in err and "already exists" in err and "--overwrite" in err
    assert [p.name for p in outdir.iterdir()] == ["keep.txt"]

    out = _run(capsys, *argv, "--overwrite", "--eval", "--text", str(jsonl), "--eval-windows", "2",
               "--eval-seqlen", "32")
    assert f"({jsonl})" in out
    dense, pruned = _ppl(out, "dense  perplexity"), _ppl(out, "pruned perplexity")
    assert math.isfinite(dense) and math.isfinite(pruned)
    assert not (outdir / "keep.txt").exists() and (outdir / "moonshot_report.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.jsonl", "out", "tiny-llama"]  # no temp dirs
    model = transformers.AutoModelForCausalLM.from_pretrained(outdir)
    assert moonshot_fx.check_pattern(model.model.layers[0].mlp.down_proj.weight, "2:4")


@pytest.mark.parametrize("problem", ["sparsity", "text"])
def test_failure_leaves_no_outdir(tmp_path: Path, capsys: pytest.CaptureFixture[str], problem: str) -> None:
    src = _llama_dir(tmp_path)
    calib = tmp_path / "calib.txt"
    calib.write_text(_corpus(), encoding="utf-8")
    outdir = tmp_path / "pruned"
    if problem == "sparsity":  # 2:3 fits no layer of this model (inputs 64 and 128): nothing to prune
        argv = ["--sparsity", "2:3", "--calib-windows", "4", "--seqlen", "32"]
    else:  # a text file with fewer tokens than one window
        calib.write_text("the cat sat .", encoding="utf-8")
        argv = ["--calib-windows", "4", "--seqlen", "32"]
    rc = cli.main(["prune", "--model", str(src), "--calibration", str(calib), *argv, "--no-progress",
                   "--out", str(outdir)])
    err = capsys.readouterr().err
    assert rc == 2, err
    if problem == "text":
        assert "DataFileError" in err and "fewer than one window of 32" in err
    else:
        assert "NoPrunableSitesError" in err and "multiple of 3" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "tiny-llama"]  # no OUTDIR, no temp dir


def test_save_hf_directory_strips_sparsity_config_and_is_atomic(tmp_path: Path) -> None:
    from moonshot_fx.hf_export import save_hf_directory

    src = _llama_dir(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(src)
    tok = transformers.AutoTokenizer.from_pretrained(src)
    model.config.sparsity_config = {"format": "dense", "sparsity_structure": "2:4"}
    dest = save_hf_directory(model, tok, tmp_path / "a" / "out", {"sites": []}, extra={"command": "x"})
    config = json.loads((dest / "config.json").read_text())
    assert "sparsity_config" not in config and config["model_type"] == "llama"
    assert model.config.sparsity_config  # the in-memory config is left as it was
    assert json.loads((dest / "moonshot_report.json").read_text()) == {"sites": [], "command": "x"}
    assert oct(dest.stat().st_mode & 0o777) != oct(0o700)  # an ordinary directory, not mkdtemp's private one

    class BrokenTokenizer:
        def save_pretrained(self, path: Any) -> None:
            (Path(path) / "tokenizer.json").write_text("{")
            raise OSError("disk full")

    before = _hashes(dest)
    with pytest.raises(OSError, match="disk full"):  # a failure while replacing keeps the old directory
        save_hf_directory(model, BrokenTokenizer(), dest, None, overwrite=True)
    assert _hashes(dest) == before
    with pytest.raises(OSError, match="disk full"):  # and a failure on a new one leaves nothing
        save_hf_directory(model, BrokenTokenizer(), tmp_path / "a" / "new", None)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["out"]
    with pytest.raises(moonshot_fx.SaveError, match="already exists"):
        save_hf_directory(model, tok, dest, None)


def _write_gguf(src: Path, dest: Path) -> None:
    """The tiny Llama of ``src`` as a float32 GGUF file (llama.cpp's tensor names and q/k row order)
    with a SentencePiece-style vocabulary, written with the `gguf` package."""
    gguf = pytest.importorskip("gguf")
    model = transformers.AutoModelForCausalLM.from_pretrained(src)
    c = model.config
    w = gguf.GGUFWriter(str(dest), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    # SentencePiece-style BPE pieces: every character and every prefix of "▁word" (the GGUF
    # converter derives merges from pieces), longer pieces scored higher
    pieces = {ch for word in WORDS for ch in word + "."} | {("\u2581" + w)[:k] for w in WORDS + [".", ""]
                                                          for k in range(1, len(w) + 2)}
    vocab = ["[UNK]", "<s>", "</s>"] + sorted(pieces, key=lambda t: (len(t), t))
    w.add_tokenizer_model("llama")
    w.add_token_list(vocab)
    w.add_token_scores([0.0, 0.0, 0.0] + [float(-i) for i in range(len(vocab) - 3)][::-1])
    w.add_token_types([2, 3, 3] + [1] * (len(vocab) - 3))
    w.add_vocab_size(len(vocab))
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def rope_rows(x: np.ndarray, heads: int) -> np.ndarray:  # HF rotate-half rows -> llama.cpp interleaved
        return x.reshape(heads, x.shape[0] // heads // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)  # embeddings and head for this vocabulary
    w.add_tensor("token_embd.weight", rng.normal(0, 0.02, (len(vocab), c.hidden_size)).astype(np.float32))
    w.add_tensor("output.weight", rng.normal(0, 0.02, (len(vocab), c.hidden_size)).astype(np.float32))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        for hf, cpp in names.items():
            w.add_tensor(f"blk.{i}.{cpp}.weight", sd[f"{p}{hf}.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", rope_rows(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", rope_rows(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_prune_gguf_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("accelerate")
    src = _llama_dir(tmp_path)
    gguf_file = tmp_path / "tiny.gguf"
    _write_gguf(src, gguf_file)
    calib = tmp_path / "calib.txt"
    calib.write_text(_corpus(), encoding="utf-8")
    outdir = tmp_path / "from-gguf"
    out = _run(capsys, "prune", "--model", str(gguf_file), "--calibration", str(calib), *LM_ARGS,
               "--out", str(outdir), "--eval", "--text", str(calib), "--eval-windows", "2", "--eval-seqlen", "32")
    assert "pruned: 14 layers to 2:4" in out and math.isfinite(_ppl(out, "pruned perplexity"))
    config = json.loads((outdir / "config.json").read_text())
    assert "quantization_config" not in config and "sparsity_config" not in config
    model = transformers.AutoModelForCausalLM.from_pretrained(outdir)  # no gguf_file: plain safetensors
    for i in range(2):
        assert moonshot_fx.check_pattern(model.model.layers[i].self_attn.q_proj.weight, "2:4")
    assert transformers.AutoTokenizer.from_pretrained(outdir)("the cat")["input_ids"]  # its tokenizer was saved


def test_hf_classifier_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A non-causal HF directory loads as the class its config names and saves back as one;
    perplexity is refused for it."""
    tok = _tokenizer(_corpus())
    cfg = transformers.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  vocab_size=len(tok), max_position_embeddings=64, num_labels=3)
    torch.manual_seed(0)
    src = tmp_path / "bert"
    transformers.BertForSequenceClassification(cfg).save_pretrained(src)
    tok.save_pretrained(src)
    calib = tmp_path / "c.txt"
    calib.write_text(_corpus(), encoding="utf-8")
    err = _fails(capsys, "prune", "--model", str(src), "--calibration", str(calib), "--eval")
    assert "ConfigError" in err and "not a causal LM" in err
    outdir = tmp_path / "bert-2of4"
    _run(capsys, "prune", "--model", str(src), "--calibration", str(calib), *LM_ARGS, "--out", str(outdir))
    model = transformers.AutoModelForSequenceClassification.from_pretrained(outdir)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert moonshot_fx.check_pattern(model.bert.encoder.layer[1].output.dense.weight, "2:4")
    assert torch.equal(model.classifier.weight,
                       transformers.AutoModelForSequenceClassification.from_pretrained(src).classifier.weight)


def test_vision_model_with_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    ref = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    ckpt = tmp_path / "r18.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, ckpt)
    images = tmp_path / "images.npz"
    np.savez(images, images=np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    base = ("prune", "--model", "torchvision:resnet18", "--checkpoint", str(ckpt), "--num-classes", "10")
    err = _fails(capsys, *base)  # 224x224 inputs: the bundled 32x32 images do not fit
    assert "DataFileError" in err and "3x224x224" in err and "--calibration" in err
    out_pt = tmp_path / "r18-2of4.pt"
    out = _run(capsys, *base, "--calibration", str(images), "--calib-images", "4", "--batch-size", "4",
               "--out", str(out_pt), "--no-progress")
    assert f"calibration: 4 images from {images}" in out and "conv1.weight" in out  # the 147-input stem stays dense
    sd = torch.load(out_pt, weights_only=True)
    assert sd.keys() == ref.state_dict().keys()
    convs = [k for k, v in sd.items() if v.dim() == 4]
    assert len(convs) == 20
    for k in convs:
        if k == "conv1.weight":
            assert torch.equal(sd[k], ref.state_dict()[k])
        else:
            assert moonshot_fx.check_pattern(sd[k], "2:4"), k
    assert torch.equal(sd["fc.weight"], ref.fc.weight)


def test_errors_exit_2_and_name_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-model"
    err = _fails(capsys, "prune", "--model", str(missing))
    assert "ModelLoadError" in err and "no such file or directory" in err and str(missing) in err
    err = _fails(capsys, "prune", "--model", "timm:resnet_eighteen", "--checkpoint", str(tmp_path / "x.pt"))
    assert "ModelLoadError" in err and "timm has no architecture 'resnet_eighteen'" in err
    err = _fails(capsys, "prune", "--model", "torchvision:resnet18")
    assert "ModelLoadError" in err and "needs --checkpoint" in err

    src = _llama_dir(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the cat"}\n{"content": "no text field"}\n', encoding="utf-8")
    err = _fails(capsys, "prune", "--model", str(src), "--calibration", str(bad), "--no-progress")
    assert "DataFileError" in err and "line 2" in err and "`text`" in err and "content" in err
    err = _fails(capsys, "eval", "--model", str(src), "--text", str(tmp_path / "none.txt"))
    assert "DataFileError" in err and "none.txt" in err

    notok = _llama_dir(tmp_path, with_tokenizer=False, name="no-tokenizer")
    err = _fails(capsys, "eval", "--model", str(notok))
    assert "ModelLoadError" in err and "tokenizer" in err and "--tokenizer" in err
    calib = tmp_path / "c.txt"
    calib.write_text(_corpus(), encoding="utf-8")  # --tokenizer supplies the missing one
    out = _run(capsys, "eval", "--model", str(notok), "--tokenizer", str(src), "--text", str(calib),
               "--eval-windows", "2", "--eval-seqlen", "32")
    assert math.isfinite(_ppl(out, "perplexity"))

    weights_only = tmp_path / "w-only"
    weights_only.mkdir()
    (weights_only / "model.safetensors").write_bytes(b"")
    err = _fails(capsys, "prune", "--model", str(weights_only))
    assert "ModelLoadError" in err and "without config.json" in err
    err = _fails(capsys, "prune", "--model", str(src / "model.safetensors"))
    assert "ModelLoadError" in err and "not a .gguf file" in err
    with pytest.raises(SystemExit) as info:  # a bare unknown word is a usage error
        cli.main(["prune", "--model", "vgg"])
    assert info.value.code == 2
    assert "'vgg' is not a bundled model" in capsys.readouterr().err


def test_export_takes_a_user_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    backend = cli._onnx_backend()
    if isinstance(backend, Exception) or not hasattr(backend, "export_main"):
        pytest.skip("moonshot_fx.backends.onnx is not available")
    ok, why = backend.is_available()
    if not ok:
        pytest.skip(why)
    src = _llama_dir(tmp_path)
    calib = tmp_path / "c.txt"
    calib.write_text(_corpus(), encoding="utf-8")
    outdir = tmp_path / "pruned"
    _run(capsys, "prune", "--model", str(src), "--calibration", str(calib), *LM_ARGS, "--out", str(outdir))
    onnx_path = tmp_path / "pruned.onnx"
    out = _run(capsys, "export", "--model", str(outdir), "--out", str(onnx_path), "--pattern", "2:4")
    assert onnx_path.is_file() and "patterns valid: True" in out
