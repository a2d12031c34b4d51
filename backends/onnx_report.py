"""What an ONNX export found: the per-parameter initializer checks, the report, and the errors."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from moonshot_fx.errors import MoonshotError, TraceError


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
