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
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.fx as fx
from torch import nn

from moonshot_fx.errors import (
    CalibrationError,
    ConfigError,
    MoonshotError,
    NoPrunableSitesError,
)

from .compile_graph import (
    _fqn_from_source,
    _index,
    _input_path,
    _rebuild,
    _Rebuilt,
    _split_batch,
)

__all__ = ["CompileRecord", "SparsifyBackend", "backend", "is_available"]
_ = _fqn_from_source  # re-exported: the graph reading lives in compile_graph.py

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
