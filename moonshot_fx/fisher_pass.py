"""MOONSHOT's gradient pass as one step: the Fisher form, the row clusters and the backward.

:func:`gradient_pass` is what :func:`moonshot_fx.sparsify` runs before calibration when
``method="moonshot"`` and α < 1; its result, :class:`FisherStatistics`, is everything the
sequential pass needs from the gradients. :func:`moonshot_fx.sparsify_checkpoint` computes the
same statistics layer by layer ahead of pruning (its backward streams the layers in reverse,
:mod:`moonshot_fx.streaming_fisher`) and hands each layer's to ``sparsify(..., gradients=...)``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch

from . import distributed
from .config import SparsifyConfig
from .errors import ConfigError
from .passes.calibrate import LossFn, collect_gradients
from .passes.capture import CapturedGraph
from .passes.discover import Site
from .passes.losses import SampledLabelLoss
from .passes.row_clusters import row_clusters
from .progress import progress_bar


@dataclasses.dataclass
class FisherStatistics:
    """The gradient statistics of a set of sites (see :func:`collect_gradients`).

    ``fisher``: the resolved form (``token``, ``row``, ``kron``, ``sample``, ``weight``);
    ``row_weights[site][b]``: per-row weights of calibration batch ``b`` (token / row / kron
    forms, else None); ``sample_fishers[site]``: the sample / weight / Kronecker-factor tensors;
    ``clusters``: row clusters per site (row form)."""

    fisher: str
    row_weights: dict[str, list[torch.Tensor]] | None
    sample_fishers: dict[str, torch.Tensor]
    clusters: dict[str, int] | None = None


def needs_gradients(cfg: SparsifyConfig) -> bool:
    """Whether a run with ``cfg`` has a gradient pass: MOONSHOT with α < 1 or ``alpha="auto"``
    (α = 1 is the base pruner alone)."""
    return cfg.method == "moonshot" and (cfg.alpha == "auto" or float(cfg.alpha) < 1.0)


def default_fisher(cfg: SparsifyConfig, sites: Sequence[Site]) -> str:
    """``fisher="auto"``: sample-level for convolutional models (per-image correlations matter),
    else the per-weight diagonal for score-based bases (Wanda, magnitude) and the Kronecker form
    for the Hessian-driven ones (SmolLM2 2:4, five seeds, WikiText-2 / C4 ÷ base: kron
    0.871 / 0.952 over SparseGPT and 0.931 / 0.938 over OPTIMA, against the per-head row form's
    0.927 / 0.979 and 0.957 / 0.956 and the shared token form's; docs/method.md §8). Its sites
    wider than ``kron_max_width`` use the token form. Under ``torch.distributed``, where the
    Kronecker form is not reduced across ranks yet, the per-row form."""
    if any(s.kind.startswith("conv") for s in sites):
        return "sample"
    if cfg.base in ("wanda", "magnitude"):
        return "weight"
    return "row" if distributed.is_distributed() else "kron"


def resolve_fisher(cfg: SparsifyConfig, sites: Sequence[Site]) -> str:
    """The Fisher form a run uses: ``auto`` resolved, and ``row`` on a score-based base turned
    into the per-weight diagonal (which is already per row)."""
    kind = default_fisher(cfg, sites) if cfg.fisher == "auto" else cfg.fisher
    if kind == "row" and cfg.base in ("wanda", "magnitude"):
        kind = "weight"
    return kind


def fisher_loss(cfg: SparsifyConfig, loss_fn: LossFn | None) -> LossFn | None:
    """The loss of MOONSHOT's gradient pass: the user's, the default (``fisher_labels="data"``),
    or cross-entropy on labels sampled from the model (``"model"``: the true Fisher)."""
    if cfg.fisher_labels == "data":
        return loss_fn
    if loss_fn is not None:
        raise ConfigError("fisher_labels='model' draws its own labels from the model's predictions; it cannot "
                          "be combined with a custom loss_fn (drop one of them).")
    return SampledLabelLoss(seed=0)


def gradient_pass(captured: CapturedGraph, sites: Sequence[Site], norm: Sequence[tuple[tuple[Any, ...], dict[str, Any]]],
                  cfg: SparsifyConfig, loss_fn: LossFn | None, progress: bool = False) -> FisherStatistics:
    """Resolve the Fisher form, find the row clusters and run the backward over ``norm``.
    ``loss_fn`` is used as given (the caller applies :func:`fisher_loss`)."""
    kind = resolve_fisher(cfg, sites)
    distributed.check_supported(cfg.method, cfg.alpha, kind)
    clusters = row_clusters(captured.gm, sites, cfg.row_clusters) if kind == "row" else None
    row_weights, sample_fishers, _ = collect_gradients(
        captured, sites, norm, kind=kind, loss_fn=loss_fn, clusters=clusters, kron_max_width=cfg.kron_max_width,
        progress=progress_bar(progress, "gradients", len(norm)))
    if kind not in ("token", "row", "kron"):
        row_weights = None  # sample / weight kinds: the Fisher itself is in sample_fishers
    return FisherStatistics(kind, row_weights, sample_fishers, clusters)
