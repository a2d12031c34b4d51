"""Seeded random Llama checkpoints of real shapes, for the larger-than-memory benchmark (``scale.py``).

``write_checkpoint(shape, cache)`` writes ``cache/<shape>/`` once: ``config.json`` (a
``LlamaConfig`` of that shape), safetensors shards of at most ``shard_bytes`` each and
``model.safetensors.index.json``; no tokenizer (the benchmark calibrates on random token ids).
Every tensor is drawn from its own generator (seed, tensor index), so the bytes do not depend on
the sharding; the generator holds at most one shard in memory. Projections are N(0, 0.02²) — the
Llama initialiser's scale, under which the hidden states stay finite through 40 layers — and the
RMSNorm weights are ones. The directory is built under a temporary name and renamed into place
when complete, so an existing ``cache/<shape>`` is always whole and is reused as it is.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class LlamaShape:
    """The sizes of a Llama decoder (what ``LlamaConfig`` needs)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    max_positions: int = 4096
    dtype: str = "bfloat16"  # of the weights in the checkpoint

    @property
    def element(self) -> int:
        """Bytes per weight."""
        return torch.empty((), dtype=getattr(torch, self.dtype)).element_size()

    def config(self) -> dict[str, object]:
        """``config.json`` of a ``LlamaForCausalLM`` of this shape and dtype."""
        from transformers import LlamaConfig

        cfg = LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                          num_hidden_layers=self.layers, num_attention_heads=self.heads,
                          num_key_value_heads=self.kv_heads, max_position_embeddings=self.max_positions,
                          rms_norm_eps=1e-5, tie_word_embeddings=False, torch_dtype=self.dtype)
        body = cfg.to_dict()
        body["architectures"] = ["LlamaForCausalLM"]
        return body

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every tensor's name and shape, in checkpoint order."""
        h, kv = self.hidden, self.hidden // self.heads * self.kv_heads
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
                    (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                    (p + "self_attn.o_proj.weight", (h, h)), (p + "post_attention_layernorm.weight", (h,)),
                    (p + "mlp.gate_proj.weight", (self.intermediate, h)),
                    (p + "mlp.up_proj.weight", (self.intermediate, h)),
                    (p + "mlp.down_proj.weight", (h, self.intermediate))]
        return out + [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]

    def params(self) -> int:
        return sum(_numel(s) for _, s in self.tensors())


#: ``--shape`` choices: Llama-2-13B's sizes in bf16 (26 GB), Llama-2-7B's in fp32 (27 GB: also larger than
#: 24 GiB, with about half the solve cost per layer), and a tiny one for the tests
SHAPES = {
    "llama2-13b": LlamaShape(hidden=5120, layers=40, heads=40, kv_heads=40, intermediate=13824, vocab=32000),
    "llama2-7b-fp32": LlamaShape(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=32000,
                                 dtype="float32"),
    "tiny": LlamaShape(hidden=64, layers=3, heads=4, kv_heads=2, intermediate=128, vocab=128, max_positions=64),
}
STD = 0.02


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def plan_shards(tensors: list[tuple[str, tuple[int, ...]]], shard_bytes: int,
                element: int = 2) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive tensors grouped into shards of at most ``shard_bytes`` (a larger tensor alone);
    ``element``: bytes per weight."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        n = _numel(shape) * element
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    return shards


def _tensor(index: int, name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return torch.randn(shape, generator=g).mul_(STD).to(dtype)


def write_checkpoint(shape: str, cache: Path, *, seed: int = 0, shard_bytes: int = 2 * 10**9,
                     verbose: bool = False) -> Path:
    """``cache/<shape>``, written on first use (see the module docstring); returns its path."""
    from safetensors.torch import save_file

    spec = SHAPES[shape]
    dest = cache / shape
    if (dest / "model.safetensors.index.json").is_file():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{shape}.", suffix=".tmp", dir=cache))
    try:
        order = {name: i for i, (name, _) in enumerate(spec.tensors())}
        shards = plan_shards(spec.tensors(), shard_bytes, spec.element)
        fname = "model-{:05d}-of-{:05d}.safetensors".format
        weight_map: dict[str, str] = {}
        t0 = time.perf_counter()
        for k, group in enumerate(shards, start=1):
            body = {name: _tensor(order[name], name, s, seed, getattr(torch, spec.dtype)) for name, s in group}
            save_file(body, str(tmp / fname(k, len(shards))), metadata={"format": "pt"})
            weight_map.update({name: fname(k, len(shards)) for name in body})
            del body
            if verbose:
                print(f"shard {k}/{len(shards)} written ({time.perf_counter() - t0:.0f}s)", flush=True)
        index = {"metadata": {"total_size": spec.params() * spec.element, "seed": seed, "std": STD},
                 "weight_map": weight_map}
        (tmp / "config.json").write_text(json.dumps(spec.config(), indent=2) + "\n", encoding="utf-8")
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 → an ordinary directory
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
