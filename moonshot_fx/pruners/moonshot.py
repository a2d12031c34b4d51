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
    """``H_mix`` as above; ``alpha == 1`` (or no Fisher) returns ``hessian`` itself.

    A row-clustered Fisher ``(C, d, d)`` (``F_c = Σ_t (Σ_{i∈c} δ_ti²) x_t x_tᵀ`` for ``C`` equal
    clusters of output rows) gives ``(C, d, d)``: cluster ``c``'s rows see ``C · F_c / c_tay`` with
    ``c_tay`` the mean diagonal of ``Σ_c F_c`` (the shared Fisher), i.e. the mean per-row Fisher of
    the cluster on the scale of the layer's mean per-row Fisher (:func:`mixed_curvature`)."""
    if fisher is None or alpha >= 1.0:
        return hessian
    h = hessian.to(torch.float32)
    f = fisher.to(torch.float32)
    scale = 1.0
    if f.dim() == 3:
        scale = float(f.shape[0])
        c_f = torch.diagonal(f, dim1=-2, dim2=-1).sum(dim=0).mean()
    else:
        c_f = torch.diagonal(f).mean()
    c_f = c_f.clamp_min(torch.finfo(torch.float32).tiny)
    if alpha <= 0.0:
        return f * (scale / c_f)
    c_h = torch.diagonal(h).mean().clamp_min(torch.finfo(torch.float32).tiny)
    return alpha * (h / c_h) + (1.0 - alpha) * scale * (f / c_f)


