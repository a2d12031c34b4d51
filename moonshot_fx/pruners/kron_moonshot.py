"""MOONSHOT with a Kronecker-factored Fisher (``fisher="kron"``): rows coupled through the loss.

The token-level empirical Fisher of a linear layer is ``Σ_t (δ_t δ_tᵀ) ⊗ (x_t x_tᵀ)`` (row-major
``vec``). The shared form keeps only its trace over outputs, ``I ⊗ F`` with
``F = Σ_t ‖δ_t‖² x_t x_tᵀ`` (every output row alike). The Kronecker factorisation that keeps
*both* partial traces exact is

    Σ_t (δ_t δ_tᵀ) ⊗ (x_t x_tᵀ)  ≈  G ⊗ F / S,    G = Σ_t ‖x_t‖² δ_t δ_tᵀ,   S = tr G = tr F,

(tracing out the inputs gives ``G``, tracing out the outputs gives ``F``), so ``G`` says which
*directions* of output error the loss sees: an error along a direction no gradient takes costs
nothing in the Taylor term. Each term normalised by its mean diagonal, the mixed curvature

    M = α · I ⊗ H/c_h + (1 − α) · G/c_g ⊗ F/c_f

is a sum of two Kronecker products, inverted exactly in its joint eigenbasis
(:class:`moonshot_fx.kron.KronSumInverse`: two eigendecompositions of ``d_in × d_in`` matrices and
one of ``d_out × d_out``).

How it prunes: the base selects the mask on the row-shared ``H_mix`` (SparseGPT's column-sequential
OBS or OPTIMA: for them the coupling changes the objective, not which greedy choice is cheap to
make), then the kept weights of *all rows together* are re-solved exactly under ``M``
(:func:`moonshot_fx.kron.kron_resolve`), so a pruned weight's error can be compensated by other
rows where the loss does not see the difference. The re-solve is kept only when it lowers the
mixed objective under ``M`` (it always should; the guard protects against an inexact solve).
Score-based bases (Wanda, magnitude) take the OBS saliency ``w_q² / [M⁻¹]_qq`` as their score and
no update. ``resolve=False`` (``kron_resolve=False`` through ``moonshot_prune``) skips the joint
re-solve: the per-block α search previews its candidates so (:mod:`moonshot_fx.passes.block_alpha`).
Cost per site: the eigendecompositions (``2·d_in³ + d_out³``), ``G`` in the backward
(``rows · d_out²``) and ``4·d_out·d_in·(d_out + d_in)`` flops per CG iteration.
"""
from __future__ import annotations

import torch

from ..config import Pattern
from ..kron import KronSumInverse, kron_objective, kron_resolve
from .moonshot import mix_hessians


def _normalised(x: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.float64)
    return x / torch.diagonal(x).mean().clamp_min(torch.finfo(torch.float64).tiny)


def kron_prune(weight: torch.Tensor, hessian: torch.Tensor, fisher: torch.Tensor, g: torch.Tensor,
               pattern: Pattern, alpha: float, base: str, *, resolve: bool = True,
               **options: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` (out × in) against the Kronecker-factored mixed curvature (module docstring)."""
    from ..masks import select_mask
    from . import get_pruner

    dampening = float(options.get("dampening", 0.01))  # type: ignore[arg-type]
    # M⁻¹ for M = α·I⊗Ĥ + (1 − α)·Ĝ⊗F̂ (hats: divided by their mean diagonal; Ĥ dampened inside)
    h, gg, f = _normalised(hessian), _normalised(g), _normalised(fisher)
    inverse = KronSumInverse.build(h, gg, f, alpha, 1.0 - alpha, damp=dampening)
    if base in ("wanda", "magnitude"):
        mask = select_mask(inverse.saliency(weight).to(torch.float32), pattern, scope="row")
        return weight * mask, mask
    shared, mask = get_pruner(base)(weight, mix_hessians(hessian, fisher, alpha), pattern, **options)
    if not resolve:  # a preview: the mask and the base pruner's weights only
        return shared.to(weight.dtype), mask
    resolved, _ = kron_resolve(weight, mask, inverse)
    before = kron_objective(weight - shared, h, gg, f, alpha, 1.0 - alpha)
    after = kron_objective(weight - resolved, h, gg, f, alpha, 1.0 - alpha)
    return (resolved if after <= before else shared).to(weight.dtype), mask
