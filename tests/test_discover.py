"""Discovery: exactly the right prunable sites on real architectures (random weights, tiny configs).

For each model we assert the exact set of candidate weights ``find_sites`` reports and the exact
subset the default :class:`SparsifyConfig` selects (``DEFAULT_EXCLUDE`` keeps embeddings, LM heads
and final classifiers dense; the graph-level ``is_head`` test excludes final classifiers too unless
``prune_head=True``), plus the shared-input groups, the transposed flag of HF ``Conv1D``, skip
reasons for grouped convolutions, glob include/exclude/overrides and the ``inspect`` table.
"""
from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moonshot_fx
from moonshot_fx.config import DEFAULT_EXCLUDE, SparsifyConfig
from moonshot_fx.errors import NoPrunableSitesError
from moonshot_fx.passes.calibrate import collect_hessians
from moonshot_fx.passes.capture import CapturedGraph, capture, normalize_batch
from moonshot_fx.passes.discover import Site, find_sites, select_sites

warnings.filterwarnings("ignore", category=UserWarning)


def discover(model: nn.Module, batch: Any) -> tuple[CapturedGraph, dict[str, Site]]:
    model.eval()
    args, kwargs = normalize_batch(batch, model)
    cap = capture(model, args, kwargs)
    return cap, {s.name: s for s in find_sites(cap.gm, model)}


def selected(sites: dict[str, Site], config: SparsifyConfig | None = None, **kw: Any) -> set[str]:
    return {s.name for s in select_sites(list(sites.values()), config or SparsifyConfig(), **kw)}


# ----------------------------------------------------------------------------- HF Llama


LLAMA_PER_LAYER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def llama() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         tie_word_embeddings=True)
    model = tf.LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model, {"input_ids": torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))}


@pytest.fixture(scope="module")
def llama_sites(llama: Any) -> dict[str, Site]:
    return discover(*llama)[1]


def test_llama_sites(llama_sites: dict[str, Site]) -> None:
    sites = llama_sites
    layer_sites = {f"model.layers.{i}.{p}.weight" for i in range(2) for p in LLAMA_PER_LAYER}
    # the tied embedding is a candidate only because lm_head uses it as a linear map; it is one
    # site under its canonical name with lm_head.weight as alias
    assert set(sites) == layer_sites | {"model.embed_tokens.weight"}
    emb = sites["model.embed_tokens.weight"]
    assert emb.aliases == ("model.embed_tokens.weight", "lm_head.weight")
    assert emb.is_head and emb.kind == "linear" and emb.shape == (64, 16)
    assert selected(sites) == layer_sites
    # even with prune_head the default exclusions keep the tied embedding dense
    assert selected(sites, prune_head=True) == layer_sites
    # ... and an alias matching an exclude glob is enough (lm_head), not only the canonical name
    assert "model.embed_tokens.weight" not in selected(sites, SparsifyConfig(exclude=("*lm_head*",)), prune_head=True)
    assert "model.embed_tokens.weight" in selected(sites, SparsifyConfig(default_exclude=False), prune_head=True)

    for i in range(2):
        p = f"model.layers.{i}."
        groups = {name: sites[p + name + ".weight"].group for name in LLAMA_PER_LAYER}
        assert groups["self_attn.q_proj"] == groups["self_attn.k_proj"] == groups["self_attn.v_proj"]
        assert groups["mlp.gate_proj"] == groups["mlp.up_proj"]
        distinct = {groups["self_attn.q_proj"], groups["self_attn.o_proj"], groups["mlp.gate_proj"],
                    groups["mlp.down_proj"]}
        assert len(distinct) == 4
        for name in LLAMA_PER_LAYER:
            s = sites[p + name + ".weight"]
            assert s.kind == "linear" and not s.transposed and not s.is_head and not s.skipped
            assert s.aliases == (s.name,) and len(s.nodes) == 1
        assert sites[p + "self_attn.k_proj.weight"].matrix_shape == (8, 16)  # GQA: 1 kv head of 8
        assert sites[p + "mlp.down_proj.weight"].matrix_shape == (16, 32)
    # groups of different layers never merge
    assert len({s.group for s in sites.values()}) == 2 * 4 + 1


