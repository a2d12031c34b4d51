"""Exact inverse of a sum of two Kronecker products, MOONSHOT's Kronecker-factored curvature.

For one linear layer with weight ``W`` (d_out × d_in) and ``Δ = W − Ŵ`` vectorised row-major
(``vec(Δ)`` stacks the rows, so a weight gradient ``δ xᵀ`` is ``δ ⊗ x``):

* reconstruction: ``tr(Δ H Δᵀ) = vec(Δ)ᵀ (I ⊗ H) vec(Δ)``, ``H = XᵀX``;
* Kronecker-factored Fisher: ``Σ_t (δ_t δ_tᵀ) ⊗ (x_t x_tᵀ) ≈ G ⊗ A``, ``G = E[δδᵀ]``, ``A = E[xxᵀ]``.

The mixed curvature ``M = a·(I ⊗ H) + b·(G ⊗ A)`` (``a = α/c_rec``, ``b = (1 − α)/c_tay``) is
(d_out·d_in)² — far too large to form — but it is diagonalised exactly by one congruence per
factor: with ``P = H^{-1/2} U`` where ``H^{-1/2} A H^{-1/2} = U Λ Uᵀ`` (so ``Pᵀ H P = I``,
``Pᵀ A P = Λ``) and ``G = Q Σ Qᵀ``,

    (Q ⊗ P)ᵀ M (Q ⊗ P) = diag(a + b σ_k λ_l),

hence ``M⁻¹ vec(X) = vec(Q [(Qᵀ X P) ⊘ D] Pᵀ)`` with ``D_kl = a + b σ_k λ_l``, and the diagonal of
``M⁻¹`` (what OBS saliencies need) is ``(Q∘Q) D^{-1} (P∘P)ᵀ``. Cost: two eigendecompositions
(d_out³ + 2·d_in³ flops) and matrix products; memory O(d_out² + d_in² + d_out·d_in). This is the
simultaneous-diagonalisation idea of The LLM Surgeon, written for our mixed objective.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import LinalgError


def _sym(x: torch.Tensor) -> torch.Tensor:
    return (x + x.T) / 2


@dataclass
class KronSumInverse:
    """``M⁻¹`` for ``M = a·(I ⊗ H) + b·(G ⊗ A)`` in its joint eigenbasis (see module docstring).

    Attributes:
        q: ``(d_out, d_out)`` eigenvectors of ``G``.
        p: ``(d_in, d_in)`` with ``Pᵀ H P = I`` and ``Pᵀ A P = diag(λ)``.
        d: ``(d_out, d_in)`` eigenvalues ``a + b σ_k λ_l`` of ``M`` in that basis.
    """

    q: torch.Tensor
    p: torch.Tensor
    d: torch.Tensor

    @classmethod
    def build(cls, hessian: torch.Tensor, g: torch.Tensor, a_factor: torch.Tensor, a: float, b: float,
              *, damp: float = 0.0) -> KronSumInverse:
        """Factor ``M`` (fp64). ``hessian`` and ``a_factor`` are ``d_in × d_in``, ``g`` is
        ``d_out × d_out``; ``damp`` adds ``damp·mean(diag H)·I`` to ``H`` (it must be positive
        definite). Raises :class:`LinalgError` when ``M`` is not positive definite."""
        h = _sym(hessian.to(torch.float64))
        if damp > 0:
            h = h + damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
        evals, evecs = torch.linalg.eigh(h)
        if float(evals.min()) <= 0:
            raise LinalgError("KronSumInverse: H is not positive definite; pass damp > 0 (e.g. 0.01).")
        h_isqrt = (evecs * evals.rsqrt()) @ evecs.T
        lam, u = torch.linalg.eigh(_sym(h_isqrt @ a_factor.to(torch.float64) @ h_isqrt))
        sigma, q = torch.linalg.eigh(_sym(g.to(torch.float64)))
        d = a + b * sigma.unsqueeze(1) * lam.unsqueeze(0)
        if float(d.min()) <= 0:
            raise LinalgError("KronSumInverse: a·(I⊗H) + b·(G⊗A) is not positive definite (G, A must be PSD, a > 0).")
        return cls(q=q, p=h_isqrt @ u, d=d)

    def to(self, dtype: torch.dtype) -> KronSumInverse:
        """The same factors cast to ``dtype`` (built in fp64; iterative solves may run in fp32)."""
        return KronSumInverse(q=self.q.to(dtype), p=self.p.to(dtype), d=self.d.to(dtype))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``M⁻¹ vec(x)`` as a ``(d_out, d_in)`` matrix, in the factors' dtype."""
        y = (self.q.T @ x.to(self.q.dtype) @ self.p) / self.d
        return self.q @ y @ self.p.T

    def diagonal(self) -> torch.Tensor:
        """``[M⁻¹]_{(i,j),(i,j)}`` for every weight, shaped ``(d_out, d_in)``."""
        return self.q.square() @ self.d.reciprocal() @ self.p.square().T

    def saliency(self, weight: torch.Tensor) -> torch.Tensor:
        """OBS cost of removing each weight alone (the others re-fitted): ``w² / (2 [M⁻¹]_qq)``."""
        return weight.to(torch.float64).square() / (2 * self.diagonal())

    def obs_update(self, weight: torch.Tensor, i: int, j: int) -> torch.Tensor:
        """The optimal change of all weights when ``weight[i, j]`` is set to zero (OBS):
        ``−w_q / [M⁻¹]_qq · M⁻¹ e_q``; ``weight + update`` has a zero at ``(i, j)``."""
        e = torch.zeros(self.d.shape, dtype=self.d.dtype)
        e[i, j] = 1.0
        col = self.apply(e)
        return -(float(weight[i, j]) / float(col[i, j])) * col


