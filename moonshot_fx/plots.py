"""Per-layer figures of a pruning run (matplotlib, the optional ``plots`` extra).

:func:`plot_site_errors` draws the relative reconstruction error ``tr(ΔCΔᵀ) / tr(WCWᵀ)`` of every
pruned weight (``SiteReport.rel_error``), in graph order, for one run or several side by side —
what ``moonshot-fx prune --plot FILE`` writes and what ``benchmarks/plots.py`` draws for the
benchmark runs. Sites without the statistic (Wanda, magnitude: NaN) are left out of the line.
Files are written atomically (a temporary file renamed into place).
"""
from __future__ import annotations

import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import MissingExtraError

__all__ = ["pyplot", "plot_site_errors", "save_figure", "site_errors", "short_site_name"]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or :class:`MissingExtraError`."""
    try:
        import matplotlib
    except ImportError as exc:
        raise MissingExtraError(
            "figures need matplotlib, which is not installed: pip install 'moonshot-fx[plots]' "
            "(or pip install matplotlib)") from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Save ``fig`` to ``path`` (format from the suffix, PNG by default) atomically; closes it."""
    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = path.suffix.lstrip(".").lower() or "png"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format=fmt, dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def site_errors(report: Any) -> list[tuple[str, float]]:
    """``(site name, rel_error)`` in graph order from a :class:`~moonshot_fx.report.SparsityReport`,
    its ``to_dict()`` / ``moonshot_report.json`` form, or a mapping ``name → rel_error`` (``None``
    for a site without the statistic)."""
    if hasattr(report, "sites"):
        return [(s.name, _num(s.rel_error)) for s in report.sites]
    if isinstance(report, Mapping) and "sites" in report:
        return [(s["name"], _num(s["rel_error"])) for s in report["sites"]]
    if isinstance(report, Mapping):
        return [(k, _num(v)) for k, v in report.items()]
    raise TypeError(f"cannot read per-site errors from a {type(report).__name__}")


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)


_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|block)\.(\d+)\.")


def short_site_name(name: str) -> str:
    """``model.layers.12.mlp.down_proj.weight`` → ``12.down_proj``; other names lose ``.weight``."""
    base = name[:-len(".weight")] if name.endswith(".weight") else name
    m = _LAYER.search(base)
    return f"{m.group(1)}.{base.rsplit('.', 1)[-1]}" if m else base


def plot_site_errors(runs: Any, path: str | os.PathLike[str], *, title: str | None = None) -> Path:
    """Write a figure of the per-site relative error of one run (a report, as :func:`site_errors`
    reads) or of several (a mapping ``label → report``), sites in the first run's order on the x
    axis, error on a log axis. Returns the path written. Raises :class:`MissingExtraError`
    without matplotlib and ``ValueError`` when no site has a finite error (e.g. Wanda only)."""
    plt = pyplot()
    series = {label: site_errors(r) for label, r in _as_runs(runs).items()}
    order: list[str] = []
    for errs in series.values():
        order += [n for n, _ in errs if n not in order]
    pos = {n: i for i, n in enumerate(order)}
    fig, ax = plt.subplots(figsize=(max(6.0, min(16.0, 0.06 * len(order) + 4)), 3.6))
    drawn = 0
    for label, errs in series.items():
        pts = [(pos[n], e) for n, e in errs if math.isfinite(e) and e > 0]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker=".", markersize=3, linewidth=0.8, label=label or None)
            drawn += 1
    if not drawn:
        plt.close(fig)
        raise ValueError("no site has a finite relative error to plot (Wanda and magnitude keep no "
                         "reconstruction statistics)")
    ax.set_yscale("log")
    ax.set_ylabel("relative reconstruction error")
    ax.set_xlabel("pruned weight (graph order)")
    ticks = _tick_positions(order)
    ax.set_xticks(ticks)
    ax.set_xticklabels([short_site_name(order[i]) for i in ticks], rotation=90, fontsize=7)
    ax.grid(True, which="major", alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.set_title(title or "per-layer relative reconstruction error", fontsize=10)
    return save_figure(fig, path)


def _as_runs(runs: Any) -> Mapping[str, Any]:
    """One run (a report, its dict, or ``name → error``) as ``{"": run}``; several stay as given."""
    single = hasattr(runs, "sites") or not isinstance(runs, Mapping) or "sites" in runs \
        or all(v is None or isinstance(v, (int, float)) for v in runs.values())
    return {"": runs} if single else runs


def _tick_positions(order: Sequence[str], most: int = 40) -> list[int]:
    """At most ``most`` evenly spaced tick positions over the sites."""
    if len(order) <= most:
        return list(range(len(order)))
    step = math.ceil(len(order) / most)
    return list(range(0, len(order), step))
