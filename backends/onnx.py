"""ONNX export of pruned models, verified with ONNX Runtime.

:func:`export_onnx` exports with ``torch.onnx.export(..., dynamo=True)``, then checks three things
before the file appears at its destination:

* **parity** — ONNX Runtime (``CPUExecutionProvider``) on *fresh* inputs whose dynamic dimensions
  differ from the export example (batch + 1, sequence + 3, spatial × 1.5) against eager PyTorch;
* **zeros** — for every pruned parameter (a floating weight of two or more dimensions with at least
  one exact zero) the ONNX initializer that carries it is located, in the exported file and in the
  ORT-optimised model, and every pruned position must still be exactly zero there;
* **patterns** — optionally, that those initializers satisfy an N:M pattern
  (:func:`moonshot_fx.check_pattern`) along the input dimension of the layer each came from:
  dimension 0 of a weight stored ``(in, out)`` (GPT-2's ``Conv1D``, ``x @ W``), dimension 1 of an
  ``(out, in)`` one; the layout comes from the pruning report, the module, or the ONNX graph
  (:mod:`moonshot_fx.backends.onnx_layout`).

A dimension marked dynamic is exported from an example of size at least 2 along it (a size-1
example is repeated to 2 first): ``torch.export`` specialises size-1 dimensions, which leaves
the exported graph tied to that size even where the ONNX input says it is dynamic.

Locating an initializer: by name (ONNX keeps parameter FQNs when nothing rewrote the tensor), else
by value in the same layout or transposed (the exporter constant-folds ``W.T`` for ``MatMul``),
else by value up to a per-output-row scale (BatchNorm folded into a preceding Conv), else through
ORT's blocked NCHWc Conv layouts (``ORT_ENABLE_ALL`` on x86; undone before checking), else by the
multiset of values (only the zero *count* can be checked then). Parameters found none of these ways are listed in
:attr:`OnnxReport.not_found`.

Files are written atomically: everything is written into a temporary directory next to the
destination, verified there, and moved into place only on success, so a failed export or a failed
verification leaves no file (and an earlier file at that path untouched).

ONNX Runtime converts sparse initializers to dense at load, so the file stores dense fp32 weights
with zeros in them; speed-ups from 2:4 come from an execution provider that exploits the pattern,
such as TensorRT with ``trt_sparsity_enable`` (see ``tensorrt_config_path``).
"""
from __future__ import annotations

import argparse
import fnmatch
import inspect
import json
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from moonshot_fx.config import PatternLike, parse_pattern
from moonshot_fx.errors import BackendUnavailableError, ConfigError, MoonshotError, TraceError

from moonshot_fx.user_models import model_arg_type

from . import onnx_layout

__all__ = [
    "InitializerCheck", "OnnxExportError", "OnnxReport", "OnnxVerificationError",
    "add_export_arguments", "export_main", "export_onnx", "is_available",
    "tensorrt_provider_options",
]

PatternSpec = Union[None, PatternLike, Mapping[str, Union[PatternLike, None]]]

_OPT_LEVELS = ("disabled", "basic", "extended", "all")


class OnnxExportError(TraceError):
    """``torch.onnx.export`` could not export the model (its message says which step failed)."""


class OnnxVerificationError(MoonshotError, RuntimeError):
    """The exported model failed verification; ``.report`` holds the full :class:`OnnxReport`."""

    def __init__(self, message: str, report: "OnnxReport") -> None:
        super().__init__(message)
        self.report = report


@dataclass
class InitializerCheck:
    """Where one pruned parameter ended up in an ONNX model, and whether its zeros survived.

    ``layout`` is ``"same"``, ``"transposed"``, ``"rescaled"`` (same positions, values scaled per
    output row, e.g. a folded BatchNorm), ``"nchwc8"``/``"nchwc16"`` (ORT's blocked Conv layout,
    undone before checking), ``"by name"`` (same name and shape, other values), ``"permuted"`` (same values in another order, e.g. ORT's
    NCHWc reorder: positions unknown, only the zero count is compared) or ``"not found"``.
    ``zeros_preserved`` is None when nothing was found. ``weight_layout`` is how the parameter
    is stored (``"out_in"`` or ``"in_out"``): the pattern is checked along its input dimension;
    ``layout_source`` says who told (``"report"``, ``"module"``, ``"graph"`` or ``"default"``).
    """

    param: str
    stage: str  # "export" or "optimized"
    initializer: str | None
    layout: str
    zeros_expected: int
    zeros_preserved: bool | None
    pattern: str | None = None
    pattern_ok: bool | None = None
    problems: list[str] = field(default_factory=list)
    weight_layout: str | None = None
    layout_source: str = ""


