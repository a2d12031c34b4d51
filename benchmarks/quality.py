"""Quality benchmark: dense vs pruned quality, pruning wall time and peak RSS, side by side.

    python benchmarks/quality.py --model smollm2 --patterns 2:4 0.5 \
        --methods magnitude wanda sparsegpt moonshot-sparsegpt moonshot-wanda

Writes ``benchmarks/results/quality_<model>.json`` (``…_seed<N>.json`` with ``--seed N``; after
every row, atomically; each row carries every pruned weight's relative error in ``site_errors``)
and re-renders ``benchmarks/results/RESULTS.md``, the README table and the figures (see
``render.py``, ``plots.py``). Every method of one invocation runs in the same process on the same calibration
data, so time ratios are fair.

Settings (documented defaults):
* smollm2 — SmolLM2-135M; calibration: ``--calib-windows`` (128) × 512 tokens of wikitext2_valid,
  seed 0 (``--seed`` picks other windows, as in ``peers.py``); evaluation: the first
  ``--eval-windows`` (32) non-overlapping 512-token windows of wikitext2_raw_test.
* stories260k — calibration: 64 × 256 tokens sampled from the dense model (seed 0); evaluation:
  all 128-token windows of tinystories_sample.txt.
* resnet20 / resnet56 — calibration: the 1,000 calib.npz images (labels unused); evaluation:
  top-1 on all 10,000 test.npz images. The first conv is kept dense (3 input channels).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, parse_method, timed, write_json  # noqa: E402

import moonshot_fx  # noqa: E402
from moonshot_fx import data  # noqa: E402

log = logging.getLogger("quality")


def lm_setup(name: str, args: argparse.Namespace) -> tuple[Any, list[Any], Callable[[Any], float], dict[str, Any]]:
    if name == "smollm2":
        model, tok = data.load_smollm2(progress=False)
        source = getattr(args, "calib_source", "wikitext2")
        ids = data.tokenize(tok, data.load_text("wikitext2_valid"))
        n_c4 = {"wikitext2": 0, "c4": args.calib_windows, "mix": args.calib_windows // 2}[source]
        cal = data.calibration_windows(ids, args.calib_windows - n_c4, args.seqlen, seed=args.seed)
        calib_text = f"{args.calib_windows - n_c4}x{args.seqlen} tokens wikitext2_valid"
        if n_c4:
            c4_ids, skipped = c4_calibration_ids(tok, max(getattr(args, "c4_windows", 0), 1) * args.seqlen)
            cal = torch.cat([cal, data.calibration_windows(c4_ids, n_c4, args.seqlen, seed=args.seed)])
            calib_text = (f"{calib_text} + " if n_c4 < args.calib_windows else "") + \
                f"{n_c4}x{args.seqlen} tokens c4_valid_sample documents {skipped}+ (after the evaluated ones)"
        test = data.tokenize(tok, data.load_text("wikitext2_test"))
        ev = data.eval_windows(test, args.seqlen, args.eval_windows)
        settings = {"calibration": f"{calib_text} seed {args.seed}",
                    "evaluation": f"first {ev.shape[0]}x{args.seqlen} tokens wikitext2_raw_test", "metric": "perplexity"}
    else:
        model, tok = data.load_stories260k()
        ev = data.eval_windows(data.story_tokens(tok), 128)
        cal = data.sampled_windows(model, 64, 256, seed=0)
        settings = {"calibration": "64x256 tokens sampled from the dense model, seed 0",
                    "evaluation": f"{ev.shape[0]}x128 tokens tinystories_sample", "metric": "perplexity"}
    batches = [{"input_ids": cal[i:i + args.batch]} for i in range(0, cal.shape[0], args.batch)]
    if name == "smollm2" and getattr(args, "c4_windows", 0):  # speed.py does not evaluate, so has no such flag
        c4 = data.eval_windows(data.tokenize(tok, data.load_text("c4_valid")), args.seqlen, args.c4_windows)
        settings["evaluation_c4"] = f"first {c4.shape[0]}x{args.seqlen} tokens c4_valid_sample" + (
            " (never calibrated on)" if getattr(args, "calib_source", "wikitext2") == "wikitext2"
            else " (calibration uses later documents only)")
        return model, batches, lambda m: {"quality": data.perplexity(m, ev, batch_size=4),
                                          "quality_c4": data.perplexity(m, c4, batch_size=4)}, settings
    return model, batches, lambda m: {"quality": data.perplexity(m, ev, batch_size=4)}, settings


def c4_calibration_ids(tok: Any, eval_tokens: int) -> tuple[torch.Tensor, int]:
    """C4 tokens for calibration that share no document with the evaluated C4 span: the documents
    after the first ``k``, where the first ``k`` documents (joined as :func:`data.load_text` joins
    them) already hold more than ``eval_tokens`` tokens. Returns the ids and ``k``."""
    docs = data.load_documents("c4_valid")
    k, size = 0, 0
    while size <= eval_tokens + 64:  # margin: the last evaluated window may end inside document k
        k += 1
        if k >= len(docs):
            raise ValueError(f"c4_valid_sample has too few documents to keep {eval_tokens} evaluation tokens apart")
        size = data.tokenize(tok, "\n\n".join(docs[:k])).numel()
    return data.tokenize(tok, "\n\n".join(docs[k:])), k


def cnn_setup(name: str, args: argparse.Namespace) -> tuple[Any, list[Any], Callable[[Any], float], dict[str, Any]]:
    model = data.load_cifar_resnet(int(name.replace("resnet", "")))
    cx, _ = data.load_cifar("calib", n=args.calib_images)
    tx, ty = data.load_cifar("test", n=args.test_images)
    batches = [cx[i:i + 100] for i in range(0, cx.shape[0], 100)]
    settings = {"calibration": f"{cx.shape[0]} calib.npz images (labels unused)",
                "evaluation": f"top-1 on {tx.shape[0]} test.npz images", "metric": "top1",
                "exclude": ["conv1.weight"]}
    return model, batches, lambda m: {"quality": data.top1(m, tx, ty)}, settings


def run(args: argparse.Namespace) -> Path:
    setup = lm_setup if args.model in ("smollm2", "stories260k") else cnn_setup
    model, batches, evaluate, settings = setup(args.model, args)
    extra: dict[str, Any] = {"exclude": ("conv1.weight",)} if setup is cnn_setup else {}
    if args.sequential is not None:
        extra["sequential"] = args.sequential == "on"
    extra["sequential_unit"] = args.sequential_unit
    settings["sequential_unit"] = args.sequential_unit
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    out_path = RESULTS / f"{args.prefix}_{args.model}{f'_seed{args.seed}' if args.seed else ''}.json"
    doc: dict[str, Any] = {"model": args.model, "settings": settings, "machine": machine(),
                           "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"), "rows": []}
    if args.append and out_path.exists():
        old = json.loads(out_path.read_text())
        if old.get("settings") != settings:
            raise SystemExit(f"--append: {out_path} was measured with other settings {old.get('settings')}")
        redo = {(p, m) for p in args.patterns for m in args.methods}
        doc["rows"] = [r for r in old["rows"] if (r["pattern"], r["method"]) not in redo]
        doc["command"] = f"{old['command']} + (appended) {doc['command']}"
        doc["runs"] = old.get("runs", 1) + 1
        if "note" in old:  # written by hand: kept, and to be extended for the new run
            doc["note"] = old["note"]
    t = time.perf_counter()
    dense_q = evaluate(model)
    doc["dense"] = {**dense_q, "eval_seconds": time.perf_counter() - t}
    print(f"{args.model} dense {settings['metric']} {_show(dense_q)}", flush=True)
    for pattern in args.patterns:
        for label in args.methods:
            spec = parse_method(label)
            model.load_state_dict(dense)
            kwargs = {**extra, **spec.kwargs()}
            try:
                _, wall, peak = timed(lambda: moonshot_fx.sparsify(
                    model, calibration=batches, sparsity=pattern, method=spec.method, progress=args.progress, **kwargs))
            except moonshot_fx.MoonshotError as exc:
                print(f"{pattern} {label}: FAILED {exc}", flush=True)
                doc["rows"].append({"pattern": pattern, "method": label, "error": str(exc)})
                continue
            report = model.moonshot_report
            q = evaluate(model)
            row = {"pattern": pattern, "method": label, "run": doc.get("runs", 1), **q, "prune_seconds": wall,
                   "peak_rss_mb": peak / 2**20, "timings": report.timings, "alpha": report.alpha,
                   "alpha_search": report.alpha_search, "sequential": report.sequential,
                   "sequential_unit": report.config.get("sequential_unit"),
                   "fisher": report.config.get("fisher") if spec.method == "moonshot" else None,
                   "block_alphas": {k: v["alpha"] for k, v in report.block_alphas.items()},
                   "sparsity": report.overall_sparsity, "sites": len(report.sites),
                   "site_errors": {s.name: (s.rel_error if math.isfinite(s.rel_error) else None)
                                   for s in report.sites}}
            summary = region_summary(report)
            if summary:
                row["region"] = summary
            doc["rows"].append(row)
            print(f"{pattern:>5} {label:<24} {settings['metric']} {_show(q)}  prune {wall:7.1f}s  "
                  f"peak RSS {peak / 2**20:7.0f} MB  alpha {report.alpha if not report.block_alphas else 'per block'}",
                  flush=True)
            write_json(out_path, doc)
    model.load_state_dict(dense)
    write_json(out_path, doc)
    from render import render_all

    render_all()
    return out_path


_REGION_NOTE = re.compile(r"region refit (kept|reverted): held-out region error ([0-9.e+-]+)"
                          r"(?: -> ([0-9.e+-]+)| \(refit ([0-9.e+-]+)\))")


def region_summary(report: Any) -> dict[str, Any] | None:
    """Region reconstruction's outcome from the report's site notes: how many region ends kept
    or reverted their refit, and the held-out region errors (relative) before / after, per site
    and as means; None when no site was refit."""
    sites = {}
    for s in report.sites:
        m = _REGION_NOTE.search(s.note or "")
        if m:
            before, refit = float(m.group(2)), float(m.group(3) or m.group(4))
            sites[s.name] = {"kept": m.group(1) == "kept", "holdout_before": before, "holdout_refit": refit,
                             "holdout_after": refit if m.group(1) == "kept" else before}
    if not sites:
        return None
    n = len(sites)
    return {"kept": sum(v["kept"] for v in sites.values()), "reverted": sum(not v["kept"] for v in sites.values()),
            "holdout_before_mean": sum(v["holdout_before"] for v in sites.values()) / n,
            "holdout_after_mean": sum(v["holdout_after"] for v in sites.values()) / n,
            "raised": sum(v["holdout_after"] > v["holdout_before"] for v in sites.values()), "sites": sites}


def _show(q: dict[str, float]) -> str:
    return " / ".join(f"{v:9.3f}" for v in q.values())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", choices=["smollm2", "stories260k", "resnet20", "resnet56"])
    p.add_argument("--patterns", nargs="+", default=None)
    p.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt", "moonshot-sparsegpt",
                                                     "moonshot-wanda"])
    p.add_argument("--calib-windows", type=int, default=128)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--calib-source", choices=("wikitext2", "c4", "mix"), default="wikitext2",
                   help="smollm2: calibrate on WikiText-2 validation (default), on C4 documents after the "
                        "evaluated ones, or half of each")
    p.add_argument("--c4-windows", type=int, default=0,
                   help="smollm2: also report perplexity on the first N 512-token windows of the C4 sample "
                        "(quality_c4; out of the calibration domain)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0,
                   help="which calibration windows (smollm2; the same windows as peers.py --seed)")
    p.add_argument("--calib-images", type=int, default=1000)
    p.add_argument("--test-images", type=int, default=10000)
    p.add_argument("--sequential", choices=["on", "off"], default=None)
    p.add_argument("--sequential-unit", choices=["auto", "block", "group"], default="auto",
                   help="sequential granularity (default auto, the library's default: group for "
                        "sparsegpt/optima bases, block for wanda/magnitude)")
    p.add_argument("--prefix", default="quality")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--append", action="store_true",
                   help="keep the rows of an existing result file with the same settings (rows of this run's "
                        "patterns × methods are replaced); time ratios across runs are then not comparable")
    args = p.parse_args(argv)
    if args.patterns is None:
        args.patterns = ["0.7", "0.9"] if args.model.startswith("resnet") else ["2:4", "0.5"]
    logging.basicConfig(level=logging.WARNING)
    print(run(args))


if __name__ == "__main__":
    main()
