"""Mixture-of-experts models: every expert slice of a 3-D expert parameter is a site.

Tiny random Mixtral / Qwen2-MoE (transformers 5.x: ``mlp.experts.gate_up_proj`` ``(E, 2I, H)``,
``mlp.experts.down_proj`` ``(E, H, I)``, run as grouped products). Asserted: the sites and their
names (``<parameter>[e]``), N:M validity of every slice along its input dimension (the last dim of
an ``(E, out, in)`` parameter), routers untouched and reported, the report's sparsity equal to the
zeros really in the parameters, each expert's ``XᵀX`` equal to the one recomputed from the hidden
states the router sends it, the handling of an expert no token reaches, and the ``(E, in, out)``
layout of a grouped product without a transpose.
"""
from __future__ import annotations

import fnmatch
import warnings
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moonshot_fx
from moonshot_fx.config import DEFAULT_EXCLUDE, SparsifyConfig
from moonshot_fx.passes.apply import write_weights
from moonshot_fx.passes.calibrate import collect_hessians
from moonshot_fx.passes.capture import capture, normalize_batch
from moonshot_fx.passes.discover import find_sites, select_sites
from moonshot_fx.passes.experts import split_slice_name
from moonshot_fx.pruners import prune_layer

warnings.filterwarnings("ignore", category=UserWarning)

E, H, I, VOCAB = 4, 32, 64, 128
EXPERT_PARAMS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def tiny_mixtral(seed: int = 0) -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=VOCAB, num_local_experts=E, num_experts_per_tok=2)
    return MixtralForCausalLM(cfg).eval()


def tiny_qwen2_moe(seed: int = 0) -> nn.Module:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2MoeConfig(hidden_size=H, intermediate_size=I, moe_intermediate_size=32, shared_expert_intermediate_size=I,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                         num_experts=E, num_experts_per_tok=2)
    return Qwen2MoeForCausalLM(cfg).eval()


def batches(n: int = 2, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (2, 16), generator=g)} for _ in range(n)]


def weight_of(model: nn.Module, name: str) -> torch.Tensor:
    base, index = split_slice_name(name)
    p = model.get_parameter(base)
    return p if index is None else p[index]


