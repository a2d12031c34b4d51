"""MOONSHOT: prune against a mix of the reconstruction and the Taylor/Fisher objectives.

For one site with dense weights ``W`` and pruned ``Ŵ`` (``Δ = W − Ŵ``):

* reconstruction error  ``f_rec = ‖XWᵀ − XŴᵀ‖² = tr(Δ H Δᵀ)``, ``H = XᵀX``;
* second-order Taylor term of the loss with the empirical Fisher as curvature, in the shared
  ``d_in × d_in`` form ``f_tay = tr(Δ F Δᵀ)`` (``F`` from :mod:`moonshot_fx.stats`).

Each term is normalised by the mean diagonal of its curvature (the cost of moving an average
input weight by one), so neither scale decides:

    f_mix = α · f_rec / c_rec + (1 − α) · f_tay / c_tay = tr(Δ H_mix Δᵀ),
    H_mix = α · H / c_rec + (1 − α) · F / c_tay.

Because ``f_mix`` keeps the quadratic shape of ``f_rec``, every Hessian-driven base pruner takes
``H_mix`` unchanged. ``α = 1`` hands the base pruner ``H`` itself (bit-identical results).

Score-based bases (Wanda, magnitude) can instead take the per-weight diagonal Fisher
``F_ij = Σ_t δ_ti² x_tj²`` (shaped like ``W``): the cost of removing ``W_ij`` alone is then
``W_ij² · (α H_jj / c_rec + (1 − α) F_ij / c_tay)``, with ``c_tay = mean(F)`` (which equals the
shared form's mean diagonal divided by the number of rows, so both kinds are on one scale), and
each output row weighs the loss by its own gradients instead of their sum over rows.
"""
from __future__ import annotations

import torch

from ..config import Pattern


def mix_hessians(hessian: torch.Tensor, fisher: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """``H_mix`` as above; ``alpha == 1`` (or no Fisher) returns ``hessian`` itself."""
    if fisher is None or alpha >= 1.0:
        return hessian
    h = hessian.to(torch.float32)
    f = fisher.to(torch.float32)
    c_f = torch.diagonal(f).mean().clamp_min(torch.finfo(torch.float32).tiny)
    if alpha <= 0.0:
        return f / c_f
    c_h = torch.diagonal(h).mean().clamp_min(torch.finfo(torch.float32).tiny)
    return alpha * (h / c_h) + (1.0 - alpha) * (f / c_f)


def quadratic_error(weight: torch.Tensor, pruned: torch.Tensor, curvature: torch.Tensor) -> float:
    """``tr(Δ C Δᵀ)`` with ``Δ = W − Ŵ``: reconstruction error for ``C = H``, Taylor term for ``C = F``."""
    if torch.float64 in (weight.dtype, pruned.dtype, curvature.dtype):
        delta = weight.to(torch.float64) - pruned.to(torch.float64)
        return float(((delta @ curvature.to(torch.float64)) * delta).sum())
    # fp32 product (fast GEMM), fp64 reduction: relative error ~1e-6, ample for comparisons
    delta = weight.to(torch.float32) - pruned.to(torch.float32)
    return float(((delta @ curvature.to(torch.float32)) * delta).sum(dtype=torch.float64))


def mixed_objective(weight: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor, fisher: torch.Tensor, alpha: float) -> float:
    """``f_mix`` of ``pruned`` (the quantity MOONSHOT minimises)."""
    return quadratic_error(weight, pruned, mix_hessians(hessian, fisher, min(alpha, 1.0 - 1e-12) if alpha >= 1 else alpha))


def moonshot_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: Pattern,
    *,
    fisher: torch.Tensor | None = None,
    weight_fisher: torch.Tensor | None = None,
    alpha: float = 0.75,
    base: str = "sparsegpt",
    **options: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the ``base`` pruner on ``H_mix``; returns ``(W_hat, mask)``.

    ``fisher`` is a shared ``d_in × d_in`` curvature; ``weight_fisher`` a per-weight diagonal shaped
    like ``weight`` (score-based bases only). They are told apart by name, never by shape: a square
    weight's per-weight Fisher has the Hessian's shape."""
    from . import get_pruner

    if weight_fisher is not None and float(alpha) < 1.0:
        return _prune_with_weight_fisher(weight, hessian, weight_fisher, pattern, float(alpha), base)
    return get_pruner(base)(weight, mix_hessians(hessian, fisher, float(alpha)), pattern, **options)


def mixed_saliency(weight: torch.Tensor, hessian: torch.Tensor, weight_fisher: torch.Tensor, alpha: float) -> torch.Tensor:
    """``W² · (α diag(H)/c_rec + (1 − α) F/c_tay)`` for a per-weight Fisher ``F`` (see module docstring)."""
    w2 = weight.to(torch.float32).square()
    f = weight_fisher.to(torch.float32)
    tiny = torch.finfo(torch.float32).tiny
    taylor = f / f.mean().clamp_min(tiny)
    if alpha <= 0.0:
        return w2 * taylor
    h = torch.diagonal(hessian).to(torch.float32).clamp_min(0)
    return w2 * (alpha * (h / h.mean().clamp_min(tiny)).unsqueeze(0) + (1.0 - alpha) * taylor)


def _prune_with_weight_fisher(weight: torch.Tensor, hessian: torch.Tensor, weight_fisher: torch.Tensor,
                              pattern: Pattern, alpha: float, base: str) -> tuple[torch.Tensor, torch.Tensor]:
    from ..errors import ConfigError
    from ..masks import select_mask

    if weight_fisher.shape != weight.shape:
        raise ConfigError(f"per-weight Fisher of shape {tuple(weight_fisher.shape)} does not match weight {tuple(weight.shape)}")
    if base not in ("wanda", "magnitude"):
        raise ConfigError(f"a per-weight Fisher (fisher='weight') works with base 'wanda' or 'magnitude', not {base!r}")
    mask = select_mask(mixed_saliency(weight, hessian, weight_fisher, alpha), pattern, scope="row")
    return weight * mask, mask
