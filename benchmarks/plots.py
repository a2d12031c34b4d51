"""Figures of the benchmark results (PNG next to their JSON in ``benchmarks/results/``).

    python benchmarks/plots.py            # every figure the result files allow

* ``sweep_<model>.png`` from ``sweep_<model>.json`` (``quality.py --prefix sweep`` over several
  sparsities): perplexity against unstructured sparsity per method (log axis, dense line), 2:4 in
  a panel of its own;
* ``peers_<model>.png`` from ``peers_<model>.json`` and its ``_seed<N>`` siblings: our perplexity
  next to llm-compressor's per method and pattern, mean over the seeds with their range;
* ``<stem>_layers.png`` from any quality file whose rows carry ``site_errors`` (``quality.py``
  records them): the relative reconstruction error of every pruned weight, one line per method.

Needs matplotlib (``pip install 'moonshot-fx[plots]'``). ``quality.py`` and ``peers.py`` call
:func:`render_figures` at their end when it is installed.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402

from moonshot_fx.plots import plot_site_errors, pyplot, save_figure  # noqa: E402

SEED = re.compile(r"_seed(\d+)$")


def _is_unstructured(pattern: str) -> bool:
    return ":" not in pattern


def sweep_figure(doc: dict[str, Any], path: Path) -> Path:
    """Perplexity against sparsity, one line per method; 2:4 (N:M patterns) on the right."""
    plt = pyplot()
    rows = [r for r in doc["rows"] if "quality" in r]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    nm = sorted({r["pattern"] for r in rows if not _is_unstructured(r["pattern"])})
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 4.0), sharey=True,
                             gridspec_kw={"width_ratios": [3, 1 if nm else 0.01]})
    left, right = axes
    for i, m in enumerate(methods):
        pts = sorted((float(r["pattern"]), r["quality"]) for r in rows
                     if r["method"] == m and _is_unstructured(r["pattern"]))
        if pts:
            left.plot(*zip(*pts), marker="o", label=m, color=f"C{i}")
        for j, p in enumerate(nm):
            q = [r["quality"] for r in rows if r["method"] == m and r["pattern"] == p]
            if q:
                right.scatter([j + (i - (len(methods) - 1) / 2) * 0.12], q, color=f"C{i}", zorder=3)
    dense = doc.get("dense", {}).get("quality")
    for ax in axes:
        if dense:
            ax.axhline(dense, color="grey", linestyle="--", linewidth=1)
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    if dense:
        left.text(0.99, dense, f"dense {dense:.1f}", va="bottom", ha="right", fontsize=8, color="grey",
                  transform=left.get_yaxis_transform())
    left.set_xlabel("unstructured sparsity")
    left.set_ylabel(f"{doc.get('settings', {}).get('metric', 'perplexity')} (log)")
    left.legend(fontsize=8)
    right.set_xticks(range(len(nm)))
    right.set_xticklabels(nm)
    right.set_xlim(-0.6, len(nm) - 0.4)
    right.set_xlabel("N:M")
    fig.suptitle(f"{doc['model']}: quality against sparsity ({doc.get('settings', {}).get('calibration', '')})",
                 fontsize=9)
    return save_figure(fig, path)


def peers_figure(docs: list[dict[str, Any]], path: Path) -> Path:
    """Ours beside llm-compressor per (pattern, method): mean perplexity over the seed files, the
    bar's whisker spanning their range."""
    plt = pyplot()
    cells: dict[tuple[str, str], dict[str, list[float]]] = {}
    for doc in docs:
        for p in doc["pairs"]:
            c = cells.setdefault((p["pattern"], p["method"]), {"peer": [], "ours": []})
            c["peer"].append(p["peer"]["quality"])
            c["ours"].append(p["ours"]["quality"])
    keys = [k for k in cells if "@" not in k[1]]  # the @block/@group variants stay in the tables
    patterns = list(dict.fromkeys(k[0] for k in keys))
    fig, axes = plt.subplots(1, len(patterns), figsize=(4.2 * len(patterns), 3.8), squeeze=False)
    for ax, pat in zip(axes[0], patterns):
        ks = [k for k in keys if k[0] == pat]
        for j, side in enumerate(("peer", "ours")):
            means = [sum(cells[k][side]) / len(cells[k][side]) for k in ks]
            lo = [m - min(cells[k][side]) for m, k in zip(means, ks)]
            hi = [max(cells[k][side]) - m for m, k in zip(means, ks)]
            xs = [i + (j - 0.5) * 0.38 for i in range(len(ks))]
            ax.bar(xs, means, width=0.36, yerr=[lo, hi], capsize=3, color=f"C{j}",
                   label="llm-compressor" if side == "peer" else "moonshot-fx")
        top = max(max(cells[k]["peer"] + cells[k]["ours"]) for k in ks)
        ax.set_ylim(0, top * 1.3)
        for i, k in enumerate(ks):
            n = len(cells[k]["ours"])
            ratio = (sum(cells[k]["ours"]) / n) / (sum(cells[k]["peer"]) / len(cells[k]["peer"]))
            ax.text(i, top * 1.27, f"{ratio:.2f}×\n{n} seed{'s' if n > 1 else ''}",
                    ha="center", va="top", fontsize=7)
        ax.set_xticks(range(len(ks)))
        ax.set_xticklabels([k[1] if not k[1].startswith("moonshot-") else
                            f"{k[1]}\n(peer: {k[1].split('-', 1)[1]})" for k in ks], fontsize=8)
        ax.set_title(f"{pat}", fontsize=9)
        ax.set_ylabel("perplexity (lower is better)")
        ax.grid(True, axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, bbox_to_anchor=(0.5, -0.06))
    fig.suptitle(f"{docs[0]['model']}: moonshot-fx against llm-compressor (ratio: ours ÷ peer, mean over seeds)",
                 fontsize=9)
    return save_figure(fig, path)


