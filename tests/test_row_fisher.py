"""MOONSHOT's row-clustered Fisher (fisher="row"): closed forms, equivalences and orderings."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import transformers

import moonshot_fx
from moonshot_fx.config import parse_pattern
from moonshot_fx.errors import ConfigError
from moonshot_fx.masks import check_pattern
from moonshot_fx.passes.calibrate import collect_gradients
from moonshot_fx.passes.capture import capture
from moonshot_fx.passes.discover import find_sites
from moonshot_fx.passes.row_clusters import row_clusters
from moonshot_fx.pruners import cluster_quadratic_error, mix_hessians, prune_layer
from moonshot_fx.stats import LayerStats, input_rows, mixed_curvature


class TokenMLP(nn.Module):
    """A causal-LM-shaped model whose tokens never interact: per-token gradients are exact."""

    def __init__(self, vocab: int = 11, width: int = 8, hidden: int = 6):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.up = nn.Linear(width, hidden)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.out(torch.tanh(self.up(self.embed(input_ids))))}


def token_mlp_case() -> tuple[TokenMLP, torch.Tensor, object, list, torch.Tensor, float]:
    """A seeded TokenMLP, its ids, capture and ``up.weight`` site, with each token's own loss term
    (``per_token``, (batch, positions)) and the default loss's per-position scale."""
    torch.manual_seed(0)
    model = TokenMLP().eval()
    ids = torch.randint(0, 11, (3, 7))
    cap = capture(model, (), {"input_ids": ids})
    sites = [s for s in find_sites(cap.gm, model) if s.name == "up.weight"]
    logits = model(ids)["logits"]
    per_token = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    return model, ids, cap, sites, per_token, 1.0 / per_token.shape[1]  # the default loss: per-sample mean


def tiny_llama(layers: int = 2) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, use_cache=False)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_per_row_fisher_equals_explicit_per_token_gradients() -> None:
    model, ids, cap, sites, per_token, scale = token_mlp_case()
    d_out = sites[0].shape[0]
    weights, _, _ = collect_gradients(cap, sites, [((), {"input_ids": ids})], kind="row",
                                      clusters={"up.weight": d_out})
    x = input_rows(model.embed(ids).detach(), "linear")
    stats = LayerStats()
    stats.add_token_fisher("up.weight", x, weights["up.weight"][0])
    got = stats.fisher["up.weight"]  # (d_out, d_in, d_in): one Fisher per output row
    # explicit: the gradient of each token's own loss term w.r.t. row i of the weight
    expected = torch.zeros_like(got)
    for k in range(ids.shape[0]):
        for t in range(per_token.shape[1]):
            (g,) = torch.autograd.grad(scale * per_token[k, t], model.up.weight, retain_graph=True)
            g = g.to(torch.float64)
            expected += torch.einsum("ia,ib->iab", g, g)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-9)
    # and the clusters of the shared form: summing the rows gives the token Fisher
    shared = LayerStats()
    token_w, _, _ = collect_gradients(cap, sites, [((), {"input_ids": ids})], kind="token")
    shared.add_token_fisher("up.weight", x, token_w["up.weight"][0])
    assert torch.allclose(got.sum(dim=0), shared.fisher["up.weight"], rtol=1e-6)


def test_mixed_curvature_per_cluster_matches_mixing_the_cluster_fishers() -> None:
    torch.manual_seed(1)
    rows = [torch.randn(40, 12), torch.randn(24, 12)]
    w = [torch.rand(40, 3), torch.rand(24, 3)]  # (rows, C): Σ_{i∈c} δ_ti² for C = 3 clusters
    alpha = 0.6
    direct = mixed_curvature(rows, w, alpha)
    st = LayerStats()
    for r, ww in zip(rows, w):
        st.add_rows(r)
        st.add_token_fisher("s", r, ww)
    via = mix_hessians(st.mean_hessian(), st.mean_fisher("s"), alpha)
    assert direct.shape == via.shape == (3, 12, 12)
    # same curvature up to one positive factor per call (the pruners are scale-free)
    ratio = direct.to(torch.float32) / via
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), rtol=1e-4)
    # one cluster is the shared token form
    one = mixed_curvature(rows, [ww.sum(dim=1, keepdim=True) for ww in w], alpha)[0]
    assert torch.allclose(one, mixed_curvature(rows, [ww.sum(dim=1) for ww in w], alpha))


