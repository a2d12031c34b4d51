"""Pruners: pure functions ``(weight (out, in), hessian (in, in), pattern, **options) -> (Ŵ, mask)``.

The registry maps method names to these functions; :func:`prune_layer` is the public entry point
for a single layer. Conv weights are pruned on their ``(out, in·kh·kw)`` view.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..config import PatternLike, parse_pattern
from ..errors import ConfigError, PatternError
from ..masks import as_matrix
from .magnitude import magnitude_prune
from .moonshot import cluster_quadratic_error, mix_hessians, mixed_objective, moonshot_prune, quadratic_error
from .sparsegpt import sparsegpt_prune
from .wanda import wanda_prune

PrunerFn = Callable[..., "tuple[torch.Tensor, torch.Tensor]"]


def _optima(*args: object, **kwargs: object) -> "tuple[torch.Tensor, torch.Tensor]":
    from .optima import optima_prune

    return optima_prune(*args, **kwargs)


def _admm(*args: object, **kwargs: object) -> "tuple[torch.Tensor, torch.Tensor]":
    from .admm import admm_prune

    return admm_prune(*args, **kwargs)


PRUNERS: dict[str, PrunerFn] = {
    "magnitude": magnitude_prune,
    "wanda": wanda_prune,
    "sparsegpt": sparsegpt_prune,
    "optima": _optima,
    "admm": _admm,
    "moonshot": moonshot_prune,
}


def get_pruner(method: str) -> PrunerFn:
    """The pruner function registered as ``method``."""
    try:
        return PRUNERS[method]
    except KeyError:
        raise ConfigError(f"unknown pruning method {method!r}: choose one of {', '.join(PRUNERS)}.") from None


def prune_layer(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    sparsity: PatternLike,
    method: str = "sparsegpt",
    **options: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune one weight against its input Hessian ``H = XᵀX``.

    Args:
        weight: ``(out, in)`` (or a conv kernel ``(out, in, kh, kw)``, pruned on its 2-D view).
        hessian: ``(in·kh·kw, in·kh·kw)``; may be None only for ``magnitude``.
        sparsity: fraction in [0, 1), ``"50%"``, or ``"2:4"``-style N:M pattern.
        method: ``magnitude``, ``wanda``, ``sparsegpt``, ``optima``, ``admm`` or ``moonshot``.
        **options: ``dampening``, ``blocksize``; for ``moonshot``: ``fisher``, ``alpha``, ``base``;
            for ``optima``: ``mask_from``;
            for ``admm``: ``iterations``, ``rho0``, ``growth``, ``every``.

    Returns:
        ``(pruned_weight, mask)`` shaped like ``weight``; ``mask`` is True where kept.
    """
    pattern = parse_pattern(sparsity)
    fn = get_pruner(method)
    w2 = as_matrix(weight.detach())
    if hessian is None and method != "magnitude":
        raise ConfigError(f"method {method!r} needs the input Hessian XᵀX; only 'magnitude' works without data.")
    square = (w2.shape[1], w2.shape[1])
    clustered = hessian is not None and method == "moonshot" and hessian.dim() == 3 and hessian.shape[1:] == square
    if hessian is not None and hessian.shape != square and not clustered:
        raise ConfigError(f"hessian shape {tuple(hessian.shape)} does not match weight inputs {w2.shape[1]}")
    if pattern.is_nm and w2.shape[1] % pattern.m:
        raise PatternError(
            f"{pattern} sparsity needs in_features divisible by {pattern.m}; this weight has "
            f"{w2.shape[1]}: exclude it or give it an unstructured override."
        )
    new, mask = fn(w2, hessian, pattern, **options)
    return new.reshape(weight.shape).to(weight.dtype), mask.reshape(weight.shape)


def reconstruction_error(weight: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
    """``‖XWᵀ − XŴᵀ‖² = tr((W − Ŵ) H (W − Ŵ)ᵀ)`` for ``H = XᵀX``."""
    return quadratic_error(as_matrix(weight), as_matrix(pruned), hessian)


__all__ = [
    "PRUNERS", "cluster_quadratic_error", "get_pruner", "mix_hessians", "mixed_objective", "prune_layer",
    "quadratic_error", "reconstruction_error",
]