@dataclass
class OnnxReport:
    """Result of :func:`export_onnx`.

    ``max_abs_diff`` is the largest |ORT − eager| over all outputs on the fresh-shape inputs
    (``verify_shapes``); ``example_max_abs_diff`` the same on the export example itself;
    ``optimized_max_abs_diff`` the fresh-shape difference of the ORT-optimised model.
    """

    path: str
    size_bytes: int
    max_abs_diff: float | None
    example_max_abs_diff: float | None
    optimized_path: str | None
    optimized_size_bytes: int | None
    optimized_max_abs_diff: float | None
    optimization_level: str
    input_names: list[str]
    output_names: list[str]
    export_shapes: dict[str, list[int]]
    verify_shapes: dict[str, list[int]]
    dynamic_dims: dict[str, list[int]]
    checks: list[InitializerCheck]
    providers: list[str]
    available_providers: list[str]
    tensorrt_config_path: str | None = None
    atol: float = 1e-4
    rtol: float = 1e-5
    output_scale: float = 0.0  # max |eager output| over the verification inputs

    @property
    def tolerance(self) -> float:
        """Allowed max |ORT − eager|: ``atol + rtol · output_scale`` (fp32 rounding grows with the
        outputs' magnitude: LM logits of size ~30 after 30 layers differ by ~1e-4)."""
        return self.atol + self.rtol * self.output_scale

    @property
    def pruned_params(self) -> list[str]:
        """FQNs of the parameters that were checked (those with exact zeros)."""
        return sorted({c.param for c in self.checks})

    @property
    def not_found(self) -> dict[str, list[str]]:
        """Per stage, the pruned parameters no initializer could be matched to."""
        out: dict[str, list[str]] = {}
        for c in self.checks:
            if c.layout == "not found":
                out.setdefault(c.stage, []).append(c.param)
        return out

    @property
    def zeros_ok(self) -> bool:
        """True when every located initializer kept every pruned zero."""
        return all(c.zeros_preserved is not False for c in self.checks)

    @property
    def patterns_ok(self) -> bool:
        """True when every initializer checked against a pattern satisfies it."""
        return all(c.pattern_ok is not False for c in self.checks)

    @property
    def ok(self) -> bool:
        """Parity within :attr:`tolerance`, zeros preserved and patterns valid."""
        parity = all(d is None or d <= self.tolerance for d in
                     (self.max_abs_diff, self.example_max_abs_diff, self.optimized_max_abs_diff))
        return parity and self.zeros_ok and self.patterns_ok

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """A few human-readable lines."""
        found = {s: sum(1 for c in self.checks if c.stage == s and c.layout != "not found")
                 for s in ("export", "optimized")}
        total = len(self.pruned_params)
        lines = [
            f"ONNX model: {self.path} ({self.size_bytes / 1e6:.2f} MB), providers {self.providers}",
            f"  parity on fresh shapes {self.verify_shapes}: max |diff| = {_fmt(self.max_abs_diff)}"
            f" (example shapes: {_fmt(self.example_max_abs_diff)}; tolerance {self.tolerance:.3g} = "
            f"{self.atol:g} + {self.rtol:g} x max|output| {self.output_scale:.3g})",
            f"  pruned parameters: {total}; located in export {found['export']}/{total}, "
            f"in ORT-optimised ({self.optimization_level}) {found['optimized']}/{total}; "
            f"zeros preserved: {self.zeros_ok}; patterns valid: {self.patterns_ok}",
        ]
        if self.optimized_path:
            lines.append(f"  optimised model: {self.optimized_path} ({(self.optimized_size_bytes or 0) / 1e6:.2f} MB), "
                         f"max |diff| = {_fmt(self.optimized_max_abs_diff)}")
        for stage, names in self.not_found.items():
            lines.append(f"  not found in {stage}: {', '.join(names[:8])}{' …' if len(names) > 8 else ''}")
        if self.tensorrt_config_path:
            lines.append(f"  TensorRT provider config: {self.tensorrt_config_path}")
        return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


# ---------------------------------------------------------------------------------------------
# availability


def is_available() -> tuple[bool, str]:
    """Whether ONNX export and verification can run here, and why (not)."""
    missing, versions = [], []
    for mod in ("onnx", "onnxruntime", "onnxscript"):
        try:
            m = __import__(mod)
            versions.append(f"{mod} {getattr(m, '__version__', '?')}")
        except Exception as e:  # ImportError, or a broken install
            missing.append(f"{mod} ({type(e).__name__}: {e})")
    if missing:
        return False, (f"missing {', '.join(missing)}; install them with "
                       "`pip install 'moonshot-fx[onnx]'` (onnx, onnxruntime, onnxscript).")
    import onnxruntime as ort

    return True, f"{', '.join(versions)}; ONNX Runtime providers: {', '.join(ort.get_available_providers())}"


