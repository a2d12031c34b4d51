"""``scale.py distributed``: the same pruning in one process and in N (torch.distributed, gloo).

Each configuration is N fresh processes (``torch.multiprocessing`` spawn; N = 1 runs without a
process group, i.e. the ordinary path) with ``OMP_NUM_THREADS=1`` each. Every rank loads the
model and the *same* calibration batches (``moonshot_fx.sparsify`` keeps ``batches[rank::N]``),
waits at a barrier, and times ``sparsify``; it reports its wall time and its peak RSS (VmHWM,
the whole process: model load included). Rank 0 saves the pruned weights; the parent compares
the masks of the two configurations (fraction of identical mask entries over every pruned
weight) and evaluates both on the test windows. Writes ``results/scale_<model>.json``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, write_json  # noqa: E402


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=["smollm2", "stories260k"], default="smollm2")
    p.add_argument("--pattern", default="2:4")
    p.add_argument("--method", default="sparsegpt")
    p.add_argument("--nproc", type=int, default=2, help="processes of the distributed configuration")
    p.add_argument("--calib-windows", type=int, default=32, help="smollm2: 512-token wikitext2_valid windows")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=16, help="smollm2: 512-token wikitext2_raw_test windows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default=str(RESULTS))


def _setup(args: argparse.Namespace) -> tuple[Any, list[Any], Any, dict[str, Any]]:
    from quality import lm_setup

    return lm_setup(args.model, argparse.Namespace(**{**vars(args), "c4_windows": 0}))


def _peak_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    """One rank: load, (join the group), time sparsify, save what the parent needs."""
    import torch

    import moonshot_fx

    torch.set_num_threads(1)
    model, batches, _, _ = _setup(args)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
        torch.distributed.barrier()
    try:
        t = time.perf_counter()
        moonshot_fx.sparsify(model, calibration=batches, sparsity=args.pattern, method=args.method, progress=False)
        wall = time.perf_counter() - t
        names = [s.name for s in model.moonshot_report.sites]
        state = model.state_dict()
        pruned = {n: state[n].detach().clone() for n in names}
        digest = hashlib.sha256(b"".join(pruned[n].numpy().tobytes() for n in names)).hexdigest()
        if rank == 0:
            torch.save(pruned, os.path.join(out, "weights.pt"))
        sites = model.moonshot_report.sites
        row = {"rank": rank, "sparsify_s": wall, "peak_rss_mb": _peak_kb() / 1024, "weights_sha256": digest,
               "timings": model.moonshot_report.timings,
               # the solves this rank owned (owner-rank split by cost) and their seconds
               "solved_sites": sum(x.solved_by == rank for x in sites),
               "solve_s": sum(x.seconds for x in sites if x.solved_by == rank)}
        Path(out, f"rank{rank}.json").write_text(json.dumps(row))
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(world: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Spawn ``world`` ranks; returns the configuration's figures (``weights`` file in ``out``)."""
    import torch.multiprocessing as mp

    out.mkdir(parents=True)
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned ranks
    t = time.perf_counter()
    mp.spawn(_worker, args=(world, _free_port(), args, str(out)), nprocs=world, join=True)
    launch = time.perf_counter() - t
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    return {"processes": world, "sparsify_s": max(r["sparsify_s"] for r in ranks), "processes_wall_s": launch,
            "ranks": ranks, "ranks_identical": len({r["weights_sha256"] for r in ranks}) == 1}


def mask_agreement(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, int]:
    """Fraction of identical mask entries (``w != 0``) over every weight of ``a`` (same names in ``b``)."""
    same = total = 0
    for name, w in a.items():
        same += int(((w != 0) == (b[name] != 0)).sum())
        total += w.numel()
    return same / total, total


def distributed(args: argparse.Namespace) -> dict[str, Any]:
    """Run both configurations, compare them, write the result document."""
    import torch

    configs = sorted({1, args.nproc})
    with tempfile.TemporaryDirectory(prefix="scale-dist-") as tmp:
        rows = [run_config(n, args, Path(tmp) / f"n{n}") for n in configs]
        weights = [torch.load(Path(tmp) / f"n{n}" / "weights.pt") for n in configs]
    model, _, evaluate, settings = _setup(args)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    dense_q = evaluate(model)["quality"]
    for row, w in zip(rows, weights):
        model.load_state_dict({**dense, **w})
        row["perplexity"] = evaluate(model)["quality"]
    agreement, entries = mask_agreement(weights[0], weights[-1])
    max_diff = max(float((weights[0][k] - weights[-1][k]).abs().max()) for k in weights[0])
    doc = {"model": args.model, "pattern": args.pattern, "method": args.method, "settings": settings,
           "dense_perplexity": dense_q, "rows": rows, "mask_agreement": agreement, "mask_entries": entries,
           "max_abs_weight_diff": max_diff, "machine": machine(), "command": " ".join(sys.argv),
           "date": time.strftime("%Y-%m-%d %H:%M")}
    doc["markdown"] = markdown(doc)
    write_json(Path(args.results) / f"scale_{args.model}.json", doc)
    print(doc["markdown"])
    return doc


def markdown(doc: dict[str, Any]) -> str:
    s = doc["settings"]
    lines = [f"**{doc['model']} {doc['pattern']} {doc['method']}, one process vs {doc['rows'][-1]['processes']} "
             f"(torch.distributed, gloo, OMP_NUM_THREADS=1 per rank)** — {s['calibration']}; {s['evaluation']}; "
             f"dense perplexity {doc['dense_perplexity']:.2f} (`{doc['command']}`, {doc['date']})", "",
             "| processes | sparsify wall (s) | speed-up | per-rank peak RSS (MB) | per-rank solves (sites, s) "
             "| ranks identical | perplexity |",
             "|---:|---:|---:|---|---|:---:|---:|"]
    ref = doc["rows"][0]["sparsify_s"]
    for r in doc["rows"]:
        rss = " / ".join(f"{x['peak_rss_mb']:.0f}" for x in r["ranks"])
        solves = " / ".join(f"{x.get('solved_sites', '?')}, {x.get('solve_s', float('nan')):.1f}" for x in r["ranks"])
        lines.append(f"| {r['processes']} | {r['sparsify_s']:.1f} | {ref / r['sparsify_s']:.2f}× | {rss} | {solves} | "
                     f"{'yes' if r['ranks_identical'] else 'no'} | {r['perplexity']:.3f} |")
    lines += ["", f"Mask agreement between the two: **{100 * doc['mask_agreement']:.4f}%** of "
                  f"{doc['mask_entries']:,} entries (largest weight difference {doc['max_abs_weight_diff']:.2e}). "
                  "Peak RSS is each rank's whole process (model load included); the wall is the slowest rank's "
                  "`sparsify` after a barrier. Each input group is solved by one owner rank, chosen longest job "
                  "first by `d_in³ + rows·d_in²`; the solves column gives each rank's sites and their seconds."]
    return "\n".join(lines)
