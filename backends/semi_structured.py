"""2:4 semi-structured sparse ``nn.Linear`` weights for NVIDIA sparse tensor cores.

:func:`to_semi_structured` swaps the weight of every eligible ``nn.Linear`` for a
``torch.sparse.to_sparse_semi_structured`` tensor (cuSPARSELt, or CUTLASS when
``SparseSemiStructuredTensor._FORCE_CUTLASS`` is set), or goes through torchao's
``sparsify_(model, SemiSparseWeightConfig())`` when a torchao that still has it (≤ 0.18) is
installed. Which layers are eligible is decided by the pure function
:func:`semi_structured_eligibility`, which takes the environment as arguments so that it can be
tested on any machine.

Eligibility (from ``torch/sparse/semi_structured.py`` of the installed torch):

* CUDA is available and the GPU's compute capability is at least 8.0 (Ampere or newer);
* the weight is a 2-D CUDA tensor of a dtype the kernel backend accepts — cuSPARSELt: float16,
  bfloat16, int8, float8_e4m3fn; CUTLASS: float16, bfloat16, float32, int8 (fp32 models must be
  cast with ``model.half()`` / ``model.bfloat16()`` first for cuSPARSELt);
* both dimensions are at least, and multiples of, the backend's minimum sparse block for that dtype
  (cuSPARSELt fp16/bf16: 16 × 16; int8/fp8: 32 × 32; CUTLASS fp16/bf16: 32 × 64; fp32: 32 × 32;
  int8: 16 × 128), read from the installed torch when it exposes them;
* the weight is 2:4 sparse (:func:`moonshot_fx.check_pattern`): conversion keeps only two values
  out of every four, so converting a weight that is not 2:4 would silently change the model.

Where nothing can be converted (no CUDA, too old a GPU) the call raises
:class:`~moonshot_fx.errors.BackendUnavailableError`, or with ``on_unsupported="warn"`` warns and
returns the model unchanged: it is never a silent no-op.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import nn

from moonshot_fx.errors import BackendUnavailableError, ConfigError
from moonshot_fx.masks import pattern_violations

__all__ = [
    "SHAPE_CONSTRAINTS", "SemiStructuredReport", "is_available", "semi_structured_eligibility",
    "device_eligibility", "to_semi_structured", "torchao_status",
]

# (sparse_min_rows, sparse_min_cols) per backend and dtype, as in torch 2.6-2.14's
# torch/sparse/semi_structured.py; :func:`_constraints` prefers the installed torch's own tables.
SHAPE_CONSTRAINTS: dict[str, dict[torch.dtype, tuple[int, int]]] = {
    "cusparselt": {
        torch.float8_e4m3fn: (32, 32),
        torch.int8: (32, 32),
        torch.float16: (16, 16),
        torch.bfloat16: (16, 16),
    },
    "cutlass": {
        torch.int8: (16, 128),
        torch.float16: (32, 64),
        torch.bfloat16: (32, 64),
        torch.float32: (32, 32),
    },
}

MIN_CAPABILITY = (8, 0)


def _constraints(backend: str) -> dict[torch.dtype, tuple[int, int]]:
    """The installed torch's (min rows, min cols) table for ``backend``, else the built-in copy."""
    cls_name = {"cusparselt": "SparseSemiStructuredTensorCUSPARSELT",
                "cutlass": "SparseSemiStructuredTensorCUTLASS"}.get(backend)
    if cls_name is None:
        raise ConfigError(f"unknown semi-structured backend {backend!r}: 'cusparselt' or 'cutlass'.")
    cls = getattr(torch.sparse, cls_name, None)
    table = getattr(cls, "_DTYPE_SHAPE_CONSTRAINTS", None)
    if isinstance(table, Mapping):
        try:
            return {dt: (int(c.sparse_min_rows), int(c.sparse_min_cols)) for dt, c in table.items()}
        except AttributeError:  # a future layout of the table: fall back to the copy
            pass
    return dict(SHAPE_CONSTRAINTS[backend])


def _default_backend() -> str:
    sst = getattr(torch.sparse, "SparseSemiStructuredTensor", None)
    return "cutlass" if sst is not None and getattr(sst, "_FORCE_CUTLASS", False) else "cusparselt"


def device_eligibility(cuda_available: bool, capability: tuple[int, int] | None) -> tuple[bool, str]:
    """Whether the device can run 2:4 sparse kernels (pure function)."""
    if not cuda_available:
        return False, ("CUDA is not available: 2:4 semi-structured sparse kernels (cuSPARSELt/CUTLASS) "
                       "run only on NVIDIA GPUs with compute capability >= 8.0. On CPU keep the dense "
                       "pruned model, or export it with moonshot_fx.export_onnx.")
    if capability is None or tuple(capability) < MIN_CAPABILITY:
        cc = "unknown" if capability is None else f"{capability[0]}.{capability[1]}"
        return False, (f"GPU compute capability {cc} < 8.0: sparse tensor cores need Ampere (sm_80) "
                       "or newer.")
    return True, f"CUDA device with compute capability {capability[0]}.{capability[1]}"


