"""MOONSHOT's ``alpha="auto"``: choose the mix α by the loss on held-out calibration batches.

Pure plumbing over the pruning maths: collect the dense statistics once on the fitting batches,
prune every group for each α of ``cfg.alpha_grid`` (nothing is written into the model), and
score each candidate on the held-out slice — with the model's own loss, or, for a label-free
classifier, the cross-entropy against the dense model's probabilities; with BatchNorm
re-estimation on, each candidate is scored as the run will leave it (norms re-estimated).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable

import torch
import torch.nn as nn

from .config import SparsifyConfig
from .passes.apply import read_weights, write_weights
from .passes.calibrate import LossFn, collect_hessians, default_loss, needs_diagonal_only, output_logits
from .passes.capture import CapturedGraph
from .passes.discover import Site
from .passes.losses import scores_own_predictions, soft_target_loss
from .passes.norm_recalibration import (batchnorm_modules, batchnorm_state, recalibrate_batchnorm,
                                        restore_batchnorm_state)
from .passes.prune import prune_all_groups
from .passes.runner import GraphRunner
from .progress import progress_bar

log = logging.getLogger(__name__)

__all__ = ["choose_alpha", "dense_soft_targets", "held_out_loss", "held_out_loss_recalibrated"]


def dense_soft_targets(captured: CapturedGraph, sites: list[Site], norm: list[Any]) -> list[torch.Tensor] | None:
    """The dense model's probabilities on ``norm`` when the default loss would score it against
    its own predictions (a classifier or masked LM without labels; else None): the reference
    :func:`held_out_loss` compares a pruned model against."""
    runner = GraphRunner(captured, sites, weights={})
    targets = []
    with torch.no_grad():
        for args, kwargs in norm:
            flat = runner.run([captured.flat_inputs(args, kwargs)])
            assert flat is not None
            out = captured.unflatten(flat[0])
            if not scores_own_predictions(out, kwargs, args):
                return None
            targets.append(torch.softmax(output_logits(out).float(), dim=-1))
    return targets


def held_out_loss(captured: CapturedGraph, sites: list[Site], norm: list[Any], weights: dict[str, torch.Tensor],
                  loss_fn: LossFn | None, soft_targets: list[torch.Tensor] | None = None) -> float:
    """Mean per-sample loss of the model with ``weights`` substituted, over ``norm`` batches.

    With ``soft_targets`` (one per batch, from :func:`dense_soft_targets`) the loss is the
    cross-entropy against the dense model's probabilities — how far the pruned classifier's
    predictions moved (KL to the dense model plus a constant). Scoring a label-free classifier
    against its *own* argmax instead would reward confident models, not faithful ones.
    """
    runner = GraphRunner(captured, sites, weights=weights)

    def forward(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        flat = runner.run([captured.flat_inputs(args, kwargs)])
        assert flat is not None
        return captured.unflatten(flat[0])

    return _mean_loss(forward, norm, loss_fn, soft_targets)


def _mean_loss(forward: Callable[[tuple[Any, ...], dict[str, Any]], Any], norm: list[Any], loss_fn: LossFn | None,
               soft_targets: list[torch.Tensor] | None) -> float:
    """Mean per-sample loss of ``forward`` over ``norm`` (see :func:`held_out_loss`)."""
    fn = loss_fn or default_loss
    total, count = 0.0, 0
    with torch.no_grad():
        for i, (args, kwargs) in enumerate(norm):
            out = forward(args, kwargs)
            if soft_targets is not None:
                losses = soft_target_loss(output_logits(out), soft_targets[i])
            else:
                losses = fn(out, args, kwargs)
            total += float(losses.sum())
            count += losses.shape[0]
    return total / max(1, count)


def held_out_loss_recalibrated(model: nn.Module, norm_fit: list[Any], held: list[Any], weights: dict[str, torch.Tensor],
                               loss_fn: LossFn | None, soft_targets: list[torch.Tensor] | None = None) -> float:
    """:func:`held_out_loss` of the model as ``recalibrate_norms=True`` would leave it: ``weights``
    written, BatchNorm statistics re-estimated on ``norm_fit``, then the eager model scored on
    ``held``. The model's parameters and BatchNorm buffers are restored before returning, also on
    error. Without this, candidates whose pruned activations BatchNorm would re-centre are judged
    with the dense statistics, which at high sparsity makes every candidate look alike."""
    saved_w = read_weights(model, list(weights))
    saved_bn = batchnorm_state(model)
    try:
        write_weights(model, weights)
        recalibrate_batchnorm(model, norm_fit)
        return _mean_loss(lambda a, k: model(*a, **k), held, loss_fn, soft_targets)
    finally:
        write_weights(model, saved_w)
        restore_batchnorm_state(saved_bn)


def choose_alpha(model: nn.Module, captured: CapturedGraph, sites: list[Site], norm: list[Any], cfg: SparsifyConfig,
                 row_weights: dict[str, list[torch.Tensor]] | None, sample_fishers: dict[str, torch.Tensor] | None,
                 loss_fn: LossFn | None, progress: bool) -> tuple[float, dict[float, float]]:
    """Pick α from ``cfg.alpha_grid`` by the loss on a held-out slice of the calibration batches.

    The statistics (H and F, dense model) are collected once; each α costs one pure-maths prune
    of every group plus one forward over the held-out slice (1/8 of the batches, at least one).
    With a single batch the slice is that batch itself (documented: no held-out data exists).
    With ``recalibrate_norms`` on a model with BatchNorm, each candidate is scored after its
    BatchNorm statistics are re-estimated on the fitting batches (one more forward over them),
    since that is the model the run returns.
    """
    n_hold = max(1, len(norm) // 8)
    held = norm[-n_hold:]
    fit_idx = list(range(len(norm) - n_hold)) or [0]
    norm_fit = [norm[i] for i in fit_idx]
    flat_fit = [captured.flat_inputs(*b) for b in norm_fit]
    rw = {k: [v[i] for i in fit_idx] for k, v in row_weights.items()} if row_weights else None
    stats = collect_hessians(captured, sites, flat_fit, row_weights=rw, diagonal_only=needs_diagonal_only(cfg))
    targets = dense_soft_targets(captured, sites, held) if loss_fn is None else None
    recalibrate = cfg.recalibrate_norms and bool(batchnorm_modules(model))
    scores: dict[float, float] = {}
    for a in progress_bar(progress, "alpha search", len(cfg.alpha_grid))(list(cfg.alpha_grid)):
        res = prune_all_groups(model, sites, stats, cfg, sample_fishers, a, progress=False)
        weights = {k: r.weight for k, r in res.items()}
        if recalibrate:  # score each candidate as the run will leave it: norms re-estimated
            loss = held_out_loss_recalibrated(model, norm_fit, held, weights, loss_fn, targets)
        else:
            loss = held_out_loss(captured, sites, held, weights, loss_fn, targets)
        scores[a] = loss if math.isfinite(loss) else float("inf")
        log.info("alpha=%.3g held-out loss %.4f", a, scores[a])
    best = min(scores, key=lambda a: (scores[a], -a))
    return best, scores
