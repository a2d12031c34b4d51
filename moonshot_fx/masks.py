"""Mask selection and pattern checking (pure tensor functions).

Masks are boolean tensors shaped like the 2-D weight ``(out, in)``; ``True`` means *kept*.
Every selector removes exactly the requested number of weights: unstructured quotas are spread
over rows/blocks by cumulative rounding, so the total is ``round(sparsity * numel)`` exactly.
"""
from __future__ import annotations

import torch

from .config import Pattern, PatternLike, parse_pattern
from .errors import PatternError


def quotas(counts: list[int], sparsity: float) -> list[int]:
    """How many to prune in each unit so that the total is exactly ``round(sparsity * sum(counts))``.

    Cumulative rounding: unit ``k`` gets ``round(s * C_k) - round(s * C_{k-1})`` where ``C_k`` is the
    running total of ``counts``, so every unit is within one of its share and nothing drifts.
    """
    out: list[int] = []
    running, done = 0, 0
    for c in counts:
        running += c
        target = int(round(sparsity * running))
        out.append(min(c, max(0, target - done)))
        done += out[-1]
    return out


def prune_lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Keep-mask over ``scores`` (any shape) removing the ``count`` lowest entries (ties by index)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if count > 0:
        idx = torch.topk(scores.reshape(-1), count, largest=False, sorted=False).indices
        keep.view(-1)[idx] = False
    return keep


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Unstructured keep-mask comparing scores within each row (Wanda's rule)."""
    rows, cols = scores.shape
    per_row = quotas([cols] * rows, sparsity)
    keep = torch.ones_like(scores, dtype=torch.bool)
    # rows sharing one quota are handled together with a single topk
    for k in sorted(set(per_row)):
        if k == 0:
            continue
        sel = torch.tensor([q == k for q in per_row], device=scores.device)
        idx = torch.topk(scores[sel], k, dim=1, largest=False, sorted=False).indices
        sub = torch.ones((int(sel.sum()), cols), dtype=torch.bool, device=scores.device)
        sub.scatter_(1, idx, False)
        keep[sel] = sub
    return keep


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M keep-mask: in each row, every group of ``m`` consecutive columns keeps its ``n`` best."""
    rows, cols = scores.shape
    if cols % m:
        raise PatternError(
            f"{n}:{m} sparsity needs in_features divisible by {m}, but this weight has {cols} "
            f"inputs; exclude this layer or give it an unstructured override."
        )
    grouped = scores.reshape(rows, cols // m, m)
    idx = torch.topk(grouped, m - n, dim=2, largest=False, sorted=False).indices
    keep = torch.ones_like(grouped, dtype=torch.bool)
    keep.scatter_(2, idx, False)
    return keep.reshape(rows, cols)


def select_mask(scores: torch.Tensor, pattern: PatternLike, scope: str = "row") -> torch.Tensor:
    """Keep-mask for ``pattern`` from ``scores`` (higher = more important).

    ``scope`` applies to unstructured patterns: ``"row"`` compares within each output row,
    ``"layer"`` across the whole weight. N:M always compares within groups.
    """
    pat = parse_pattern(pattern)
    if pat.is_nm:
        return nm_mask(scores, pat.n, pat.m)
    if scope == "layer":
        return prune_lowest(scores, int(round(pat.sparsity * scores.numel())))
    if scope == "row":
        return row_mask(scores, pat.sparsity)
    raise ValueError(f"unknown mask scope {scope!r}")


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """The 2-D ``(out, in·k…)`` view pruning works on (conv kernels flattened channel-major)."""
    return weight.reshape(weight.shape[0], -1) if weight.dim() != 2 else weight


def pattern_violations(weight: torch.Tensor, pattern: PatternLike, transposed: bool = False) -> list[str]:
    """Human-readable reasons ``weight`` does not satisfy ``pattern`` (empty list if it does).

    N:M groups run along the *input* dimension, the one the layer reduces over: dimension 1 of
    an ``(out, in)`` weight (``nn.Linear``; conv kernels on their ``(out, in·kh·kw)`` view), or,
    with ``transposed=True``, dimension 0 of a weight stored ``(in, out)`` (Hugging Face
    ``Conv1D`` as in GPT-2, a bare ``x @ W``). A report's ``SiteReport.layout == "in_out"``
    means ``transposed=True``.
    """
    pat = parse_pattern(pattern)
    w = weight.detach()
    if transposed:
        if w.dim() != 2:
            raise PatternError(f"transposed=True needs a 2-D (in, out) weight, got shape {tuple(w.shape)}")
        w = w.T
    w = as_matrix(w)
    where = "dim 0 of the (in, out) weight" if transposed else "dim 1 of the (out, in) weight"
    problems: list[str] = []
    if pat.is_nm:
        if w.shape[1] % pat.m:
            return [f"in_features {w.shape[1]} ({where}) is not a multiple of {pat.m}"]
        nnz = (w.reshape(w.shape[0], -1, pat.m) != 0).sum(dim=2)
        bad = int((nnz > pat.n).sum())
        if bad:
            problems.append(f"{bad} groups of {pat.m} along the input dimension ({where}) "
                            f"have more than {pat.n} non-zeros")
    else:
        need = int(round(pat.sparsity * w.numel()))
        zeros = int((w == 0).sum())
        if zeros < need:
            problems.append(f"{zeros} zeros, need at least {need} for sparsity {pat.sparsity:g}")
    return problems


def check_pattern(weight: torch.Tensor, pattern: PatternLike, transposed: bool = False) -> bool:
    """True when ``weight`` satisfies ``pattern`` exactly (N:M groups, or at least the zero count).

    N:M groups run along the input dimension: dimension 1 of an ``(out, in)`` weight (conv
    weights on their ``(out, in·kh·kw)`` view), or dimension 0 with ``transposed=True`` for a
    weight stored ``(in, out)`` (GPT-2's ``Conv1D``, ``x @ W``; ``SiteReport.layout == "in_out"``).
    See :func:`pattern_violations` for the reasons when it returns False.
    """
    return not pattern_violations(weight, pattern, transposed=transposed)


__all__ = ["Pattern", "check_pattern", "nm_mask", "pattern_violations", "quotas", "row_mask", "select_mask"]
