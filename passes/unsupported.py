"""Weights discovery did not turn into sites, each with the reason it stays dense.

Discovery only sees parameters the traced graph uses as the weight of a linear map or a
convolution. Every other parameter of two or more dimensions — an LSTM's gate matrices, an
embedding table, a fused attention projection read through slices, a 3-d or transposed
convolution, a weight forward never uses — would otherwise be left dense in silence;
:func:`unsupported_weights` names each one with why, for ``report.skipped``.
"""
from __future__ import annotations

from typing import Iterable

import torch.nn as nn

from .discover import Site
from .experts import split_slice_name


def _owners(model: nn.Module) -> dict[int, tuple[str, nn.Module, str]]:
    """id(parameter) → (canonical FQN, owning module, attribute name), first occurrence wins."""
    out: dict[int, tuple[str, nn.Module, str]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for attr, p in mod._parameters.items():
            if p is not None and id(p) not in out:
                out[id(p)] = (f"{mod_name}.{attr}" if mod_name else attr, mod, attr)
    return out


def unsupported_reason(module: nn.Module, attr: str) -> str:
    """Why a parameter ``attr`` of ``module`` (two or more dims, not a site) is not pruned."""
    kind = type(module).__name__
    if isinstance(module, nn.RNNBase):
        return f"recurrent layer (nn.{kind}) is not supported"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return f"embedding (nn.{kind}) is a lookup table, not a linear map: kept dense"
    if isinstance(module, nn.MultiheadAttention):
        return (f"nn.MultiheadAttention's {attr} is read through q/k/v slices, which is not supported "
                "(its out_proj is pruned like any linear layer)")
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return f"transposed convolution (nn.{kind}) is not supported"
    if isinstance(module, nn.Conv3d):
        return "3-d convolution (nn.Conv3d) is not supported"
    if isinstance(module, nn.Bilinear):
        return "bilinear layer (nn.Bilinear) is not supported"
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        return (f"nn.{kind} weight not used as a linear map in the traced graph (unused by forward, or "
                "reached through an op discovery does not recognise)")
    return f"{kind}.{attr} is not used as a linear or convolution weight in the traced graph"


def unsupported_weights(model: nn.Module, sites: Iterable[Site]) -> dict[str, str]:
    """FQN → reason for every parameter with ``dim() >= 2`` that no site covers (by name or
    alias), in ``model.named_parameters()`` order. Sites themselves, skipped or not, are left
    to the caller."""
    covered = set()
    for s in sites:  # an expert slice "<param>[e]" covers its 3-D parameter (all slices are sites)
        covered.update((s.name, *s.aliases, s.parameter_name))
        if s.slice_index is not None:
            covered.update(split_slice_name(a)[0] for a in s.aliases)
    owners = _owners(model)
    out: dict[str, str] = {}
    for name, p in model.named_parameters():
        if p.dim() < 2 or name in covered:
            continue
        fqn, module, attr = owners.get(id(p), (name, model, name.rsplit(".", 1)[-1]))
        if fqn in covered:
            continue
        out[name] = unsupported_reason(module, attr)
    return out
