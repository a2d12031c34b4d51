"""Apply pass: write pruned weights into the user's own parameters, all or nothing."""
from __future__ import annotations

import torch
import torch.nn as nn

from moonshot_fx.errors import PatternError


def write_weights(model: nn.Module, new: dict[str, torch.Tensor]) -> None:
    """Copy ``new[name]`` into ``model``'s parameter ``name`` in place (same object, same class).

    Every value is validated first (shape, finiteness) so that nothing is written unless
    everything can be; a tied parameter is written once and seen by all its aliases.
    """
    params = {name: model.get_parameter(name) for name in new}
    for name, value in new.items():
        p = params[name]
        if value.shape != p.shape:
            raise PatternError(f"pruned {name} has shape {tuple(value.shape)}, expected {tuple(p.shape)}")
        if not torch.isfinite(value).all():
            raise PatternError(f"pruned {name} has non-finite values; model left unchanged")
    with torch.no_grad():
        for name, value in new.items():
            params[name].copy_(value)
