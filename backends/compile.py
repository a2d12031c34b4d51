"""A ``torch.compile`` backend that prunes the weights it sees, then hands the graph on.

::

    compiled = torch.compile(model, backend=moonshot_fx.backend(sparsity="2:4", calibration=batches))
    compiled(x)   # first compilation: prunes model's weights in place, then compiles with inductor

How it works. With inlined ``nn.Module`` s (the default since torch 2.5) Dynamo hands a backend a
``GraphModule`` whose parameters arrive as placeholders, and ``example_inputs`` holds the real
``nn.Parameter`` objects of the user's model (their Dynamo *source*, e.g.
``L['self']._modules['0']._parameters['weight']``, gives back the FQN). The backend rebuilds that
graph as an ordinary module in which those placeholders become ``get_attr`` s of the *same*
``Parameter`` objects registered under their original FQNs, and runs :func:`moonshot_fx.sparsify`
on it. ``sparsify`` writes its results in place into the parameters it was given, i.e. into the
user's model, so pruning through the compiled graph and pruning the model eagerly give the same
weights (same sites, same names for ``include``/``exclude`` globs, same calibration). This is the
most faithful route: no second trace of the user's model, and the graph that is pruned is exactly
the graph that is compiled. The graph then goes, unchanged, to the inner backend, whose runtime
inputs are the now-pruned parameters.

Each parameter is handed to ``sparsify`` at most once: the backend object remembers every
parameter it has seen by identity (a weak reference keyed by ``id``), so recompilations (new shapes,
new guards) and later graphs of a graph-broken model see the already-pruned parameters as
constants (buffers) and prune nothing again.

Calibration. Batches in the model's own input format (tensor, tuple of positional inputs, or dict of
keyword inputs) are mapped onto the graph's inputs through their Dynamo sources
(``L['args'][0]``, ``L['kwargs']['input_ids']``, ``L['x']`` …). Without calibration, or for a graph
whose inputs are not model inputs (the part after a graph break takes intermediate activations),
the graph is calibrated on its own example inputs, with a ``warnings.warn``. Pass ``model=`` to
prune the whole model eagerly on the first compilation instead, which is exact across graph breaks.

``sparsify`` traces with ``torch.export``; inside a Dynamo backend that nested trace would leak its
guards into the frame being compiled, so it runs outside the current tracing context
(``torch._guards.tracing(None)``).
"""
from __future__ import annotations

import contextlib
import re
import sys
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.fx as fx
from torch import nn

from moonshot_fx.errors import CalibrationError, ConfigError, MoonshotError, NoPrunableSitesError

__all__ = ["CompileRecord", "SparsifyBackend", "backend", "is_available"]

CompilerFn = Callable[[fx.GraphModule, list[Any]], Callable[..., Any]]


def is_available() -> tuple[bool, str]:
    """Whether the compile backend can run here (needs torch.compile / Dynamo)."""
    try:
        import torch._dynamo  # noqa: F401
    except Exception as e:  # pragma: no cover - every supported torch has Dynamo
        return False, f"torch._dynamo is unavailable: {type(e).__name__}: {e}"
    if not hasattr(torch, "compile"):  # pragma: no cover
        return False, f"torch {torch.__version__} has no torch.compile (need >= 2.0)"
    return True, f"torch {torch.__version__} with Dynamo"


@dataclass
class CompileRecord:
    """What one compilation did: parameters newly pruned, parameters already handled."""

    index: int
    new_params: list[str] = field(default_factory=list)
    already_handled: list[str] = field(default_factory=list)
    calibration: str = ""  # "calibration", "example inputs", "model", or "none"
    report: Any = None  # the SparsityReport of the sparsify call, if any


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


# ---------------------------------------------------------------------------------------------
# the backend


@contextlib.contextmanager
def _outside_dynamo() -> Iterator[None]:
    """Run code (a nested torch.export) without leaking guards into the frame being compiled."""
    guards = torch._guards
    with guards.compile_context(None), guards.tracing(None):
        yield


def _inner_compiler(inner: str | CompilerFn) -> CompilerFn:
    if callable(inner):
        return inner
    if inner == "eager":
        return lambda gm, example_inputs: gm.forward
    try:
        return torch._dynamo.lookup_backend(inner)  # type: ignore[no-any-return]
    except Exception as e:
        raise ConfigError(f"unknown inner backend {inner!r}: use 'inductor', 'eager', another registered "
                          f"torch.compile backend name, or a callable (gm, example_inputs) -> callable.") from e