def semi_structured_eligibility(
    shape: Sequence[int],
    dtype: torch.dtype,
    *,
    is_2_4: bool,
    cuda_available: bool,
    capability: tuple[int, int] | None,
    device_type: str = "cuda",
    contiguous: bool = True,
    backend: str = "cusparselt",
    constraints: Mapping[torch.dtype, tuple[int, int]] | None = None,
) -> tuple[bool, str]:
    """Whether a weight can become a semi-structured sparse tensor, and why not (pure function).

    Args:
        shape: the weight's shape ``(out_features, in_features)``.
        dtype: its dtype.
        is_2_4: whether it satisfies 2:4 (see :func:`moonshot_fx.check_pattern`).
        cuda_available, capability: the environment (``torch.cuda.is_available()``,
            ``torch.cuda.get_device_capability()``).
        device_type: where the weight lives (``"cuda"`` or ``"cpu"``...).
        contiguous: whether the weight is contiguous.
        backend: ``"cusparselt"`` (torch's default) or ``"cutlass"``.
        constraints: ``{dtype: (min_rows, min_cols)}``; default: the installed torch's table.

    Returns:
        ``(True, "ok")`` or ``(False, reason)``.
    """
    ok, reason = device_eligibility(cuda_available, capability)
    if not ok:
        return False, reason
    table = dict(constraints) if constraints is not None else _constraints(backend)
    if device_type != "cuda":
        return False, f"weight is on {device_type}; move the model to the GPU first (model.cuda())"
    if len(shape) != 2:
        return False, f"weight has {len(shape)} dimensions; only 2-D (Linear) weights are supported"
    if dtype not in table:
        names = ", ".join(str(d).replace("torch.", "") for d in table)
        return False, (f"dtype {str(dtype).replace('torch.', '')} is not supported by {backend} "
                       f"(supported: {names}); cast the model first, e.g. model.half()")
    rows, cols = int(shape[0]), int(shape[1])
    min_rows, min_cols = table[dtype]
    if rows < min_rows or rows % min_rows or cols < min_cols or cols % min_cols:
        return False, (f"shape ({rows}, {cols}) is not supported by {backend} for "
                       f"{str(dtype).replace('torch.', '')}: both dimensions must be at least and a "
                       f"multiple of ({min_rows}, {min_cols})")
    if not contiguous:
        return False, "weight is not contiguous"
    if not is_2_4:
        return False, ("weight is not 2:4 sparse (some groups of 4 inputs keep more than 2 values); "
                       "prune it with sparsity='2:4' first or exclude it")
    return True, "ok"


def _capability() -> tuple[int, int] | None:
    if not torch.cuda.is_available():
        return None
    try:
        major, minor = torch.cuda.get_device_capability()
        return int(major), int(minor)
    except Exception:  # pragma: no cover - a broken driver
        return None


def torchao_status() -> tuple[bool, str]:
    """Whether a torchao with ``sparsify_`` and ``SemiSparseWeightConfig`` (≤ 0.18) is installed."""
    try:
        import torchao  # noqa: F401
    except Exception as e:
        return False, f"torchao is not installed ({type(e).__name__}); `pip install 'torchao==0.18.0'`"
    version = str(getattr(torchao, "__version__", "?"))
    try:
        from torchao.sparsity import SemiSparseWeightConfig, sparsify_  # noqa: F401
    except Exception:
        return False, (f"torchao {version} has no torchao.sparsity (removed after 0.18.0); "
                       "install torchao==0.18.0 or use the torch API (use_torchao=False)")
    return True, f"torchao {version}"


def is_available() -> tuple[bool, str]:
    """Whether 2:4 semi-structured conversion can run here, and why (not)."""
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return False, f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured (need >= 2.1)"
    ok, reason = device_eligibility(torch.cuda.is_available(), _capability())
    if not ok:
        return False, reason
    backend = _default_backend()
    if backend == "cusparselt":
        cslt = getattr(torch.backends, "cusparselt", None)
        if cslt is not None and not cslt.is_available():
            return False, ("this torch build has no cuSPARSELt; set "
                           "torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS = True to use CUTLASS")
    return True, f"{reason}; backend {backend}"