def nm_ok(w: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """At most n non-zeros in every m consecutive weights along the last (input) dimension."""
    return bool(((w.reshape(w.shape[0], -1, m) != 0).sum(-1) <= n).all())


def test_default_router_exclusions_spare_the_experts_own_gates() -> None:
    routers = ["model.layers.0.mlp.gate.weight", "model.layers.3.mlp.shared_expert_gate.weight",
               "model.layers.1.mlp.router.weight", "model.layers.0.block_sparse_moe.gate.weight"]
    prunable = ["model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.shared_expert.gate_proj.weight",
                "model.layers.0.mlp.experts.gate_up_proj[3]", "model.layers.0.mlp.experts.gate_up_proj",
                "model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight"]
    excluded = lambda n: any(fnmatch.fnmatchcase(n, g) for g in DEFAULT_EXCLUDE)  # noqa: E731
    assert [n for n in routers if not excluded(n)] == []
    assert [n for n in prunable if excluded(n)] == []


def test_mixtral_expert_sites_are_named_per_slice() -> None:
    model = tiny_mixtral()
    b = batches(1)[0]
    args, kwargs = normalize_batch(b, model)
    captured = capture(model, args, kwargs)
    sites = {s.name: s for s in find_sites(captured.gm, model)}
    for layer in range(2):
        for p, shape in zip(EXPERT_PARAMS, ((2 * I, H), (H, I))):
            for e in range(E):
                s = sites[f"model.layers.{layer}.{p}[{e}]"]
                assert (s.slice_index, s.shape, s.transposed, s.kind, s.skipped) == (e, shape, False, "linear", "")
                assert s.parameter_name == f"model.layers.{layer}.{p}"
                assert s.matrix_shape == shape  # (out, in): the pruners' rows are the expert's outputs
        # each expert of a parameter has its own group (its own rows of the shared input)
        groups = {sites[f"model.layers.{layer}.{EXPERT_PARAMS[0]}[{e}]"].group for e in range(E)}
        assert len(groups) == E
    # a parameter-level glob selects or excludes all its slices
    cfg = SparsifyConfig(exclude=(*DEFAULT_EXCLUDE, "*experts.down_proj"))
    chosen = {s.name for s in select_sites(list(sites.values()), cfg)}
    assert not any("down_proj[" in n for n in chosen)
    assert sum("gate_up_proj[" in n for n in chosen) == 2 * E
    assert "model.layers.0.mlp.gate.weight" not in chosen
    rows = {r["name"]: r for r in moonshot_fx.inspect(model, b)}
    assert rows["model.layers.1.mlp.experts.down_proj[2]"]["slice"] == 2
    assert rows["model.layers.0.mlp.gate.weight"]["selected"] is False


@pytest.mark.parametrize("sequential,method", [(False, "sparsegpt"), (True, "sparsegpt"), (False, "magnitude"),
                                               (True, "moonshot")])
def test_mixtral_2_4_prunes_every_expert_and_keeps_routers(sequential: bool, method: str) -> None:
    model = tiny_mixtral()
    model.set_experts_implementation("eager")  # untraceable: capture switches to grouped_mm and back
    dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
    extra = {"base": "sparsegpt", "alpha": 0.5} if method == "moonshot" else {}
    cal = batches(2)
    moonshot_fx.sparsify(model, cal[0], calibration=cal, sparsity="2:4", method=method, sequential=sequential,
                         progress=False, **extra)
    assert model.config._experts_implementation == "eager"
    report = model.moonshot_report
    assert report.sequential == (sequential and method != "magnitude")
    names = {s.name for s in report.sites}
    for layer in range(2):
        for p in EXPERT_PARAMS:
            full = model.get_parameter(f"model.layers.{layer}.{p}")
            assert not torch.equal(full, dense[f"model.layers.{layer}.{p}"])
            for e in range(E):
                assert f"model.layers.{layer}.{p}[{e}]" in names
                w = full[e]  # (out, in): the input dimension is the last one for gate_up (H) and down (I)
                assert nm_ok(w) and float((w == 0).float().mean()) == 0.5
        for router in (f"model.layers.{layer}.mlp.gate.weight",):
            assert torch.equal(model.get_parameter(router), dense[router])
            assert "router" in report.skipped[router]
    # the report's sparsity is the zeros really in the pruned weights
    zeros = sum(int((weight_of(model, s.name) == 0).sum()) for s in report.sites)
    total = sum(weight_of(model, s.name).numel() for s in report.sites)
    assert report.total_params == total
    assert report.overall_sparsity == pytest.approx(zeros / total, abs=1e-12)
    # every 3-D expert weight is in the report: experts are the bulk of the body
    expert_weights = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert sum(s.params for s in report.sites if "[" in s.name) == expert_weights
    with torch.no_grad():
        assert torch.isfinite(model(**cal[0]).logits).all()


def test_qwen2_moe_2_4_keeps_both_gates_dense() -> None:
    model = tiny_qwen2_moe()
    dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cal = batches(2)
    moonshot_fx.sparsify(model, cal[0], calibration=cal, sparsity="2:4", method="sparsegpt", progress=False)
    report = model.moonshot_report
    for layer in range(2):
        for gate in ("mlp.gate.weight", "mlp.shared_expert_gate.weight"):
            name = f"model.layers.{layer}.{gate}"
            assert torch.equal(model.get_parameter(name), dense[name]) and name in report.skipped
        for p in EXPERT_PARAMS:
            for e in range(E):
                assert nm_ok(model.get_parameter(f"model.layers.{layer}.{p}")[e])
        shared = model.get_parameter(f"model.layers.{layer}.mlp.shared_expert.gate_proj.weight")
        assert nm_ok(shared) and f"model.layers.{layer}.mlp.shared_expert.gate_proj.weight" in {s.name for s in report.sites}
    zeros = sum(int((weight_of(model, s.name) == 0).sum()) for s in report.sites)
    assert report.overall_sparsity == pytest.approx(zeros / report.total_params, abs=1e-12)


def test_expert_hessian_is_over_exactly_the_routed_rows() -> None:
    model = tiny_mixtral()
    cal = batches(2)
    norm = [normalize_batch(b, model) for b in cal]
    captured = capture(model, *norm[0])
    sites = [s for s in find_sites(captured.gm, model) if s.slice_index is not None]
    stats = collect_hessians(captured, sites, [captured.flat_inputs(a, k) for a, k in norm])
    # independently: the MoE block's input, the router's top-2, the rows each expert gets
    seen: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    hooks = [model.model.layers[i].mlp.register_forward_hook(lambda m, inp, out, i=i: seen[i].append(inp[0].detach()))
             for i in range(2)]
    with torch.no_grad():
        for a, k in norm:
            model(*a, **k)
    for h in hooks:
        h.remove()
    by_name = {s.name: s for s in sites}
    routed_total = 0
    for layer in range(2):
        mlp = model.model.layers[layer].mlp
        x = torch.cat([t.reshape(-1, H) for t in seen[layer]]).double()
        top = torch.topk(torch.softmax(x @ mlp.gate.weight.double().T, dim=-1), 2, dim=-1).indices
        for e in range(E):
            xe = x[(top == e).any(dim=-1)]
            routed_total += xe.shape[0]
            gu = stats[by_name[f"model.layers.{layer}.mlp.experts.gate_up_proj[{e}]"].group]
            assert gu.rows == xe.shape[0]
            torch.testing.assert_close(gu.hessian, xe.T @ xe, rtol=1e-4, atol=1e-4)
            w = mlp.experts.gate_up_proj[e].double()
            gate, up = (xe @ w.T).chunk(2, dim=-1)
            he = F.silu(gate) * up  # the down projection's input for this expert
            dn = stats[by_name[f"model.layers.{layer}.mlp.experts.down_proj[{e}]"].group]
            assert dn.rows == he.shape[0]
            torch.testing.assert_close(dn.hessian, he.T @ he, rtol=1e-4, atol=1e-6)
    assert routed_total == 2 * 2 * sum(b["input_ids"].numel() for b in cal)  # top-2, two layers


def starved_mixtral() -> nn.Module:
    """Layer 0's router sends every token to experts 0 and 1: attention adds nothing (o_proj = 0),
    every embedding has a positive first component, and the router reads only that component."""
    model = tiny_mixtral()
    layer = model.model.layers[0]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        emb[:, 0] = emb[:, 0].abs() + 1.0
        layer.mlp.gate.weight.zero_()
        layer.mlp.gate.weight[:, 0] = torch.tensor([3.0, 2.0, 1.0, -1.0])
    return model


@pytest.mark.parametrize("sequential", [False, True])
def test_unrouted_expert_is_magnitude_pruned_and_noted(sequential: bool) -> None:
    model = starved_mixtral()
    dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cal = batches(2)
    moonshot_fx.sparsify(model, cal[0], calibration=cal, sparsity="2:4", method="sparsegpt", sequential=sequential,
                         progress=False)
    rows = {s.name: s for s in model.moonshot_report.sites}
    for p in EXPERT_PARAMS:
        for e in range(E):
            name = f"model.layers.0.{p}[{e}]"
            w = model.get_parameter(f"model.layers.0.{p}")[e]
            assert nm_ok(w)
            if e < 2:
                assert rows[name].note == ""
                continue
            assert "no calibration token" in rows[name].note and "magnitude" in rows[name].note
            expected, _ = prune_layer(dense[f"model.layers.0.{p}"][e], None, "2:4", method="magnitude")
            assert torch.equal(w, expected)
    assert all(r.note == "" for n, r in rows.items() if "[" not in n)  # only experts can starve


def test_unrouted_expert_left_dense_on_request() -> None:
    model = starved_mixtral()
    dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cal = batches(2)
    moonshot_fx.sparsify(model, cal[0], calibration=cal, sparsity="2:4", method="sparsegpt",
                         unrouted_experts="dense", progress=False)
    report = model.moonshot_report
    starved = {f"model.layers.0.{p}[{e}]" for p in EXPERT_PARAMS for e in (2, 3)}
    for name in starved:
        assert "no calibration token" in report.skipped[name] and "dense" in report.skipped[name]
        base, e = split_slice_name(name)
        assert torch.equal(model.get_parameter(base)[e], dense[base][e])
    assert not starved & {s.name for s in report.sites}
    for p in EXPERT_PARAMS:
        for e in (0, 1):
            assert nm_ok(model.get_parameter(f"model.layers.0.{p}")[e])
    zeros = sum(int((weight_of(model, s.name) == 0).sum()) for s in report.sites)
    assert report.overall_sparsity == pytest.approx(zeros / report.total_params, abs=1e-12)
    with pytest.raises(moonshot_fx.errors.ConfigError, match="unrouted_experts"):
        SparsifyConfig(unrouted_experts="drop")


class InOutExperts(nn.Module):
    """A top-1 MoE whose experts are stored ``(E, in, out)`` and run by transformers' grouped
    product directly (no transpose: its ``is_transposed=True`` layout). ``F.grouped_mm`` itself
    does not export in float32 (its meta kernel wants bf16), hence transformers' fallback op."""

    def __init__(self, d_in: int = 16, d_out: int = 8, experts: int = 3):
        super().__init__()
        self.router = nn.Linear(d_in, experts, bias=False)
        self.w = nn.Parameter(torch.randn(experts, d_in, d_out) / d_in**0.5)
        self.experts = experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, x.shape[-1])
        ids = self.router(x).argmax(dim=-1)
        order = torch.argsort(ids)
        counts = torch.histc(ids.float(), bins=self.experts, min=0, max=self.experts - 1)
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
        import transformers.integrations.moe  # noqa: F401 - registers torch.ops.transformers.grouped_mm_fallback

        y = torch.ops.transformers.grouped_mm_fallback(x[order], self.w, offs=offs)
        return y[torch.argsort(order)]