class SparsifyBackend:
    """The callable :func:`backend` returns; pass it to ``torch.compile(..., backend=...)``.

    Attributes:
        records: one :class:`CompileRecord` per compilation.
        prune_counts: how many times each parameter FQN was handed to ``sparsify`` (at most 1).
    """

    def __init__(self, sparsity: Any = 0.5, method: str = "sparsegpt", calibration: Iterable[Any] | None = None,
                 inner: str | CompilerFn = "inductor", *, model: nn.Module | None = None,
                 **sparsify_options: Any) -> None:
        if "progress" not in sparsify_options:
            sparsify_options["progress"] = False
        self.sparsity = sparsity
        self.method = method
        self.calibration = None if calibration is None else list(calibration)
        self.inner = inner
        self.model = model
        self.options = sparsify_options
        self._compiler = _inner_compiler(inner)
        self._handled: dict[int, weakref.ref] = {}
        self.records: list[CompileRecord] = []
        self.prune_counts: dict[str, int] = {}
        if self.calibration is not None and not self.calibration:
            raise CalibrationError("calibration is empty: pass batches, or None to calibrate on the example inputs.")

    # identity bookkeeping ------------------------------------------------------------------------
    def _is_handled(self, p: torch.Tensor) -> bool:
        ref = self._handled.get(id(p))
        return ref is not None and ref() is p

    def _mark(self, p: torch.Tensor) -> None:
        self._handled[id(p)] = weakref.ref(p)

    def reset(self) -> None:
        """Forget which parameters were pruned (the next compilation prunes what it sees again)."""
        self._handled.clear()
        self.prune_counts.clear()
        self.records.clear()

    @property
    def compilations(self) -> int:
        return len(self.records)

    # torch.compile entry point --------------------------------------------------------------------
    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        record = CompileRecord(index=len(self.records))
        self.records.append(record)
        if self.model is not None:
            self._prune_model(record)
        else:
            self._prune_graph(gm, example_inputs, record)
        return self._compiler(gm, example_inputs)

    def _sparsify(self, module: nn.Module, batches: list[Any]) -> Any:
        from moonshot_fx.api import sparsify

        with _outside_dynamo():
            try:
                sparsify(module, None, calibration=batches, sparsity=self.sparsity, method=self.method, **self.options)
            except NoPrunableSitesError:
                return None
        return getattr(module, "moonshot_report", None)

    def _prune_model(self, record: CompileRecord) -> None:
        model = self.model
        assert model is not None
        params = dict(model.named_parameters())
        if all(self._is_handled(p) for p in params.values()):
            record.already_handled, record.calibration = list(params), "none"
            return
        if self.calibration is None and self.method != "magnitude":
            raise CalibrationError("backend(model=...) needs calibration=[batch, ...] (the model's own inputs).")
        record.report = self._sparsify(model, self.calibration or [])
        record.calibration = "model"
        for name, p in params.items():
            self._mark(p)
            self.prune_counts[name] = self.prune_counts.get(name, 0) + 1
        record.new_params = list(params)

    def _prune_graph(self, gm: fx.GraphModule, example_inputs: list[Any], record: CompileRecord) -> None:
        rebuilt = _rebuild(gm, example_inputs, self._is_handled)
        record.already_handled = list(rebuilt.old)
        if not any(p.dim() >= 2 for p in rebuilt.new.values()):
            for p in rebuilt.new.values():
                self._mark(p)
            record.calibration = "none"
            return
        batches, how = self._batches(rebuilt)
        record.calibration = how
        try:
            record.report = self._sparsify(rebuilt.module, batches)
        except MoonshotError:
            raise
        except Exception as e:
            raise CalibrationError(
                f"pruning the compiled graph on {how} failed ({type(e).__name__}: {e}). If the graph was "
                "compiled for static shapes other than the calibration batches', compile with "
                "dynamic=True, calibrate with batches of the compiled shape, or pass model=...") from e
        for name, p in rebuilt.new.items():
            self._mark(p)
            self.prune_counts[name] = self.prune_counts.get(name, 0) + 1
        record.new_params = list(rebuilt.new)

    def _batches(self, rebuilt: _Rebuilt) -> tuple[list[Any], str]:
        fake = getattr(torch._subclasses, "FakeTensor", ())
        if any(isinstance(e, fake) for e in rebuilt.examples):
            raise CalibrationError("the backend received fake example inputs; give calibration batches.")
        examples = [tuple(e.detach() for e in rebuilt.examples)]
        if self.calibration is None:
            if self.method != "magnitude":
                warnings.warn(
                    "moonshot_fx.backend: no calibration data given; calibrating on the compiled graph's "
                    "example inputs only (one batch): pruning quality will suffer. Pass calibration=[...].",
                    stacklevel=3)
            return examples, "example inputs"
        mapped = [None if rebuilt.resume else self._map_batch(b, rebuilt) for b in self.calibration]
        if any(m is None for m in mapped):
            warnings.warn(
                "moonshot_fx.backend: this graph's inputs are not the model's inputs (a graph break?), so "
                "the calibration batches cannot be fed to it; calibrating it on its example inputs instead. "
                "Pass model=... to prune the whole model on the first compilation.", stacklevel=3)
            return examples, "example inputs"
        return mapped, "calibration"

    @staticmethod
    def _map_batch(batch: Any, rebuilt: _Rebuilt) -> tuple[torch.Tensor, ...] | None:
        args, kwargs = _split_batch(batch)
        positional = list(args)
        out: list[torch.Tensor] = []
        next_local = 0
        for source in rebuilt.input_sources:
            path = _input_path(source) if source else None
            if path is None:
                return None
            kind, key, rest = path
            try:
                if kind == "args":
                    value = _index(positional[key], rest)
                elif kind == "kwargs":
                    value = _index(kwargs[key], rest)
                elif key in kwargs:
                    value = _index(kwargs[key], rest)
                else:  # a named local of forward(x, ...) given positionally: take them in order
                    if next_local >= len(positional):
                        return None
                    value = _index(positional[next_local], rest)
                    next_local += 1
            except (IndexError, KeyError, TypeError):
                return None
            if not isinstance(value, torch.Tensor):
                return None
            out.append(value)
        for value, example in zip(out, rebuilt.examples):
            if value.dtype != example.dtype or value.dim() != example.dim():
                return None
        return tuple(out)


