"""The SmolLM2-135M 2:4 ablation table: every configuration measured on WikiText-2 test *and* C4,
as a ratio to SparseGPT on the same calibration seed, averaged over the seeds it was run on.

Used by ``render.py`` (README and RESULTS.md). A configuration's ratio on one seed divides its
perplexity by SparseGPT's *in the same result file* where that file has a SparseGPT row; a file
without one (a follow-up run of a few configurations) takes SparseGPT from the file of the same
seed and settings whose name shares the longest prefix with its own, the run closest in time on a
tie (``quality17k_smollm2_seed2`` → ``quality17_smollm2_seed2``, ``q18best_smollm2`` →
``q18_smollm2``): the table names it.
Runs calibrated on C4 (all of it or half) are rows of their own, labelled so, their ratios to
SparseGPT calibrated the same way.
Rounding moves a 2:4 perplexity by about ±3% between otherwise identical runs, which is why
only the mean over seeds is read against a target.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

#: the Fisher forms a MOONSHOT label can name (a label without one ran the default of its day)
FORMS = {"token", "row", "kron", "sample", "weight"}
#: what the table shows: SmolLM2 rows at this pattern measured on both texts
PATTERN = "2:4"


def _seed(doc: dict[str, Any]) -> int | None:
    cal = str(doc.get("settings", {}).get("calibration", ""))
    tail = cal.rsplit("seed", 1)
    return int(tail[1]) if len(tail) == 2 and tail[1].strip().isdigit() else None


def _key(doc: dict[str, Any]) -> tuple[Any, ...]:
    s = doc.get("settings", {})
    return (str(s.get("calibration", "")).rsplit("seed", 1)[0], s.get("evaluation"), s.get("evaluation_c4"))


def _hours_apart(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Hours between two runs' ``date`` fields (the run closest in time ran the closest code)."""
    from datetime import datetime

    try:
        ta, tb = (datetime.strptime(str(d.get("date", ""))[:16], "%Y-%m-%d %H:%M") for d in (a, b))
    except ValueError:
        return float("inf")
    return abs((ta - tb).total_seconds()) / 3600


def _calibration_tag(doc: dict[str, Any]) -> str:
    """``""`` for the usual WikiText-2 calibration; a label suffix for runs calibrated on C4
    (``quality.py --calib-source``), which are their own rows, never mixed into the usual ones."""
    cal = str(doc.get("settings", {}).get("calibration", ""))
    if "c4_valid" not in cal:
        return ""
    return " [calibrated on WikiText-2 + C4]" if "wikitext2" in cal else " [calibrated on C4]"


def _rows(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["method"]: r for r in doc.get("rows", [])
            if r.get("pattern") == PATTERN and "quality_c4" in r and "error" not in r}


def collect(files: list[tuple[Path, dict[str, Any]]]) -> dict[str, list[tuple[int, float, float, str]]]:
    """``method → [(seed, WikiText-2 ÷ SparseGPT, C4 ÷ SparseGPT, baseline file stem)]``, one
    entry per (method, seed): where several files measured a method on one seed, the file with
    its own SparseGPT row wins, then the later file name."""
    docs = [(p.stem, d) for p, d in files if p.stem.split("_")[1:2] == ["smollm2"] and not p.stem.startswith("layers")
            and _rows(d) and _seed(d) is not None]  # layers_: a per-layer experiment
    with_base = {stem: d for stem, d in docs if "sparsegpt" in _rows(d)}
    out: dict[str, dict[int, tuple[int, float, float, str, bool]]] = {}
    for stem, doc in sorted(docs):
        seed = _seed(doc)
        assert seed is not None
        rows = _rows(doc)
        if "sparsegpt" in rows:
            base_stem = stem
        else:
            same = [s for s, d in with_base.items() if _seed(d) == seed and _key(d) == _key(doc)]
            if not same:
                continue
            base_stem = max(same, key=lambda s: (len(os.path.commonprefix([s, stem])),
                                                 -_hours_apart(with_base[s], doc), s))
        base = _rows(with_base[base_stem])["sparsegpt"]
        own = base_stem == stem
        tag = _calibration_tag(doc)
        for method, r in rows.items():
            if method.startswith("moonshot") and not (set(method.split("+")[0].split("-")) & FORMS):
                method += f"-{r['fisher']}" if r.get("fisher") else " (default form of its run)"
            if tag:
                if method == "sparsegpt":
                    continue  # 1.000 by construction: the tagged rows' own baseline
                method += tag
            entry = (seed, r["quality"] / base["quality"], r["quality_c4"] / base["quality_c4"], base_stem, own)
            old = out.setdefault(method, {}).get(seed)
            if old is None or (own and not old[4]) or own == old[4]:
                out[method][seed] = entry
    return {m: [e[:4] for _, e in sorted(by.items())] for m, by in out.items()}


def _cell(xs: list[float]) -> str:
    mean = sum(xs) / len(xs)
    return f"{mean:.3f}" if len(xs) == 1 else f"{mean:.3f} [{min(xs):.3f}, {max(xs):.3f}]"


def ablation_table(files: list[tuple[Path, dict[str, Any]]]) -> str | None:
    """The markdown table (module docstring), best mean C4 ratio first; None without data."""
    data = collect(files)
    if not data:
        return None
    order = sorted(data, key=lambda m: (m != "sparsegpt", "[calibrated" in m, sum(e[2] for e in data[m]) / len(data[m])))
    lines = ["| configuration | seeds | WikiText-2 ÷ SparseGPT | C4 ÷ SparseGPT | SparseGPT from |",
             "|---|---|---:|---:|---|"]
    for m in order:
        es = data[m]
        seeds = ",".join(str(e[0]) for e in es)
        bases = sorted({e[3] for e in es})
        lines.append(f"| {m} | {seeds} | {_cell([e[1] for e in es])} | {_cell([e[2] for e in es])} | "
                     f"{bases[0] if len(bases) == 1 else f'{len(bases)} files'} |")
    return "\n".join(lines)


__all__ = ["ablation_table", "collect"]