def kron_objective(delta: torch.Tensor, hessian: torch.Tensor, g: torch.Tensor, a_factor: torch.Tensor,
                   a: float, b: float) -> float:
    """``vec(Δ)ᵀ [a·(I ⊗ H) + b·(G ⊗ A)] vec(Δ) = a·tr(Δ H Δᵀ) + b·tr(G Δ A Δᵀ)`` (fp64)."""
    d = delta.to(torch.float64)
    first = float(((d @ hessian.to(torch.float64)) * d).sum())
    second = float(((g.to(torch.float64) @ d @ a_factor.to(torch.float64)) * d).sum())
    return a * first + b * second


def kron_resolve(weight: torch.Tensor, mask: torch.Tensor, inverse: KronSumInverse, *, tol: float = 1e-4,
                 max_iter: int = 300, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, int]:
    """The exact minimiser of ``vec(W − Ŵ)ᵀ M vec(W − Ŵ)`` with ``Ŵ = 0`` off ``mask``, where
    ``M⁻¹`` is ``inverse``: OPTIMA's re-solve, but with the rows coupled through ``M``.

    Dual (OBS) form: ``Ŵ = W − M⁻¹ Y`` with ``Y`` supported on the pruned set ``P`` and
    ``[M⁻¹ Y]_P = W_P``, solved by conjugate gradients on ``Y`` (each step one application of
    ``M⁻¹``: four matrix products), Jacobi-preconditioned by ``diag(M⁻¹)_P`` and started from the
    single-weight OBS multipliers ``W_P / diag(M⁻¹)_P``. Stops when the preconditioned residual
    is below ``tol`` relative to its start. Returns ``(Ŵ, iterations)``; ``Ŵ`` is exactly 0 on ``P``.

    The factors are built in fp64 (:meth:`KronSumInverse.build`); the iterations run in ``dtype``.
    Measured on SmolLM2's attention sites (14 sites, real statistics): fp32 to ``tol = 1e-4``
    loses at most 1e-5 of the objective decrease that an fp64 solve to 1e-9 reaches, at 0.41× the
    time of fp64 to 1e-5 (27 against 36 iterations, each half the cost).
    """
    inv = inverse.to(dtype)
    w = weight.to(dtype)
    pruned = (~mask.to(torch.bool)).to(dtype)
    diag = inv.diagonal().clamp_min(torch.finfo(dtype).tiny)
    wp = w * pruned
    start = float((wp * wp / diag).sum())
    if start == 0.0:  # nothing to remove: the weights already vanish on P
        return weight.clone(), 0
    y = wp / diag
    r = wp - inv.apply(y) * pruned
    z = r / diag
    direction = z.clone()
    rz = float((r * z).sum())
    it = 0
    while it < max_iter and rz > tol * tol * start:
        ap = inv.apply(direction) * pruned
        curv = float((direction * ap).sum())
        if not curv > 0:  # converged to rounding (or lost positive definiteness in low precision)
            break
        step = rz / curv
        y.add_(direction, alpha=step)
        r.sub_(ap, alpha=step)
        z = r / diag
        rz_new = float((r * z).sum())
        direction = z + (rz_new / rz) * direction
        rz = rz_new
        it += 1
    out = w - inv.apply(y)
    out[mask.logical_not()] = 0
    return out.to(weight.dtype), it
