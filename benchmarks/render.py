"""Render benchmarks/results/*.json into results markdown and the README's results table.

    python benchmarks/render.py

The README section between ``<!-- results:start -->`` and ``<!-- results:end -->`` is replaced;
nothing else in the README is touched.
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
    lines = [f"**{doc['model']}** — {doc['settings']['calibration']}; {doc['settings']['evaluation']}; {unit_note}"
             f"dense {metric} **{doc['dense']['quality']:.2f}** ({doc['date']}, {_command_note(doc)})", "",
             f"| pattern | method | {metric} | vs base pruner | prune time (s) | time ÷ SparseGPT | peak RSS (MB) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    if doc.get("note"):
        lines[1:1] = ["", f"_Note: {doc['note']}_"]
    order = list(dict.fromkeys(r["pattern"] for r in doc["rows"]))
    rows = sorted((r for r in doc["rows"] if "error" not in r), key=lambda r: order.index(r["pattern"]))
    for r in doc["rows"]:
        if "error" in r:
            lines.append(f"| {r['pattern']} | {r['method']} | failed: {r['error'][:60]} | | | | |")
    by_key = {(r["pattern"], r["method"]): r for r in rows}
    for r in rows:
        ref = by_key.get((r["pattern"], "sparsegpt"))
        same_run = ref is not None and ref.get("run", 1) == r.get("run", 1)
        t_ratio = f"{r['prune_seconds'] / ref['prune_seconds']:.2f}×" if same_run else "– (other run)" if ref else "–"
        base = _base_of(r["method"])
        vs = "–"
        if base and (r["pattern"], base) in by_key:
            b = by_key[(r["pattern"], base)]["quality"]
            if better_low:
                vs = f"{100 * (r['quality'] - b) / b:+.1f}%"
            else:
                vs = f"{r['quality'] - b:+.2f} pts"
        alpha = f" (α={r['alpha']:g})" if r.get("alpha") is not None else ""
        if unit == "auto" and r.get("sequential_unit") and "@" not in r["method"]:
            alpha += f" [{r['sequential_unit']}]"  # what "auto" chose for this row
        lines.append(f"| {r['pattern']} | {r['method']}{alpha} | {r['quality']:.2f} | {vs} | "
                     f"{r['prune_seconds']:.1f} | {t_ratio} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def generic_table(doc: dict[str, Any]) -> str:
    if "markdown" in doc:
        return doc["markdown"]
    return "```\n" + json.dumps(doc, indent=1)[:2000] + "\n```"


#: section order and titles of the result files (others follow alphabetically under their name)
TITLES = {
    "quality_smollm2": "SmolLM2-135M: quality with the default sequential unit (auto)",
    "quality-block_smollm2": "SmolLM2-135M: quality, all methods, block sequential unit",
    "quality-group_smollm2": "SmolLM2-135M: quality, group sequential unit (earlier runs: see each row's run in the JSON)",
    "peers_smollm2": "SmolLM2-135M: against llm-compressor",
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
    return (base, seed) if sep and base in TITLES and seed.isdigit() else (stem, None)


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


def _seed_section(stem: str, docs: dict[int, dict[str, Any]]) -> list[str]:
    summarise, title = SEED_SUMMARIES[stem]
    summary = summarise(docs) if len(docs) > 1 else None
    return [] if summary is None else [f"### {title}\n\n_{stem}.json, {stem}_seed*.json_\n\n{summary}"]


def render_all() -> str:
    """Write results/RESULTS.md and the README section; returns the markdown."""
    parts = []
    seeded: tuple[str, dict[int, dict[str, Any]]] | None = None  # the stem being collected over seeds
    for path in sorted(RESULTS.glob("*.json"), key=_order):
        doc = json.loads(path.read_text())
        stem, seed = _seed_variant(path.stem)
        if seeded and seeded[0] != stem:  # the summary follows the last seed's table
            parts += _seed_section(*seeded)
            seeded = None
        if stem in SEED_SUMMARIES:
            seeded = seeded or (stem, {})
            seeded[1][int(seed or 0)] = doc
        title = TITLES.get(stem, stem) + (f", calibration seed {seed}" if seed else "")
        body = quality_table(doc) if "rows" in doc and "dense" in doc else generic_table(doc)
        parts.append(f"### {title}\n\n_{path.name}_\n\n{body}")
    if seeded:
        parts += _seed_section(*seeded)
    md = "\n\n".join(parts) if parts else "_No results yet: run the benchmarks._"
    write_text(RESULTS / "RESULTS.md", md + "\n")
    if README.exists() and RESULTS == DEFAULT_RESULTS.resolve():  # only the real results go into the README
        text = README.read_text()
        if START in text and END in text:
            head, rest = text.split(START, 1)
            _, tail = rest.split(END, 1)
            write_text(README, f"{head}{START}\n{md}\n{END}{tail}")
    return md


if __name__ == "__main__":
    print(render_all())
