"""The report a `sparsify` call attaches to the model (``model.moonshot_report``)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


OUT_IN = "out_in"
IN_OUT = "in_out"


def layout_name(transposed: bool) -> str:
    """``"in_out"`` for a weight stored ``(in, out)`` (a site's ``transposed``), else ``"out_in"``."""
    return IN_OUT if transposed else OUT_IN


@dataclass
class SiteReport:
    """One pruned weight.

    ``rel_error`` is ``tr(ΔCΔᵀ) / tr(WCWᵀ)`` on the calibration statistics (``Δ = W − Ŵ``): with
    ``C = XᵀX`` the relative reconstruction error, except for MOONSHOT sites whose sequential pass
    formed ``H_mix`` directly (token Fisher, fixed α), where ``C = H_mix``, the objective minimised.
    NaN for Wanda (only diagonals are kept) and magnitude (no statistics)."""

    name: str
    pattern: str
    sparsity: float
    rel_error: float
    params: int
    seconds: float
    #: how the site was handled when it differs from the method (e.g. a mixture-of-experts slice
    #: that no calibration token reached: ``"… pruned by magnitude"``); empty otherwise
    note: str = ""
    #: how the weight is stored: ``"out_in"`` (``nn.Linear``; conv kernels as ``(out, in·k…)``) or
    #: ``"in_out"`` (HF ``Conv1D``, a bare ``x @ W``). N:M groups run along the input dimension, so
    #: check an ``"in_out"`` weight with ``check_pattern(w, pattern, transposed=True)``
    layout: str = "out_in"
    #: the rank that solved it under torch.distributed (0 in one process)
    solved_by: int = 0

    @property
    def transposed(self) -> bool:
        """True when the weight is stored ``(in, out)`` (the ``transposed=`` of :func:`check_pattern`)."""
        return self.layout == IN_OUT


@dataclass
class SparsityReport:
    """What a `sparsify` call did: per-site results, timings and the config used."""

    config: dict[str, Any]
    sites: list[SiteReport] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    alpha: float | None = None
    alpha_search: dict[str, float] = field(default_factory=dict)
    #: ``alpha="auto"`` chosen per block inside the sequential pass (``alpha_search="block"``):
    #: block → ``{"alpha", "held_out_error": {α: boundary error}, "held_out"}``
    block_alphas: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: fisher="row": sites whose Fisher was clustered over output rows → clusters (others: 1)
    row_clusters: dict[str, int] = field(default_factory=dict)
    #: fisher="kron": the sites pruned against the Kronecker-factored curvature (the others,
    #: wider than ``kron_max_width``, used the token form)
    kron_sites: list[str] = field(default_factory=list)
    sequential: bool = False
    capture_method: str = ""
    #: BatchNorm layers whose running statistics were re-estimated after pruning
    norms_recalibrated: int = 0
    #: whether that re-estimation was switched on by ``recalibrate_norms=None`` (auto: the model
    #: has BatchNorm and calibration data was given) rather than asked for
    norms_recalibrated_by_default: bool = False

    @property
    def total_params(self) -> int:
        """Weights in pruned sites."""
        return sum(s.params for s in self.sites)

    @property
    def overall_sparsity(self) -> float:
        """Fraction of zeros over all pruned sites."""
        total = self.total_params
        return sum(s.sparsity * s.params for s in self.sites) / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict."""
        out = asdict(self)
        out["overall_sparsity"] = self.overall_sparsity
        return out

    def to_json(self, **kw: Any) -> str:
        """JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), **kw)

    def to_markdown(self) -> str:
        """A markdown table, one row per site."""
        lines = ["| site | layout | pattern | sparsity | rel. error | seconds |", "|---|---|---|---|---|---|"]
        for s in self.sites:
            lines.append(f"| {s.name} | {s.layout} | {s.pattern} | {s.sparsity:.3f} | {s.rel_error:.4f} "
                         f"| {s.seconds:.2f} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        t = ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items())
        extra = f", alpha={self.alpha}" if self.alpha is not None else ""
        return (f"SparsityReport({len(self.sites)} sites, {self.total_params:,} weights, "
                f"sparsity {self.overall_sparsity:.3f}{extra}; {t})")
