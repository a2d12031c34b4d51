"""Apply pass: write pruned weights into the user's own parameters, all or nothing.

A name ``"<param>[e]"`` (an expert slice, see :mod:`moonshot_fx.passes.experts`) is written into
slice ``e`` of the 3-D parameter ``param``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from moonshot_fx.errors import PatternError

from .experts import split_slice_name


def read_weights(model: nn.Module, names: list[str] | dict[str, object]) -> dict[str, torch.Tensor]:
    """Copies of the current values of ``names`` (parameters or expert slices), for a snapshot
    that :func:`write_weights` can restore."""
    out = {}
    for name in names:
        base, index = split_slice_name(name)
        p = model.get_parameter(base)
        out[name] = (p if index is None else p[index]).detach().clone()
    return out


def write_weights(model: nn.Module, new: dict[str, torch.Tensor]) -> None:
    """Copy ``new[name]`` into ``model``'s parameter ``name`` in place (same object, same class).

    Every value is validated first (shape, finiteness, slice index) so that nothing is written
    unless everything can be; a tied parameter is written once and seen by all its aliases.
    """
    targets: dict[str, tuple[torch.Tensor, int | None]] = {}
    for name, value in new.items():
        base, index = split_slice_name(name)
        p = model.get_parameter(base)
        if index is not None and not (p.dim() >= 3 and 0 <= index < p.shape[0]):
            raise PatternError(f"{name}: {base} of shape {tuple(p.shape)} has no expert slice {index}")
        shape = tuple(p.shape) if index is None else tuple(p.shape[1:])
        if tuple(value.shape) != shape:
            raise PatternError(f"pruned {name} has shape {tuple(value.shape)}, expected {shape}")
        if not torch.isfinite(value).all():
            raise PatternError(f"pruned {name} has non-finite values; model left unchanged")
        targets[name] = (p, index)
    with torch.no_grad():
        for name, value in new.items():
            p, index = targets[name]
            (p if index is None else p[index]).copy_(value)
