"""The inputs of an ONNX export: (args, kwargs) flattened to named tensors behind a small wrapper
module, and which of their dimensions are exported dynamic."""
from __future__ import annotations

import inspect
from typing import Any, Mapping

import torch
from torch import nn
from torch.utils import _pytree as pytree

from moonshot_fx.errors import ConfigError

# inputs: flatten (args, kwargs) to a tuple of tensors behind a small wrapper module


def _split_inputs(model: nn.Module, example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        raise ConfigError(
            f"example_inputs must be a tensor, a tuple of positional inputs or a dict of keyword "
            f"inputs, not {type(example_inputs).__name__}."
        )
    # Hugging Face models: no KV cache in the graph (its outputs are not exportable as tensors).
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache") and "use_cache" not in kwargs:
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}
        if "use_cache" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
            kwargs["use_cache"] = False
    return args, kwargs


def _output_tensors(out: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(out, torch.Tensor):
        return (out,)
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):  # HF ModelOutput: export the logits only
        return (logits,)
    leaves = [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]
    if not leaves:
        raise ConfigError(f"the model returned no tensor (got {type(out).__name__}); nothing to export.")
    return tuple(leaves)


class _Flat(nn.Module):
    """Calls ``inner`` with the original (args, kwargs) structure rebuilt from flat tensors."""

    def __init__(self, inner: nn.Module, spec: Any, leaves: list[Any], tensor_idx: list[int]) -> None:
        super().__init__()
        self.inner = inner
        self._spec = spec
        positions = set(tensor_idx)
        self._consts = [None if i in positions else v for i, v in enumerate(leaves)]
        self._idx = list(tensor_idx)
        self.train(inner.training)

    def forward(self, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        leaves = list(self._consts)
        for i, t in zip(self._idx, flat):
            leaves[i] = t
        args, kwargs = pytree.tree_unflatten(leaves, self._spec)
        return _output_tensors(self.inner(*args, **kwargs))


def _input_names(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], tensor_idx: list[int]) -> list[str]:
    """ONNX input names: forward's parameter names for positional tensors, keys for keyword ones."""
    try:
        params = [p.name for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    # name every leaf by its path in ((args...), {kwargs...})
    paths, _ = pytree.tree_flatten_with_path((args, kwargs))
    names: list[str] = []
    for i in tensor_idx:
        keypath = paths[i][0]
        parts = []
        for k in keypath:
            if isinstance(k, pytree.SequenceKey):
                parts.append(str(k.idx))
            elif isinstance(k, pytree.MappingKey):
                parts.append(str(k.key))
            else:
                parts.append(str(getattr(k, "name", k)).strip("."))
        top, rest = parts[0], parts[1:]
        if top == "0" and rest:  # positional argument
            pos = int(rest[0])
            base = params[pos] if pos < len(params) else f"input_{pos}"
            name = "_".join([base, *rest[1:]])
        else:
            name = "_".join(rest) or "input"
        name = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in name)
        while name in names:
            name += "_"
        names.append(name)
    return names


def _widened(flat: list[torch.Tensor], run: Any) -> list[torch.Tensor]:
    """Inputs to export from: ``flat`` with every size-1 dimension that is to be dynamic repeated
    to size 2 (``torch.export`` specialises size-1 dimensions: a graph traced at batch 1 keeps 1
    in its reshapes even where the ONNX input is marked dynamic, and fails or computes garbage
    at any other batch). Tried on ``run`` (the eager model) first: all such dimensions, then the
    batch only; ``flat`` itself when the model accepts neither (that dimension is then static)."""
    for only_batch in (False, True):
        out, changed = [], False
        for t in flat:
            reps = [1] * t.dim()
            for d in _dynamic_dims(t):
                if t.shape[d] == 1 and (d == 0 or not only_batch):
                    reps[d] = 2
            changed = changed or any(r != 1 for r in reps)
            out.append(t.repeat(*reps) if any(r != 1 for r in reps) else t)
        if not changed:
            return flat
        try:
            with torch.no_grad():
                run(*out)
        except Exception:  # noqa: BLE001 - the model fixes that size; try less, then keep the example
            continue
        return out
    return flat


def _dynamic_dims(t: torch.Tensor) -> list[int]:
    """Dimensions to mark dynamic: all of an integer/bool tensor (batch, sequence); batch,
    sequence (3-D) or spatial (4-D and more) dimensions of a floating tensor."""
    if t.dim() == 0:
        return []
    if not t.is_floating_point() and not t.is_complex():
        return list(range(t.dim()))
    if t.dim() == 3:
        return [0, 1]
    if t.dim() >= 4:
        return [0, *range(2, t.dim())]
    return [0]
