"""Streaming pruning from a sharded checkpoint (moonshot_fx.sparsify_checkpoint)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import moonshot_fx
from moonshot_fx.errors import ConfigError, MoonshotError
from moonshot_fx.masks import check_pattern
from moonshot_fx.streaming import UnsupportedArchitectureError

ROOT = Path(__file__).resolve().parents[1]


def _tiny_llama(path: Path, layers: int = 3, hidden: int = 64, inter: int = 128, dtype=torch.float32,
                shard: str | None = None, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(path, max_shard_size=shard or "200KB")  # 3 layers of width 64 in fp32: 3 shards
    (path / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')  # a side file to copy
    return path


def _calib(n: int = 4, batch: int = 2, seqlen: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 128, (batch, seqlen), generator=g) for _ in range(n)]


def _tree_hash(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = _tiny_llama(tmp_path_factory.mktemp("ckpt") / "tiny-llama")
    assert len(list(path.glob("*.safetensors"))) == 3
    return path


@pytest.mark.parametrize("method,options", [("sparsegpt", {}), ("wanda", {}), ("sparsegpt", {"sequential": False})])
def test_equals_in_memory_sparsify(src: Path, tmp_path: Path, method: str, options: dict) -> None:
    from transformers import LlamaForCausalLM

    before = _tree_hash(src)
    calib = _calib()
    dst = tmp_path / "pruned"
    report = moonshot_fx.sparsify_checkpoint(src, dst, calibration=calib, sparsity="2:4", method=method, **options)
    assert _tree_hash(src) == before  # the input is only read

    ref = LlamaForCausalLM.from_pretrained(src)
    moonshot_fx.sparsify(ref, calibration=[{"input_ids": c} for c in calib], sparsity="2:4", method=method,
                         progress=False, **options)
    out = LlamaForCausalLM.from_pretrained(dst)
    a, b = ref.state_dict(), out.state_dict()
    assert a.keys() == b.keys()
    for k in a:  # tolerance: exact (same ops, same order, same fp32 statistics)
        assert torch.equal(a[k], b[k]), k
    assert [s.name for s in report.sites] == [s.name for s in ref.moonshot_report.sites]
    assert len(report.sites) == 3 * 7
    for s in report.sites:
        assert check_pattern(b[s.name], "2:4")
    body = json.loads((dst / "moonshot_report.json").read_text())
    assert body["streaming"] is True and body["config"]["method"] == method
    assert (dst / "tokenizer_config.json").read_text() == (src / "tokenizer_config.json").read_text()
    assert "sparsity_config" not in json.loads((dst / "config.json").read_text())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_bf16_checkpoint_stays_bf16_and_matches(tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    src = _tiny_llama(tmp_path / "bf16", layers=2, dtype=torch.bfloat16)
    calib = _calib(n=2)
    moonshot_fx.sparsify_checkpoint(src, tmp_path / "out", calibration=calib, sparsity="2:4", method="sparsegpt")
    ref = LlamaForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    moonshot_fx.sparsify(ref, calibration=[{"input_ids": c} for c in calib], sparsity="2:4", method="sparsegpt",
                         progress=False)
    from safetensors import safe_open

    for f in (tmp_path / "out").glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                t = h.get_tensor(k)
                assert t.dtype == torch.bfloat16, k
                assert torch.equal(t, ref.state_dict()[k]), k


def test_failure_leaves_no_output(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import moonshot_fx.streaming as streaming

    before = _tree_hash(src)
    real = streaming._read
    calls = {"n": 0}

    def failing_read(names, shards):  # an I/O error on the third read (the second decoder layer)
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("injected read failure")
        return real(names, shards)

    monkeypatch.setattr(streaming, "_read", failing_read)
    with pytest.raises(OSError, match="injected"):
        moonshot_fx.sparsify_checkpoint(src, tmp_path / "out", calibration=_calib(), sparsity="2:4")
    assert calls["n"] == 3
    assert list(tmp_path.iterdir()) == []  # neither the destination nor a temporary directory
    assert _tree_hash(src) == before


def _out_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("method,options", [("sparsegpt", {}), ("moonshot", {"alpha": 0.5, "fisher": "row"})])
def test_disk_backed_activations_equal_in_memory(src: Path, tmp_path: Path, method: str, options: dict,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import moonshot_fx.activation_buffer as ab

    spill = tmp_path / "spill"
    files: list[Path] = []
    real = ab.ActivationBuffer.__init__

    def recording_init(self, shape, dtype, directory=None):  # note each buffer's file while it exists
        real(self, shape, dtype, directory)
        if self.path is not None:
            assert self.path.parent == spill and self.path.stat().st_size == self.tensor.numel() * 4
            files.append(self.path)

    monkeypatch.setattr(ab.ActivationBuffer, "__init__", recording_init)
    moonshot_fx.sparsify_checkpoint(src, tmp_path / "ram", calibration=_calib(), sparsity="2:4", method=method,
                                    **options)
    assert files == []  # the default keeps the activations in memory
    moonshot_fx.sparsify_checkpoint(src, tmp_path / "disk", calibration=_calib(), sparsity="2:4", method=method,
                                    offload_activations=spill, layer_device="cpu", **options)
    assert len(files) == (2 if method == "moonshot" else 1)  # MOONSHOT's gradient pass has its own copy
    assert list(spill.iterdir()) == []  # removed at the end
    a, b = _out_tensors(tmp_path / "ram"), _out_tensors(tmp_path / "disk")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_failure_removes_the_activation_file(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import moonshot_fx.streaming as streaming

    real = streaming._read
    calls = {"n": 0}

    def failing_read(names, shards):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("injected read failure")
        return real(names, shards)

    monkeypatch.setattr(streaming, "_read", failing_read)
    spill = tmp_path / "spill"
    with pytest.raises(OSError, match="injected"):
        moonshot_fx.sparsify_checkpoint(src, tmp_path / "out", calibration=_calib(), sparsity="2:4",
                                        offload_activations=spill)
    assert list(spill.iterdir()) == [] and not (tmp_path / "out").exists()


def test_cuda_device_refused_without_cuda(src: Path, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        moonshot_fx.sparsify_checkpoint(src, tmp_path / "out", calibration=_calib(), sparsity="2:4",
                                        layer_device="cuda")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method,options", [("sparsegpt", {}), ("moonshot", {"alpha": 0.5, "fisher": "row"})])
def test_cuda_onload_matches_cpu(src: Path, tmp_path: Path, method: str, options: dict) -> None:
    calib = _calib()
    moonshot_fx.sparsify_checkpoint(src, tmp_path / "cpu", calibration=calib, sparsity="2:4", method=method,
                                    layer_device="cpu", **options)
    moonshot_fx.sparsify_checkpoint(src, tmp_path / "gpu", calibration=calib, sparsity="2:4", method=method,
                                    layer_device="cuda", **options)
    a, b = _out_tensors(tmp_path / "cpu"), _out_tensors(tmp_path / "gpu")
    agree = total = 0
    for k, w in a.items():
        assert b[k].device.type == "cpu" and b[k].dtype == w.dtype
        if "proj" in k:
            assert check_pattern(b[k], "2:4")
            agree += int(((w == 0) == (b[k] == 0)).sum())
            total += w.numel()
    assert agree / total >= 0.999


def test_bad_options_raise_before_writing(src: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="alpha='auto'"):
        moonshot_fx.sparsify_checkpoint(src, tmp_path / "a", calibration=_calib(), method="moonshot", alpha="auto")
    with pytest.raises(ConfigError, match="unknown"):
        moonshot_fx.sparsify_checkpoint(src, tmp_path / "b", calibration=_calib(), bogus=1)
    with pytest.raises(ConfigError, match="reconstruct"):
        moonshot_fx.sparsify_checkpoint(src, tmp_path / "d", calibration=_calib(), reconstruct="region")
    with pytest.raises(MoonshotError, match="needs calibration"):
        moonshot_fx.sparsify_checkpoint(src, tmp_path / "c", method="sparsegpt")
    with pytest.raises(ConfigError, match="source"):
        moonshot_fx.sparsify_checkpoint(src, src / "inside", calibration=_calib())
    assert list(tmp_path.iterdir()) == []


def test_unsupported_architecture(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(path)
    with pytest.raises(UnsupportedArchitectureError, match="Llama-family"):
        moonshot_fx.sparsify_checkpoint(path, tmp_path / "out", calibration=_calib(), sparsity="2:4")
    assert not (tmp_path / "out").exists()


_MEMORY_CHILD = textwrap.dedent("""
    import json, sys, torch
    import moonshot_fx
    from moonshot_fx.streaming import sparsify_checkpoint
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 128, (2, 32), generator=g) for _ in range(2)]
    def rss_kb():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS"))
    # warm-up on a 1-layer checkpoint: imports, torch.export's first-use caches
    sparsify_checkpoint(sys.argv[3], sys.argv[2] + ".warm", calibration=calib, sparsity="2:4", method="sparsegpt")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (the peak RSS) to the current RSS
    base = rss_kb()
    sparsify_checkpoint(sys.argv[1], sys.argv[2], calibration=calib, sparsity="2:4", method="sparsegpt")
    with open("/proc/self/status") as f:
        peak = next(int(l.split()[1]) for l in f if l.startswith("VmHWM"))
    print(json.dumps({"base_kb": base, "peak_kb": peak}))