def test_heads_are_detected_from_the_graph() -> None:
    model = tiny_llama(1)
    cap = capture(model, (), {"input_ids": torch.randint(0, 64, (2, 8))})
    sites = find_sites(cap.gm, model)
    got = row_clusters(cap.gm, sites, "heads")
    short = {k.split(".")[-2]: v for k, v in got.items()}
    assert short == {"q_proj": 4, "k_proj": 2, "v_proj": 2, "o_proj": 1, "gate_proj": 1, "up_proj": 1,
                     "down_proj": 1, "lm_head": 1}
    assert row_clusters(cap.gm, sites, 8)["model.layers.0.mlp.up_proj.weight"] == 8


def _objective_per_row(W, Wp, H, F_rows, alpha):
    """The true mixed objective Σ_i Δ_i (α H / c_h + (1 − α) d_out F_i / c_f) Δ_iᵀ with exact per-row F_i."""
    c_h = torch.diagonal(H).mean()
    c_f = torch.diagonal(F_rows.sum(0)).mean()
    total = 0.0
    for i in range(W.shape[0]):
        C = alpha * H / c_h + (1 - alpha) * W.shape[0] * F_rows[i] / c_f
        d = (W[i] - Wp[i]).to(torch.float64)
        total += float(d @ C.to(torch.float64) @ d)
    return total


