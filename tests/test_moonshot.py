"""MOONSHOT's mixed objective on small layers with known X and gradients."""
import pytest
import torch

from moonshot_fx import prune_layer
from moonshot_fx.pruners import mix_hessians, mixed_objective


def _layer(seed=0, d=64, out=32, n=2048):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, d, generator=g) @ (torch.randn(d, d, generator=g) / d**0.5)) * torch.exp(torch.randn(d, generator=g))
    delta = torch.randn(n, out, generator=g) * torch.exp(torch.randn(n, 1, generator=g))  # output grads
    H = x.T @ x
    Fi = (x * delta.square().sum(1, keepdim=True)).T @ x  # token Fisher Xᵀdiag(‖δ_t‖²)X
    return torch.randn(out, d, generator=g), H, Fi


@pytest.mark.parametrize("base", ["sparsegpt", "wanda"])
@pytest.mark.parametrize("pattern", ["2:4", 0.5])
def test_alpha_one_reproduces_base(base, pattern):
    W, H, Fi = _layer()
    a, ma = prune_layer(W, H, pattern, method=base)
    b, mb = prune_layer(W, H, pattern, method="moonshot", base=base, fisher=Fi, alpha=1.0)
    assert torch.equal(ma, mb)
    assert torch.allclose(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("pattern", ["2:4", 0.5])
def test_mixed_objective_not_worse_than_either_extreme(seed, pattern):
    W, H, Fi = _layer(seed)
    alpha = 0.5
    mixed = prune_layer(W, H, pattern, method="moonshot", fisher=Fi, alpha=alpha)[0]
    rec_only = prune_layer(W, H, pattern, method="sparsegpt")[0]
    fisher_only = prune_layer(W, H, pattern, method="moonshot", fisher=Fi, alpha=0.0)[0]
    f = lambda w: mixed_objective(W, w, H, Fi, alpha)
    assert f(mixed) <= f(rec_only)
    assert f(mixed) <= f(fisher_only)


def test_mixing_normalises_each_term():
    _, H, Fi = _layer()
    mixed = mix_hessians(H, Fi * 1e6, 0.5)
    again = mix_hessians(H * 1e-3, Fi, 0.5)
    assert torch.allclose(mixed, again, rtol=1e-5)
    assert torch.diagonal(mixed).mean().item() == pytest.approx(1.0, rel=1e-5)
    assert mix_hessians(H, Fi, 1.0) is H


def _weight_fisher(seed=0, d=64, out=32, n=2048):
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(n, d, generator=g) * torch.exp(torch.randn(d, generator=g))
    delta = torch.randn(n, out, generator=g) * torch.exp(torch.randn(1, out, generator=g))  # rows differ in loss weight
    return x, delta, delta.square().T @ x.square()  # F_ij = Σ_t δ_ti² x_tj²


@pytest.mark.parametrize("out", [32, 64])  # 64: a square weight, whose per-weight Fisher has H's shape
@pytest.mark.parametrize("pattern", ["2:4", 0.5])
def test_per_weight_fisher_wanda_minimises_its_diagonal_cost(pattern, out):
    W, _, _ = _layer(3, out=out)
    x, delta, Fw = _weight_fisher(3, out=out)
    H = x.T @ x
    alpha = 0.5
    cost = lambda m: float((W.square() * (alpha * torch.diagonal(H) / torch.diagonal(H).mean()
                                          + (1 - alpha) * Fw / Fw.mean()) * (~m)).sum())
    _, mixed = prune_layer(W, H, pattern, method="moonshot", base="wanda", weight_fisher=Fw, alpha=alpha)
    _, wanda = prune_layer(W, H, pattern, method="wanda")
    _, taylor = prune_layer(W, H, pattern, method="moonshot", base="wanda", weight_fisher=Fw, alpha=0.0)
    assert cost(mixed) < cost(wanda) and cost(mixed) < cost(taylor)
    assert torch.equal(prune_layer(W, H, pattern, method="moonshot", base="wanda", weight_fisher=Fw, alpha=1.0)[1], wanda)
    # rows that share their gradient scale: the per-weight Fisher selects like the shared token form
    same = x.square().sum(0).expand_as(W)  # F_ij = Σ_t x_tj² for every row
    tok = x.T @ x  # the token form with ‖δ_t‖² = 1: diagonal Σ_t x_tj²
    assert torch.equal(prune_layer(W, H, pattern, method="moonshot", base="wanda", weight_fisher=same, alpha=0.3)[1],
                       prune_layer(W, H, pattern, method="moonshot", base="wanda", fisher=tok, alpha=0.3)[1])


def test_per_weight_fisher_refused_by_hessian_bases():
    from moonshot_fx import ConfigError, SparsifyConfig

    with pytest.raises(ConfigError, match="fisher='weight'"):
        SparsifyConfig(method="moonshot", base="sparsegpt", fisher="weight")
    SparsifyConfig(method="moonshot", base="wanda", fisher="weight")


@pytest.mark.parametrize("base, expected", [("wanda", "weight"), ("sparsegpt", "kron"), ("optima", "kron")])
def test_auto_fisher_kind_follows_the_base(base, expected):
    import torch.nn as nn

    import moonshot_fx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    batches = [torch.randn(8, 16) for _ in range(2)]
    moonshot_fx.sparsify(model, calibration=batches, sparsity="2:4", method="moonshot", base=base, alpha=0.5,
                         progress=False)
    assert model.moonshot_report.config["fisher"] == expected
    assert moonshot_fx.check_pattern(model[2].weight.detach(), "2:4")


@pytest.mark.parametrize("alpha, zero_fisher", [(0.0, False), (0.3, False), (0.75, False), (0.3, True)])
def test_mixed_curvature_in_one_product_equals_mixing_h_and_f(alpha, zero_fisher):
    from moonshot_fx.stats import mixed_curvature, squared_row_norms

    g = torch.Generator().manual_seed(3)
    rows = [torch.randn(200, 24, generator=g) * torch.linspace(0.1, 3.0, 24) for _ in range(3)]
    weights = [torch.rand(200, generator=g) ** 3 * (0.0 if zero_fisher else 1.0) for _ in range(3)]
    n = sum(r.shape[0] for r in rows)
    H = sum(r.double().T @ r.double() for r in rows) / n
    F = sum((r.double() * w.double()[:, None]).T @ r.double() for r, w in zip(rows, weights)) / n
    got = mixed_curvature(rows, weights, alpha)
    assert got.dtype == torch.float64
    norms = squared_row_norms(rows)  # what sites sharing an input pass in, computed once
    torch.testing.assert_close(torch.cat(norms), torch.cat(rows).double().square().sum(1))
    assert torch.equal(mixed_curvature(rows, weights, alpha, row_norms=norms), got)
    torch.testing.assert_close(got.float(), mix_hessians(H, F, alpha), rtol=2e-5, atol=1e-6)


def test_mixed_curvature_is_scale_free_where_xtx_would_overflow():
    """H_mix does not depend on the scale of X; formed in one product it stays finite and exact
    for activations whose XᵀX overflows float32 (the per-row scales are far below its range)."""
    from moonshot_fx.stats import mixed_curvature

    g = torch.Generator().manual_seed(5)
    rows = [torch.randn(100, 16, generator=g) for _ in range(2)]
    weights = [torch.rand(100, generator=g) for _ in range(2)]
    plain = mixed_curvature(rows, weights, 0.5)
    huge = mixed_curvature([r * 1e22 for r in rows], weights, 0.5)
    assert torch.isfinite(huge).all()
    torch.testing.assert_close(huge, plain, rtol=1e-5, atol=1e-7)
