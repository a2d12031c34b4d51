"""Dampened Cholesky factorisations of Hessians with bounded retries (pure functions).

Conventions: ``H`` is ``(..., d, d)`` symmetric positive semi-definite (leading dims batch several
Hessians). Dampening adds ``λ · mean(diag H)`` to the diagonal; on a Cholesky failure λ grows ×10
up to ``max_tries`` times, then :class:`~moonshot_fx.errors.LinalgError` is raised — never a silent
fallback to an identity inverse.
"""
from __future__ import annotations

import logging

import torch

from .errors import LinalgError

log = logging.getLogger(__name__)


def prepare_hessian(h: torch.Tensor, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy ``h`` as float64-safe fp32, give dead inputs (zero diagonal) a unit diagonal.

    Returns ``(H, dead)``; when ``weight`` is given its dead columns are zeroed in place
    (an input that is always zero carries no information, its weights are free to drop).
    """
    hh = h.to(torch.float32).clone()
    dead = torch.diagonal(hh, dim1=-2, dim2=-1) == 0
    if dead.any():
        torch.diagonal(hh, dim1=-2, dim2=-1)[dead] = 1.0
        if weight is not None:
            weight[..., dead] = 0
    return hh, dead


def damped_cholesky(h: torch.Tensor, dampening: float = 0.01, max_tries: int = 6) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor of ``H + λ·mean(diag H)·I`` with growing λ on failure.

    Returns ``(L, λ_used)``. Works on batches (leading dims). Raises LinalgError after ``max_tries``.
    """
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    scale = diag.mean(dim=-1, keepdim=True).clamp_min(torch.finfo(h.dtype).tiny)
    if not torch.isfinite(h).all():
        raise LinalgError("Hessian has non-finite entries (NaN/inf in calibration activations?).")
    lam = dampening
    for attempt in range(max_tries):
        damped = h.clone()  # H + λ·scale·I without a d×d identity (memory: one copy of H, not three)
        torch.diagonal(damped, dim1=-2, dim2=-1).add_(lam * scale)
        chol, info = torch.linalg.cholesky_ex(damped)
        del damped
        if not bool((info != 0).any()):
            if attempt:
                log.info("Cholesky succeeded after raising dampening to %.3g", lam)
            return chol, lam
        log.warning("Cholesky failed with dampening %.3g; retrying with %.3g", lam, lam * 10)
        lam *= 10
    raise LinalgError(
        f"Hessian of size {h.shape[-1]} is not positive definite even with dampening {lam / 10:.3g}; "
        "use more calibration data, a larger `dampening`, or exclude this layer."
    )


def inverse_cholesky_upper(h: torch.Tensor, dampening: float = 0.01, max_tries: int = 6) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of the dampened inverse Hessian, ``H⁻¹ = UᵀU`` (SparseGPT's Hinv).

    Row ``i`` of ``U`` divided by ``U[i, i]`` is the OBS update direction for eliminating input ``i``
    after inputs ``< i`` are fixed, which is what lets SparseGPT prune left-to-right in one pass.
    """
    chol, _ = damped_cholesky(h, dampening, max_tries)
    hinv = torch.cholesky_inverse(chol)
    del chol  # at most two d×d factors alive at once
    upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
    if bool((info != 0).any()):  # numerically possible for very ill-conditioned H
        raise LinalgError("inverse Hessian lost positive definiteness; raise `dampening`.")
    return upper


def damped_inverse(h: torch.Tensor, dampening: float = 0.01, max_tries: int = 6) -> torch.Tensor:
    """``(H + λ·mean(diag H)·I)⁻¹`` through a Cholesky factorisation (batched)."""
    chol, _ = damped_cholesky(h, dampening, max_tries)
    return torch.cholesky_inverse(chol)


def damped(h: torch.Tensor, dampening: float) -> torch.Tensor:
    """``H + λ·mean(diag H)·I`` (the matrix every pruner's objective actually uses)."""
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    return h + (dampening * diag.mean(dim=-1, keepdim=True)).unsqueeze(-1) * eye
