"""The Kronecker-sum inverse against dense linear algebra on small shapes."""
from __future__ import annotations

import pytest
import torch

from moonshot_fx.errors import LinalgError
from moonshot_fx.kron import KronSumInverse


def _problem(d_out: int = 5, d_in: int = 7, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(40, d_in, generator=g, dtype=torch.float64)
    x[:, 1] = x[:, 0] + 0.1 * x[:, 1]  # correlated inputs
    delta = torch.randn(40, d_out, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2.0, d_out)
    h = x.T @ x
    a_factor = (x * x.square().sum(1, keepdim=True).sqrt()).T @ x / 40  # another PSD input factor
    g_factor = delta.T @ delta / 40
    return h, g_factor, a_factor


def _dense(h: torch.Tensor, g: torch.Tensor, a_factor: torch.Tensor, a: float, b: float) -> torch.Tensor:
    eye = torch.eye(g.shape[0], dtype=torch.float64)
    return a * torch.kron(eye, h) + b * torch.kron(g, a_factor)


@pytest.mark.parametrize("alpha", [1.0, 0.75, 0.3])
def test_inverse_diagonal_and_saliency_equal_the_dense_computation(alpha: float) -> None:
    h, g, af = _problem()
    a, b = alpha / float(torch.diagonal(h).mean()), (1 - alpha) / float(torch.diagonal(af).mean() * torch.diagonal(g).mean())
    inv = KronSumInverse.build(h, g, af, a, b)
    dense_inv = torch.linalg.inv(_dense(h, g, af, a, b))
    x = torch.randn(5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    got = inv.apply(x).reshape(-1)
    want = dense_inv @ x.reshape(-1)  # row-major vec
    assert float((got - want).norm() / want.norm()) <= 1e-5
    diag = torch.diagonal(dense_inv).reshape(5, 7)
    assert float(((inv.diagonal() - diag).abs() / diag).max()) <= 1e-5
    w = torch.randn(5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(inv.saliency(w), w.square() / (2 * diag), rtol=1e-5, atol=0)


def test_obs_update_is_the_constrained_minimiser() -> None:
    """Zeroing one weight with the OBS update costs exactly its saliency, and no other change of
    the remaining weights costs less (checked against the dense constrained least squares)."""
    h, g, af = _problem(4, 6, seed=1)
    a, b = 0.5 / float(torch.diagonal(h).mean()), 0.5
    inv = KronSumInverse.build(h, g, af, a, b)
    m = _dense(h, g, af, a, b)
    w = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    i, j = 2, 3
    upd = inv.obs_update(w, i, j)
    assert abs(float((w + upd)[i, j])) < 1e-10
    v = upd.reshape(-1)
    cost = float(v @ m @ v) / 2
    assert cost == pytest.approx(float(inv.saliency(w)[i, j]), rel=1e-8)
    # brute force: minimise ½ vᵀMv over v with v_q = −w_q (eliminate q, solve the rest)
    q = i * 6 + j
    keep = [k for k in range(24) if k != q]
    rest = torch.linalg.solve(m[keep][:, keep], m[keep][:, q] * float(w[i, j]))
    full = torch.zeros(24, dtype=torch.float64)
    full[q] = -float(w[i, j])
    full[keep] = rest
    torch.testing.assert_close(full, v, rtol=1e-7, atol=1e-9)


def test_pure_reconstruction_reduces_to_row_shared_obs() -> None:
    """b = 0: M⁻¹ = I ⊗ H⁻¹/a, the saliency SparseGPT/OBS use (w² / 2[H⁻¹]_jj · a)."""
    h, g, af = _problem()
    inv = KronSumInverse.build(h, g, af, 2.0, 0.0)
    hinv = torch.linalg.inv(h)
    torch.testing.assert_close(inv.diagonal(), torch.diagonal(hinv).expand(5, 7) / 2.0, rtol=1e-8, atol=0)


def test_singular_hessian_needs_damping() -> None:
    h, g, af = _problem()
    h = h.clone()
    h[:, 0] = 0
    h[0, :] = 0
    with pytest.raises(LinalgError, match="damp"):
        KronSumInverse.build(h, g, af, 1.0, 1.0)
    KronSumInverse.build(h, g, af, 1.0, 1.0, damp=0.01)
