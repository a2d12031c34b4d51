"""Reading a Dynamo graph for the ``torch.compile`` backend: the parameter each graph input comes
from (Dynamo sources), the calibration batch split into graph inputs, and the graph rebuilt as a
module whose parameters ``sparsify`` can prune."""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx
from torch import nn

from moonshot_fx.errors import CalibrationError, ConfigError

# ---------------------------------------------------------------------------------------------
# Dynamo sources


def _source_name(node: fx.Node) -> str | None:
    arg = node.meta.get("grapharg")
    src = getattr(arg, "source", None)
    if src is None:
        return None
    name = src.name
    return name() if callable(name) else str(name)


_TOKEN = re.compile(r"_modules\['([^']*)'\]|_parameters\['([^']*)'\]|_buffers\['([^']*)'\]"
                    r"|\.([A-Za-z_]\w*)|\[(\d+)\]|\['([^']*)'\]")


def _fqn_from_source(source: str) -> str | None:
    """``L['self']._modules['model']._modules['layers']._modules['0']._parameters['weight']``
    → ``model.layers.0.weight`` (the root local — ``self``/``fn``/``mod`` — dropped)."""
    m = re.match(r"^L\['[^']*'\]", source)
    if m is None:
        return None
    parts = []
    for tok in _TOKEN.finditer(source, m.end()):
        val = next(g for g in tok.groups() if g is not None)
        if val in ("_modules", "_parameters", "_buffers"):
            continue
        parts.append(val)
    return ".".join(parts) or None


def _input_path(source: str) -> tuple[str, Any, tuple[Any, ...]] | None:
    """Where a graph input comes from in a call: ``("args", i, rest)``, ``("kwargs", name, rest)``
    or ``("local", name, rest)``; ``rest`` indexes into that value; None for anything else
    (e.g. activations after a graph break, globals)."""
    m = re.match(r"^L\['([^']*)'\]((?:\[(?:\d+|'[^']*')\])*)$", source)
    if m is None:
        return None
    root, tail = m.group(1), m.group(2)
    keys: list[Any] = [int(k) if k.isdigit() else k.strip("'") for k in re.findall(r"\[(\d+|'[^']*')\]", tail)]
    if root == "args" and keys and isinstance(keys[0], int):
        return "args", keys[0], tuple(keys[1:])
    if root == "kwargs" and keys and isinstance(keys[0], str):
        return "kwargs", keys[0], tuple(keys[1:])
    return "local", root, tuple(keys)


def _compiling_code_name() -> str | None:
    """Name of the code object Dynamo is compiling right now (None if it cannot be told).

    Dynamo names the continuation after a graph break ``torch_dynamo_resume_in_<fn>_at_<line>``;
    its inputs are activations, not the model's inputs. Read from ``convert_frame._compile``'s
    ``code`` argument on the call stack (private, hence the defensive fallback).
    """
    try:
        frame = sys._getframe(1)
    except Exception:  # pragma: no cover
        return None
    while frame is not None:
        code = frame.f_code
        if code.co_name == "_compile" and code.co_filename.endswith("convert_frame.py"):
            target = frame.f_locals.get("code")
            return getattr(target, "co_name", None)
        frame = frame.f_back
    return None


