"""Mixture-of-experts weights: one prunable site per expert slice of a 3-D expert parameter.

transformers 5.x stores an MoE layer's experts as 3-D parameters — Mixtral / Qwen2-MoE:
``mlp.experts.gate_up_proj`` ``(E, 2I, H)`` and ``mlp.experts.down_proj`` ``(E, H, I)``, i.e.
``(E, out, in)``; models decorated with ``is_transposed=True`` store ``(E, in, out)`` — and runs
them through an *experts implementation*. ``"eager"`` loops over the experts that received a
token (data-dependent: torch.export refuses it), ``"batched_mm"`` gathers one weight copy per
token (``gate_up_proj[expert_ids]``, far too large for calibration), and ``"grouped_mm"``
(transformers' default) sorts the routed rows by expert and multiplies them with the whole 3-D
weight in one grouped product whose ``offs`` (cumulative row counts) say where each expert's
rows end. :func:`grouped_experts_for_capture` switches an HF model to ``"grouped_mm"`` while it
is traced (restoring the user's setting after), so every MoE layer appears in the graph as

    grouped_mm(x_sorted, W.transpose(-2, -1), offs)        # W: (E, out, in)
    grouped_mm(x_sorted, W, offs)                          # W: (E, in, out), is_transposed

(``aten._grouped_mm`` for bf16 / CUDA, ``transformers.grouped_mm_fallback`` otherwise).

Each expert ``e`` of such a parameter becomes one site named ``"<parameter FQN>[e]"`` (for
example ``model.layers.0.mlp.experts.gate_up_proj[3]``) whose weight is the 2-D slice ``W[e]``
and whose input rows are exactly the rows routed to expert ``e``:
``x_sorted[offs[e-1]:offs[e]]``. Globs select a slice by its own name or by the parameter's
(``*experts.down_proj`` selects every expert of it). An expert that no calibration token reached
has no statistics: it is pruned by magnitude (reported in the site's ``note``) or, with
``SparsifyConfig(unrouted_experts="dense")``, left dense and listed in ``report.skipped``.
"""
from __future__ import annotations

import contextlib
import re
from typing import Any, Iterator

import torch
import torch.fx as fx
import torch.nn as nn

aten = torch.ops.aten

_SLICE_NAME = re.compile(r"^(?P<param>.+)\[(?P<index>\d+)\]$")

GROUPED_MM_TARGETS = {t for t in (getattr(getattr(aten, "_grouped_mm", None), "default", None),
                                   getattr(torch.nn.functional, "grouped_mm", None),
                                   getattr(torch, "_grouped_mm", None)) if t is not None}

#: the experts implementation the graph is captured with
TRACE_IMPLEMENTATION = "grouped_mm"


def slice_name(param: str, index: int) -> str:
    """The site name of expert ``index`` of the 3-D parameter ``param``: ``"param[index]"``."""
    return f"{param}[{index}]"


def split_slice_name(name: str) -> tuple[str, int | None]:
    """``("model…gate_up_proj", 3)`` for ``"model…gate_up_proj[3]"``; ``(name, None)`` otherwise."""
    match = _SLICE_NAME.match(name)
    if match is None:
        return name, None
    return match.group("param"), int(match.group("index"))


def is_grouped_mm(node: fx.Node) -> bool:
    """Whether ``node`` is a grouped matrix product ``(S, in) × (E, in, out) → (S, out)`` with offsets."""
    if node.op != "call_function":
        return False
    if node.target in GROUPED_MM_TARGETS:
        return True
    # transformers registers its fallback as a custom op (``transformers.grouped_mm_fallback``)
    name = str(node.target)
    return "grouped_mm" in name and "backward" not in name


def offsets_node(node: fx.Node) -> fx.Node | None:
    """The ``offs`` operand of a grouped product (third argument or keyword)."""
    offs = node.args[2] if len(node.args) > 2 else node.kwargs.get("offs")
    return offs if isinstance(offs, fx.Node) else None


