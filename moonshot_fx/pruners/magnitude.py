"""Magnitude pruning: drop the smallest |W| (across the whole layer for unstructured patterns)."""
from __future__ import annotations

import torch

from ..config import Pattern
from ..masks import select_mask


def magnitude_prune(weight: torch.Tensor, hessian: torch.Tensor | None, pattern: Pattern, **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(W ⊙ mask, mask)``; the Hessian is ignored (magnitude needs no data)."""
    mask = select_mask(weight.abs(), pattern, scope="layer")
    return weight * mask, mask
