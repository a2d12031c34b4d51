"""Render benchmarks/results/*.json into the README's headline table and results/RESULTS.md.

    python benchmarks/render.py

The README section between ``<!-- results:start -->`` and ``<!-- results:end -->`` is replaced by
``headline()`` (one table: SmolLM2-135M and ResNet-20/56, means over calibration seeds); nothing
else in the README is touched. The figures of ``plots.py`` are drawn first (when matplotlib is
installed) and shown under their result file. Every result file is rendered into ``RESULTS.md``, grouped by the
question it answers (``GROUPS``); a file of unknown name lands under "Ablations and experiments".
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_RESULTS, RESULTS, write_text  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"
#: hand-written notes on reading the results, appended to RESULTS.md
NOTES = Path(__file__).resolve().parent / "results_notes.md"


def _base_of(label: str) -> str | None:
    suffix = "+bn" if label.endswith("+bn") else ""
    parts = label[: len(label) - len(suffix)].split("-")
    return parts[1] + suffix if parts[0] == "moonshot" and len(parts) > 1 else None


def _command_note(doc: dict[str, Any]) -> str:
    """The first command of a result file in backticks, and how many runs ``--append`` added
    (``quality.py`` joins their commands with ``" + (appended) "``; all are in the JSON)."""
    first, *more = doc["command"].split(" + (appended) ")
    return f"`{first}`" + (f" + {len(more)} appended run(s): commands in the JSON" if more else "")


def quality_table(doc: dict[str, Any]) -> str:
    metric = doc["settings"]["metric"]
    better_low = metric == "perplexity"
    unit = doc["settings"].get("sequential_unit")
    unit_note = f"sequential unit: {unit}; " if unit else ""
    c4 = any("quality_c4" in r for r in doc["rows"])  # a second evaluation text (``--c4-windows``)
    dense_c4 = f" (C4 {doc['dense']['quality_c4']:.2f})" if c4 and "quality_c4" in doc["dense"] else ""
    lines = [f"**{doc['model']}** — {doc['settings']['calibration']}; {doc['settings']['evaluation']}; {unit_note}"
             f"dense {metric} **{doc['dense']['quality']:.2f}**{dense_c4} ({doc['date']}, {_command_note(doc)})", "",
             f"| pattern | method | {metric} | vs base pruner |" + (" C4 | C4 vs base |" if c4 else "")
             + " prune time (s) | time ÷ SparseGPT | peak RSS (MB) |",
             "|---|---|---:|---:|" + ("---:|---:|" if c4 else "") + "---:|---:|---:|"]
    if doc.get("note"):
        lines[1:1] = ["", f"_Note: {doc['note']}_"]
    order = list(dict.fromkeys(r["pattern"] for r in doc["rows"]))
    rows = sorted((r for r in doc["rows"] if "error" not in r), key=lambda r: order.index(r["pattern"]))
    for r in doc["rows"]:
        if "error" in r:
            lines.append(f"| {r['pattern']} | {r['method']} | failed: {r['error'][:60]} | | | | |" + (" | |" if c4 else ""))
    by_key = {(r["pattern"], r["method"]): r for r in rows}
    for r in rows:
        ref = by_key.get((r["pattern"], "sparsegpt"))
        same_run = ref is not None and ref.get("run", 1) == r.get("run", 1)
        t_ratio = f"{r['prune_seconds'] / ref['prune_seconds']:.2f}×" if same_run else "– (other run)" if ref else "–"
        base = _base_of(r["method"])
        b_row = by_key.get((r["pattern"], base)) if base else None
        vs = _change(r["quality"], b_row["quality"], better_low) if b_row else "–"
        c4_cells = ""
        if c4:
            q4 = r.get("quality_c4")
            b4 = b_row.get("quality_c4") if b_row else None
            c4_cells = (f" {q4:.2f} |" if q4 is not None else " – |") + \
                (f" {_change(q4, b4, better_low)} |" if q4 is not None and b4 is not None else " – |")
        alpha = f" (α={r['alpha']:g})" if r.get("alpha") is not None else ""
        if unit == "auto" and r.get("sequential_unit") and "@" not in r["method"]:
            alpha += f" [{r['sequential_unit']}]"  # what "auto" chose for this row
        lines.append(f"| {r['pattern']} | {r['method']}{alpha} | {r['quality']:.2f} | {vs} |{c4_cells} "
                     f"{r['prune_seconds']:.1f} | {t_ratio} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def _change(q: float, base: float, better_low: bool) -> str:
    """``q`` against ``base``: a relative change for perplexity, a difference in points otherwise."""
    return f"{100 * (q - base) / base:+.1f}%" if better_low else f"{q - base:+.2f} pts"


def generic_table(doc: dict[str, Any]) -> str:
    if "markdown" in doc:
        return doc["markdown"]
    return "```\n" + json.dumps(doc, indent=1)[:2000] + "\n```"


#: section order and titles of the result files (others follow alphabetically under their name)
TITLES = {
    "quality_smollm2": "SmolLM2-135M: quality with the default sequential unit (auto)",
    "quality-block_smollm2": "SmolLM2-135M: quality, all methods, block sequential unit",
    "quality-group_smollm2": "SmolLM2-135M: quality, group sequential unit (earlier runs: see each row's run in the JSON)",
    "sweep_smollm2": "SmolLM2-135M: quality against sparsity (30–70% and 2:4, calibration seed 0)",
    "layers_smollm2": "SmolLM2-135M at 2:4: per-layer relative reconstruction error (calibration seed 0)",
    "peers_smollm2": "SmolLM2-135M: against llm-compressor",
    "peers-memory_smollm2": "SmolLM2-135M 2:4: peak-RSS growth against llm-compressor after the memory work (seed 0, 16 eval windows)",
    "peers_agreement_smollm2": "SmolLM2-135M: our SparseGPT and llm-compressor's on identical inputs",
    "speed_smollm2": "SmolLM2-135M: pruning time and memory, ratios to SparseGPT",
    "quality_resnet20": "ResNet-20 (CIFAR-10): top-1",
    "quality-block_resnet20": "ResNet-20 (CIFAR-10): top-1 with the block sequential unit",
    "quality_resnet56": "ResNet-56 (CIFAR-10): top-1",
    "deploy": "Deployment: ONNX Runtime parity and file sizes",
}


def _seed_variant(stem: str) -> tuple[str, str | None]:
    """``peers_smollm2_seed2`` → ``("peers_smollm2", "2")`` (``peers.py --seed``); else ``(stem, None)``."""
    base, sep, seed = stem.rpartition("_seed")
    return (base, seed) if sep and base and seed.isdigit() else (stem, None)


def _order(path: Path) -> tuple[int, str]:
    keys = list(TITLES)
    stem, _ = _seed_variant(path.stem)  # another calibration seed sits next to its seed-0 file
    return (keys.index(stem) if stem in keys else len(keys), path.name)


#: per seed, the two perplexities a seed table shows side by side, then any further values
SeedCells = dict[tuple[str, str], dict[int, tuple[float, ...]]]


def _seed_table(cells: SeedCells, seeds: list[int], intro: str, tail_headers: list[str],
                tail: Callable[[list[tuple[float, ...]]], list[str]]) -> str | None:
    """The markdown of a table over calibration seeds: one row per (pattern, method) seen on two or
    more seeds, each seed's cell ``first / second``, then the columns ``tail`` derives from the
    row's values (``tail_headers`` name them). None when no row qualifies."""
    rows = [(k, v) for k, v in cells.items() if len(v) >= 2]
    if not rows:
        return None
    lines = [intro, "", "| pattern | method | " + " | ".join([f"seed {s}" for s in seeds] + tail_headers) + " |",
             "|---|---|" + "---:|" * (len(seeds) + len(tail_headers))]
    for (pattern, method), by_seed in rows:
        per = [f"{by_seed[s][0]:.2f} / {by_seed[s][1]:.2f}" if s in by_seed else "–" for s in seeds]
        lines.append(f"| {pattern} | {method} | " + " | ".join(per + tail(list(by_seed.values()))) + " |")
    return "\n".join(lines)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def seed_summary(docs: dict[int, dict[str, Any]]) -> str | None:
    """One row per (pattern, method, sequential unit) that ``peers.py`` ran on two or more calibration seeds: each
    seed's perplexity (peer / ours), the means, the mean ratio and the range of time ratios."""
    cells: SeedCells = {}
    for seed, doc in docs.items():
        for r in doc.get("pairs", []):
            p, o = r.get("peer") or {}, r.get("ours") or {}
            if "quality" in p and "quality" in o:
                # keyed by the unit the row really ran with: the default unit changed between runs
                unit = o.get("sequential_unit")
                label = f"{r['method'].split('@')[0]}, {unit}" if unit else r["method"]
                cells.setdefault((r["pattern"], label), {})[seed] = (
                    p["quality"], o["quality"], o["prune_seconds"] / p["prune_seconds"])

    def tail(vals: list[tuple[float, ...]]) -> list[str]:
        times = [t for _, _, t in vals]
        return [f"{_mean([p for p, _, _ in vals]):.2f}", f"{_mean([o for _, o, _ in vals]):.2f}",
                f"{_mean([o / p for p, o, _ in vals]):.3f}× ({len(vals)} seeds)", f"{min(times):.2f}–{max(times):.2f}×"]

    return _seed_table(cells, sorted(docs),
                       "Perplexity, llm-compressor / ours, on each calibration set `peers.py --seed N` used (the "
                       "seed picks the 32 wikitext2_valid windows; evaluation is the same); mean ratio = mean of the "
                       "per-seed ratios ours ÷ peer.",
                       ["mean peer", "mean ours", "mean ratio", "time ours ÷ peer"], tail)


