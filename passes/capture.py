"""Capture a model as an FX graph: torch.export (non-strict, dynamic dims) with an fx fallback.

The captured graph shares the user's parameter tensors (no copies), so the passes can read the
weights through it and :mod:`moonshot_fx.passes.apply` writes results into the user's module.
Batches are normalised to ``(args, kwargs)``: a tensor, a tuple/list of positional inputs, or a
dict of keyword inputs (HF style). HF models get ``use_cache=False``.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from moonshot_fx.errors import CalibrationError, TraceError

from .experts import grouped_experts_for_capture

log = logging.getLogger(__name__)

Batch = Any


def normalize_batch(batch: Batch, model: torch.nn.Module | None = None) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of one batch; adds ``use_cache=False`` for models that take it."""
    if isinstance(batch, torch.Tensor):
        args, kwargs = (batch,), {}
    elif isinstance(batch, (tuple, list)):
        args, kwargs = tuple(batch), {}
    elif isinstance(batch, dict):
        args, kwargs = (), dict(batch)
    else:
        raise CalibrationError(
            f"a calibration batch must be a tensor, a tuple of positional inputs or a dict of keyword "
            f"inputs; got {type(batch).__name__}."
        )
    if model is not None and "use_cache" not in kwargs and _accepts(model, "use_cache"):
        kwargs["use_cache"] = False
    return args, kwargs


def _accepts(model: torch.nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def batch_shape_key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    leaves = pytree.tree_leaves((args, kwargs))
    return tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else x for x in leaves)


@dataclass
class CapturedGraph:
    """A traced graph plus what is needed to feed it batches and read its outputs."""

    gm: fx.GraphModule
    method: str  # "export" or "symbolic_trace"
    in_spec: Any = None
    out_spec: Any = None
    dynamic: bool = False
    shape_key: tuple[Any, ...] = ()
    kwarg_names: tuple[str, ...] = field(default_factory=tuple)

    def flat_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
        """Placeholder values in graph order for one batch."""
        if self.method == "symbolic_trace":
            return list(args) + [kwargs[k] for k in self.kwarg_names if k in kwargs]
        if self.in_spec is not None and self.in_spec.num_children == 2:
            kw_spec = self.in_spec.child(1) if hasattr(self.in_spec, "child") else self.in_spec.children_specs[1]
            order = list(kw_spec.context) if kw_spec.context else []
            kwargs = {k: kwargs[k] for k in order if k in kwargs}
        return pytree.tree_leaves((args, kwargs))

    def unflatten(self, flat: Any) -> Any:
        """The model-level output (e.g. an HF ``CausalLMOutputWithPast``) from flat outputs."""
        if self.out_spec is None:
            return flat
        return pytree.tree_unflatten(list(flat), self.out_spec)

    def matches(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether a batch can run on this graph (any shape if dynamic)."""
        return self.dynamic or batch_shape_key(args, kwargs) == self.shape_key


def _dynamic_spec(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``Dim.AUTO`` on every dim of every tensor input, in the structure export expects."""
    from torch.export import Dim

    def spec(x: Any) -> Any:
        return {i: Dim.AUTO for i in range(x.dim())} if isinstance(x, torch.Tensor) else None

    if not kwargs:
        return tuple(spec(a) for a in args)
    names = list(inspect.signature(model.forward).parameters)
    out = {names[i]: spec(a) for i, a in enumerate(args)}
    out.update({k: spec(v) for k, v in kwargs.items()})
    return out


def capture(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], *,
            static_first: bool = False) -> CapturedGraph:
    """Trace ``model`` with ``torch.export`` (dynamic, then static), else ``fx.symbolic_trace``.

    ``static_first`` tries static shapes first: about half the export time of a Llama (3.9 s
    against 7.4–8.0 s for SmolLM2-135M), for callers that will only run the example's shape.

    Raises:
        TraceError: with the failure of each method and what to try.
    """
    errors: list[str] = []
    for dynamic in ((False, True) if static_first else (True, False)):
        try:
            # MoE experts as grouped products: the only experts implementation that traces with one
            # site per expert slice (see moonshot_fx.passes.experts); the user's setting is restored
            with torch.no_grad(), grouped_experts_for_capture(model):
                dyn = _dynamic_spec(model, args, kwargs) if dynamic else None
                ep = torch.export.export(model, args, kwargs, dynamic_shapes=dyn, strict=False)
            gm = ep.module()
            return CapturedGraph(
                gm=gm, method="export", in_spec=getattr(gm, "_in_spec", None),
                out_spec=getattr(gm, "_out_spec", None), dynamic=dynamic, shape_key=batch_shape_key(args, kwargs),
            )
        except Exception as exc:  # noqa: BLE001 - each failure is reported in the TraceError
            errors.append(f"torch.export ({'dynamic' if dynamic else 'static'} shapes): {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            log.debug("torch.export failed", exc_info=True)
    try:
        gm = fx.symbolic_trace(model)
        names = tuple(n.target for n in gm.graph.nodes if n.op == "placeholder")
        return CapturedGraph(gm=gm, method="symbolic_trace", dynamic=True, kwarg_names=names[len(args):],
                             shape_key=batch_shape_key(args, kwargs))
    except Exception as exc:  # noqa: BLE001
        errors.append(f"torch.fx.symbolic_trace: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    raise TraceError(
        f"could not trace {type(model).__name__} into a graph:\n  - " + "\n  - ".join(errors) +
        "\nTry: pass example_inputs exactly as the model's forward takes them (a dict of keyword "
        "inputs for HF models); move data-dependent Python control flow out of forward; or prune "
        "a traceable submodule (e.g. model.model) instead."
    )


def iter_batches(calibration: Iterable[Batch] | None, limit: int | None = None) -> Iterable[Batch]:
    """The calibration batches (at most ``limit``)."""
    if calibration is None:
        return []
    if isinstance(calibration, (torch.Tensor, dict)):
        return [calibration]
    out: list[Batch] = []
    for i, b in enumerate(calibration):
        if limit is not None and i >= limit:
            break
        out.append(b)
    return out
