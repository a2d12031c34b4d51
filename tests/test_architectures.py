"""Architecture matrix: every model a user brings is pruned fully, or says exactly what stayed dense.

For each architecture (tiny random configs; no weights are downloaded) we run
``sparsify(..., sparsity="2:4", method="sparsegpt")`` on a couple of calibration batches and check,
independently of the library's own bookkeeping:

* every weight (every parameter with two or more dimensions) is either pruned or listed in
  ``report.skipped`` with a non-empty reason — nothing is silently left dense;
* what is left dense is only what that architecture is allowed to keep dense (embeddings, the
  task head, routers, depthwise convolutions, layers whose input size is not a multiple of 4): a
  residual-stream projection wrongly taken for a head fails here;
* every pruned weight satisfies 2:4 along its *input* dimension, worked out here from the module
  type (``nn.Linear``/convs ``(out, in…)``, HF ``Conv1D`` ``(in, out)``, MoE experts
  ``(E, out, in)``, the bare parameters of the user module as that module uses them);
* the report's overall sparsity equals the zeros counted in the parameters.
"""
from __future__ import annotations

import fnmatch
import re
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moonshot_fx

tf = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", category=UserWarning)

VOCAB = 128
EMBED = ("*embed_tokens*", "*embed_positions*", "*wte*", "*wpe*", "*word_embeddings*",
         "*position_embeddings*", "*token_type_embeddings*")


def _lm_batches(n: int = 2, batch: int = 2, seq: int = 16, **extra: Any) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=g), **extra} for _ in range(n)]


def _image_batches(size: int = 32, n: int = 2, batch: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, 3, size, size, generator=g) for _ in range(n)]


def _small(cls: Any, **kw: Any) -> Any:
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    base.update(kw)
    return cls(**base)


class BareParams(nn.Module):
    """A user module whose weights are bare parameters used three ways."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w_in = nn.Parameter(torch.randn(32, 16, generator=g))    # F.linear: (out, in)
        self.p_mid = nn.Parameter(torch.randn(32, 32, generator=g))   # x @ P: (in, out)
        self.q_out = nn.Parameter(torch.randn(8, 32, generator=g))    # x @ Q.t(): (out, in)
        self.scale = nn.Parameter(torch.ones(32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(F.linear(x, self.w_in)) * self.scale
        h = torch.relu(h @ self.p_mid)
        return h @ self.q_out.t()


class DictOutput(nn.Module):
    """A user module returning ``{"features": residual stream, "logits": cls(features)}``: only
    ``cls`` is the head; the residual writers reach ``features`` but are body layers."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.b1 = nn.Linear(32, 32)
        self.b2 = nn.Linear(32, 32)
        self.cls = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.inp(x)
        h = h + self.b1(torch.relu(h))
        h = h + self.b2(torch.relu(h))
        return {"features": h, "logits": self.cls(h)}


#: layout of the bare parameters of BareParams: True where stored (in, out)
BARE_TRANSPOSED = {"w_in": False, "p_mid": True, "q_out": False}


def _llama(**kw: Any) -> nn.Module:
    return tf.LlamaForCausalLM(_small(tf.LlamaConfig, **kw))


def _t5() -> nn.Module:
    cfg = tf.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                      num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0)
    return tf.T5ForConditionalGeneration(cfg)


def _bert(cls: Any) -> nn.Module:
    cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, num_labels=3)
    return cls(cfg)


def _mixtral() -> nn.Module:
    return tf.MixtralForCausalLM(_small(tf.MixtralConfig, num_local_experts=4, num_experts_per_tok=2))


def _qwen2_moe() -> nn.Module:
    cfg = _small(tf.Qwen2MoeConfig, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                 shared_expert_intermediate_size=128, decoder_sparse_step=1)
    return tf.Qwen2MoeForCausalLM(cfg)