def resolve_expert_weight(gm: fx.GraphModule, node: Any) -> tuple[nn.Parameter | None, bool]:
    """The 3-D parameter behind a grouped product's weight operand and whether it was transposed
    (its last two dims swapped; ``transpose``/``permute`` of dims 1 and 2 only)."""
    flipped = False
    while isinstance(node, fx.Node):
        if node.op == "get_attr":
            value: Any = gm
            for part in str(node.target).split("."):
                value = getattr(value, part, None)
                if value is None:
                    return None, flipped
            ok = isinstance(value, nn.Parameter) and value.dim() == 3
            return (value, flipped) if ok else (None, flipped)
        if node.op != "call_function":
            return None, flipped
        if node.target is aten.transpose.int and sorted(int(a) % 3 for a in node.args[1:3]) == [1, 2]:
            flipped, node = not flipped, node.args[0]
            continue
        if node.target is aten.permute.default and [int(a) % 3 for a in node.args[1]] == [0, 2, 1]:
            flipped, node = not flipped, node.args[0]
            continue
        if node.target in (aten.contiguous.default, aten.clone.default, aten.alias.default):
            node = node.args[0]
            continue
        return None, flipped
    return None, flipped


def expert_rows(offsets: torch.Tensor, index: int) -> slice:
    """The rows of expert ``index`` in the expert-sorted input of a grouped product."""
    offs = [int(v) for v in offsets.reshape(-1).tolist()]
    start = offs[index - 1] if index > 0 else 0
    return slice(start, offs[index])


def uses_3d_parameter(gm: fx.GraphModule, node: fx.Node) -> str:
    """FQN of a 3-D parameter that ``node`` (a get_attr) reads, else ``""``."""
    if node.op != "get_attr":
        return ""
    value: Any = gm
    for part in str(node.target).split("."):
        value = getattr(value, part, None)
        if value is None:
            return ""
    return str(node.target) if isinstance(value, nn.Parameter) and value.dim() == 3 else ""


#: ops through which an unsupported experts implementation reads its 3-D weights
PER_EXPERT_READS = {aten.index.Tensor, aten.select.int, aten.bmm.default, aten.matmul.default, aten.einsum.default}


def unsupported_expert_use(node: fx.Node) -> str:
    """The op name when ``node`` (a 3-D parameter's get_attr) feeds per-expert indexing or a batched
    product that is not a recognised grouped product; ``""`` otherwise."""
    frontier = [node]
    for _ in range(3):  # through a transpose or two
        nxt = []
        for n in frontier:
            for user in n.users:
                if user.op != "call_function":
                    continue
                if is_grouped_mm(user):
                    return ""
                if user.target in PER_EXPERT_READS:
                    return str(getattr(user.target, "__name__", user.target))
                if user.target in (aten.transpose.int, aten.permute.default, aten.contiguous.default):
                    nxt.append(user)
        frontier = nxt
    return ""


def _experts_configs(model: nn.Module) -> list[Any]:
    """Configs of the HF (sub)models whose experts implementation can be switched."""
    out = []
    for module in model.modules():
        config = getattr(module, "config", None)
        can_set = getattr(type(module), "_can_set_experts_implementation", None)
        if config is None or can_set is None or not hasattr(config, "_experts_implementation_internal"):
            continue
        try:
            ok = bool(can_set())
        except Exception:  # noqa: BLE001 - an unreadable class simply is not switched
            ok = False
        if ok and all(c is not config for c in out):
            out.append(config)
    return out


def has_3d_expert_parameters(model: nn.Module) -> bool:
    """Whether ``model`` holds 3-D parameters of a module named ``experts``."""
    return any(p.dim() == 3 and ".experts." in f".{n}" for n, p in model.named_parameters())


@contextlib.contextmanager
def grouped_experts_for_capture(model: nn.Module) -> Iterator[None]:
    """While tracing, run an HF MoE model's experts with ``"grouped_mm"`` (see module docstring);
    the user's experts implementation is restored afterwards, also on error."""
    configs = _experts_configs(model) if has_3d_expert_parameters(model) else []
    saved = [(c, c._experts_implementation_internal) for c in configs]
    try:
        for c, _ in saved:
            c._experts_implementation_internal = TRACE_IMPLEMENTATION
        yield
    finally:
        for c, old in saved:
            c._experts_implementation_internal = old
