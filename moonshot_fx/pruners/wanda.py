"""Wanda: score ``|W_ij| · ‖X_j‖`` compared within each output row (Sun et al., 2023).

``‖X_j‖² = H_jj`` for ``H = XᵀX``, so Wanda needs only the Hessian's diagonal; MOONSHOT passes a
mixed Hessian here and the score becomes ``|W_ij| · sqrt(diag H_mix)_j``. No weight update.
"""
from __future__ import annotations

import torch

from ..config import Pattern
from ..masks import select_mask


def wanda_scores(weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """``|W| · sqrt(diag H)`` broadcast over rows."""
    diag = torch.diagonal(hessian).to(weight.dtype).clamp_min(0)
    return weight.abs() * diag.sqrt().unsqueeze(0)


def wanda_prune(weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern, **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(W ⊙ mask, mask)`` with Wanda's per-row (or per N:M group) selection."""
    mask = select_mask(wanda_scores(weight, hessian), pattern, scope="row")
    return weight * mask, mask