def _require() -> None:
    ok, reason = is_available()
    if not ok:
        raise BackendUnavailableError(f"ONNX export is unavailable: {reason}")


# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# atomic files


class _Staging:
    """A temporary directory next to ``final`` where files are written under their final names,
    then moved into place by :meth:`commit` (same filesystem, so ``os.replace`` is atomic)."""

    def __init__(self, final: Path) -> None:
        self.final = final
        final.parent.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        self.path = self.dir / final.name

    def commit(self) -> None:
        # companions first (external data), the model file last
        for f in sorted(self.dir.iterdir(), key=lambda p: p.name == self.final.name):
            os.replace(f, self.final.parent / f.name)
        self.cleanup()

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _file_size(model_path: Path) -> int:
    """Size of a model file plus the external-data files it references."""
    import onnx

    size = model_path.stat().st_size
    try:
        m = onnx.load(str(model_path), load_external_data=False)
    except Exception:
        return size
    seen = set()
    for init in m.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location" and entry.value not in seen:
                seen.add(entry.value)
                p = model_path.parent / entry.value
                if p.exists():
                    size += p.stat().st_size
    return size


# ---------------------------------------------------------------------------------------------
# TensorRT provider options


def tensorrt_provider_options(*, fp16: bool = True, engine_cache_path: str | None = None,
                              device_id: int = 0) -> dict[str, str]:
    """Provider options for ONNX Runtime's ``TensorrtExecutionProvider`` with 2:4 sparsity on.

    ``trt_sparsity_enable`` lets TensorRT pick sparse tensor-core kernels for layers whose weights
    are 2:4 (Ampere and later); it only takes effect in fp16/int8 precision, hence
    ``trt_fp16_enable``. Values are strings, as ORT's C API takes them.
    """
    opts = {
        "device_id": str(device_id),
        "trt_sparsity_enable": "True",
        "trt_fp16_enable": "True" if fp16 else "False",
        "trt_engine_cache_enable": "True" if engine_cache_path else "False",
    }
    if engine_cache_path:
        opts["trt_engine_cache_path"] = engine_cache_path
    return opts


def _tensorrt_config(model_path: Path) -> dict[str, Any]:
    return {
        "model": str(model_path),
        "providers": [
            ["TensorrtExecutionProvider",
             tensorrt_provider_options(engine_cache_path=str(model_path.parent / "trt_cache"))],
            ["CUDAExecutionProvider", {"device_id": "0"}],
            ["CPUExecutionProvider", {}],
        ],
        "usage": ("cfg = json.load(open(this_file)); onnxruntime.InferenceSession(cfg['model'], "
                  "providers=[tuple(p) for p in cfg['providers']]) -- needs onnxruntime-gpu with "
                  "TensorRT; sparse kernels need 2:4 weights and an Ampere or newer GPU."),
    }


# ---------------------------------------------------------------------------------------------
# ORT sessions and parity


def _ort_level(name: str) -> Any:
    import onnxruntime as ort

    levels = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    return levels[name]


def _session(path: Path, level: str = "all", optimized_to: Path | None = None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = _ort_level(level)
    so.log_severity_level = 3  # errors only (ORT warns about hardware-specific optimised files)
    if optimized_to is not None:
        so.optimized_model_filepath = str(optimized_to)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _fresh_like(t: torch.Tensor, shape: Sequence[int], gen: torch.Generator) -> torch.Tensor:
    if t.dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool)
    if t.is_floating_point():
        return torch.randn(shape, generator=gen, dtype=torch.float32).to(t.dtype)
    if t.numel():  # token ids / masks: stay within the values seen (e.g. the vocabulary)
        lo, hi = int(t.min()), int(t.max())
    else:
        lo, hi = 0, 1
    return torch.randint(lo, hi + 1, tuple(shape), generator=gen, dtype=torch.int64).to(t.dtype)