def moonshot_seed_summary(docs: dict[int, dict[str, Any]]) -> str | None:
    """One row per (pattern, MOONSHOT method) that ``quality.py --seed`` ran, next to its base
    pruner in the same file, on two or more calibration seeds: each seed's perplexity (base /
    MOONSHOT), the means and the mean change."""
    cells: SeedCells = {}
    for seed, doc in docs.items():
        by_key = {(r["pattern"], r["method"]): r for r in doc.get("rows", []) if "error" not in r}
        for (pattern, method), r in by_key.items():
            base = _base_of(method)
            if base and (pattern, base) in by_key:
                cells.setdefault((pattern, method), {})[seed] = (by_key[(pattern, base)]["quality"], r["quality"])

    def tail(vals: list[tuple[float, ...]]) -> list[str]:
        changes = [m / b - 1 for b, m in vals]
        return [f"{_mean([b for b, _ in vals]):.2f}", f"{_mean([m for _, m in vals]):.2f}",
                f"{100 * _mean(changes):+.1f}% ({len(vals)} seeds, {100 * min(changes):+.1f}% to {100 * max(changes):+.1f}%)"]

    return _seed_table(cells, sorted(docs),
                       "Perplexity, base pruner / MOONSHOT, on each calibration set `quality.py --seed N` used (the "
                       "seed picks the 32 wikitext2_valid windows; evaluation is the same); mean change = mean of the "
                       "per-seed changes.",
                       ["mean base", "mean MOONSHOT", "mean change"], tail)


