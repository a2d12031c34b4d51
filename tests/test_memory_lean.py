"""The memory-lean forms of the statistics and scoring equal the plain formulas they replace."""
from __future__ import annotations

import torch

from moonshot_fx.pruners import moonshot as moonshot_pruner
from moonshot_fx.pruners.sparsegpt import sparsegpt_prune
from moonshot_fx.config import Pattern
from moonshot_fx.linalg import damped_cholesky
from moonshot_fx.stats import _add_by_rows_, _divided_to_fp32, accumulate_hessian, gram


def test_chunked_hessian_sum_and_mean_are_bit_identical() -> None:
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(300, 700, generator=g) * 3 for _ in range(3)]
    h = ref = None
    for x in xs:
        h = accumulate_hessian(h, x)
        u = gram(x).to(torch.float64)
        ref = u if ref is None else ref + u
    assert torch.equal(h, ref)
    w = torch.rand(300, generator=g)
    hw = accumulate_hessian(accumulate_hessian(None, xs[0], w), xs[1], w)
    refw = gram(xs[0] * w.sqrt().unsqueeze(1)).double() + gram(xs[1] * w.sqrt().unsqueeze(1)).double()
    assert torch.equal(hw, refw)
    assert torch.equal(_divided_to_fp32(h, 900), (h / 900).to(torch.float32))
    batched = torch.stack([h[:40, :40], h[40:80, 40:80]])
    assert torch.equal(_divided_to_fp32(batched, 7, rows_per_chunk=3), (batched / 7).to(torch.float32))
    acc = batched.clone()
    assert torch.equal(_add_by_rows_(acc, batched.float(), rows_per_chunk=5), batched + batched.float().double())


def test_dampening_in_place_equals_adding_the_identity() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 64, generator=g)
    for h in (x.T @ x, torch.stack([x[:100].T @ x[:100], x[100:].T @ x[100:]])):
        chol, lam = damped_cholesky(h, 0.01)
        scale = torch.diagonal(h, dim1=-2, dim2=-1).mean(dim=-1, keepdim=True)
        ref = torch.linalg.cholesky(h + (lam * scale).unsqueeze(-1) * torch.eye(64))
        assert torch.equal(chol, ref)


def test_row_chunked_quadratic_error_matches_one_product(monkeypatch) -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(256, 64, generator=g)
    H = x.T @ x / 256
    W = torch.randn(48, 64, generator=g)
    P, _ = sparsegpt_prune(W, H, Pattern(n=2, m=4))
    whole = moonshot_pruner.quadratic_error(W, P, H)
    zero = moonshot_pruner.quadratic_error(W, W.new_zeros(()).expand_as(W), H)
    monkeypatch.setattr(moonshot_pruner, "QUADRATIC_ERROR_CHUNK", 10 * 64)  # 10 rows per block, 5 blocks
    assert abs(moonshot_pruner.quadratic_error(W, P, H) - whole) <= 1e-5 * whole
    assert abs(zero - float(torch.einsum("ij,jk,ik->", W.double(), H.double(), W.double()))) <= 1e-5 * zero
    assert 0 < whole < zero  # SparseGPT keeps half the weights: far below pruning everything


def test_symmetric_quadratic_form_equals_the_full_product(monkeypatch) -> None:
    # the upper-block-triangle form (half the flops) against the fp64 full product, with blocks
    # that do not divide the width (16-wide blocks over 70 columns: 16, 16, 16, 16, 6)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 70, generator=g)
    C = x.T @ x / 200
    D = torch.randn(9, 70, generator=g)
    ref = float(torch.einsum("ij,jk,ik->", D.double(), C.double(), D.double()))
    monkeypatch.setattr(moonshot_pruner, "SYMMETRIC_BLOCK", 16)
    got = moonshot_pruner.symmetric_quadratic_form(D, C)
    assert abs(got - ref) <= 1e-5 * ref
    # an asymmetric C gives another value: the form does rely on (and only on) the symmetry
    A = C + torch.triu(torch.ones(70, 70), diagonal=1)
    full = float(((D.double() @ A.double()) * D.double()).sum())
    assert abs(moonshot_pruner.symmetric_quadratic_form(D, A) - full) > 1e-3 * abs(full)