def backend(
    sparsity: Any = 0.5,
    method: str = "sparsegpt",
    calibration: Iterable[Any] | None = None,
    inner: str | CompilerFn = "inductor",
    *,
    model: nn.Module | None = None,
    **sparsify_options: Any,
) -> SparsifyBackend:
    """A ``torch.compile`` backend that prunes weights on the first compilation.

    Args:
        sparsity: fraction, ``"50%"`` or ``"N:M"`` (as :func:`moonshot_fx.sparsify`).
        method: ``magnitude``, ``wanda``, ``sparsegpt``, ``optima`` or ``moonshot``.
        calibration: batches in the model's input format (tensor, tuple, or dict of keyword inputs).
            None: calibrate on the compiled graph's example inputs, with a warning (not needed for
            ``magnitude``).
        inner: the backend that compiles the graph afterwards: ``"inductor"``, ``"eager"``, any
            registered backend name, or a callable ``(gm, example_inputs) -> callable``.
        model: optional; prune this whole model eagerly with ``sparsify`` on the first compilation
            instead of pruning the compiled graph (exact across graph breaks; needs calibration).
        **sparsify_options: forwarded to :func:`moonshot_fx.sparsify` (``prune_head``, ``include``,
            ``exclude``, ``dampening``, ``alpha`` …; ``progress`` defaults to False).

    Returns:
        A :class:`SparsifyBackend` (``(gm, example_inputs) -> callable``); it remembers the
        parameters it pruned, by identity, so that recompilations and graph breaks never prune a
        parameter twice. ``.records`` and ``.prune_counts`` say what each compilation did.

    Example::

        be = moonshot_fx.backend(sparsity="2:4", method="sparsegpt", calibration=batches)
        fast = torch.compile(model, backend=be)
        fast(x)  # prunes model's Linear/Conv weights in place, then runs the inductor-compiled graph
    """
    return SparsifyBackend(sparsity, method, calibration, inner, model=model, **sparsify_options)
