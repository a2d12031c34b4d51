"""Scale benchmarks (issue 19): a model larger than memory, and calibration in several processes.

    # (a) a seeded random Llama-2-13B-shaped bf16 checkpoint (≈ 26 GB, written once into the cache;
    #     --shape llama2-7b-fp32: Llama-2-7B's shape in fp32, ≈ 27 GB, about half the solve per layer)
    python benchmarks/scale.py checkpoint --shape llama2-13b --cache /work/cache/scale
    #     ... streamed through sparsify_checkpoint, 2:4 SparseGPT, on 4 random windows of 512 tokens
    python benchmarks/scale.py stream --shape llama2-13b --cache /work/cache/scale --windows 4 --seq 512
    # (b) SmolLM2-135M 2:4 SparseGPT, one process vs two (gloo): wall, per-rank RSS, masks, perplexity
    python benchmarks/scale.py distributed --model smollm2 --pattern 2:4 --nproc 2

``stream`` records the peak resident set (the kernel's high-water mark, VmHWM, read and reset
after every decoder layer — so each layer's own peak is known — and an RSS sampling thread as a
cross-check), the total wall time, each layer's wall time, and each phase's (read, trace,
calibrate, solve, propagate, write; from ``sparsify_checkpoint``'s ``on_layer``). With
``--max-blocks K`` only the first K decoder layers are streamed (a view of the checkpoint whose
config says K layers and whose index names only their tensors; the shards are the same files),
and the total for every layer is extrapolated from their mean, labelled as such. The pruned
output goes to a temporary directory under the cache and is deleted afterwards unless ``--out``
is given. Writes ``benchmarks/results/scale_<shape>.json`` (``scale_<model>.json`` for
``distributed``) with a ``markdown`` field for ``render.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, PeakRSS, machine, write_json  # noqa: E402
from scale_checkpoint import SHAPES, write_checkpoint  # noqa: E402

MB = 2**20
PHASES = ("load", "capture", "calibrate", "solve", "propagate", "write")
PHASE_NAMES = {"load": "read shards, assign", "capture": "trace", "calibrate": "statistics, block re-runs",
               "solve": "SparseGPT solve", "propagate": "propagate activations", "write": "write shard"}


def status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in kB (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def truncated_view(src: Path, blocks: int, view: Path) -> Path:
    """A directory that reads as ``src`` cut to its first ``blocks`` decoder layers: config.json
    with ``num_hidden_layers=blocks``, an index of only those layers' (and the non-layer)
    tensors, and symlinks to the same shard files."""
    import re

    config = json.loads((src / "config.json").read_text())
    index = json.loads((src / "model.safetensors.index.json").read_text())
    layer = re.compile(r"^model\.layers\.(\d+)\.")
    keep = {k: v for k, v in index["weight_map"].items() if not (m := layer.match(k)) or int(m.group(1)) < blocks}
    view.mkdir(parents=True)
    for shard in sorted(set(keep.values())):
        (view / shard).symlink_to(src / shard)
    config["num_hidden_layers"] = blocks
    (view / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (view / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": keep}, indent=2))
    return view


def stream(args: argparse.Namespace) -> dict[str, Any]:
    """Stream the cached checkpoint through sparsify_checkpoint; returns (and writes) the result document."""
    import torch

    import moonshot_fx

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads()))
    spec = SHAPES[args.shape]
    src = write_checkpoint(args.shape, args.cache)
    layers = min(args.max_blocks or spec.layers, spec.layers)
    work = Path(tempfile.mkdtemp(prefix=f".stream-{args.shape}.", dir=args.cache))
    g = torch.Generator().manual_seed(args.seed)
    calib = [torch.randint(0, spec.vocab, (1, args.seq), generator=g) for _ in range(args.windows)]
    rows: list[dict[str, Any]] = []
    exact = reset_peak()
    base_kb = status_kb("VmRSS")
    peaks_kb = [base_kb]

    result = Path(args.results) / f"scale_{args.shape}.json"
    sampled = PeakRSS(interval=0.05)
    t = time.perf_counter()

    def on_layer(index: int, seconds: dict[str, float]) -> None:
        peak = status_kb("VmHWM")
        peaks_kb.append(peak)
        rows.append({"layer": index, **seconds, "peak_rss_mb": peak / 1024, "rss_after_mb": status_kb("VmRSS") / 1024})
        print(f"layer {index + 1}/{layers}: {seconds['total']:.1f}s, peak RSS {peak / 1024:.0f} MB", flush=True)
        reset_peak()
        if index + 1 < layers:  # the figures so far, in case the run is stopped (SIGTERM) before the end
            write_json(result, summarise(args, spec, None, rows, time.perf_counter() - t, base_kb, max(peaks_kb),
                                         sampled.peak, exact, layers))

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")  # unwinds: the temporary output is removed

    signal.signal(signal.SIGTERM, stop)
    try:
        source = truncated_view(src, layers, work / "view") if layers < spec.layers else src
        out = Path(args.out) if args.out else work / "pruned"
        with sampled:
            report = moonshot_fx.sparsify_checkpoint(source, out, calibration=calib, sparsity=args.pattern,
                                                     method=args.method, overwrite=bool(args.out),
                                                     on_layer=on_layer)
            wall = time.perf_counter() - t
        peaks_kb.append(status_kb("VmHWM"))
    except KeyboardInterrupt:
        print(f"stopped after {len(rows)} of {layers} layers; {result} holds the figures of those", flush=True)
        raise SystemExit(130)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = summarise(args, spec, report, rows, wall, base_kb, max(peaks_kb), sampled.peak, exact, layers)
    write_json(result, doc)
    print(doc["markdown"])
    return doc


def summarise(args: argparse.Namespace, spec: Any, report: Any | None, rows: list[dict[str, Any]], wall: float,
              base_kb: int, peak_kb: int, sampled_peak: int, exact: bool, layers: int) -> dict[str, Any]:
    """The result document of ``stream`` (figures and their markdown); ``report`` None: the run
    is still going (or was stopped) after ``len(rows)`` of the ``layers`` requested."""
    n = len(rows)
    phases = {p: sum(r[p] for r in rows) for p in PHASES}
    block_mean = sum(r["total"] for r in rows) / n
    outside = wall - sum(r["total"] for r in rows)  # embeddings, non-layer tensors, index, side files
    partial = n < spec.layers
    estimate = outside + block_mean * spec.layers
    sites = report.sites if report is not None else []
    doc: dict[str, Any] = {
        "shape": args.shape, "config": {k: v for k, v in vars(spec).items()}, "params": spec.params(),
        "checkpoint_gb": spec.params() * spec.element / 1e9, "dtype": spec.dtype, "pattern": args.pattern,
        "method": args.method, "calibration": f"{args.windows} windows x {args.seq} random token ids, seed {args.seed}",
        "blocks_run": n, "blocks_requested": layers, "blocks_total": spec.layers, "partial": partial,
        "complete": report is not None,
        "peak_rss_mb": peak_kb / 1024, "peak_rss_sampled_mb": sampled_peak / MB, "baseline_rss_mb": base_kb / 1024,
        "peak_exact": exact, "goal_rss_mb": args.goal_gb * 1024, "wall_s": wall, "outside_blocks_s": outside,
        "block_mean_s": block_mean, "block_min_s": min(r["total"] for r in rows),
        "block_max_s": max(r["total"] for r in rows), "phases_s": phases,
        "wall_all_blocks_s": estimate if partial else wall, "wall_all_blocks_extrapolated": partial,
        "sites": len(sites), "sparsity": report.overall_sparsity if report is not None else None,
        "nonfinite_errors": sum(1 for s in sites if not (s.rel_error == s.rel_error and abs(s.rel_error) < 1e30)),
        "timings": report.timings if report is not None else None, "blocks": rows, "machine": machine(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    doc["markdown"] = stream_markdown(doc)
    return doc


def stream_markdown(doc: dict[str, Any]) -> str:
    c = doc["config"]
    scope = (f"the first **{doc['blocks_run']} of {doc['blocks_total']}** decoder layers (total for all "
             f"{doc['blocks_total']} **extrapolated** from their mean)" if doc["partial"]
             else f"all {doc['blocks_total']} decoder layers")
    if not doc["complete"]:
        scope += (f"; the run was **stopped after {doc['blocks_run']} of the {doc['blocks_requested']} layers "
                  "requested** (no output checkpoint kept)")
    verdict = "within" if doc["peak_rss_mb"] <= doc["goal_rss_mb"] else "over"
    all_blocks = f"{doc['wall_all_blocks_s'] / 60:.1f} min" + (" (extrapolated)" if doc["partial"] else "")
    lines = [
        f"**{doc['shape']} shape, synthetic** — seeded random {doc.get('dtype', 'bfloat16')} weights (N(0, 0.02²), norms 1), "
        f"hidden {c['hidden']}, {c['layers']} layers, {c['heads']} heads, FFN {c['intermediate']}, vocab {c['vocab']}: "
        f"{doc['params'] / 1e9:.2f} B parameters, a {doc['checkpoint_gb']:.1f} GB checkpoint on a machine with "
        f"{_ram_gb():.0f} GiB RAM. `sparsify_checkpoint` {doc['pattern']} {doc['method']} on {doc['calibration']}; "
        f"{scope}. Wall times are **contended** (shared 2-core machine, OMP_NUM_THREADS="
        f"{doc['omp_num_threads']}): a memory measurement, not speed evidence "
        f"(`{doc['command']}`, {doc['date']}).", "",
        "| peak RSS | goal | baseline RSS (imports) | wall, layers run | per layer (mean / min / max) | all layers |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| **{doc['peak_rss_mb'] / 1024:.2f} GiB** ({doc['peak_rss_mb'] * MB / 1e9:.2f} GB; {verdict}) | "
        f"{doc['goal_rss_mb'] / 1024:.0f} GiB | "
        f"{doc['baseline_rss_mb']:.0f} MB | {doc['wall_s']:.0f} s | {doc['block_mean_s']:.1f} / "
        f"{doc['block_min_s']:.1f} / {doc['block_max_s']:.1f} s | {all_blocks} |", "",
        f"Peak RSS: the kernel's high-water mark (VmHWM), read and reset after every layer "
        f"(sampling thread: {doc['peak_rss_sampled_mb'] / 1024:.2f} GiB). "
        + (f"Sites pruned: {doc['sites']}, {100 * doc['sparsity']:.1f}% of their weights zero; non-finite "
           f"reconstruction errors: {doc['nonfinite_errors']}." if doc["complete"] else ""), "",
        "| phase | seconds (layers run) | share of the phases | per layer |", "|---|---:|---:|---:|"]
    if doc.get("note"):
        lines[1:1] = ["", f"_Note: {doc['note']}_"]
    total = sum(doc["phases_s"].values())
    for p, s in doc["phases_s"].items():
        lines.append(f"| {p} ({PHASE_NAMES[p]}) | {s:.1f} | {100 * s / total:.0f}% | {s / doc['blocks_run']:.1f} |")
    other = sum(r["total"] for r in doc["blocks"]) - total  # report bookkeeping, freeing, malloc_trim
    lines.append(f"| other, inside the layers (bookkeeping, freeing memory) | {other:.1f} | – | "
                 f"{other / doc['blocks_run']:.1f} |")
    lines.append(f"| outside the layers (embeddings, head copy, index) | {doc['outside_blocks_s']:.1f} | – | – |")
    return "\n".join(lines)


def _ram_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    ck = sub.add_parser("checkpoint", help="write the synthetic checkpoint into the cache (once)")
    st = sub.add_parser("stream", help="stream the synthetic checkpoint through sparsify_checkpoint")
    for q in (ck, st):
        q.add_argument("--shape", choices=sorted(SHAPES), default="llama2-13b")
        q.add_argument("--cache", type=Path, default=Path(os.environ.get("MOONSHOT_FX_CACHE", "/work/cache/scale")))
    ck.add_argument("--shard-gb", type=float, default=2.0, help="largest shard (GB); the generator holds one")
    st.add_argument("--windows", type=int, default=4)
    st.add_argument("--seq", type=int, default=512)
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--pattern", default="2:4")
    st.add_argument("--method", default="sparsegpt")
    st.add_argument("--max-blocks", type=int, default=None, help="stream only the first K decoder layers")
    st.add_argument("--goal-gb", type=float, default=6.0)
    st.add_argument("--out", default=None, help="keep the pruned checkpoint here (default: a deleted temporary)")
    st.add_argument("--results", default=str(RESULTS))
    from scale_distributed import add_arguments, distributed

    add_arguments(sub.add_parser("distributed", help="one process vs several (gloo) on a real model"))
    args = p.parse_args(argv)
    if args.command == "checkpoint":
        path = write_checkpoint(args.shape, args.cache, shard_bytes=int(args.shard_gb * 1e9), verbose=True)
        print(path)
    elif args.command == "stream":
        stream(args)
    else:
        distributed(args)


if __name__ == "__main__":
    main()