def _grown(size: int, integer: bool, dim: int) -> int:
    if dim == 0:
        return size + 1
    return size + 3 if integer else size + max(1, size // 2)


def _candidate_inputs(flat: list[torch.Tensor], sym: list[list[int]], seed: int) -> Iterator[list[torch.Tensor]]:
    """Fresh inputs: every symbolic dimension grown, then only the batch grown."""
    gen = torch.Generator().manual_seed(seed)
    for grow in ("all", "batch"):
        shapes = []
        changed = False
        for t, dims in zip(flat, sym):
            shape = list(t.shape)
            for d in dims:
                if grow == "all" or d == 0:
                    shape[d] = _grown(shape[d], not t.is_floating_point(), d)
                    changed = True
            shapes.append(shape)
        if changed:
            yield [_fresh_like(t, s, gen) for t, s in zip(flat, shapes)]


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


def _max_abs(ref: tuple[torch.Tensor, ...]) -> float:
    """Largest |value| over the floating outputs (0 when there are none)."""
    return max((float(r.detach().abs().max()) for r in ref if r.is_floating_point() and r.numel()), default=0.0)


def _max_diff(sess: Any, names: list[str], inputs: list[torch.Tensor], ref: tuple[torch.Tensor, ...]) -> float:
    feed = {n: _to_numpy(t) for n, t in zip(names, inputs)}
    outs = sess.run(None, feed)
    if len(outs) != len(ref):
        raise OnnxExportError(f"ONNX model has {len(outs)} outputs but the torch model returned {len(ref)}.")
    worst = 0.0
    for o, r in zip(outs, ref):
        r_np = _to_numpy(r).astype(np.float64) if r.is_floating_point() else _to_numpy(r)
        if tuple(o.shape) != tuple(r_np.shape):
            return float("inf")
        if r_np.size:
            worst = max(worst, float(np.max(np.abs(o.astype(np.float64) - r_np))))
    return worst


# ---------------------------------------------------------------------------------------------
# zero-pattern check


#: without a pruning report, a >=2-D parameter counts as pruned when at least this fraction is zero
#: (an embedding table with a few zero entries is not a pruned weight)
PRUNED_ZERO_FRACTION = 0.25


def _pruned_params(model: nn.Module) -> dict[str, np.ndarray]:
    """Parameters to check: the sites of ``model.moonshot_report`` (left by ``sparsify``) when
    present, else every >=2-D float parameter with at least ``PRUNED_ZERO_FRACTION`` zeros."""
    report = getattr(model, "moonshot_report", None)
    out = {}
    if report is not None and getattr(report, "sites", None):
        named = dict(model.named_parameters(remove_duplicate=False))
        for site in report.sites:
            p = named.get(site.name)
            if p is not None and bool((p == 0).any()):
                out[site.name] = p.detach().cpu().float().numpy()
        return out
    for name, p in model.named_parameters():
        if p.dim() >= 2 and p.is_floating_point() and float((p == 0).float().mean()) >= PRUNED_ZERO_FRACTION:
            out[name] = p.detach().cpu().float().numpy()
    return out


def _pattern_for(name: str, patterns: PatternSpec) -> Any:
    if patterns is None:
        return None
    if isinstance(patterns, Mapping):
        for glob, pat in patterns.items():
            if fnmatch.fnmatchcase(name, glob):
                return None if pat is None else parse_pattern(pat)
        return None
    return parse_pattern(patterns)


def _initializers(model_path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(model_path))
    out = {}
    for init in m.graph.initializer:
        if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                              onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE) and len(init.dims) >= 2:
            arr = numpy_helper.to_array(init)
            out[init.name] = np.asarray(arr, dtype=np.float32)
    return out


def _match_exact(p: np.ndarray, a: np.ndarray, nz: np.ndarray) -> bool:
    return a.shape == p.shape and np.allclose(a[nz], p[nz], rtol=1e-6, atol=0.0)


