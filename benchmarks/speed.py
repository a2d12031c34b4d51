"""Pruning speed and memory per method, side by side in one process, as ratios to SparseGPT.

    python benchmarks/speed.py --model smollm2 --pattern 2:4 \
        --methods sparsegpt magnitude wanda optima moonshot-sparsegpt moonshot-wanda moonshot-optima

Every method prunes a freshly restored dense model with the same calibration batches (SmolLM2:
``--calib-windows`` × 512 tokens of wikitext2_valid, seed 0). For MOONSHOT the backward pass that
gathers Fisher statistics is reported separately from the pruning step (``gradients`` column),
so "prune step ÷ base" compares like with like. Writes ``benchmarks/results/speed_<model>.json``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, parse_method, timed, write_json  # noqa: E402
from quality import cnn_setup, lm_setup  # noqa: E402

import moonshot_fx  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", choices=["smollm2", "stories260k", "resnet20", "resnet56"])
    p.add_argument("--pattern", default="2:4")
    p.add_argument("--methods", nargs="+", default=["sparsegpt", "magnitude", "wanda", "optima",
                                                     "moonshot-sparsegpt", "moonshot-wanda", "moonshot-optima"])
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--eval-windows", type=int, default=1)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="which calibration windows (smollm2), as quality.py --seed")
    p.add_argument("--prefix", default="speed", help="result file name: <prefix>_<model>.json")
    p.add_argument("--calib-images", type=int, default=1000)
    p.add_argument("--test-images", type=int, default=100)
    args = p.parse_args(argv)
    setup = lm_setup if args.model in ("smollm2", "stories260k") else cnn_setup
    model, batches, _, settings = setup(args.model, args)
    extra: dict[str, Any] = {"exclude": ("conv1.weight",)} if setup is cnn_setup else {}
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    for label in args.methods:
        spec = parse_method(label)
        model.load_state_dict(dense)
        _, wall, peak = timed(lambda: moonshot_fx.sparsify(model, calibration=batches, sparsity=args.pattern,
                                                           method=spec.method, progress=False, **extra, **spec.kwargs()))
        t = model.moonshot_report.timings
        rows.append({"method": label, "wall": wall, "gradients": t.get("gradients", 0.0),
                     "alpha_search": t.get("alpha_search", 0.0), "prune_step": wall - t.get("gradients", 0.0) - t.get("alpha_search", 0.0),
                     "peak_rss_mb": peak / 2**20, "sequential_unit": model.moonshot_report.config.get("sequential_unit")})
        print(f"{label:<22} wall {wall:7.1f}s  prune step {rows[-1]['prune_step']:7.1f}s  "
              f"gradients {rows[-1]['gradients']:6.1f}s  peak RSS {peak / 2**20:6.0f} MB", flush=True)
        _write(args, settings, rows, complete=False)  # a run stopped early keeps the rows it measured
    model.load_state_dict(dense)
    _write(args, settings, rows, complete=True)
    from render import render_all

    render_all()


def _write(args: argparse.Namespace, settings: dict[str, Any], rows: list[dict[str, Any]], complete: bool) -> None:
    """Write ``<prefix>_<model>.json`` with the rows so far (``"complete"`` says whether every
    requested method ran) and their markdown table."""
    ref = next((r for r in rows if r["method"] == "sparsegpt"), rows[0])
    lines = [f"**{args.model} {args.pattern}** — {settings['calibration']}; ratios to {ref['method']} in the same run "
             f"(`{' '.join(sys.argv)}`, {time.strftime('%Y-%m-%d %H:%M')})", "",
             "| method | wall (s) | ÷ SparseGPT | prune step (s) | prune step ÷ its base | gradients (s) | peak RSS (MB) | RSS ÷ SparseGPT |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    by = {r["method"]: r for r in rows}
    for r in rows:
        base = by.get(r["method"].split("-")[1]) if r["method"].startswith("moonshot-") else None
        step_ratio = f"{r['prune_step'] / base['prune_step']:.2f}×" if base else "–"
        unit = f" [{r['sequential_unit']}]" if r.get("sequential_unit") else ""
        lines.append(f"| {r['method']}{unit} | {r['wall']:.1f} | {r['wall'] / ref['wall']:.2f}× | {r['prune_step']:.1f} | {step_ratio} | "
                     f"{r['gradients']:.1f} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / ref['peak_rss_mb']:.2f}× |")
    md = "\n".join(lines)
    write_json(RESULTS / f"{args.prefix}_{args.model}.json", {"model": args.model, "pattern": args.pattern, "settings": settings,
                                                     "machine": machine(), "rows": rows, "markdown": md,
                                                     "complete": complete, "command": " ".join(sys.argv)})
    if complete:
        print(md)


if __name__ == "__main__":
    main()