def test_llama_inspect_table(llama: Any) -> None:
    model, batch = llama
    rows = moonshot_fx.inspect(model, batch)
    by_name = {r["name"]: r for r in rows}
    assert len(rows) == len(by_name) == 15
    assert {n for n, r in by_name.items() if r["selected"]} == {
        f"model.layers.{i}.{p}.weight" for i in range(2) for p in LLAMA_PER_LAYER}
    emb = by_name["model.embed_tokens.weight"]
    assert emb["selected"] is False and emb["head"] is True and "lm_head.weight" in emb["aliases"]
    q = by_name["model.layers.0.self_attn.q_proj.weight"]
    assert q == {"name": "model.layers.0.self_attn.q_proj.weight", "kind": "linear", "shape": [16, 16],
                 "params": 256, "group": q["group"], "aliases": ["model.layers.0.self_attn.q_proj.weight"],
                 "head": False, "skipped": "", "layout": "out_in", "selected": True, "reason": ""}
    assert "kept dense by default" in emb["reason"] and "'*embed*'" in emb["reason"]
    assert by_name["model.layers.0.self_attn.v_proj.weight"]["group"] == q["group"]
    # a config is honoured; one that selects nothing gives an all-False table instead of raising
    none = moonshot_fx.inspect(model, batch, SparsifyConfig(include=("nothing*",)))
    assert len(none) == 15 and not any(r["selected"] for r in none)
    # prune_head reaches inspect too (the tied head is selected once the default exclusions are cleared)
    with_head = moonshot_fx.inspect(model, batch, SparsifyConfig(default_exclude=False), prune_head=True)
    assert {r["name"]: r["selected"] for r in with_head}["model.embed_tokens.weight"] is True


