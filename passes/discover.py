"""Discovery pass: find every prunable weight use in a captured graph.

A *site* is one parameter (keyed by its fully qualified name; a tied parameter is one site) used
as the weight of a linear map: ``linear``/``F.linear``, ``addmm``/``mm``/``matmul`` with a parameter
operand (HF ``Conv1D`` stores its weight as ``(in, out)``: ``transposed``), ``conv1d``/``conv2d``.
Sites that read the same input tensor with the same unfolding share one statistic (``group``).
Grouped/depthwise convolutions are reported as skipped with the reason.

Mixture-of-experts layers (3-D expert parameters run through a grouped product) give one site per
expert slice, named ``"<parameter FQN>[e]"`` (``slice_index`` = e), whose statistics are taken
over the rows routed to that expert only: see :mod:`moonshot_fx.passes.experts`.
"""
from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from moonshot_fx.config import ROUTER_EXCLUDE, SparsifyConfig
from moonshot_fx.errors import NoPrunableSitesError
from moonshot_fx.report import layout_name

from . import experts as moe
from .heads import head_nodes

log = logging.getLogger(__name__)

aten = torch.ops.aten
LINEAR_TARGETS = {aten.linear.default, F.linear, torch._C._nn.linear}
MM_TARGETS = {aten.mm.default, aten.matmul.default, torch.matmul, torch.mm}
ADDMM_TARGETS = {aten.addmm.default, torch.addmm}
CONV_TARGETS = {aten.conv2d.default: "conv2d", aten.conv1d.default: "conv1d", F.conv2d: "conv2d",
                F.conv1d: "conv1d", aten.convolution.default: "conv",
                # padding="same"/"valid" convs are exported as these overloads
                aten.conv2d.padding: "conv2d", aten.conv1d.padding: "conv1d"}
TRANSPOSE_TARGETS = {aten.t.default, aten.numpy_T.default, torch.t}