def test_grouped_mm_on_in_out_layout_is_pruned_along_its_input_dim() -> None:
    torch.manual_seed(0)
    model = InOutExperts().eval()
    x = torch.randn(64, 16)
    dense = model.w.detach().clone()
    sites = {s.name: s for s in find_sites(capture(model, (x,), {}).gm, model)}
    assert {n for n in sites if n.startswith("w[")} == {"w[0]", "w[1]", "w[2]"}
    assert sites["w[1]"].transposed and sites["w[1]"].shape == (16, 8) and sites["w[1]"].matrix_shape == (8, 16)
    assert sites["w[1]"].is_head  # the experts make this toy model's output
    moonshot_fx.sparsify(model, x, calibration=[x], sparsity="2:4", method="sparsegpt", prune_head=True, progress=False)
    for e in range(3):
        w = model.w[e].T  # (out, in): groups of 4 along the 16 inputs
        assert nm_ok(w) and not torch.equal(model.w[e], dense[e])
    assert "router.weight" in model.moonshot_report.skipped


def test_write_weights_slices_all_or_nothing() -> None:
    model = InOutExperts()
    before = model.w.detach().clone()
    ok = torch.zeros(16, 8)
    bad = torch.full((16, 8), float("nan"))
    with pytest.raises(moonshot_fx.errors.PatternError):
        write_weights(model, {"w[0]": ok, "w[2]": bad})
    assert torch.equal(model.w, before)
    with pytest.raises(moonshot_fx.errors.PatternError, match="no expert slice 5"):
        write_weights(model, {"w[5]": ok})
    write_weights(model, {"w[1]": ok})
    assert torch.equal(model.w[1], ok) and torch.equal(model.w[0], before[0]) and torch.equal(model.w[2], before[2])
