"""ADMM (method="admm"): objective orderings against SparseGPT/OPTIMA, pattern validity, an
enumerated 2:4 optimum, MOONSHOT's mixed curvature and the end-to-end sparsify path."""
from __future__ import annotations

import itertools

import pytest
import torch

import moonshot_fx
from moonshot_fx.config import parse_pattern
from moonshot_fx.linalg import damped
from moonshot_fx.pruners import get_pruner, mix_hessians, mixed_objective, prune_layer
from moonshot_fx.pruners.admm import admm_prune
from moonshot_fx.pruners.moonshot import prune_row_clusters
from moonshot_fx.pruners.optima import reoptimize_rows
from moonshot_fx.pruners.sparsegpt import sparsegpt_prune


def objective(w: torch.Tensor, w_hat: torch.Tensor, c: torch.Tensor) -> float:
    d = (w - w_hat).double()
    return float(((d @ c.double()) * d).sum())


def correlated_layer(seed: int, n: int = 64, d: int = 32, out: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """X with strongly correlated columns (rank 4 plus 0.3 noise); returns (W, H = XᵀX)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g) @ torch.randn(4, d, generator=g) + 0.3 * torch.randn(n, d, generator=g)
    return torch.randn(out, d, generator=g), x.T @ x


@pytest.mark.parametrize("pattern", ["50%", "70%", "2:4"])
@pytest.mark.parametrize("seed", range(4))
def test_beats_sparsegpt_and_optima_on_its_mask(pattern: str, seed: int) -> None:
    w, h = correlated_layer(seed)
    pat = parse_pattern(pattern)
    c = damped(h.double(), 0.01)  # the objective every pruner minimises
    w_sg, m_sg = sparsegpt_prune(w, h, pat)
    w_opt = reoptimize_rows(w, h, m_sg, start=w_sg)
    w_admm, mask = admm_prune(w, h, pat)
    assert moonshot_fx.check_pattern(w_admm, pattern)
    assert torch.equal(w_admm != 0, mask & (w_admm != 0)) and not bool(w_admm[~mask].any())
    if not pat.is_nm:
        assert int((~mask).sum()) == round(pat.sparsity * w.numel())
    e_admm, e_opt, e_sg = objective(w, w_admm, c), objective(w, w_opt, c), objective(w, w_sg, c)
    assert e_admm <= e_opt * (1 + 1e-6)
    assert e_admm < e_sg
    # mask changes are real: on these layers ADMM moves away from SparseGPT's mask and gains ≥ 1 %
    assert e_admm <= 0.99 * e_opt


def _best_row(w: torch.Tensor, c: torch.Tensor) -> float:
    """Brute force over every 2:4 mask of one row (exact weights on each support)."""
    d = w.numel()
    groups = [list(itertools.combinations(range(g * 4, g * 4 + 4), 2)) for g in range(d // 4)]
    best = float("inf")
    for combo in itertools.product(*groups):
        s = [i for pair in combo for i in pair]
        p = [i for i in range(d) if i not in s]
        w_hat = torch.zeros(d, dtype=torch.float64)
        w_hat[s] = w[s] + torch.linalg.solve(c[s][:, s], c[s][:, p] @ w[p])
        delta = w - w_hat
        best = min(best, float(delta @ c @ delta))
    return best


def test_enumerated_two_four_optimum() -> None:
    """2 rows × 8 inputs: rows decouple under a row-shared C, so the optimum is the sum of each
    row's best of 6² masks. ADMM is a heuristic for this combinatorial problem: on inputs with
    AR(0.7)-correlated columns it finds the optimum on 18 of these 20 seeds (OPTIMA on
    SparseGPT's mask: 8), and it is never worse than OPTIMA."""
    pat = parse_pattern("2:4")
    hits = hits_optima = 0
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(64, 8, generator=g)
        x = z.clone()
        for j in range(1, 8):
            x[:, j] = 0.7 * x[:, j - 1] + 0.51 ** 0.5 * z[:, j]
        h, w = x.T @ x, torch.randn(2, 8, generator=g)
        c = damped(h.double(), 0.01)
        best = sum(_best_row(w[i].double(), c) for i in range(2))
        w_sg, m_sg = sparsegpt_prune(w, h, pat)
        e_opt = objective(w, reoptimize_rows(w, h, m_sg, start=w_sg), c)
        w_admm, _ = admm_prune(w, h, pat)
        assert moonshot_fx.check_pattern(w_admm, "2:4")
        e = objective(w, w_admm, c)
        assert e >= best * (1 - 1e-9)  # the enumeration is the true optimum
        assert e <= e_opt * (1 + 1e-6)
        hits += e <= best * (1 + 1e-6)
        hits_optima += e_opt <= best * (1 + 1e-6)
    assert hits >= 17 and hits > hits_optima


def test_optima_baseline_guard_is_never_worse_than_optima() -> None:
    """baseline='optima' starts from and guards against SparseGPT's mask re-solved exactly."""
    pat = parse_pattern("2:4")
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(32, 3, generator=g) @ torch.randn(3, 8, generator=g) + torch.randn(32, 8, generator=g)
        h, w = x.T @ x, torch.randn(4, 8, generator=g)
        c = damped(h.double(), 0.01)
        w_sg, m_sg = sparsegpt_prune(w, h, pat)
        e_opt = objective(w, reoptimize_rows(w, h, m_sg, start=w_sg), c)
        w_admm, _ = admm_prune(w, h, pat, baseline="optima")
        assert objective(w, w_admm, c) <= e_opt * (1 + 1e-6)


def test_mixed_curvature_and_row_clusters() -> None:
    w, h = correlated_layer(0)
    _, f = correlated_layer(1)
    pat = parse_pattern("2:4")
    h_mix = mix_hessians(h, f, 0.5)
    w_sg, _ = get_pruner("moonshot")(w, h, pat, fisher=f, alpha=0.5, base="sparsegpt")
    w_admm, _ = get_pruner("moonshot")(w, h, pat, fisher=f, alpha=0.5, base="admm")
    assert torch.equal(w_admm, admm_prune(w, h_mix, pat)[0])  # the base runs on H_mix as is
    assert mixed_objective(w, w_admm, h, f, 0.5) < mixed_objective(w, w_sg, h, f, 0.5)
    # per-cluster curvature (fisher="row"): one ADMM per block of rows, each a valid pattern
    f3 = torch.stack([f, correlated_layer(2)[1]])
    for sp in ("2:4", "50%"):
        w3, _ = prune_layer(w, mix_hessians(h, f3, 0.5), sp, method="moonshot", fisher=None, alpha=1.0, base="admm")
        assert moonshot_fx.check_pattern(w3, sp)
        ref, _ = prune_row_clusters(w, mix_hessians(h, f3, 0.5), parse_pattern(sp), "admm")
        assert torch.equal(w3, ref)


def test_sparsify_end_to_end_and_config() -> None:
    transformers = pytest.importorskip("transformers")
    from moonshot_fx.config import SparsifyConfig, default_sequential_unit

    assert default_sequential_unit(SparsifyConfig(method="admm")) == "group"
    assert default_sequential_unit(SparsifyConfig(method="moonshot", base="admm")) == "group"
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(cfg).eval()
    cal = [{"input_ids": torch.randint(0, 64, (4, 16))} for _ in range(2)]
    moonshot_fx.sparsify(model, calibration=cal, sparsity="2:4", method="admm", progress=False)
    pruned = [p for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n and "lm_head" not in n]
    assert len(pruned) == 7
    for p in pruned:
        assert moonshot_fx.check_pattern(p, "2:4")
        assert float((p == 0).float().mean()) >= 0.5