#: result files repeated over calibration seeds: summary function and section title
SEED_SUMMARIES = {
    "peers_smollm2": (seed_summary, "SmolLM2-135M: against llm-compressor over calibration seeds"),
    "quality_smollm2": (moonshot_seed_summary, "SmolLM2-135M: MOONSHOT against its base over calibration seeds"),
}


def _seed_summary_for(stem: str) -> tuple[Callable[[dict[int, dict[str, Any]]], str | None], str] | None:
    """The summary over calibration seeds of a result file repeated with ``--seed N``, and its title."""
    if stem in SEED_SUMMARIES:
        return SEED_SUMMARIES[stem]
    if stem.startswith("peers"):
        return seed_summary, f"{stem}: against llm-compressor over calibration seeds"
    if stem.startswith(("quality", "exp")):
        return moonshot_seed_summary, f"{stem}: MOONSHOT against its base over calibration seeds"
    return None


def _seed_section(stem: str, docs: dict[int, dict[str, Any]]) -> list[str]:
    found = _seed_summary_for(stem)
    if found is None:
        return []
    summarise, title = found
    summary = summarise(docs) if len(docs) > 1 else None
    return [] if summary is None else [f"### {title}\n\n_{stem}.json, {stem}_seed*.json_\n\n{summary}"]


#: RESULTS.md sections, by the question a result file answers: (title, does this stem belong here);
#: the first match wins, and the last group takes every file no other group claims
GROUPS: list[tuple[str, Callable[[str], bool]]] = [
    ("Quality: how much does pruning cost, per method",
     lambda s: (s.startswith("quality") and not s[7:8].isdigit()) or s.startswith(("sweep", "layers"))),
    ("Against peers: llm-compressor on the same model and data", lambda s: s.startswith("peers")),
    ("Speed and memory", lambda s: s.startswith("speed")),
    ("Deployment", lambda s: s.startswith("deploy")),
    ("Scale: a model larger than memory, and several processes", lambda s: s.startswith("scale")),
    ("Ablations and experiments", lambda s: True),
]


def _group_of(stem: str) -> int:
    return next(i for i, (_, belongs) in enumerate(GROUPS) if belongs(stem))


def _load_all() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, json.loads(p.read_text())) for p in sorted(RESULTS.glob("*.json"), key=_order)]