@dataclass
class Site:
    """One prunable parameter and where the graph uses it."""

    name: str
    kind: str  # linear | conv1d | conv2d
    shape: tuple[int, ...]
    transposed: bool = False  # weight stored as (in, out) (HF Conv1D, x @ W)
    nodes: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)  # graph node feeding each use
    conv: dict[str, Any] | None = None
    aliases: tuple[str, ...] = ()
    group: str = ""
    is_head: bool = False
    skipped: str = ""
    #: expert ``e`` of a 3-D expert parameter (``name`` is ``"<parameter>[e]"``, ``shape`` the
    #: 2-D slice's); None for an ordinary weight
    slice_index: int | None = None

    @property
    def parameter_name(self) -> str:
        """FQN of the parameter holding this site's weight (the 3-D tensor for an expert slice)."""
        return moe.split_slice_name(self.name)[0] if self.slice_index is not None else self.name

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(out, in·k…)`` — the 2-D shape the pruners see."""
        if self.transposed:
            return (self.shape[1], self.shape[0])
        rest = 1
        for s in self.shape[1:]:
            rest *= s
        return (self.shape[0], rest)

    @property
    def params(self) -> int:
        """Number of weights."""
        out, inp = self.matrix_shape
        return out * inp

    def row(self) -> dict[str, Any]:
        """A JSON-friendly summary (the `inspect` table row)."""
        row = {"name": self.name, "kind": self.kind, "shape": list(self.shape), "params": self.params,
               "group": self.group, "aliases": list(self.aliases), "head": self.is_head,
               "skipped": self.skipped, "layout": layout_name(self.transposed)}
        if self.slice_index is not None:
            row["slice"] = self.slice_index
        return row


def _param_names(model: nn.Module) -> tuple[dict[int, str], dict[int, tuple[str, ...]]]:
    canonical: dict[int, str] = {}
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        canonical.setdefault(id(p), name)
        aliases.setdefault(id(p), []).append(name)
    return canonical, {k: tuple(v) for k, v in aliases.items()}


def _resolve_weight(gm: fx.GraphModule, node: Any) -> tuple[torch.Tensor | None, bool]:
    """The parameter behind ``node`` (through transposes) and whether it was transposed."""
    flipped = False
    while isinstance(node, fx.Node):
        if node.op == "get_attr":
            value = gm
            for part in str(node.target).split("."):
                value = getattr(value, part, None)
                if value is None:
                    return None, flipped
            return (value, flipped) if isinstance(value, nn.Parameter) else (None, flipped)
        if node.op == "call_function" and (
            node.target in TRANSPOSE_TARGETS
            or (node.target is aten.transpose.int and sorted(int(a) % 2 for a in node.args[1:3]) == [0, 1])
            or (node.target is aten.permute.default and list(node.args[1]) in ([1, 0], [-1, -2]))
        ):
            flipped = not flipped
            node = node.args[0]
            continue
        return None, flipped
    return None, flipped


def _conv_attrs(kind: str, node: fx.Node, weight: torch.Tensor) -> tuple[str, dict[str, Any] | None, str]:
    """Normalised conv kind and unfold attributes, or a skip reason."""
    args = list(node.args) + [None] * 9
    kw = node.kwargs
    if kind == "conv":  # aten.convolution: (x, w, b, stride, padding, dilation, transposed, out_pad, groups)
        if args[6]:
            return kind, None, "transposed convolution is not supported"
        stride, padding, dilation, groups = args[3], args[4], args[5], args[8]
        kind = {3: "conv1d", 4: "conv2d"}.get(weight.dim(), "conv")
    else:
        stride = args[3] if args[3] is not None else kw.get("stride", 1)
        padding = args[4] if args[4] is not None else kw.get("padding", 0)
        dilation = args[5] if args[5] is not None else kw.get("dilation", 1)
        groups = args[6] if args[6] is not None else kw.get("groups", 1)
    if kind not in ("conv1d", "conv2d"):
        return kind, None, f"{weight.dim() - 2}-d convolution is not supported"
    if groups not in (None, 1):
        return kind, None, f"grouped convolution (groups={groups}) is not supported: its inputs differ per group"
    nd = 1 if kind == "conv1d" else 2
    if isinstance(padding, str):
        padding = _string_padding(padding, tuple(weight.shape[2:]), dilation or 1)
        if padding is None:
            return kind, None, "padding='same' with an even kernel (asymmetric padding) is not supported"

    def pair(v: Any) -> tuple[int, ...]:
        v = [v] if isinstance(v, int) else list(v)
        v = v * nd if len(v) == 1 else v
        return tuple(int(x) for x in v) if nd == 2 else (1, int(v[0]))

    ks = tuple(weight.shape[2:]) if nd == 2 else (1, weight.shape[2])
    attrs = {"kernel_size": ks, "stride": pair(stride or 1), "padding": pair(padding or 0),
             "dilation": pair(dilation or 1)}
    if nd == 1:
        attrs["padding"] = (0, attrs["padding"][1])
    return kind, attrs, ""


def _string_padding(padding: str, kernel: tuple[int, ...], dilation: Any) -> tuple[int, ...] | None:
    """Integer padding equal to ``"valid"``/``"same"`` (stride 1), or None when "same" is asymmetric."""
    if padding == "valid":
        return (0,) * len(kernel)
    dil = [dilation] if isinstance(dilation, int) else list(dilation)
    dil = dil * len(kernel) if len(dil) == 1 else dil
    total = [int(d) * (k - 1) for d, k in zip(dil, kernel)]
    if padding != "same" or any(t % 2 for t in total):
        return None
    return tuple(t // 2 for t in total)


def find_sites(gm: fx.GraphModule, model: nn.Module) -> list[Site]:
    """Every weight use in graph order, merged per parameter (before include/exclude filtering)."""
    canonical, aliases = _param_names(model)
    sites: dict[str, Site] = {}
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        weight = None
        transposed = False
        x_node = None
        kind = ""
        conv = None
        skip = ""
        if node.op == "call_function":
            if moe.is_grouped_mm(node):
                _add_expert_sites(gm, node, canonical, aliases, sites)
                continue
            if node.target in LINEAR_TARGETS:
                weight, transposed = _resolve_weight(gm, node.args[1])
                kind, x_node = "linear", node.args[0]
            elif node.target in MM_TARGETS:
                weight, flipped = _resolve_weight(gm, node.args[1])
                kind, x_node, transposed = "linear", node.args[0], not flipped
            elif node.target in ADDMM_TARGETS:
                weight, flipped = _resolve_weight(gm, node.args[2])
                kind, x_node, transposed = "linear", node.args[1], not flipped
            elif node.target in CONV_TARGETS:
                weight, _ = _resolve_weight(gm, node.args[1])
                if weight is not None:
                    kind, conv, skip = _conv_attrs(CONV_TARGETS[node.target], node, weight)
                x_node = node.args[0]
        elif node.op == "call_module":
            mod = modules.get(str(node.target))
            if isinstance(mod, nn.Linear):
                weight, kind = mod.weight, "linear"
            elif isinstance(mod, (nn.Conv1d, nn.Conv2d)):
                weight = mod.weight
                kind = "conv1d" if isinstance(mod, nn.Conv1d) else "conv2d"
                if mod.groups != 1:
                    skip = f"grouped convolution (groups={mod.groups}) is not supported"
                elif isinstance(mod.padding, str) and _string_padding(mod.padding, mod.kernel_size, mod.dilation) is None:
                    skip = "padding='same' with an even kernel (asymmetric padding) is not supported"
                else:
                    padding = (_string_padding(mod.padding, mod.kernel_size, mod.dilation)
                               if isinstance(mod.padding, str) else mod.padding)
                    assert padding is not None
                    pad = (0, padding[0]) if kind == "conv1d" else tuple(padding)
                    one = (lambda t: (1, t[0])) if kind == "conv1d" else tuple
                    conv = {"kernel_size": one(mod.kernel_size), "stride": one(mod.stride),
                            "padding": pad, "dilation": one(mod.dilation)}
            x_node = node.args[0] if node.args else None
        if weight is None or not isinstance(x_node, fx.Node) or weight.dim() < 2:
            continue
        if kind == "linear" and weight.dim() != 2:
            continue
        name = canonical.get(id(weight))
        if name is None:
            continue
        site = sites.get(name)
        if site is None:
            site = sites[name] = Site(name=name, kind=kind, shape=tuple(weight.shape), transposed=transposed,
                                      conv=conv, aliases=aliases.get(id(weight), (name,)), skipped=skip)
        elif site.kind != kind or site.transposed != transposed or site.conv != conv:
            site.skipped = site.skipped or "parameter used in incompatible ways (different op kinds)"
        site.nodes.append(node.name)
        site.inputs.append(x_node.name)
    _report_unsupported_experts(gm, canonical, aliases, sites)
    _mark_heads(gm, sites)
    for site in sites.values():
        conv_key = "" if site.conv is None else str(sorted(site.conv.items()))
        site.group = (site.inputs[0] if len(site.inputs) == 1 else f"{site.name}@" + "+".join(site.inputs)) + (
            f"|{site.kind}{conv_key}" if site.kind != "linear" else "")
        if site.slice_index is not None and len(site.inputs) == 1:
            site.group += f"[{site.slice_index}]"  # each expert sees its own rows of the shared input
    return list(sites.values())


def _add_expert_sites(gm: fx.GraphModule, node: fx.Node, canonical: dict[int, str],
                      aliases: dict[int, tuple[str, ...]], sites: dict[str, Site]) -> None:
    """One site per expert slice of the 3-D weight of a grouped product (see module docstring)."""
    weight, flipped = moe.resolve_expert_weight(gm, node.args[1] if len(node.args) > 1 else None)
    x_node = node.args[0] if node.args else None
    name = canonical.get(id(weight)) if weight is not None else None
    if weight is None or name is None or not isinstance(x_node, fx.Node):
        return
    # grouped_mm multiplies (S, in) rows by (E, in, out): a (E, out, in) parameter reaches it transposed
    transposed = not flipped
    skip = "" if moe.offsets_node(node) is not None else "grouped product without per-expert offsets"
    for e in range(weight.shape[0]):
        key = moe.slice_name(name, e)
        site = sites.get(key)
        if site is None:
            site = sites[key] = Site(name=key, kind="linear", shape=tuple(weight.shape[1:]), transposed=transposed,
                                     aliases=tuple(moe.slice_name(a, e) for a in aliases.get(id(weight), (name,))),
                                     skipped=skip, slice_index=e)
        elif site.transposed != transposed:
            site.skipped = site.skipped or "parameter used in incompatible ways (different layouts)"
        site.nodes.append(node.name)
        site.inputs.append(x_node.name)


def _report_unsupported_experts(gm: fx.GraphModule, canonical: dict[int, str], aliases: dict[int, tuple[str, ...]],
                                sites: dict[str, Site]) -> None:
    """A 3-D parameter read per expert by something other than a grouped product (an experts
    implementation moonshot-fx cannot calibrate) becomes a skipped site, so it is reported."""
    seen = {s.parameter_name for s in sites.values()}
    for node in gm.graph.nodes:
        if not moe.uses_3d_parameter(gm, node):
            continue
        op = moe.unsupported_expert_use(node)
        weight, _ = moe.resolve_expert_weight(gm, node)
        name = canonical.get(id(weight)) if weight is not None else None
        if not op or name is None or name in seen or "expert" not in name:
            continue
        seen.add(name)
        sites[name] = Site(name=name, kind="linear", shape=tuple(weight.shape), nodes=[node.name], inputs=[node.name],
                           aliases=aliases.get(id(weight), (name,)),
                           skipped=f"3-D (per-expert) weight read through {op}, which moonshot-fx cannot calibrate "
                                   "per expert; run the experts with experts_implementation='grouped_mm'")


def _mark_heads(gm: fx.GraphModule, sites: dict[str, Site]) -> None:
    """Flag the sites that produce the model's primary output (:mod:`moonshot_fx.passes.heads`)."""
    site_nodes = {n for s in sites.values() for n in s.nodes}
    heads = head_nodes(gm, site_nodes)
    for s in sites.values():
        s.is_head = any(n in heads for n in s.nodes)