def prune_row_clusters(weight: torch.Tensor, curvature: torch.Tensor, pattern: Pattern, method: str,
                       **options: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` whose ``C`` equal blocks of output rows each have their own curvature
    ``curvature[c]`` (``(C, d, d)``): the base pruner ``method`` runs once per block. Every row of
    SparseGPT, OPTIMA, Wanda and magnitude is pruned independently given its curvature, so this is
    exact for a per-row-block curvature; it only costs one factorisation per block."""
    from . import get_pruner

    clusters = curvature.shape[0]
    rows = weight.shape[0]
    if rows % clusters:
        raise ValueError(f"{rows} output rows do not split into {clusters} equal clusters")
    size = rows // clusters
    fn = get_pruner(method)
    options = {k: v for k, v in options.items() if k != "hinv_upper"}  # a shared factor does not apply
    patterns = [pattern] * clusters
    if not pattern.is_nm and clusters > 1:
        patterns = cluster_sparsities(weight, curvature, pattern.sparsity, float(options.get("dampening", 0.01)))
    parts = [fn(weight[c * size:(c + 1) * size], curvature[c], patterns[c], **options) for c in range(clusters)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def cluster_sparsities(weight: torch.Tensor, curvature: torch.Tensor, sparsity: float, dampening: float) -> list[Pattern]:
    """Unstructured sparsity of each row cluster, so that the layer's total is ``sparsity``.

    A row-shared pruner compares weights of all rows with one saliency; pruning clusters one by
    one would force every cluster to the same sparsity instead. The budget is therefore split
    first, by the single-weight OBS saliency ``w_ij² / [C_c⁻¹]_jj`` of every weight under its
    cluster's (dampened) curvature ``C_c`` — on one scale, since the curvatures are (see
    :func:`mix_hessians`) — the lowest ``round(sparsity · numel)`` over the whole layer."""
    from ..linalg import damped
    from ..masks import prune_lowest

    clusters = curvature.shape[0]
    size = weight.shape[0] // clusters
    inv_diag = torch.diagonal(torch.linalg.inv(damped(curvature.to(torch.float64), dampening)), dim1=-2, dim2=-1)
    w = weight.to(torch.float64).reshape(clusters, size, -1)
    saliency = w.square() / inv_diag.clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(1)
    keep = prune_lowest(saliency, int(round(sparsity * weight.numel())))
    pruned = (~keep).reshape(clusters, -1).sum(dim=1)
    per = size * weight.shape[1]
    return [Pattern(sparsity=min(float(k) / per, 1.0 - 1.0 / per)) for k in pruned.tolist()]


def cluster_quadratic_error(weight: torch.Tensor, pruned: torch.Tensor, curvature: torch.Tensor) -> float:
    """``Σ_c tr(Δ_c C_c Δ_cᵀ)`` over the row blocks of a ``(C, d, d)`` curvature (2-D: one block)."""
    if curvature.dim() == 2:
        return quadratic_error(weight, pruned, curvature)
    size = weight.shape[0] // curvature.shape[0]
    return sum(quadratic_error(weight[c * size:(c + 1) * size], pruned[c * size:(c + 1) * size], curvature[c])
               for c in range(curvature.shape[0]))


#: weights of more elements than this are scored a block of rows at a time (three weight-sized
#: fp32 temporaries of a 13824 × 5120 projection are 850 MB); smaller ones in one product, as before
QUADRATIC_ERROR_CHUNK = 2**24


def quadratic_error(weight: torch.Tensor, pruned: torch.Tensor, curvature: torch.Tensor) -> float:
    """``tr(Δ C Δᵀ)`` with ``Δ = W − Ŵ``: reconstruction error for ``C = H``, Taylor term for ``C = F``."""
    if weight.numel() > QUADRATIC_ERROR_CHUNK and weight.dim() == 2:
        step = max(1, QUADRATIC_ERROR_CHUNK // weight.shape[1])
        return sum(quadratic_error(weight[i:i + step], pruned[i:i + step], curvature)
                   for i in range(0, weight.shape[0], step))
    if torch.float64 in (weight.dtype, pruned.dtype, curvature.dtype):
        delta = weight.to(torch.float64) - pruned.to(torch.float64)
        return float(((delta @ curvature.to(torch.float64)) * delta).sum())
    # fp32 products (fast GEMM), fp64 reduction: relative error ~1e-6, ample for comparisons
    delta = weight.to(torch.float32) - pruned.to(torch.float32)
    return symmetric_quadratic_form(delta, curvature.to(torch.float32))


#: column block of :func:`symmetric_quadratic_form` (below it, the one-product form is as fast)
SYMMETRIC_BLOCK = 1024


def symmetric_quadratic_form(delta: torch.Tensor, c: torch.Tensor) -> float:
    """``tr(Δ C Δᵀ)`` for a symmetric ``C`` (every curvature here is) from its upper block triangle:
    ``Σ_I tr(Δ_I C_II Δ_Iᵀ) + 2 Σ_{I<J} tr(Δ_I C_IJ Δ_Jᵀ)`` over column blocks ``I`` — half the
    flops of ``(Δ C) ∘ Δ`` (``rows·d²/2``). For a wide layer that is what the report's relative
    error costs on top of the solve: the full product cost more than SparseGPT's solve itself
    (5120 × 2048, one thread: 1.49 s against 1.34 s)."""
    d = c.shape[0]
    if d <= 2 * SYMMETRIC_BLOCK:
        return float(((delta @ c) * delta).sum(dtype=torch.float64))
    total = torch.zeros((), dtype=torch.float64)
    for i in range(0, d, SYMMETRIC_BLOCK):
        j = min(i + SYMMETRIC_BLOCK, d)
        strip = delta[:, i:j] @ c[i:j, i:]  # (rows, d − i): the block row of C from its diagonal on
        total += (strip[:, :j - i] * delta[:, i:j]).sum(dtype=torch.float64)
        if j < d:
            total += 2 * (strip[:, j - i:] * delta[:, j:]).sum(dtype=torch.float64)
    return float(total)


def mixed_objective(weight: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor, fisher: torch.Tensor, alpha: float) -> float:
    """``f_mix`` of ``pruned`` (the quantity MOONSHOT minimises)."""
    return cluster_quadratic_error(weight, pruned, mix_hessians(hessian, fisher, min(alpha, 1.0 - 1e-12) if alpha >= 1 else alpha))


def moonshot_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: Pattern,
    *,
    fisher: torch.Tensor | None = None,
    weight_fisher: torch.Tensor | None = None,
    kron_g: torch.Tensor | None = None,
    alpha: float = 0.75,
    base: str = "sparsegpt",
    **options: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the ``base`` pruner on ``H_mix``; returns ``(W_hat, mask)``.

    ``fisher`` is a shared ``d_in × d_in`` curvature, or ``(C, d_in, d_in)`` for ``C`` equal
    clusters of output rows (``fisher="row"``; see :func:`prune_row_clusters`); ``weight_fisher`` a per-weight diagonal shaped
    like ``weight`` (score-based bases only); ``kron_g`` the output factor of the Kronecker-factored
    Fisher (``fisher="kron"``, see :mod:`.kron_moonshot`). They are told apart by name, never by shape: a square
    weight's per-weight Fisher has the Hessian's shape."""
    from . import get_pruner

    kron_resolve = bool(options.pop("kron_resolve", True))  # only the Kronecker form has a re-solve to skip
    if weight_fisher is not None and float(alpha) < 1.0:
        return _prune_with_weight_fisher(weight, hessian, weight_fisher, pattern, float(alpha), base)
    if kron_g is not None and fisher is not None and float(alpha) < 1.0:
        from .kron_moonshot import kron_prune

        return kron_prune(weight, hessian, fisher, kron_g, pattern, float(alpha), base, resolve=kron_resolve,
                          **options)
    curvature = mix_hessians(hessian, fisher, float(alpha))
    if curvature.dim() == 3:
        return prune_row_clusters(weight, curvature, pattern, base, **options)
    return get_pruner(base)(weight, curvature, pattern, **options)


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
