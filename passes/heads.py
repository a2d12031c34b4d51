"""Which sites are the model's *head*: the projection(s) that produce its primary output.

A head is kept dense by default (``prune_head=True`` prunes it). The rule, on the captured graph:

1. The *primary output* is the leaf of the model's output that holds the task prediction: the
   ``logits`` entry of a dict / Hugging Face ``ModelOutput`` (else the ``*_logits`` entries,
   e.g. a QA model's start/end logits; never ``router_logits``), otherwise the first non-scalar
   tensor (``(loss, logits, …)`` tuples, a bare tensor, ``last_hidden_state``).
2. Walking back from the primary output along floating-point data edges and stopping at every
   site, the sites reached are the candidates.
3. They are heads only if the primary output depends on *nothing else* that carries the input:
   if some floating-point value reaches the primary output without passing a site (a residual
   stream from the embeddings, ``head(x) + x``), the output is a hidden state, not a projection's
   prediction, and nothing is a head. A bare ``BertModel`` or a ``T5`` encoder therefore has no
   head, and ``output_hidden_states=True`` does not turn the residual writers of a decoder into
   heads (the primary output is still ``logits``).

Integer tensors (token ids, the index of the last non-pad token a sequence classifier pools at,
routing indices) and shape values do not make a bypass: an embedding lookup's *output* does.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import fx

#: output keys that never count as the primary prediction
NOT_PRIMARY_KEYS = ("router_logits",)
_SHAPE_METHODS = {"size", "dim", "numel", "stride"}


def _val(node: fx.Node) -> Any:
    return node.meta.get("val", node.meta.get("example_value"))


def _is_shape(node: fx.Node) -> bool:
    """A shape value (SymInt, ``x.size()``), which carries no data of the input."""
    v = _val(node)
    if isinstance(v, torch.Tensor) or (isinstance(v, (tuple, list)) and any(isinstance(t, torch.Tensor) for t in v)):
        return False
    if v is not None:
        return True
    return (node.op == "call_method" and node.target in _SHAPE_METHODS) or (
        node.op == "call_function" and node.target is getattr)


def _is_float(node: fx.Node) -> bool | None:
    """True / False where the traced value's dtype is known (any tensor of a tuple), else None."""
    if _is_shape(node):
        return False
    v = _val(node)
    if isinstance(v, torch.Tensor):
        return v.is_floating_point() or v.is_complex()
    if isinstance(v, (tuple, list)):
        return any(t.is_floating_point() for t in v if isinstance(t, torch.Tensor))
    return None


def _is_scalar(node: fx.Node) -> bool:
    v = _val(node)
    return isinstance(v, torch.Tensor) and v.dim() == 0


def _leaves(obj: Any) -> list[fx.Node]:
    if isinstance(obj, fx.Node):
        return [obj]
    if isinstance(obj, Mapping):
        return [n for v in obj.values() for n in _leaves(v)]
    if isinstance(obj, (tuple, list)):
        return [n for v in obj for n in _leaves(v)]
    return []


def _pick_keyed(items: list[tuple[Any, Any]]) -> list[fx.Node] | None:
    keys = [k for k, _ in items]
    if "logits" in keys:
        return _leaves(dict(items)["logits"])
    named = [v for k, v in items if isinstance(k, str) and k.endswith("logits") and k not in NOT_PRIMARY_KEYS]
    if named:
        return [n for v in named for n in _leaves(v)]
    return None


def _pick(obj: Any) -> list[fx.Node]:
    """The primary-output leaves of an output structure whose leaves are graph nodes."""
    if isinstance(obj, fx.Node):
        return [obj]
    if isinstance(obj, Mapping):
        items = list(obj.items())
        keyed = _pick_keyed(items)
        if keyed is not None:
            return keyed
        children = [v for _, v in items]
    elif isinstance(obj, (tuple, list)):
        children = list(obj)
    else:
        return []
    for child in children:
        leaves = _leaves(child)
        if any(not _is_scalar(n) for n in leaves):
            return _pick(child)
    return []


def _structure(gm: fx.GraphModule) -> Any:
    """The graph's output with its model-level structure (dict keys of a ``ModelOutput``) where the
    capture recorded one (``torch.export``'s out spec), else as the graph returns it."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    flat = out.args[0]
    spec = getattr(gm, "_out_spec", None)
    if spec is None:
        return flat
    leaves = _leaves(flat)
    if getattr(spec, "num_leaves", None) != len(leaves):
        return flat
    return _rebuild(spec, iter(leaves))


def _rebuild(spec: Any, leaves: Iterable[fx.Node]) -> Any:
    """Nest ``leaves`` as ``spec`` describes, as plain dicts / lists (no container is constructed,
    so a ``ModelOutput`` needs none of its own logic)."""
    it = iter(leaves)
    children = list(spec.children()) if hasattr(spec, "children") else list(spec.children_specs)
    if not children and spec.is_leaf():
        return next(it)
    parts = [_rebuild(c, it) for c in children]
    ctx = spec.context
    keys = list(ctx) if isinstance(ctx, (list, tuple)) else None
    if keys is not None and len(keys) == len(parts) and all(isinstance(k, str) for k in keys):
        return dict(zip(keys, parts))
    return parts


def primary_output(gm: fx.GraphModule) -> list[fx.Node]:
    """The graph nodes holding the model's primary output (see the module docstring)."""
    return _pick(_structure(gm))


def _site_free_input(gm: fx.GraphModule, site_nodes: set[str]) -> dict[str, bool]:
    """node → whether its (floating-point) value carries the input without passing any site."""
    carries: dict[str, bool] = {}  # any input- or site-derived signal
    free: dict[str, bool] = {}
    floating: dict[str, bool] = {}  # _is_float is not False, per node (inputs come first in graph order)
    for node in gm.graph.nodes:
        is_float = _is_float(node)
        floating[node.name] = is_float is not False
        inputs = node.all_input_nodes
        if node.op == "placeholder":
            carries[node.name] = True
            free[node.name] = is_float is not False
            continue
        if node.name in site_nodes:
            carries[node.name], free[node.name] = True, False
            continue
        carries[node.name] = not _is_shape(node) and any(carries[i.name] for i in inputs)
        if is_float is False:
            free[node.name] = False
            continue
        float_in = [i for i in inputs if floating[i.name]]
        other_in = [i for i in inputs if not floating[i.name]]
        free[node.name] = (any(free[i.name] for i in float_in)
                           # a float made from input-derived integers only: an embedding lookup
                           or (not any(carries[i.name] for i in float_in) and any(carries[i.name] for i in other_in)))
    return free


def head_nodes(gm: fx.GraphModule, site_nodes: set[str]) -> set[str]:
    """Names of the site nodes that are the model's head (empty when the primary output is a
    hidden state, or has no site behind it)."""
    primary = primary_output(gm)
    if not primary:
        return set()
    free = _site_free_input(gm, site_nodes)
    if any(free.get(n.name, True) for n in primary):
        return set()
    found: set[str] = set()
    seen: set[str] = set()
    stack = list(primary)
    while stack:
        node = stack.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        if node.name in site_nodes:
            found.add(node.name)
            continue
        stack.extend(i for i in node.all_input_nodes if _is_float(i) is not False)
    return found