def _split_batch(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    raise CalibrationError(f"a calibration batch must be a tensor, tuple or dict, not {type(batch).__name__}.")


def _index(value: Any, keys: tuple[Any, ...]) -> Any:
    for k in keys:
        value = value[k]
    return value


# ---------------------------------------------------------------------------------------------
# graph → module with real parameters


@dataclass
class _Rebuilt:
    module: fx.GraphModule
    inputs: list[fx.Node]  # tensor placeholders left (the module's forward arguments, in order)
    input_sources: list[str | None]
    examples: list[torch.Tensor]
    resume: bool  # the graph continues a frame after a graph break
    new: dict[str, nn.Parameter]  # FQN → parameter that sparsify may prune
    old: list[str]  # FQNs of parameters already handled (registered as buffers)


def _set_attr(root: nn.Module, path: str, value: Any, as_param: bool) -> None:
    *mods, leaf = path.split(".")
    mod = root
    for name in mods:
        if not hasattr(mod, name):
            mod.add_module(name, nn.Module())
        mod = getattr(mod, name)
    if as_param:
        mod.register_parameter(leaf, value)
    elif isinstance(value, torch.Tensor):
        mod.register_buffer(leaf, value.detach(), persistent=False)
    else:
        setattr(mod, leaf, value)


def _get_attr(obj: Any, path: str) -> Any:
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def _safe(name: str) -> str:
    parts = [re.sub(r"\W", "_", p) or "_" for p in name.split(".")]
    return ".".join(p if not p[0].isdigit() or p.isdigit() else "_" + p for p in parts)


def _substitute(node: fx.Node, value: Any) -> None:
    """Replace every use of ``node`` by a constant ``value``."""
    for user in list(node.users):
        user.args = fx.node.map_arg(user.args, lambda n: value if n is node else n)  # type: ignore[assignment]
        user.kwargs = fx.node.map_arg(user.kwargs, lambda n: value if n is node else n)  # type: ignore[assignment]


def _rebuild(gm: fx.GraphModule, example_inputs: Sequence[Any], handled: Callable[[torch.Tensor], bool]) -> _Rebuilt:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph_out = graph.graph_copy(gm.graph, env)  # type: ignore[arg-type]
    graph.output(graph_out)
    root = nn.Module()
    new: dict[str, nn.Parameter] = {}
    old: list[str] = []
    used: set[str] = set()

    def register(name: str, value: Any) -> str:
        name = _safe(name)
        base, k = name, 1
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        if isinstance(value, nn.Parameter) and not handled(value):
            _set_attr(root, name, value, as_param=True)
            new[name] = value
        else:
            if isinstance(value, nn.Parameter):
                old.append(name)
            _set_attr(root, name, value, as_param=False)
        return name

    # attributes the Dynamo graph already reads (non-inlined modules, constants)
    for node in list(graph.nodes):
        if node.op == "get_attr":
            value = _get_attr(gm, node.target)
            node.target = register(node.target, value)

    old_placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(old_placeholders) != len(example_inputs):
        raise ConfigError(f"Dynamo graph has {len(old_placeholders)} inputs but {len(example_inputs)} example inputs.")
    tensor_by_source: dict[str, fx.Node] = {}
    inputs, sources, examples = [], [], []
    symbolic: list[tuple[fx.Node, str | None, Any]] = []
    for ph, example in zip(old_placeholders, example_inputs):
        node, source = env[ph], _source_name(ph)
        if isinstance(example, nn.Parameter) or (isinstance(example, torch.Tensor) and source
                                                 and ("_parameters[" in source or "_buffers[" in source)):
            fqn = (_fqn_from_source(source) if source else None) or str(ph.target)
            with graph.inserting_before(node):
                attr = graph.get_attr(register(fqn, example))
            node.replace_all_uses_with(attr)
            graph.erase_node(node)
        elif isinstance(example, torch.Tensor):
            inputs.append(node)
            sources.append(source)
            examples.append(example)
            if source:
                tensor_by_source[source] = node
        else:
            symbolic.append((node, source, example))
    # sizes and unspecialised scalars: recompute sizes from the tensor they come from
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    head = next(iter(graph.nodes))
    for ph in reversed(placeholders):  # placeholders first (get_attrs were inserted among them)
        if ph is not head:
            head.prepend(ph)
        head = ph
    first_op = next(n for n in graph.nodes if n.op != "placeholder")
    for node, source, example in symbolic:
        m = re.match(r"^(.*)\.size\(\)\[(\d+)\]$", source or "")
        if m and m.group(1) in tensor_by_source:
            with graph.inserting_before(first_op):
                repl = graph.call_function(torch.ops.aten.sym_size.int, (tensor_by_source[m.group(1)], int(m.group(2))))
            node.replace_all_uses_with(repl)
        else:
            try:
                value = int(example) if isinstance(example, (int, torch.SymInt)) else float(example)
            except Exception as e:
                raise ConfigError(f"cannot bind graph input {node.name} (source {source}) of type "
                                  f"{type(example).__name__} for calibration") from e
            _substitute(node, value)
        graph.erase_node(node)
    graph.lint()
    resume = (_compiling_code_name() or "").startswith("torch_dynamo_resume_in_")
    return _Rebuilt(fx.GraphModule(root, graph), inputs, sources, examples, resume, new, old)