def test_globs_and_overrides(llama: Any, llama_sites: dict[str, Site]) -> None:
    sites = llama_sites
    mlp = {f"model.layers.{i}.mlp.{p}.weight" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")}
    assert selected(sites, SparsifyConfig(include=("*mlp*",))) == mlp
    # exclude wins over include; user excludes replace the defaults (so they must be repeated)
    cfg = SparsifyConfig(include=("*mlp*",), exclude=("*down_proj*",))
    assert selected(sites, cfg) == {n for n in mlp if "down" not in n}
    cfg = SparsifyConfig(exclude=(*DEFAULT_EXCLUDE, "model.layers.1.*"))
    assert selected(sites, cfg) == {f"model.layers.0.{p}.weight" for p in LLAMA_PER_LAYER}
    assert SparsifyConfig(include="*q_proj*").include == ("*q_proj*",)  # a lone string is one glob
    with pytest.raises(NoPrunableSitesError, match="no prunable layer"):
        selected(sites, SparsifyConfig(include=("*conv*",)))

    cfg = SparsifyConfig(sparsity=0.5, overrides={"*mlp*": "4:8", "*q_proj*": 0.25, "*": "2:4"})
    assert str(cfg.pattern_for("model.layers.0.mlp.up_proj.weight")) == "4:8"
    assert str(cfg.pattern_for("model.layers.1.self_attn.q_proj.weight")) == "0.25"
    assert str(cfg.pattern_for("model.layers.1.self_attn.k_proj.weight")) == "2:4"  # first match wins
    assert str(SparsifyConfig(overrides={"*mlp*": "4:8"}).pattern_for("model.layers.0.self_attn.k_proj.weight")) == "0.5"

    # end to end: the overrides are what the pruned weights satisfy
    model, batch = llama
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        moonshot_fx.sparsify(model, batch, sparsity=0.5, method="magnitude", overrides={"*mlp*": "4:8"},
                             progress=False)
        report = model.moonshot_report
        patterns = {s.name: s.pattern for s in report.sites}
        assert set(patterns) == {f"model.layers.{i}.{p}.weight" for i in range(2) for p in LLAMA_PER_LAYER}
        for name, pat in patterns.items():
            w = model.get_parameter(name)
            if ".mlp." in name:
                assert pat == "4:8" and moonshot_fx.check_pattern(w, "4:8")
            else:
                assert pat == "0.5" and float((w == 0).float().mean()) == 0.5
        assert float((model.model.embed_tokens.weight == 0).float().mean()) == 0.0
    finally:
        model.load_state_dict(state)


# ----------------------------------------------------------------------------- HF GPT-2 (Conv1D)


def test_gpt2_conv1d_sites() -> None:
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                             bos_token_id=0, eos_token_id=0))
    _, sites = discover(model, {"input_ids": torch.randint(0, 64, (2, 8))})
    per_layer = {f"transformer.h.{i}.{p}.weight" for i in range(2)
                 for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert set(sites) == per_layer | {"transformer.wte.weight"}  # wpe is only an embedding lookup
    assert selected(sites) == per_layer
    wte = sites["transformer.wte.weight"]
    assert wte.is_head and "lm_head.weight" in wte.aliases and not wte.transposed
    for name in per_layer:
        s = sites[name]
        assert s.kind == "linear" and s.transposed and not s.is_head and not s.skipped
        # Conv1D stores (in, out); the pruners see (out, in)
        assert s.matrix_shape == (s.shape[1], s.shape[0])
    assert sites["transformer.h.0.attn.c_attn.weight"].matrix_shape == (48, 16)
    assert sites["transformer.h.0.mlp.c_proj.weight"].matrix_shape == (16, 64)
    assert len({s.group for n, s in sites.items() if n in per_layer}) == 8


# ----------------------------------------------------------------------------- timm / torchvision


def test_timm_vit_sites() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              num_classes=10)
    _, sites = discover(model, torch.randn(2, 3, 32, 32))
    blocks = {f"blocks.{i}.{p}.weight" for i in range(2) for p in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert set(sites) == blocks | {"patch_embed.proj.weight", "head.weight"}
    assert selected(sites) == blocks
    # the patch embedding is a genuine conv site (kernel 8x8, stride 8; in = 3·8·8 = 192) that is
    # kept dense by the documented "*embed*" default exclusion, not by the head rule
    pe = sites["patch_embed.proj.weight"]
    assert pe.kind == "conv2d" and not pe.is_head and not pe.skipped
    assert pe.conv == {"kernel_size": (8, 8), "stride": (8, 8), "padding": (0, 0), "dilation": (1, 1)}
    assert pe.matrix_shape == (192, 192)
    assert not SparsifyConfig().selects("patch_embed.proj.weight")
    assert selected(sites, SparsifyConfig(default_exclude=False)) == blocks | {"patch_embed.proj.weight"}
    # the classifier is excluded twice over: by "head.weight" and as a graph head
    assert sites["head.weight"].is_head
    assert "head.weight" not in selected(sites, SparsifyConfig(default_exclude=False))
    assert "head.weight" in selected(sites, SparsifyConfig(default_exclude=False), prune_head=True)
    for i in range(2):
        assert sites[f"blocks.{i}.attn.qkv.weight"].matrix_shape == (576, 192)
        assert sites[f"blocks.{i}.mlp.fc2.weight"].matrix_shape == (192, 768)


RESNET18_CONVS = {"conv1.weight"} | {f"layer{s}.{b}.conv{c}.weight" for s in range(1, 5) for b in range(2)
                                     for c in (1, 2)} | {f"layer{s}.0.downsample.0.weight" for s in (2, 3, 4)}


def _check_resnet18(sites: dict[str, Site]) -> None:
    assert len(RESNET18_CONVS) == 20
    assert set(sites) == RESNET18_CONVS | {"fc.weight"}
    assert selected(sites) == RESNET18_CONVS
    assert sites["fc.weight"].is_head and sites["fc.weight"].kind == "linear"
    # fc is kept dense by the head rule even when the exclusion globs are cleared
    assert selected(sites, SparsifyConfig(default_exclude=False)) == RESNET18_CONVS
    assert selected(sites, SparsifyConfig(default_exclude=False), prune_head=True) == RESNET18_CONVS | {"fc.weight"}
    # ... or by naming it explicitly in include
    assert selected(sites, SparsifyConfig(include=("fc.weight",), default_exclude=False)) == {"fc.weight"}
    for name in RESNET18_CONVS:
        s = sites[name]
        assert s.kind == "conv2d" and not s.is_head and not s.skipped and not s.transposed
    assert sites["conv1.weight"].conv == {"kernel_size": (7, 7), "stride": (2, 2), "padding": (3, 3),
                                          "dilation": (1, 1)}
    assert sites["conv1.weight"].matrix_shape == (64, 147)
    ds = sites["layer2.0.downsample.0.weight"]
    assert ds.conv == {"kernel_size": (1, 1), "stride": (2, 2), "padding": (0, 0), "dilation": (1, 1)}
    # the downsample conv reads the same tensor as the block's conv1 but unfolds it differently:
    # separate statistics
    assert ds.inputs == sites["layer2.0.conv1.weight"].inputs
    assert ds.group != sites["layer2.0.conv1.weight"].group
    assert len({s.group for s in sites.values()}) == 21


def test_timm_resnet18_sites() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    _, sites = discover(timm.create_model("resnet18", pretrained=False, num_classes=10), torch.randn(2, 3, 32, 32))
    _check_resnet18(sites)


def test_torchvision_resnet18_sites() -> None:
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    _, sites = discover(tv.models.resnet18(num_classes=10), torch.randn(2, 3, 32, 32))
    _check_resnet18(sites)


# ----------------------------------------------------------------------------- user modules


class FunctionalLinear(nn.Module):
    """Own nn.Parameter used through F.linear, then an nn.Linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 16))
        self.b = nn.Parameter(torch.zeros(8))
        self.proj = nn.Linear(8, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(F.linear(x, self.w, self.b))
        return self.out(F.relu(self.proj(h)))


@pytest.mark.parametrize("force_fx", [False, True], ids=["export", "symbolic_trace"])
def test_functional_linear_on_own_parameter(force_fx: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = FunctionalLinear()
    if force_fx:  # the fx fallback must find the same sites (call_function + call_module nodes)
        def refuse(*a: Any, **k: Any) -> None:
            raise RuntimeError("export disabled by the test")
        monkeypatch.setattr(torch.export, "export", refuse)
    cap, sites = discover(model, torch.randn(3, 16))
    assert cap.method == ("symbolic_trace" if force_fx else "export")
    assert set(sites) == {"w", "proj.weight", "out.weight"}
    assert selected(sites) == {"w", "proj.weight"}
    assert sites["w"].kind == "linear" and sites["w"].shape == (8, 16) and not sites["w"].transposed
    assert sites["out.weight"].is_head and not sites["proj.weight"].is_head and not sites["w"].is_head
    # and it prunes through that path
    moonshot_fx.sparsify(model, torch.randn(3, 16), calibration=[torch.randn(4, 16) for _ in range(2)],
                         sparsity="2:4", method="sparsegpt", progress=False)
    assert moonshot_fx.check_pattern(model.w.detach(), "2:4")
    assert {s.name for s in model.moonshot_report.sites} == {"w", "proj.weight"}
    assert model.moonshot_report.capture_method == cap.method


class MatmulModel(nn.Module):
    """Weights used through x @ W.T, torch.matmul(x, W_in_out) and addmm."""

    def __init__(self) -> None:
        super().__init__()
        self.w_t = nn.Parameter(torch.randn(12, 16))  # (out, in) used as x @ w_t.T
        self.w_io = nn.Parameter(torch.randn(12, 8))  # (in, out) used as x @ w_io (Conv1D style)
        self.bias = nn.Parameter(torch.zeros(8))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(x @ self.w_t.T)
        h = torch.relu(torch.addmm(self.bias, h, self.w_io))
        return self.head(h)


def test_matmul_sites() -> None:
    torch.manual_seed(0)
    _, sites = discover(MatmulModel(), torch.randn(5, 16))
    assert set(sites) == {"w_t", "w_io", "head.weight"}
    assert selected(sites) == {"w_t", "w_io"}
    assert not sites["w_t"].transposed and sites["w_t"].matrix_shape == (12, 16)
    assert sites["w_io"].transposed and sites["w_io"].matrix_shape == (8, 12)


class GroupedConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(8, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)  # depthwise
        self.gc = nn.Conv2d(16, 16, 1, groups=4)  # grouped
        self.same = nn.Conv2d(16, 16, 3, padding="same", dilation=2)
        self.even = nn.Conv2d(16, 16, 2, padding="same")  # asymmetric padding
        self.pw = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pw(F.relu(self.even(self.same(self.gc(self.dw(self.stem(x)))))))
        return self.fc(x.mean((2, 3)))


def test_grouped_and_depthwise_convs_are_skipped_with_reason() -> None:
    from moonshot_fx.stats import input_rows

    torch.manual_seed(0)
    model = GroupedConvs().eval()
    x = torch.randn(2, 8, 8, 8)
    _, sites = discover(model, x)
    assert set(sites) == {"stem.weight", "dw.weight", "gc.weight", "same.weight", "even.weight", "pw.weight",
                          "fc.weight"}
    assert "grouped convolution (groups=16)" in sites["dw.weight"].skipped
    assert "grouped convolution (groups=4)" in sites["gc.weight"].skipped
    assert "asymmetric padding" in sites["even.weight"].skipped
    # padding="same" with a symmetric total padding is supported, as the equivalent integer padding
    same = sites["same.weight"]
    assert not same.skipped and same.conv == {"kernel_size": (3, 3), "stride": (1, 1), "padding": (2, 2),
                                              "dilation": (2, 2)}
    assert selected(sites) == {"stem.weight", "same.weight", "pw.weight"}
    # the unfold attributes reproduce the convolution exactly: conv(x) == rows(x) @ Wᵀ + b
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [getattr(model, n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (i[0], o)))
             for n in ("stem", "same", "pw")]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for n, (inp, out) in seen.items():
        s, mod = sites[n + ".weight"], getattr(model, n)
        rows = input_rows(inp, s.kind, s.conv)
        y = rows @ mod.weight.reshape(mod.weight.shape[0], -1).T + mod.bias
        torch.testing.assert_close(y, out.flatten(2).transpose(1, 2).reshape(-1, out.shape[1]), rtol=1e-4, atol=1e-4)
    # skipped sites stay out even when named explicitly
    assert selected(sites, SparsifyConfig(include=("dw.weight", "pw.weight"))) == {"pw.weight"}
    rows_table = {r["name"]: r for r in moonshot_fx.inspect(model, x)}
    assert rows_table["dw.weight"]["skipped"] and rows_table["dw.weight"]["selected"] is False
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    moonshot_fx.sparsify(model, x, calibration=[x], sparsity=0.5, method="sparsegpt", progress=False)
    report = model.moonshot_report
    assert set(report.skipped) == {"dw.weight", "gc.weight", "even.weight", "fc.weight"}
    assert "kept dense by default" in report.skipped["fc.weight"]  # the classifier: reported, not silent
    assert "groups=16" in report.skipped["dw.weight"]
    assert {s.name for s in report.sites} == {"stem.weight", "same.weight", "pw.weight"}
    for name in ("dw.weight", "gc.weight", "even.weight", "fc.weight"):
        assert torch.equal(model.get_parameter(name), dense[name])
    for name in ("stem.weight", "same.weight", "pw.weight"):
        assert float((model.get_parameter(name) == 0).float().mean()) == 0.5


# ----------------------------------------------------------------------------- tied parameters


class TwiceUsed(nn.Module):
    """One nn.Linear applied twice (a tied parameter with two uses and two inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.shared(torch.tanh(self.shared(x))))


def test_twice_used_linear_is_one_site_with_summed_hessian() -> None:
    torch.manual_seed(0)
    model = TwiceUsed().eval()
    batches = [torch.randn(3, 5, 16) for _ in range(2)]
    cap, sites = discover(model, batches[0])
    assert set(sites) == {"shared.weight", "head.weight"}
    site = sites["shared.weight"]
    assert len(site.nodes) == 2 and len(set(site.inputs)) == 2
    assert not site.is_head and selected(sites) == {"shared.weight"}

    # statistics by hand: a forward hook sees both uses
    seen: list[torch.Tensor] = []
    handle = model.shared.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()))
    with torch.no_grad():
        for b in batches:
            model(b)
    handle.remove()
    assert len(seen) == 4
    rows = torch.cat([x.reshape(-1, 16) for x in seen]).double()
    expected = rows.T @ rows

    stats = collect_hessians(cap, [site], [cap.flat_inputs((b,), {}) for b in batches])
    assert list(stats) == [site.group]
    st = stats[site.group]
    assert st.rows == rows.shape[0] == 2 * 2 * 3 * 5
    torch.testing.assert_close(st.hessian, expected, rtol=1e-5, atol=1e-5)  # fp32 GEMM per batch
    # a single use's statistics would be visibly different
    first_only = torch.cat([x.reshape(-1, 16) for x in seen[0::2]]).double()
    assert not torch.allclose(st.hessian, first_only.T @ first_only)

    # end to end in both modes: pruned once, under its one name
    for sequential in (False, True):
        m = TwiceUsed()
        m.load_state_dict(model.state_dict())
        moonshot_fx.sparsify(m, batches[0], calibration=batches, sparsity="2:4", method="sparsegpt",
                             sequential=sequential, progress=False)
        assert [s.name for s in m.moonshot_report.sites] == ["shared.weight"]
        assert moonshot_fx.check_pattern(m.shared.weight.detach(), "2:4")
        assert torch.equal(m.head.weight, model.head.weight)


def test_nn_module_shared_between_two_attributes_uses_first_name() -> None:
    class Aliased(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Linear(8, 8)
            self.dec = self.enc  # same module under two names
            self.out = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.dec(torch.relu(self.enc(x))))

    _, sites = discover(Aliased(), torch.randn(4, 8))
    assert set(sites) == {"enc.weight", "out.weight"}
    assert sites["enc.weight"].aliases == ("enc.weight", "dec.weight")
    assert len(sites["enc.weight"].nodes) == 2
    # an exclude glob on either name keeps it dense
    assert selected(sites, SparsifyConfig(exclude=("dec.*",)), prune_head=True) == {"out.weight"}