def select_sites(sites: list[Site], config: SparsifyConfig, *, prune_head: bool = False) -> list[Site]:
    """Sites chosen by the config's globs; heads (final classifiers) only when ``prune_head``.

    A parameter is excluded when any of its aliases matches an exclude glob (a tied
    ``lm_head``/embedding stays dense); :func:`dense_reasons` says why for each site left out.
    Raises NoPrunableSitesError if nothing is left.
    """
    chosen = [s for s in sites if not dense_reason(s, config, prune_head=prune_head)]
    if not chosen:
        found = ", ".join(s.name for s in sites[:8]) + (" …" if len(sites) > 8 else "")
        raise NoPrunableSitesError(
            f"no prunable layer left after filtering (found {len(sites)} candidate weights: {found or 'none'}; "
            f"include={list(config.include)}, exclude={list(config.exclusions)}). Check the globs, or pass "
            "prune_head=True to prune a final classifier."
        )
    return chosen


def dense_reason(site: Site, config: SparsifyConfig, *, prune_head: bool = False) -> str:
    """Why the config leaves ``site`` dense — skipped by discovery (its own reason), excluded by a
    user or default glob (which one, and how to prune it anyway), not matched by ``include``, or
    the model's head — or ``""`` when it is selected. The one rule :func:`select_sites` and
    :func:`dense_reasons` share."""
    if site.skipped:
        return site.skipped
    names = _glob_names(site)

    def hit(globs: tuple[str, ...]) -> str | None:
        return next((g for g in globs for a in names if fnmatch.fnmatchcase(a, g)), None)

    if (g := hit(tuple(config.exclude))) is not None:
        return f"excluded by exclude glob {g!r}"
    if (g := hit(tuple(g for g in config.exclusions if g not in config.exclude))) is not None:
        what = "mixture-of-experts router" if g in ROUTER_EXCLUDE else "embedding / output head / classifier"
        return (f"{what}, kept dense by default (exclude glob {g!r}); pass default_exclude=False "
                "(with your own exclude list) to prune it")
    if hit(tuple(config.include)) is None:
        return f"not matched by include={list(config.include)}"
    if site.is_head and not prune_head and not _explicitly_included(site, config):
        return ("the model's head (produces its primary output), kept dense by default; "
                "prune_head=True, or naming it in include, prunes it")
    return ""


def dense_reasons(sites: list[Site], config: SparsifyConfig, *, prune_head: bool = False) -> dict[str, str]:
    """name → :func:`dense_reason` for every site the config leaves dense, so that no dense
    weight goes unmentioned in ``report.skipped``."""
    return {s.name: r for s in sites if (r := dense_reason(s, config, prune_head=prune_head))}


def _glob_names(site: Site) -> tuple[str, ...]:
    """The names include/exclude globs are matched against: the aliases, and for an expert slice
    also its parameter's aliases (``*experts.down_proj`` selects every expert of it)."""
    if site.slice_index is None:
        return site.aliases
    return site.aliases + tuple(moe.split_slice_name(a)[0] for a in site.aliases)


def _explicitly_included(site: Site, config: SparsifyConfig) -> bool:
    return any(g != "*" and fnmatch.fnmatchcase(a, g) for g in config.include for a in _glob_names(site))
