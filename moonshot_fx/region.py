"""Region reconstruction maths: refit one pruned matrix, mask fixed, to a dense region target.

A *region* is a sub-block of a repeated block whose output is the output of one matrix (its
*end*): attention ends at ``o_proj``, an MLP at ``down_proj``, a CNN residual branch at its last
conv. After the block is pruned, the end matrix ``W`` (pruned: ``Ŵ``, mask ``M``) sees inputs
``X_p`` (rows, from the pruned model), while the dense region, fed the *same* sub-block inputs,
produced ``Y = X_d W_dᵀ`` at that point (``X_d``: the end's input inside the dense region, ``W_d``:
its dense weight; the bias is the same on both sides and cancels). The refit is the masked
least-squares problem, row by row,

    min_{ŵ_r : ŵ_r = 0 off M_r}  ‖X_p ŵ_r − X_d w_d,r‖² + λ·mean(diag H)·‖ŵ_r‖²,     H = X_pᵀX_p,

whose solution on the kept support S is ``ŵ_S = (H + λ̄I)_SS⁻¹ (K w_d)_S`` with ``K = X_pᵀX_d``.
With ``w* = (H + λ̄I)⁻¹ K w_d`` (the unconstrained solution) the objective equals
``(ŵ − w*)ᵀ(H + λ̄I)(ŵ − w*) + const``, which is exactly what OPTIMA's exact row re-solve under a
fixed mask minimises (:func:`moonshot_fx.pruners.optima.reoptimize_rows`): it is reused as is,
guard included (no row ends worse than the pruned one on the fit rows).

Whether the refit is kept is decided on held-out rows (:func:`refit_with_holdout`): the region
error ``‖X_p Ŵᵀ − X_d W_dᵀ‖²`` on rows the fit never saw must drop, else the pruned weights stay.
Pure tensor functions; the graph plumbing is :mod:`moonshot_fx.passes.region`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .linalg import damped_cholesky, prepare_hessian
from .pruners.optima import reoptimize_rows
from .stats import ACC_DTYPE, MATMUL_DTYPE, accumulate_hessian


@dataclass
class RegionFit:
    """Outcome of one matrix's region refit."""

    weight: torch.Tensor  #: the weights to use: the refit when ``kept``, else the pruned ones
    kept: bool
    #: held-out region error ``‖X_p Wᵀ − X_d W_dᵀ‖² / ‖X_d W_dᵀ‖²`` of the pruned weights and of
    #: the refit (also when it was reverted)
    holdout_before: float
    holdout_refit: float

    @property
    def holdout_after(self) -> float:
        """Held-out region error of :attr:`weight` (never above :attr:`holdout_before`)."""
        return self.holdout_refit if self.kept else self.holdout_before


def cross_stats(rows_p: Sequence[torch.Tensor], rows_d: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H, K) = (Σ X_pᵀX_p, Σ X_pᵀX_d)`` over aligned row batches, accumulated in float64."""
    H: torch.Tensor | None = None
    K: torch.Tensor | None = None
    for p, d in zip(rows_p, rows_d, strict=True):
        if p.shape != d.shape:
            raise ValueError(f"pruned and dense rows must align, got {tuple(p.shape)} and {tuple(d.shape)}")
        H = accumulate_hessian(H, p)
        k = (p.to(MATMUL_DTYPE).T @ d.to(MATMUL_DTYPE)).to(ACC_DTYPE)
        K = k if K is None else K.add_(k)
    if H is None or K is None:
        raise ValueError("cross_stats needs at least one batch of rows")
    return H, K


def masked_refit(pruned: torch.Tensor, dense: torch.Tensor, H: torch.Tensor, K: torch.Tensor, *,
                 dampening: float = 0.01, solver: str = "auto") -> torch.Tensor:
    """The masked least-squares refit of the module docstring.

    Args:
        pruned: ``(out, d)`` pruned weights ``Ŵ``; their non-zeros are the mask (kept fixed).
        dense: ``(out, d)`` dense weights ``W_d`` (the target is ``X_d W_dᵀ``).
        H: ``(d, d)`` ``X_pᵀX_p``; K: ``(d, d)`` ``X_pᵀX_d`` (sums or means, the same scale).
        dampening: relative ridge λ (``λ·mean(diag H)``, grown ×10 on a Cholesky failure).
        solver: OPTIMA's row solver (``"auto"``, ``"cholesky"``, ``"cg"``).

    Returns:
        The refit weights, zero off the mask, never worse than ``pruned`` row by row on the fit
        objective (OPTIMA's guard).
    """
    mask = pruned != 0
    Hp, _ = prepare_hessian(H)
    H64 = Hp.to(torch.float64)
    chol, _ = damped_cholesky(H64, dampening)  # the λ reoptimize_rows will find for the same H
    rhs = K.to(torch.float64) @ dense.to(torch.float64).T  # (d, out): X_pᵀ Y
    target = torch.cholesky_solve(rhs, chol).T.to(torch.float32)  # w*, the unconstrained solution
    return reoptimize_rows(target, H, mask, start=pruned.to(torch.float32), dampening=dampening,
                           solver=solver).to(pruned.dtype)


def region_error(rows_p: Sequence[torch.Tensor], rows_d: Sequence[torch.Tensor], weight: torch.Tensor,
                 dense: torch.Tensor) -> tuple[float, float]:
    """``(‖X_p Wᵀ − X_d W_dᵀ‖², ‖X_d W_dᵀ‖²)`` summed over the row batches (float64 sums)."""
    err, norm = 0.0, 0.0
    W, Wd = weight.to(MATMUL_DTYPE), dense.to(MATMUL_DTYPE)
    for p, d in zip(rows_p, rows_d, strict=True):
        y = d.to(MATMUL_DTYPE) @ Wd.T
        err += float((p.to(MATMUL_DTYPE) @ W.T - y).double().pow(2).sum())
        norm += float(y.double().pow(2).sum())
    return err, norm


def refit_with_holdout(pruned: torch.Tensor, dense: torch.Tensor,
                       fit_p: Sequence[torch.Tensor], fit_d: Sequence[torch.Tensor],
                       hold_p: Sequence[torch.Tensor], hold_d: Sequence[torch.Tensor], *,
                       dampening: float = 0.01) -> RegionFit:
    """Refit ``pruned`` on the fit rows; keep it only where the held-out region error drops.

    ``fit_p``/``fit_d`` (and ``hold_p``/``hold_d``) are aligned ``(rows, d)`` input batches of the
    end matrix in the pruned model and in the dense region. Returns a :class:`RegionFit` whose
    held-out error after is never above the one before (the refit is reverted otherwise).
    """
    H, K = cross_stats(fit_p, fit_d)
    refit = masked_refit(pruned, dense, H, K, dampening=dampening)
    before, norm = region_error(hold_p, hold_d, pruned, dense)
    after, _ = region_error(hold_p, hold_d, refit, dense)
    scale = norm if norm > 0 else 1.0
    kept = after < before
    return RegionFit(weight=refit if kept else pruned, kept=kept, holdout_before=before / scale,
                     holdout_refit=after / scale)


__all__ = ["RegionFit", "cross_stats", "masked_refit", "refit_with_holdout", "region_error"]