def _timm(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        timm = pytest.importorskip("timm")
        return timm.create_model(name, pretrained=False, num_classes=10, **kw)
    return build


def _tv(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        tv = pytest.importorskip("torchvision")
        return getattr(tv.models, name)(weights=None, **kw)
    return build


def _tv_vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                             num_classes=10)


#: name → (builder, calibration batches, globs of weights that may stay dense)
CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], list[Any]], tuple[str, ...]]] = {
    "llama": (_llama, _lm_batches, EMBED + ("lm_head.weight",)),
    "llama-hidden-states": (_llama, lambda: _lm_batches(output_hidden_states=True), EMBED + ("lm_head.weight",)),
    "qwen2": (lambda: tf.Qwen2ForCausalLM(_small(tf.Qwen2Config)), _lm_batches, EMBED + ("lm_head.weight",)),
    "mistral": (lambda: tf.MistralForCausalLM(_small(tf.MistralConfig)), _lm_batches, EMBED + ("lm_head.weight",)),
    "phi3": (lambda: tf.Phi3ForCausalLM(_small(tf.Phi3Config, pad_token_id=0)), _lm_batches,
             EMBED + ("lm_head.weight",)),
    "gpt2": (lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                                      n_positions=64)), _lm_batches, EMBED + ("lm_head.weight",)),
    "opt": (lambda: tf.OPTForCausalLM(tf.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                                   num_attention_heads=4, max_position_embeddings=64,
                                                   word_embed_proj_dim=64)), _lm_batches,
            EMBED + ("lm_head.weight",)),
    "gemma": (lambda: tf.GemmaForCausalLM(_small(tf.GemmaConfig, head_dim=16)), _lm_batches,
              EMBED + ("lm_head.weight",)),
    "bert-classifier": (lambda: _bert(tf.BertForSequenceClassification), _lm_batches, EMBED + ("classifier.weight",)),
    "bert-model": (lambda: _bert(tf.BertModel), _lm_batches, EMBED),
    "t5": (_t5, lambda: _lm_batches(decoder_input_ids=torch.zeros(2, 8, dtype=torch.long)),
           ("shared.weight", "lm_head.weight", "*relative_attention_bias*", "*embed_tokens*")),
    "mixtral": (_mixtral, _lm_batches, EMBED + ("lm_head.weight", "*mlp.gate.weight")),
    "qwen2-moe": (_qwen2_moe, _lm_batches, EMBED + ("lm_head.weight", "*mlp.gate.weight", "*shared_expert_gate*")),
    "timm-convnext_atto": (_timm("convnext_atto"), lambda: _image_batches(64), ("*conv_dw*", "head.fc.weight")),
    "timm-efficientnet_b0": (_timm("efficientnet_b0"), _image_batches,
                             ("conv_stem.weight", "*conv_dw*", "*se.conv_expand*", "*se.conv_reduce*",
                              "classifier.weight")),
    "timm-mobilenetv3_small_100": (_timm("mobilenetv3_small_100"), _image_batches,
                                   ("conv_stem.weight", "*conv_dw*", "*se.conv_expand*", "*se.conv_reduce*",
                                    "classifier.weight")),
    "timm-deit_tiny": (_timm("deit_tiny_patch16_224", img_size=32), _image_batches,
                       ("cls_token", "pos_embed", "patch_embed.proj.weight", "head.weight")),
    "timm-resnet18": (_timm("resnet18"), _image_batches, ("conv1.weight", "fc.weight")),
    "tv-mobilenet_v2": (_tv("mobilenet_v2", num_classes=10), _image_batches,
                        ("features.0.0.weight", "features.*.conv.0.0.weight", "features.*.conv.1.0.weight",
                         "classifier.1.weight")),
    "tv-resnet18": (_tv("resnet18", num_classes=10), _image_batches, ("conv1.weight", "fc.weight")),
    "tv-vit": (_tv_vit, _image_batches, ("class_token", "encoder.pos_embedding", "heads.head.weight")),
    "bare-params": (BareParams, lambda: [torch.randn(4, 16, generator=torch.Generator().manual_seed(i))
                                         for i in range(2)], ("q_out",)),
    "dict-features": (DictOutput, lambda: [torch.randn(8, 16, generator=torch.Generator().manual_seed(i))
                                           for i in range(2)], ("cls.weight",)),
}