""")


def test_peak_memory_does_not_grow_with_depth(tmp_path: Path) -> None:
    """8 vs 16 layers of one width (≈ 51 MB of fp32 weights per layer): the peak RSS growth over
    a warmed-up process stays within 10% (in memory it would double). Measured (VmHWM after
    clear_refs): 307 MB for 8 layers, 308 MB for 16; ~70 s in all."""
    warm = _tiny_llama(tmp_path / "warm", layers=1, hidden=1024, inter=2816, shard="1GB")
    growth = {}
    for n in (8, 16):
        src = _tiny_llama(tmp_path / f"l{n}", layers=n, hidden=1024, inter=2816, shard="200MB")
        # glibc: large blocks straight from mmap (returned on free), so the peak is the live set,
        # not heap fragmentation (without it the peak wandered by ±70 MB from run to run)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
               "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "2"}
        out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(src), str(tmp_path / f"o{n}"), str(warm)],
                             capture_output=True, text=True, env=env, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        growth[n] = row["peak_kb"] - row["base_kb"]
    layer_kb = (2 * 1024 * 1024 + 2 * 1024 * 512 + 3 * 1024 * 2816) * 4 / 1024  # q, o; k, v (2 kv heads); mlp
    assert growth[16] <= 1.10 * growth[8], growth
    assert growth[16] < 0.5 * 16 * layer_kb, growth  # far below the 16 layers an in-memory load would hold


def _char_tokenizer(path: Path) -> None:
    """A character-level tokenizer (ids < 128, the tiny Llama's vocabulary) saved into ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(c): c - 32 for c in range(32, 127)}
    vocab["[UNK]"] = 95
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)


def test_cli_stream_with_offloaded_activations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from moonshot_fx.cli import main

    src = _tiny_llama(tmp_path / "src", layers=2)
    _char_tokenizer(src)
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    spill, out = tmp_path / "spill", tmp_path / "out"
    args = ["prune", "--model", str(src), "--calibration", str(text), "--sparsity", "2:4", "--method", "sparsegpt",
            "--calib-windows", "4", "--seqlen", "32", "--no-progress"]
    assert main([*args, "--out", str(out), "--offload-activations", str(spill)]) == 2  # needs --stream
    assert "apply to --stream only" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--stream", "--out", str(out), "--offload-activations", str(spill),
                 "--layer-device", "cpu"]) == 0
    assert "pruned (streaming): 14 layers" in capsys.readouterr().out
    assert list(spill.iterdir()) == []
    tensors = _out_tensors(out)
    assert all(check_pattern(w, "2:4") for k, w in tensors.items() if "proj" in k)