@dataclass
class SemiStructuredReport:
    """Outcome of :func:`to_semi_structured`: per ``nn.Linear`` FQN, converted or skipped (why)."""

    model: nn.Module
    backend: str
    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    available: bool = True
    reason: str = ""

    @property
    def changed(self) -> bool:
        return bool(self.converted)

    def summary(self) -> str:
        lines = [f"semi-structured ({self.backend}): {len(self.converted)} converted, "
                 f"{len(self.skipped)} skipped" + ("" if self.available else f" — {self.reason}")]
        for name, why in list(self.skipped.items())[:20]:
            lines.append(f"  skipped {name}: {why}")
        return "\n".join(lines)


def _fail(on_unsupported: str, message: str) -> None:
    if on_unsupported == "raise":
        raise BackendUnavailableError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def to_semi_structured(
    model: nn.Module,
    *,
    on_unsupported: str = "raise",
    use_torchao: bool | None = None,
    include: Sequence[str] | None = None,
) -> SemiStructuredReport:
    """Convert the 2:4-pruned ``nn.Linear`` weights of ``model`` (in place) to semi-structured sparse.

    Args:
        model: a model already on a CUDA device of compute capability >= 8.0, in fp16/bf16.
        on_unsupported: ``"raise"`` (default) raises :class:`BackendUnavailableError` when this
            machine cannot run the kernels or when no layer is eligible; ``"warn"`` warns and
            returns the model unchanged (per-layer reasons in the report).
        use_torchao: True: use torchao ``sparsify_(model, SemiSparseWeightConfig())`` (needs
            torchao <= 0.18); False: ``torch.sparse.to_sparse_semi_structured``; None: torchao when
            a compatible one is installed, else torch.
        include: only consider Linear layers whose FQN is in this list (default: all).

    Returns:
        A :class:`SemiStructuredReport` (``report.model`` is ``model``).
    """
    if on_unsupported not in ("raise", "warn"):
        raise ConfigError(f"on_unsupported must be 'raise' or 'warn', not {on_unsupported!r}.")
    if use_torchao is None:
        use_torchao = torchao_status()[0]
    elif use_torchao:
        ok, why = torchao_status()
        if not ok:
            raise BackendUnavailableError(f"use_torchao=True but {why}")
    backend = "torchao" if use_torchao else f"torch-{_default_backend()}"
    kernel_backend = "cusparselt" if use_torchao else _default_backend()

    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)
               and (include is None or n in include)]
    report = SemiStructuredReport(model=model, backend=backend)
    ok, reason = is_available()
    if not ok:
        report.available, report.reason = False, reason
        report.skipped = {n: reason for n, _ in linears}
        _fail(on_unsupported, f"to_semi_structured cannot run here: {reason} The model is unchanged.")
        return report

    cuda, cap = torch.cuda.is_available(), _capability()
    eligible: list[tuple[str, nn.Linear]] = []
    for name, mod in linears:
        w = mod.weight
        if type(w.data).__name__.startswith("SparseSemiStructured"):
            report.skipped[name] = "weight is already semi-structured"
            continue
        is_24 = w.dim() == 2 and w.shape[1] % 4 == 0 and not pattern_violations(w.detach(), "2:4")
        good, why = semi_structured_eligibility(
            tuple(w.shape), w.dtype, is_2_4=is_24, cuda_available=cuda, capability=cap,
            device_type=w.device.type, contiguous=w.is_contiguous(), backend=kernel_backend)
        if good:
            eligible.append((name, mod))
        else:
            report.skipped[name] = why
    if not eligible:
        report.available, report.reason = False, "no eligible nn.Linear"
        _fail(on_unsupported, "to_semi_structured found no eligible nn.Linear weight; the model is "
              "unchanged. Reasons: " + "; ".join(f"{n}: {r}" for n, r in list(report.skipped.items())[:5]))
        return report

    if use_torchao:
        from torchao.sparsity import SemiSparseWeightConfig, sparsify_

        chosen = {id(m) for _, m in eligible}
        sparsify_(model, SemiSparseWeightConfig(), filter_fn=lambda mod, fqn="": id(mod) in chosen)
        report.converted = [n for n, _ in eligible]
        return report

    from torch.sparse import to_sparse_semi_structured

    for name, mod in eligible:
        try:
            sparse = to_sparse_semi_structured(mod.weight.detach())
        except Exception as e:  # a constraint this torch enforces that the table above missed
            report.skipped[name] = f"to_sparse_semi_structured failed: {type(e).__name__}: {e}"
            continue
        mod.weight = nn.Parameter(sparse, requires_grad=False)
        report.converted.append(name)
    if not report.converted:
        report.available, report.reason = False, "every conversion failed"
        _fail(on_unsupported, "to_semi_structured converted nothing: " + "; ".join(
            f"{n}: {r}" for n, r in list(report.skipped.items())[:5]))
    return report