def _has_site_errors(row: dict[str, Any]) -> bool:
    """Whether a quality row carries at least one site's relative error (Wanda's are all None)."""
    return any(v is not None for v in (row.get("site_errors") or {}).values())


def layers_figure(doc: dict[str, Any], path: Path, pattern: str | None = None) -> Path:
    """Per-site relative error of each method of one pattern (the first with ``site_errors``)."""
    rows = [r for r in doc["rows"] if _has_site_errors(r)]
    pattern = pattern or rows[0]["pattern"]
    runs = {r["method"]: r["site_errors"] for r in rows if r["pattern"] == pattern}
    return plot_site_errors(runs, path, title=f"{doc['model']} at {pattern}: relative reconstruction error per "
                                              f"pruned weight (XᵀX; lower is better)")


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def render_figures(results: Path = RESULTS) -> list[Path]:
    """Every figure the result files in ``results`` allow; returns the paths written."""
    out: list[Path] = []
    for f in sorted(results.glob("sweep_*.json")):
        doc = _load(f)
        if len({r["pattern"] for r in doc["rows"] if _is_unstructured(r["pattern"])}) >= 2:
            out.append(sweep_figure(doc, f.with_suffix(".png")))
    peers: dict[str, list[dict[str, Any]]] = {}
    for f in sorted(results.glob("peers_*.json")):
        stem = SEED.sub("", f.stem)
        doc = _load(f)
        if "pairs" in doc and stem.count("_") == 1:  # peers_<model>[_seedN], not peers_agreement_*
            peers.setdefault(stem, []).append(doc)
    for stem, docs in peers.items():
        out.append(peers_figure(docs, results / f"{stem}.png"))
    for f in sorted(results.glob("*.json")):
        doc = _load(f)
        if any(_has_site_errors(r) for r in doc.get("rows", [])):
            out.append(layers_figure(doc, results / f"{f.stem}_layers.png"))
    return out


def main() -> None:
    for p in render_figures():
        print(p)


if __name__ == "__main__":
    main()