def _conv1d_types() -> tuple[type, ...]:
    try:
        from transformers.pytorch_utils import Conv1D
        return (Conv1D,)
    except ImportError:  # pragma: no cover
        return ()


def _input_major(model: nn.Module, name: str, p: torch.Tensor, index: int | None) -> torch.Tensor:
    """The weight as ``(out, in…)``, from the owning module's type (not from the library)."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    w = p.detach()
    if index is not None:
        return w[index]  # MoE experts: (E, out, in)
    if isinstance(owner, _conv1d_types()):
        return w.t()
    if isinstance(owner, BareParams):
        return w.t() if BARE_TRANSPOSED[attr] else w
    return w.reshape(w.shape[0], -1)


_SLICE = re.compile(r"^(?P<param>.+)\[(?P<index>\d+)\]$")


def _resolve(site: str) -> tuple[str, int | None]:
    m = _SLICE.match(site)
    return (m["param"], int(m["index"])) if m else (site, None)


def _check_nm(w: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    rows, cols = w.shape
    return cols % m == 0 and bool(((w.reshape(rows, cols // m, m) != 0).sum(-1) <= n).all())


@pytest.mark.parametrize("case", list(CASES))
def test_architecture_is_pruned_fully_or_reports_why(case: str) -> None:
    builder, batches, may_stay_dense = CASES[case]
    torch.manual_seed(0)
    model = builder().eval()
    calib = batches()
    model = moonshot_fx.sparsify(model, calibration=calib, sparsity="2:4", method="sparsegpt")
    report = model.moonshot_report

    params = dict(model.named_parameters())
    aliases: dict[str, set[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(next(k for k, v in params.items() if v is p), set()).add(n)

    pruned: dict[str, set[int | None]] = {}
    for s in report.sites:
        pname, idx = _resolve(s.name)
        assert pname in params, f"{case}: report names {s.name!r}, which is no parameter"
        pruned.setdefault(pname, set()).add(idx)
    skipped = set(report.skipped)

    weights = {n for n, p in params.items() if p.dim() >= 2}
    silent = [n for n in weights if n not in pruned and not (aliases[n] & skipped)]
    assert not silent, f"{case}: weights left dense without a reason: {silent}"
    assert all(report.skipped[k].strip() for k in skipped), f"{case}: empty skip reason"

    wrongly_dense = [k for k in skipped if k in params or k in {a for v in aliases.values() for a in v}
                     if not any(fnmatch.fnmatchcase(k, g) for g in may_stay_dense)]
    assert not wrongly_dense, (f"{case}: left dense but should be pruned: "
                               f"{ {k: report.skipped[k] for k in wrongly_dense} }")
    if case == "dict-features":  # left dense by the head rule, not by a glob, and it says so
        assert "head" in report.skipped["cls.weight"]

    zeros = total = 0
    for pname, idxs in pruned.items():
        p = params[pname]
        if None not in idxs:  # expert slices: every slice of the parameter must be a site
            assert idxs == set(range(p.shape[0])), f"{case}: {pname} has experts {sorted(idxs)} of {p.shape[0]}"
        for idx in idxs:
            w = _input_major(model, pname, p, idx)
            assert _check_nm(w), f"{case}: {pname}[{idx}] is not 2:4 along its input dimension"
            zeros += int((w == 0).sum())
            total += w.numel()
    assert total == report.total_params
    assert zeros / total == pytest.approx(report.overall_sparsity, abs=1e-6)
    # at least half: 2:4 zeros two of every four, and SparseGPT also zeroes the weights of inputs
    # that are zero on every calibration row (dead ReLU channels of a random net on 4 images)
    assert report.overall_sparsity >= 0.5 - 1e-6
