"""Which dimension of a pruned weight its layer reduces over, for the ONNX pattern check.

N:M groups run along a layer's *input* dimension. A weight stored ``(out, in)`` (``nn.Linear``,
conv kernels as ``(out, in·k…)``: layout ``"out_in"``) is grouped along dimension 1; one stored
``(in, out)`` (Hugging Face ``Conv1D`` as in GPT-2, a bare ``x @ W``: layout ``"in_out"``) along
dimension 0. Checking the stored layout blindly makes a correctly pruned GPT-2 "fail".

The layout of each pruned parameter comes, in order of preference, from

1. ``model.moonshot_report`` (``SiteReport.layout``: the site that pruned it knew its layout);
2. the module holding it: ``nn.Linear`` / ``nn.Conv*`` are ``"out_in"``, a ``Conv1D``-style module
   (``weight`` of shape ``(nx, nf)`` with ``nf`` output features) is ``"in_out"``;
3. the ONNX graph: how the initializer that carries it is consumed (``MatMul(x, W)`` reduces
   over ``W``'s dimension 0; ``Gemm`` over dimension 1 with ``transB=1``, else 0; ``Conv`` over
   the filter's input channels), flipped when the initializer holds the parameter transposed.

:func:`layout_pattern_problems` then checks an initializer (already brought back to the
parameter's layout) along that dimension.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from moonshot_fx.config import Pattern
from moonshot_fx.masks import pattern_violations
from moonshot_fx.report import IN_OUT, OUT_IN

__all__ = ["IN_OUT", "OUT_IN", "describe", "graph_layouts", "layout_pattern_problems", "param_layouts", "resolve_layout"]

#: ONNX ops whose second input is a weight reduced over dimension 0 unless ``transB`` says otherwise
_MATMUL_OPS = {"MatMul": False, "Gemm": True, "FusedMatMul": True, "FusedGemm": True}
#: ONNX ops whose second input is an (out, in, k…) filter
_CONV_OPS = {"Conv", "FusedConv", "NchwcConv", "QLinearConv"}


def _flip(layout: str) -> str:
    return IN_OUT if layout == OUT_IN else OUT_IN


def _module_layout(module: nn.Module, weight: torch.Tensor) -> str | None:
    """The layout a module's ``weight`` is used in, when the module type says so."""
    if isinstance(module, (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd)):
        return OUT_IN
    nf = getattr(module, "nf", None)  # transformers' Conv1D: weight (nx, nf), forward x @ W + b
    if isinstance(nf, int) and weight.dim() == 2 and weight.shape[1] == nf:
        return IN_OUT
    return None


def param_layouts(model: nn.Module) -> dict[str, tuple[str, str]]:
    """``{parameter FQN: (layout, source)}`` for the weights whose layout the model states:
    ``source`` is ``"report"`` (``model.moonshot_report``) or ``"module"`` (see the module docstring)."""
    out: dict[str, tuple[str, str]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor):
            layout = _module_layout(mod, w)
            if layout is not None:
                out[f"{mod_name}.weight" if mod_name else "weight"] = (layout, "module")
    report = getattr(model, "moonshot_report", None)
    for site in getattr(report, "sites", None) or []:
        layout = getattr(site, "layout", None)
        if layout in (OUT_IN, IN_OUT):
            out[site.name] = (layout, "report")
    return out


def graph_layouts(model_path: str | Path) -> dict[str, str]:
    """``{initializer name: layout}`` read off the ONNX ops that consume each 2-D+ initializer as
    a weight (through ``Transpose`` nodes); an initializer used in both layouts is left out."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    # a Transpose of an initializer: its output is that initializer, flipped
    alias: dict[str, tuple[str, bool]] = {n: (n, False) for n in inits}
    for node in m.graph.node:
        if node.op_type == "Transpose" and node.input and node.input[0] in alias:
            perm = next((list(onnx.helper.get_attribute_value(a)) for a in node.attribute if a.name == "perm"), None)
            if perm in (None, [1, 0]):
                src, flipped = alias[node.input[0]]
                alias[node.output[0]] = (src, not flipped)
    seen: dict[str, set[str]] = {}
    for node in m.graph.node:
        if len(node.input) < 2 or node.input[1] not in alias:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type in _MATMUL_OPS:
            trans_b = bool(attrs.get("transB", 0)) if _MATMUL_OPS[node.op_type] else False
            layout = OUT_IN if trans_b else IN_OUT
        elif node.op_type in _CONV_OPS:
            layout = OUT_IN
        else:
            continue
        src, flipped = alias[node.input[1]]
        seen.setdefault(src, set()).add(_flip(layout) if flipped else layout)
    return {k: next(iter(v)) for k, v in seen.items() if len(v) == 1}


def resolve_layout(param: str, init_name: str | None, located: str, model_layouts: dict[str, tuple[str, str]],
                   init_layouts: dict[str, str]) -> tuple[str, str]:
    """(layout of ``param``, where it came from): the model's word when it has one, else the
    graph's use of initializer ``init_name`` (``located == "transposed"``: it holds the parameter
    transposed), else ``("out_in", "default")``."""
    if param in model_layouts:
        return model_layouts[param]
    if init_name is not None and init_name in init_layouts:
        layout = init_layouts[init_name]
        return (_flip(layout) if located == "transposed" else layout), "graph"
    return OUT_IN, "default"


def layout_pattern_problems(weight: np.ndarray, pattern: Pattern, layout: str) -> list[str]:
    """Reasons ``weight`` (in its parameter's layout ``layout``) violates ``pattern`` along its
    input dimension; empty when it satisfies it."""
    w = torch.from_numpy(np.array(weight, dtype=np.float32, copy=True))
    transposed = layout == IN_OUT and w.dim() == 2
    return pattern_violations(w, pattern, transposed=transposed)


def describe(layout: str, source: str) -> str:
    """``"in_out (from the report)"``: for messages."""
    where: dict[str, Any] = {"report": "from the pruning report", "module": "from the module type",
                             "graph": "from the ONNX graph", "default": "assumed"}
    return f"{layout} ({where.get(source, source)})"