def _file_sections(files: list[tuple[Path, dict[str, Any]]]) -> list[str]:
    """One section per result file, each seed-repeated file's summary after its last seed."""
    parts: list[str] = []
    seeded: tuple[str, dict[int, dict[str, Any]]] | None = None  # the stem being collected over seeds
    for path, doc in files:
        stem, seed = _seed_variant(path.stem)
        if seeded and seeded[0] != stem:  # the summary follows the last seed's table
            parts += _seed_section(*seeded)
            seeded = None
        if _seed_summary_for(stem) is not None:
            seeded = seeded or (stem, {})
            seeded[1][int(seed or 0)] = doc
        title = TITLES.get(stem, stem) + (f", calibration seed {seed}" if seed else "")
        body = quality_table(doc) if "rows" in doc and "dense" in doc else generic_table(doc)
        figures = "".join(f"\n\n![{title}: {png}]({png})" for png in _figures_of(path))
        parts.append(f"### {title}\n\n_{path.name}_\n\n{body}{figures}")
    if seeded:
        parts += _seed_section(*seeded)
    return parts


def _figures_of(path: Path) -> list[str]:
    """The PNG figures ``plots.py`` drew from this result file (``<stem>.png``, ``<stem>_layers.png``)."""
    return [p.name for p in (path.with_suffix(".png"), path.with_name(f"{path.stem}_layers.png")) if p.exists()]


#: the README's headline table: (model label, quality file stem, peers file stem or None, patterns,
#: methods; each entry of methods a tuple of labels, the first one present in the results is shown)
HEADLINE: list[tuple[str, str, str | None, list[str], list[tuple[str, ...]]]] = [
    ("SmolLM2-135M", "quality_smollm2", "peers_smollm2", ["2:4", "0.5"],
     [("magnitude",), ("wanda",), ("sparsegpt",), ("optima",), ("moonshot-wanda", "moonshot-wanda-auto"),
      ("moonshot-sparsegpt",), ("moonshot-optima",), ("llm-compressor sparsegpt",), ("llm-compressor wanda",)]),
    *[(name, f"quality_{key}", None, ["0.7", "0.9"],
       [("magnitude",), ("wanda",), ("sparsegpt",), ("optima",), ("moonshot-wanda", "moonshot-wanda-auto"),
        ("moonshot-sparsegpt",), ("moonshot-optima",), ("sparsegpt+bn",), ("optima+bn",),
        ("moonshot-optima-auto+bn", "moonshot-optima-a0+bn")])
      for name, key in [("ResNet-20 (CIFAR-10)", "resnet20"), ("ResNet-56 (CIFAR-10)", "resnet56")]],
]

#: per (pattern, label): per seed, (quality, time ÷ SparseGPT of the same run or None)
Cells = dict[tuple[str, str], dict[int, tuple[float, float | None]]]


def _headline_cells(stem: str, peers: str | None, docs: dict[str, dict[str, Any]]) -> tuple[Cells, dict[int, float], str]:
    """Every seed of ``stem`` (and of ``peers``): the cells, the dense quality per seed, the metric."""
    cells: Cells = {}
    dense: dict[int, float] = {}
    metric = "quality"
    for name, doc in docs.items():
        base, seed = _seed_variant(name)
        s = int(seed or 0)
        if base == stem and "rows" in doc:
            metric = doc["settings"]["metric"]
            dense[s] = doc["dense"]["quality"]
            rows = {(r["pattern"], r["method"]): r for r in doc["rows"] if "error" not in r}
            for (pattern, method), r in rows.items():
                ref = rows.get((pattern, "sparsegpt"))
                same = ref is not None and ref.get("run", 1) == r.get("run", 1)
                cells.setdefault((pattern, method), {})[s] = (
                    r["quality"], r["prune_seconds"] / ref["prune_seconds"] if same else None)
        elif peers and base == peers and "pairs" in doc:
            for r in doc["pairs"]:
                p = r.get("peer") or {}
                if "@" in r["method"] or "quality" not in p:
                    continue
                ours_sgpt = next((q["ours"] for q in doc["pairs"] if q["pattern"] == r["pattern"]
                                  and q["method"] == "sparsegpt" and "prune_seconds" in (q.get("ours") or {})), None)
                ratio = p["prune_seconds"] / ours_sgpt["prune_seconds"] if ours_sgpt else None
                cells.setdefault((r["pattern"], f"llm-compressor {r['method']}"), {})[s] = (p["quality"], ratio)
    return cells, dense, metric


def _pattern_name(pattern: str) -> str:
    try:
        return f"{100 * float(pattern):g}%"
    except ValueError:
        return pattern


def _mean_cell(values: list[float], fmt: str = ".2f") -> str:
    m = _mean(values)
    if len(values) == 1:
        return format(m, fmt)
    return f"{m:{fmt}} ({min(values):{fmt}}–{max(values):{fmt}}, {len(values)} seeds)"


