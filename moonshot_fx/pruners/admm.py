"""ADMM (ALPS-style, Meng et al., 2024): joint optimisation of the mask and the kept weights.

Problem
-------
For a layer ``W₀`` (out × d) and its dampened curvature ``C`` (``H = XᵀX``, or MOONSHOT's
``H_mix``; dampened like every other pruner: ``C = H + λ·mean(diag H)·I``) find

    min_{Ŵ}  f(Ŵ) = tr((W₀ − Ŵ) C (W₀ − Ŵ)ᵀ)     subject to  Ŵ ∈ 𝒫,

with ``𝒫`` the sparsity pattern: N:M along the input dimension, or an unstructured fraction
with the total ``round(s · numel)`` compared across the whole layer (the count SparseGPT's
block-adaptive mask also removes exactly). SparseGPT and OPTIMA fix the mask greedily and then
fit the weights; here the mask moves with the weights.

Splitting
---------
``min f(W) + ι_𝒫(Z)  s.t.  W = Z`` with the scaled dual ``U`` and penalty ``ρ``:

* W-update  ``W = (W₀ C + ρ (Z − U)) (C + ρI)⁻¹`` — with ``C = Q Λ Qᵀ`` eigendecomposed **once**
  (fp32: ``ρ ≥ 0.1·mean(diag C)`` is added to every eigenvalue, so the small ones' rounding does
  not matter; the final re-solve is float64-exact anyway), every update for any ``ρ`` is two GEMMs,
  ``W = ((W₀Q)Λ + ρ (Z − U) Q) · diag(1/(Λ + ρ)) · Qᵀ``;
* Z-update  ``Z = Π_𝒫(W + U)``: keep the largest ``|W + U|`` per N:M group (or over the layer);
* dual      ``U ← U + W − Z``.

``ρ`` is relative to the scale of ``C``: ``ρ_k = ρ₀ · mean(diag C) · growth^⌊k / every⌋``; as it
grows, ``W`` is pulled onto the pattern and the support freezes. Start: ``W = Z =`` SparseGPT's
solution, ``U = 0``. Finish: OPTIMA's exact row re-solve (:func:`.optima.reoptimize_rows`) on
the final support of ``Z``. Guard: the result is kept only where its (dampened) objective is
≤ SparseGPT's — per row for N:M (rows are independent patterns), for the whole layer otherwise.

Schedule (defaults ``iterations=20, rho0=0.1, growth=1.3, every=2``, so ``ρ`` ends at
``≈ 1.06 · mean(diag C)``): chosen on real SmolLM2-135M layer Hessians (blocks 2/15/28, q/o/gate/
down, 16 × 512 wikitext2 tokens; docs/method.md, "ADMM"). Objective relative to SparseGPT's at
2:4: OPTIMA 0.69–0.86, this schedule 0.63–0.87 (mean ≈ 0.09 below OPTIMA), 60 iterations
(``every=3``) only ≈ 0.005 lower at 3× the iterations; ``rho0`` 0.03 / 0.3 lose 0.01–0.11 on
some layers and 0.01 stalls at SparseGPT's mask (ρ too small: W jumps to the dense solution and
the projection then picks a magnitude mask that the guard rejects). Cost per site: one ``eigh``
of ``C``, ``2 · iterations`` GEMMs ``(out × d) @ (d × d)``, SparseGPT's pass and OPTIMA's
re-solve — on 576 → 1536 (down_proj) 1.6 s of single-thread CPU against SparseGPT's 0.1 s.
"""
from __future__ import annotations

import torch

from ..config import Pattern
from ..errors import ConfigError
from ..linalg import damped, damped_cholesky, prepare_hessian
from ..masks import nm_mask, prune_lowest
from .optima import reoptimize_rows
from .sparsegpt import sparsegpt_prune


