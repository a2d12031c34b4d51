"""Refuse models and inputs on the ``meta`` device before anything is traced.

A model built under ``torch.device("meta")`` (or loaded with ``low_cpu_mem_usage`` / ``device_map``
before its weights arrive) has shapes but no values: tracing it works, but calibration and
pruning cannot, and fail late with messages about batch structure or ``.item()``.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from moonshot_fx.errors import MetaDeviceError

_HOW = ("materialise the weights first: model.to_empty(device='cpu') (or 'cuda') and then "
        "model.load_state_dict(state_dict), or load the model with from_pretrained(...) without a meta "
        "device_map. (Pruning straight from a checkpoint, streaming the weights, is planned.)")


def meta_tensors(model: nn.Module) -> list[str]:
    """Names of the model's parameters and buffers that live on the meta device."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    return [n for n, t in named if t is not None and t.is_meta]


def check_not_meta(model: nn.Module, batches: Iterable[Any] = ()) -> None:
    """Raise :class:`MetaDeviceError` when any parameter or buffer of ``model``, or any tensor
    in ``batches`` (inputs in any nesting of tuples, lists and dicts), is on the meta device."""
    names = meta_tensors(model)
    if names:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise MetaDeviceError(f"{len(names)} parameter(s)/buffer(s) of {type(model).__name__} are on the meta "
                              f"device (shapes only, no values): {shown}; {_HOW}")
    for i, batch in enumerate(batches):
        if any(isinstance(x, torch.Tensor) and x.is_meta for x in pytree.tree_leaves(batch)):
            raise MetaDeviceError(f"input batch {i} holds tensors on the meta device (shapes only, no values); "
                                  "give real tensors on the model's device (e.g. batch.to('cpu')), and "
                                  f"for a meta model {_HOW}")