def headline(docs: dict[str, dict[str, Any]]) -> str:
    """The README's one results table, from the result files ``docs`` (stem → document)."""
    lines = [("| model | sparsity | method | quality (mean, range over calibration seeds) | vs dense | "
              "time ÷ SparseGPT |"), "|---|---|---|---:|---:|---:|"]
    for model, stem, peers, patterns, methods in HEADLINE:
        cells, dense, metric = _headline_cells(stem, peers, docs)
        if not dense:
            continue
        d = _mean(list(dense.values()))
        lines.append(f"| {model} | – | dense | {metric} {d:.2f} | – | – |")
        for pattern in patterns:
            for labels in methods:
                label = next((m for m in labels if (pattern, m) in cells), None)
                if label is None:
                    continue
                by_seed = cells[(pattern, label)]
                qs = [q for q, _ in by_seed.values()]
                ts = [t for _, t in by_seed.values() if t is not None]
                vs = _change(_mean(qs), d, metric == "perplexity")
                t = f"{_mean(ts):.2f}×" if ts else "–"
                lines.append(f"| {model} | {_pattern_name(pattern)} | {label} | {_mean_cell(qs)} | {vs} | {t} |")
    return "\n".join(lines)


def _docs(files: list[tuple[Path, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    return {p.stem: d for p, d in files}


#: the README's second generated block: the SmolLM2 2:4 ablation on WikiText-2 and C4 (ablation.py)
ABLATION_START, ABLATION_END = "<!-- ablation:start -->", "<!-- ablation:end -->"
ABLATION_INTRO = (
    "SmolLM2-135M at 2:4, every configuration measured on WikiText-2 test and on C4 (16 × 512 tokens each; "
    "32 × 512 WikiText-2 calibration tokens per seed): perplexity ÷ SparseGPT's on the same calibration seed, "
    "mean [min, max] over the seeds listed. A label names the base pruner, then the Fisher form, then "
    "`+region` (region reconstruction); `admm` is the joint mask-and-weight optimisation. Generated by "
    "`benchmarks/ablation.py`.")


def readme_block() -> str:
    """The README's generated block (between the markers) as the result files give it now."""
    return headline(_docs(_load_all()))


def ablation_block(files: list[tuple[Path, dict[str, Any]]] | None = None) -> str:
    """The ablation block: intro and table (or a line saying nothing was measured yet)."""
    from ablation import ablation_table

    table = ablation_table(_load_all() if files is None else files)
    return ABLATION_INTRO + "\n\n" + (table or "_No SmolLM2 2:4 runs with C4 yet._")


def _replace_block(text: str, start: str, end: str, block: str) -> str:
    if start not in text or end not in text:
        return text
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{block}\n{end}{tail}"


def results_md() -> str:
    """The whole of RESULTS.md: the headline, then every result file grouped by question, then the notes."""
    files = _load_all()
    if not files:
        return "_No results yet: run the benchmarks._"
    intro = ("# Results\n\nGenerated from `benchmarks/results/*.json` by `python benchmarks/render.py`; do not "
             "edit. The headline table (also in the README) comes first, then every result file, grouped by the "
             "question it answers.")
    parts = [intro, "## Headline\n\n" + headline(_docs(files)),
             "## SmolLM2-135M 2:4 ablation (WikiText-2 and C4)\n\n" + ablation_block(files)]
    for i, (title, _) in enumerate(GROUPS):
        sections = _file_sections([(p, d) for p, d in files if _group_of(_seed_variant(p.stem)[0]) == i])
        if sections:
            parts.append(f"## {title}\n\n" + "\n\n".join(sections))
    if NOTES.exists():
        parts.append(NOTES.read_text().strip())
    return "\n\n".join(parts)


def render_all() -> str:
    """Draw the figures (when matplotlib is installed), write results/RESULTS.md and the README
    section; returns RESULTS.md's markdown."""
    from moonshot_fx.errors import MissingExtraError

    try:
        from plots import render_figures

        render_figures(RESULTS)
    except MissingExtraError as exc:
        print(f"figures not drawn: {exc}", file=sys.stderr)
    md = results_md()
    write_text(RESULTS / "RESULTS.md", md + "\n")
    if README.exists() and RESULTS == DEFAULT_RESULTS.resolve():  # only the real results go into the README
        text = README.read_text()
        new = _replace_block(text, START, END, readme_block())
        new = _replace_block(new, ABLATION_START, ABLATION_END, ablation_block())
        if new != text:
            write_text(README, new)
    return md


if __name__ == "__main__":
    print(render_all())