def project(V: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Keep-mask of the Euclidean projection of ``V`` onto ``pattern``: the largest ``|V|`` per
    N:M group along the input dimension, or the lowest ``round(s · numel)`` of the layer pruned."""
    score = V.abs()
    if pattern.is_nm:
        return nm_mask(score, pattern.n, pattern.m)
    return prune_lowest(score, round(pattern.sparsity * V.numel()))


def _row_objective(W0: torch.Tensor, W: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    D = W0 - W
    return ((D @ C) * D).sum(dim=1, dtype=torch.float64)


def admm_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: Pattern,
    *,
    dampening: float = 0.01,
    blocksize: int = 128,
    iterations: int = 20,
    rho0: float = 0.1,
    growth: float = 1.3,
    every: int = 2,
    hinv_upper: torch.Tensor | None = None,
    solver: str = "auto",
    tol: float = 1e-5,
    eig_dtype: torch.dtype = torch.float32,
    baseline: str = "sparsegpt",
    **_: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` (out × d) against ``hessian`` (d × d) by ADMM; returns ``(Ŵ, mask)``.

    Args:
        weight: dense ``(out, d)`` weight.
        hessian: ``(d, d)`` curvature (``XᵀX`` or ``H_mix``), dampened here by ``dampening``.
        pattern: N:M (along the input dimension) or an unstructured fraction (layer-wide count).
        iterations: ADMM iterations (0: SparseGPT's mask, re-solved exactly).
        rho0: initial penalty relative to ``mean(diag C)``.
        growth, every: ``ρ`` is multiplied by ``growth`` every ``every`` iterations.
        hinv_upper: SparseGPT's precomputed inverse factor for the warm start (shared inputs).
        solver, tol: OPTIMA's final re-solve (see :func:`.optima.reoptimize_rows`).

    Returns:
        ``(Ŵ, mask)`` shaped like ``weight``; ``mask`` True where kept, ``Ŵ`` zero elsewhere.
    """
    W0 = weight.detach().to(torch.float32).clone()
    H, dead = prepare_hessian(hessian.detach(), W0)  # zeroes W0's dead columns
    w_sg, m_sg = sparsegpt_prune(W0, hessian, pattern, blocksize=blocksize, dampening=dampening,
                                 hinv_upper=hinv_upper)
    w_sg = w_sg.to(torch.float32)
    if baseline == "optima":  # SparseGPT's mask re-solved exactly: start and guard
        w_sg = reoptimize_rows(W0, hessian, m_sg, start=w_sg, dampening=dampening, solver=solver,
                               tol=tol).to(torch.float32)
    elif baseline != "sparsegpt":
        raise ConfigError(f"unknown ADMM baseline {baseline!r}: choose 'optima' or 'sparsegpt'.")
    rows, d = W0.shape
    if rows == 0 or d == 0:
        return w_sg.to(weight.dtype), m_sg
    H64 = H.to(torch.float64)
    _, lam = damped_cholesky(H64, dampening)
    C64 = damped(H64, lam)
    mask, start = m_sg, w_sg
    if iterations > 0:
        lam_c, Q = torch.linalg.eigh(C64.to(eig_dtype))
        Q = Q.to(torch.float32)
        lam_c = lam_c.to(torch.float32).clamp_min(0)
        A = (W0 @ Q) * lam_c                              # W₀ C Q = (W₀ Q) Λ
        scale = float(torch.diagonal(C64).mean())
        Z = w_sg.clone()
        U = torch.zeros_like(Z)
        for k in range(iterations):
            rho = rho0 * scale * growth ** (k // every)
            W = ((A + rho * ((Z - U) @ Q)) / (lam_c + rho)) @ Q.T
            V = W + U
            mask = project(V, pattern)
            mask[:, dead] = False
            Z = V * mask
            U = V - Z
        mask = mask.clone()
        start = Z
    if baseline == "optima" and bool(torch.equal(mask, m_sg)):  # already re-solved on this mask
        w_hat = w_sg.clone()
    else:
        w_hat = reoptimize_rows(W0, hessian, mask, start=start, dampening=dampening, solver=solver,
                                tol=tol).to(torch.float32)
    # guard against the warm start: never worse than SparseGPT under the (dampened) objective
    C32 = C64.to(torch.float32)
    err_new = _row_objective(W0, w_hat, C32)
    err_sg = _row_objective(W0, w_sg, C32)
    if pattern.is_nm:
        worse = err_new > err_sg
        if bool(worse.any()):
            w_hat[worse], mask[worse] = w_sg[worse], m_sg[worse]
    elif float(err_new.sum()) > float(err_sg.sum()):
        w_hat, mask = w_sg, m_sg
    w_hat = w_hat * mask
    return w_hat.to(weight.dtype), mask


__all__ = ["admm_prune", "project"]