def _match_rescaled(p: np.ndarray, a: np.ndarray, nz: np.ndarray) -> bool:
    """Same positions, values scaled by one factor per output row (dimension 0) on the kept weights."""
    if a.shape != p.shape:
        return False
    P, A, NZ = p.reshape(p.shape[0], -1), a.reshape(a.shape[0], -1), nz.reshape(nz.shape[0], -1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(NZ, A / np.where(NZ, P, 1.0), np.nan)
    rows = NZ.any(axis=1)
    if not rows.any():
        return False
    ratio = ratio[rows]
    if not np.all(np.isfinite(ratio[NZ[rows]])):
        return False
    hi, lo = np.nanmax(ratio, axis=1), np.nanmin(ratio, axis=1)
    return bool(np.all(hi - lo <= 1e-4 * np.maximum(np.abs(hi), np.abs(lo)) + 1e-7) and np.all(hi != 0))


def _un_nchwc(a: np.ndarray, shape: tuple[int, ...]) -> Iterator[tuple[int, np.ndarray]]:
    """Candidate OIHW views of a Conv weight that ORT's NCHWc transformer reordered.

    ORT (``ORT_ENABLE_ALL`` on x86) stores Conv filters as ``OIHWBiBo`` (blocks of B input and B
    output channels innermost) or, for the first Conv and depthwise ones, ``OIHWBo``; B is 8
    (AVX2) or 16 (AVX-512); channel counts are padded up to multiples of B.
    """
    if a.ndim != 4 or len(shape) != 4 or a.shape[2:] != shape[2:]:
        return
    op, ip, kh, kw = a.shape
    for b in (8, 16):
        if op % b:
            continue
        if ip % b == 0:
            blocked = a.reshape(op // b, ip // b, kh, kw, b, b).transpose(0, 5, 1, 4, 2, 3)
            yield b, blocked.reshape(op, ip, kh, kw)[: shape[0], : shape[1]]
        yield b, a.reshape(op // b, ip, kh, kw, b).transpose(0, 4, 1, 2, 3).reshape(op, ip, kh, kw)[: shape[0], : shape[1]]


def _locate(name: str, p: np.ndarray, inits: dict[str, np.ndarray], prefix: str) -> tuple[str | None, str, np.ndarray | None]:
    """(initializer name, layout, initializer in the parameter's layout or None)."""
    nz = p != 0
    # 1. by name (the exporter keeps FQNs of untouched parameters; ORT keeps names it rewrites
    #    in place, such as a Conv weight with a BatchNorm folded into it)
    for cand in (prefix + name, name):
        a = inits.get(cand)
        if a is not None and a.shape == p.shape:
            layout = "same" if _match_exact(p, a, nz) else "rescaled" if _match_rescaled(p, a, nz) else "by name"
            return cand, layout, a
    same = [(k, a) for k, a in inits.items() if a.shape == p.shape]
    # 2. by value, same layout or transposed
    for k, a in same:
        if _match_exact(p, a, nz):
            return k, "same", a
    if p.ndim == 2:
        for k, a in inits.items():
            if a.shape == p.shape[::-1] and _match_exact(p, a.T, nz):
                return k, "transposed", np.ascontiguousarray(a.T)
    # 3. by value up to a per-row scale (folded normalisation)
    for k, a in same:
        if _match_rescaled(p, a, nz):
            return k, "rescaled", a
    # 4. ORT's blocked NCHWc Conv layouts, possibly with a folded BatchNorm
    if p.ndim == 4:
        for k, a in inits.items():
            for b, view in _un_nchwc(a, p.shape):
                if view.shape == p.shape and (_match_exact(p, view, nz) or _match_rescaled(p, view, nz)):
                    return k, f"nchwc{b}", np.ascontiguousarray(view)
    # 5. same multiset of values in another order: positions unknowable
    ps = np.sort(p, axis=None)
    for k, a in inits.items():
        if a.size == p.size and np.array_equal(np.sort(a, axis=None), ps):
            return k, "permuted", None
    return None, "not found", None


def _check_zeros(stage: str, params: dict[str, np.ndarray], inits: dict[str, np.ndarray], prefix: str,
                 patterns: PatternSpec, model_layouts: dict[str, tuple[str, str]] | None = None,
                 init_layouts: dict[str, str] | None = None) -> list[InitializerCheck]:
    """One :class:`InitializerCheck` per pruned parameter; ``model_layouts`` (per parameter, see
    :func:`onnx_layout.param_layouts`) and ``init_layouts`` (per initializer, see
    :func:`onnx_layout.graph_layouts`) say along which dimension a pattern is checked."""
    checks = []
    for name, p in params.items():
        zeros = int((p == 0).sum())
        init_name, layout, a = _locate(name, p, inits, prefix)
        pat = _pattern_for(name, patterns)
        check = InitializerCheck(param=name, stage=stage, initializer=init_name, layout=layout,
                                 zeros_expected=zeros, zeros_preserved=None,
                                 pattern=None if pat is None else str(pat))
        if layout == "permuted":
            got = int((inits[init_name] == 0).sum())  # type: ignore[index]
            check.zeros_preserved = got >= zeros
            check.problems.append("initializer is reordered: zero count compared, positions not checkable")
        elif a is not None:
            lost = int(((p == 0) & (a != 0)).sum())
            check.zeros_preserved = lost == 0
            if lost:
                check.problems.append(f"{lost} of {zeros} pruned positions are non-zero in {init_name!r}")
            if pat is not None:
                wl, source = onnx_layout.resolve_layout(name, init_name, layout, model_layouts or {},
                                                        init_layouts or {})
                check.weight_layout, check.layout_source = wl, source
                bad = onnx_layout.layout_pattern_problems(a, pat, wl)
                check.pattern_ok = not bad
                check.problems.extend(f"not {pat}: {b}; weight layout {onnx_layout.describe(wl, source)}"
                                      for b in bad)
        checks.append(check)
    return checks


# ---------------------------------------------------------------------------------------------
# export


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    dynamic: bool = True,
    verify: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-5,
    optimized_path: str | os.PathLike[str] | None = None,
    tensorrt_config_path: str | os.PathLike[str] | None = None,
    patterns: PatternSpec = None,
    optimization_level: str = "extended",
    opset_version: int | None = None,
    seed: int = 0,
) -> OnnxReport:
    """Export ``model`` to ONNX at ``path`` and verify it with ONNX Runtime.

    Args:
        model: the (pruned) model; exported in its current train/eval mode (call ``.eval()``).
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs
            (Hugging Face style: ``{"input_ids": ids}``). Non-tensor values are baked in as
            constants. For HF models ``use_cache=False`` is added and only ``.logits`` exported.
        path: destination ``.onnx`` file (written atomically).
        dynamic: mark batch and sequence/spatial dimensions dynamic (``torch.export.Dim.AUTO``:
            dimensions the model fixes, such as fixed image sizes, stay static; the report lists
            which became dynamic in ``dynamic_dims``). A size-1 example dimension is repeated to
            size 2 for the export (``torch.export`` would specialise it to 1) unless the model
            rejects that; ``export_shapes`` in the report are the shapes exported from.
        verify: run the checks and raise :class:`OnnxVerificationError` when parity exceeds
            ``atol``, a pruned zero was lost, or a pattern is violated. With ``verify=False`` the
            checks still run and are reported, but nothing is raised.
        atol, rtol: the max absolute difference ORT vs eager may be at most
            ``atol + rtol * max|eager output|`` (the fp32 default; pass ``rtol=0`` for a purely
            absolute bound).
        optimized_path: also save ONNX Runtime's optimised model there (the zero check always
            runs on an optimised model, kept in a temporary file when this is None).
        tensorrt_config_path: write a JSON file with provider options for ORT's TensorRT execution
            provider with ``trt_sparsity_enable`` (see :func:`tensorrt_provider_options`):
            ``cfg = json.load(f); ort.InferenceSession(cfg["model"], providers=[tuple(p) for p
            in cfg["providers"]])``.
        patterns: check N:M validity of the pruned initializers: one pattern for all pruned
            parameters (``"2:4"``) or ``{glob on parameter FQN: pattern or None}``. Groups run
            along each weight's input dimension (``InitializerCheck.weight_layout``).
        optimization_level: ORT level of the optimised model: ``"extended"`` (default; portable,
            keeps weight layouts), ``"all"`` (adds hardware-specific NCHWc Conv layouts, which the
            zero check undoes), ``"basic"``, ``"disabled"``.
        opset_version: ONNX opset (default: the exporter's).
        seed: seed of the fresh verification inputs.

    Returns:
        An :class:`OnnxReport`.

    Raises:
        BackendUnavailableError: onnx / onnxruntime / onnxscript missing.
        OnnxExportError: ``torch.onnx.export`` failed.
        OnnxVerificationError: a check failed (``verify=True``); no file is left at ``path``.
    """
    _require()
    if optimization_level not in _OPT_LEVELS:
        raise ConfigError(f"optimization_level must be one of {', '.join(_OPT_LEVELS)}, not {optimization_level!r}.")
    import onnxruntime as ort

    final = Path(path)
    opt_final = Path(optimized_path) if optimized_path is not None else None
    if opt_final is not None and opt_final.resolve() == final.resolve():
        raise ConfigError("optimized_path must differ from path.")

    args, kwargs = _split_inputs(model, example_inputs)
    leaves, spec = pytree.tree_flatten((args, kwargs))
    tensor_idx = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
    if not tensor_idx:
        raise ConfigError("example_inputs contain no tensor.")
    flat = [leaves[i] for i in tensor_idx]
    names = _input_names(model, args, kwargs, tensor_idx)
    wrapper = _Flat(model, spec, leaves, tensor_idx)
    prefix = "inner."

    with torch.no_grad():
        ref_example = wrapper(*flat)
    output_names = ["logits"] if (len(ref_example) == 1 and getattr(model, "config", None) is not None) \
        else [f"output_{i}" for i in range(len(ref_example))]

    dynamic_shapes = None
    export_flat = flat
    if dynamic:
        auto = torch.export.Dim.AUTO
        dynamic_shapes = (tuple({d: auto for d in _dynamic_dims(t)} or None for t in flat),)
        export_flat = _widened(flat, wrapper)

    staging = _Staging(final)
    opt_staging = None
    try:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(
                    wrapper, tuple(export_flat), dynamo=True, dynamic_shapes=dynamic_shapes,
                    input_names=names, output_names=output_names, opset_version=opset_version,
                    verbose=False, optimize=True,
                )
        except Exception as e:
            raise OnnxExportError(f"torch.onnx.export(dynamo=True) failed for {type(model).__name__}: "
                                  f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        if program is None:  # pragma: no cover - dynamo=True always returns a program
            raise OnnxExportError("torch.onnx.export returned no ONNXProgram.")
        program.save(str(staging.path))

        # which dimensions really are dynamic in the file
        import onnx

        header = onnx.load(str(staging.path), load_external_data=False)
        sym: list[list[int]] = []
        dyn_report: dict[str, list[int]] = {}
        graph_inputs = {i.name: i for i in header.graph.input}
        for n, t in zip(names, flat):
            gi = graph_inputs.get(n)
            dims = []
            if gi is not None:
                for d, dim in enumerate(gi.type.tensor_type.shape.dim):
                    if dim.HasField("dim_param") or not dim.HasField("dim_value"):
                        dims.append(d)
            sym.append(dims)
            dyn_report[n] = dims
        del header

        # ORT-optimised model (in a staging dir next to its destination, or a temporary one)
        if opt_final is not None:
            opt_staging = _Staging(opt_final)
            opt_file = opt_staging.path
        else:
            opt_file = staging.dir / "optimized.tmp.onnx"
        sess = _session(staging.path, "all")
        _session(staging.path, optimization_level, optimized_to=opt_file)
        opt_sess = _session(opt_file, "disabled")

        # parity
        with torch.no_grad():
            ex_diff = _max_diff(sess, names, flat, ref_example)
            fresh_diff = opt_diff = None
            verify_shapes: dict[str, list[int]] = {}
            for cand in _candidate_inputs(export_flat, sym, seed):  # sizes the export did not see
                try:
                    ref = wrapper(*cand)
                except Exception:
                    continue  # the eager model itself rejects this shape (e.g. fixed image size)
                try:
                    fresh_diff = _max_diff(sess, names, cand, ref)
                    opt_diff = _max_diff(opt_sess, names, cand, ref)
                except OnnxExportError:
                    raise
                except Exception as e:
                    raise OnnxVerificationError(
                        f"ONNX Runtime failed on fresh inputs of shapes {[list(c.shape) for c in cand]} "
                        f"that eager PyTorch accepts: {type(e).__name__}: {e}", _empty_report(final)) from e
                verify_shapes = {n: list(c.shape) for n, c in zip(names, cand)}
                break
            if fresh_diff is None:  # no dynamic dimension, or none the model accepts: reuse shapes
                gen = torch.Generator().manual_seed(seed)
                cand = [_fresh_like(t, t.shape, gen) for t in flat]
                ref = wrapper(*cand)
                fresh_diff = _max_diff(sess, names, cand, ref)
                opt_diff = _max_diff(opt_sess, names, cand, ref)
                verify_shapes = {n: list(c.shape) for n, c in zip(names, cand)}
            scale = max(_max_abs(ref_example), _max_abs(ref))  # ref: the fresh-shape reference
        providers = list(sess.get_providers())
        del sess, opt_sess

        # zeros and patterns
        params = _pruned_params(model)
        layouts = onnx_layout.param_layouts(model)
        checks = _check_zeros("export", params, _initializers(staging.path), prefix, patterns, layouts,
                              onnx_layout.graph_layouts(staging.path) if patterns is not None else None)
        checks += _check_zeros("optimized", params, _initializers(opt_file), prefix, patterns, layouts,
                               onnx_layout.graph_layouts(opt_file) if patterns is not None else None)

        report = OnnxReport(
            path=str(final), size_bytes=_file_size(staging.path),
            max_abs_diff=fresh_diff, example_max_abs_diff=ex_diff,
            optimized_path=str(opt_final) if opt_final is not None else None,
            optimized_size_bytes=_file_size(opt_file) if opt_final is not None else None,
            optimized_max_abs_diff=opt_diff, optimization_level=optimization_level,
            input_names=names, output_names=output_names,
            export_shapes={n: list(t.shape) for n, t in zip(names, export_flat)},
            verify_shapes=verify_shapes, dynamic_dims=dyn_report, checks=checks,
            providers=providers, available_providers=list(ort.get_available_providers()), atol=atol,
            rtol=rtol, output_scale=scale,
        )
        if verify and not report.ok:
            raise OnnxVerificationError(_failure_message(report), report)

        if opt_final is None and opt_file.exists():
            opt_file.unlink()
        staging.commit()
        if opt_staging is not None:
            opt_staging.commit()
    finally:
        staging.cleanup()
        if opt_staging is not None:
            opt_staging.cleanup()

    if tensorrt_config_path is not None:
        trt = Path(tensorrt_config_path)
        _atomic_write_text(trt, json.dumps(_tensorrt_config(final.resolve()), indent=2) + "\n")
        report.tensorrt_config_path = str(trt)
    return report


def _empty_report(final: Path) -> OnnxReport:
    return OnnxReport(path=str(final), size_bytes=0, max_abs_diff=None, example_max_abs_diff=None,
                      optimized_path=None, optimized_size_bytes=None, optimized_max_abs_diff=None,
                      optimization_level="", input_names=[], output_names=[], export_shapes={},
                      verify_shapes={}, dynamic_dims={}, checks=[], providers=[], available_providers=[])


def _failure_message(r: OnnxReport) -> str:
    parts = []
    for label, d in (("fresh-shape", r.max_abs_diff), ("example-shape", r.example_max_abs_diff),
                     ("optimised-model", r.optimized_max_abs_diff)):
        if d is not None and d > r.tolerance:
            parts.append(f"{label} max |ORT - torch| = {d:.3g} > tolerance {r.tolerance:.3g} "
                         f"(atol {r.atol:g} + rtol {r.rtol:g} x max|output| {r.output_scale:.3g})")
    for c in r.checks:
        if c.zeros_preserved is False or c.pattern_ok is False:
            parts.append(f"{c.param} ({c.stage}, {c.initializer}): {'; '.join(c.problems)}")
    return ("ONNX export verification failed, no file written: " + "; ".join(parts[:10])
            + (" …" if len(parts) > 10 else "") + ". Pass verify=False to write it anyway.")


# ---------------------------------------------------------------------------------------------
# CLI helper


_MODELS = ("resnet20", "resnet56", "stories260k", "smollm2")


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``export`` subcommand's arguments to ``parser``."""
    parser.add_argument("--model", required=True, type=model_arg_type(_MODELS),
                        help=f"a bundled model ({', '.join(_MODELS)}), a Hugging Face model directory, a .gguf "
                             "file, or timm:NAME / torchvision:NAME (then --checkpoint FILE)")
    parser.add_argument("--checkpoint", help="torch state_dict (e.g. a pruned model) loaded with weights_only=True")
    parser.add_argument("--num-classes", type=int, default=None, help="timm/torchvision: classifier size of --checkpoint")
    parser.add_argument("--out", required=True, help="destination .onnx file")
    parser.add_argument("--optimized-out", default=None, help="also save ORT's optimised model here")
    parser.add_argument("--pattern", default=None, help="check this pattern (e.g. 2:4) on pruned weights")
    parser.add_argument("--tensorrt-config", default=None, help="write TensorRT EP options (sparsity on) here")
    parser.add_argument("--no-verify", action="store_true", help="report but do not fail on verification")
    return parser


def _load_user_model(text: str, num_classes: int | None = None) -> tuple[nn.Module, Any]:
    """The user's model (an HF directory / .gguf file with its weights; timm / torchvision: the
    architecture, whose --checkpoint export_main loads) and a random example input."""
    from moonshot_fx.user_models import example_inputs, load_user_model, parse_model_arg

    user = load_user_model(parse_model_arg(text), need_tokenizer=False, require_checkpoint=False,
                           num_classes=num_classes)
    return user.model, example_inputs(user)


def _load_cli_model(name: str, pretrained: bool = True) -> tuple[nn.Module, Any]:
    """The model ``name`` (pretrained weights; for ResNets only the architecture when
    ``pretrained`` is False, as a checkpoint will overwrite it) and an example input."""
    try:
        from moonshot_fx import data
    except ImportError as e:  # pragma: no cover - data ships with the package
        raise BackendUnavailableError(f"moonshot_fx.data is unavailable: {e}") from e
    if name in ("resnet20", "resnet56"):
        depth = int(name[len("resnet"):])
        model = data.load_cifar_resnet(depth) if pretrained else data.resnet_cifar(depth)
        return model, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    if name == "stories260k":
        model, _ = data.load_stories260k()
    else:
        model, _ = data.load_smollm2()
    vocab = int(model.config.vocab_size)
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids}


def export_main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """Entry point of ``moonshot-fx export``: build the model, load ``--checkpoint``, export.

    ``args`` is an already parsed namespace (from a parser set up with
    :func:`add_export_arguments`) or a list of command-line strings. Returns the exit code.
    """
    if args is None or not isinstance(args, argparse.Namespace):
        parser = add_export_arguments(argparse.ArgumentParser(prog="moonshot-fx export"))
        args = parser.parse_args(None if args is None else list(args))
    checkpoint = getattr(args, "checkpoint", None)
    if args.model in _MODELS:
        model, example = _load_cli_model(args.model, pretrained=not checkpoint)
    else:
        model, example = _load_user_model(args.model, getattr(args, "num_classes", None))
    if checkpoint:
        sd = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
            sd = sd["state_dict"]
        sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}
        model.load_state_dict(sd, strict=True)
    model.eval()
    try:
        report = export_onnx(
            model, example, args.out, optimized_path=getattr(args, "optimized_out", None),
            patterns=getattr(args, "pattern", None), tensorrt_config_path=getattr(args, "tensorrt_config", None),
            verify=not getattr(args, "no_verify", False),
        )
    except MoonshotError as e:
        print(f"moonshot-fx export: error: {e}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0 if report.ok else 1