@pytest.mark.parametrize("pattern", ["2:4", "0.5", "0.7"])
@pytest.mark.parametrize("base", ["sparsegpt", "optima"])
def test_row_aware_result_has_the_lower_true_mixed_objective(pattern: str, base: str) -> None:
    """Layers whose two row blocks weigh different tokens: pruning against each block's own Fisher
    gives a lower true (per-row) mixed objective than the row-shared Fisher does."""
    wins, total_row, total_shared = 0, 0.0, 0.0
    for seed in range(5):
        torch.manual_seed(seed)
        n, d_in, d_out = 256, 16, 8
        X = torch.randn(n, d_in) @ (torch.eye(d_in) + 0.4 * torch.randn(d_in, d_in))
        X[: n // 2, :4] *= 4  # the two halves of the tokens use different inputs
        X[n // 2:, 4:8] *= 4
        delta = torch.rand(n, d_out) * 0.02
        delta[: n // 2, : d_out // 2] += 1.0  # rows 0..3 care about the first half of the tokens
        delta[n // 2:, d_out // 2:] += 1.0  # rows 4..7 about the second half
        W = torch.randn(d_out, d_in)
        H = (X.T @ X / n).to(torch.float32)
        F_rows = torch.einsum("ti,ta,tb->iab", delta.square().double(), X.double(), X.double()) / n
        F_shared = F_rows.sum(0).float()
        F_clusters = torch.stack([F_rows[:4].sum(0), F_rows[4:].sum(0)]).float()
        alpha = 0.5
        shared, _ = prune_layer(W, H, pattern, method="moonshot", base=base, fisher=F_shared, alpha=alpha)
        rowwise, mask = prune_layer(W, H, pattern, method="moonshot", base=base, fisher=F_clusters, alpha=alpha)
        assert check_pattern(rowwise, parse_pattern(pattern))
        assert bool((rowwise[~mask] == 0).all())
        true_row = _objective_per_row(W, rowwise, H, F_rows, alpha)
        true_shared = _objective_per_row(W, shared, H, F_rows, alpha)
        wins += true_row <= true_shared
        total_row += true_row
        total_shared += true_shared
    # greedy OBS (SparseGPT, and OPTIMA's SparseGPT mask) is not optimal for its own objective,
    # so one seed may lose; in total and on most layers the row-aware objective is lower
    assert total_row < 0.99 * total_shared
    assert wins >= 4


@pytest.mark.parametrize("extra", [{"fisher": "row"}, {"fisher": "row", "fisher_labels": "model"},
                                   {"fisher": "row", "base": "optima"}, {"fisher": "row", "row_clusters": 4}])
def test_alpha_one_reproduces_the_base_bit_for_bit(extra: dict) -> None:
    cal = [{"input_ids": torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(b))} for b in range(2)]
    base = extra.get("base", "sparsegpt")
    ref = tiny_llama()
    moonshot_fx.sparsify(ref, calibration=cal, sparsity="2:4", method=base)
    got = tiny_llama()
    moonshot_fx.sparsify(got, calibration=cal, sparsity="2:4", method="moonshot", alpha=1.0, **{"base": base, **extra})
    for (n, a), b in zip(ref.state_dict().items(), got.state_dict().values()):
        assert torch.equal(a, b), n


def test_row_fisher_end_to_end_is_valid_and_differs_from_the_shared_form() -> None:
    cal = [{"input_ids": torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(b))} for b in range(2)]
    results = {}
    for labels in ("data", "model"):
        for fisher in ("token", "row"):
            m = tiny_llama()
            moonshot_fx.sparsify(m, calibration=cal, sparsity="2:4", method="moonshot", alpha=0.5, fisher=fisher,
                                 fisher_labels=labels)
            r = m.moonshot_report
            for s in r.sites:
                assert check_pattern(m.get_parameter(s.name).detach(), parse_pattern("2:4"))
            if fisher == "row":
                assert sorted(k.split(".")[-2] for k in r.row_clusters) == sorted(["k_proj", "q_proj", "v_proj"] * 2)
            results[(labels, fisher)] = m.get_parameter("model.layers.0.self_attn.q_proj.weight").detach().clone()
    assert not torch.equal(results[("data", "token")], results[("data", "row")])
    assert not torch.equal(results[("data", "row")], results[("model", "row")])
    # o_proj has one cluster: with the same (data) labels its first-layer result is the shared one
    again = tiny_llama()
    moonshot_fx.sparsify(again, calibration=cal, sparsity="2:4", method="moonshot", alpha=0.5, fisher="row",
                         fisher_labels="model")
    assert torch.equal(again.get_parameter("model.layers.0.self_attn.q_proj.weight"), results[("model", "row")])


def test_model_labels_cannot_be_combined_with_a_custom_loss() -> None:
    cal = [{"input_ids": torch.randint(0, 64, (2, 8))}]
    with pytest.raises(ConfigError, match="fisher_labels"):
        moonshot_fx.sparsify(tiny_llama(1), calibration=cal, sparsity="2:4", method="moonshot", alpha=0.5,
                             fisher_labels="model", loss_fn=lambda out, a, k: out.logits.sum(dim=(1, 2)))
    with pytest.raises(ConfigError, match="row_clusters"):
        moonshot_fx.SparsifyConfig(row_clusters=0)


def test_one_pass_row_fisher_mixes_as_the_sequential_pass_does() -> None:
    # The first block sees the dense inputs in both modes: the sequential pass forms H_mix per row
    # cluster in one product, the one-pass mode keeps H and the (C, d, d) Fisher apart and mixes
    # them in the pruner (as under torch.distributed). The same maths: the same layer-0 masks.
    cal = [{"input_ids": torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(b))} for b in range(2)]
    q = "model.layers.0.self_attn.q_proj.weight"
    out = {}
    for name, opts in {"seq": {"sequential": True}, "one": {"sequential": False}}.items():
        m = tiny_llama()
        moonshot_fx.sparsify(m, calibration=cal, sparsity="2:4", method="moonshot", alpha=0.5, fisher="row", **opts)
        out[name] = m.get_parameter(q).detach().clone()
    base = tiny_llama()
    moonshot_fx.sparsify(base, calibration=cal, sparsity="2:4", method="sparsegpt", sequential=False)
    assert ((out["seq"] != 0) == (out["one"] != 0)).float().mean() >= 0.99
    torch.testing.assert_close(out["one"], out["seq"], rtol=1e-3, atol=1e-4)
    assert ((out["one"] != 0) != (base.get_parameter(q) != 0)).any()  # the Fisher term is used
