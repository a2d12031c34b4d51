"""Re-estimate BatchNorm running statistics after pruning (optional pass).

Pruning a convolution shifts the mean and variance of its output, and the BatchNorm that follows
keeps normalising with the dense model's statistics. Re-estimating them on the calibration batches
(cumulative average, no gradient, every other module in eval mode) is a cheap, data-only repair
that matters most at high sparsity. On failure the previous statistics are restored.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn


def batchnorm_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """BatchNorm layers that track running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


BatchNormState = list[tuple[nn.modules.batchnorm._BatchNorm, torch.Tensor, torch.Tensor, torch.Tensor]]


def batchnorm_state(model: nn.Module) -> BatchNormState:
    """A copy of every tracking BatchNorm's running mean, variance and batch count."""
    return [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
            for m in batchnorm_modules(model)]


def restore_batchnorm_state(state: BatchNormState) -> None:
    """Write back what :func:`batchnorm_state` copied (in place: aliases of the buffers see it)."""
    with torch.no_grad():
        for m, mean, var, nbt in state:
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(nbt)


def recalibrate_batchnorm(model: nn.Module, batches: Sequence[tuple[tuple[Any, ...], dict[str, Any]]]) -> int:
    """Recompute running mean/var of every BatchNorm on ``batches``; returns how many were updated."""
    bns = batchnorm_modules(model)
    if not bns or not batches:
        return 0
    modes = [(m, m.momentum, m.training) for m in bns]
    before = batchnorm_state(model)
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average over all batches
            m.train()
        with torch.no_grad():
            for args, kwargs in batches:
                model(*args, **kwargs)
    except BaseException:
        restore_batchnorm_state(before)
        raise
    finally:
        for m, momentum, training in modes:
            m.momentum = momentum
            m.train(training)
    return len(bns)
