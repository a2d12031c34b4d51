"""llm-compressor side of ``benchmarks/peers.py``; runs in its own venv and never imports moonshot_fx.

    benchmarks/.cache/venv-peers/bin/python benchmarks/peers_worker.py --model-dir DIR \
        --calib calib.pt --eval eval.pt --method sparsegpt --sparsity 2:4 --out result.json

Loads the plain HF model directory written by ``peers.py``, runs llm-compressor's ``oneshot`` with
``SparseGPTModifier`` or ``WandaPruningModifier`` (targets Linear, ignore lm_head) on a
``datasets.Dataset`` built from the calibration token ids, times only the ``oneshot`` call and
samples its peak RSS (``common.timed``, the same sampler as our side), then measures perplexity on
the evaluation windows with the formula of ``moonshot_fx.data.perplexity`` (exp of the mean
next-token NLL over all windows, ``use_cache=False``). ``--method dense`` only evaluates.

``wait_for_quiet_cpu``, ``OthersCPU`` and ``contended`` are also used by ``peers.py`` (this module
imports only the standard library at import time).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def _ps_cpu_seconds() -> dict[int, tuple[int, float, str]]:
    """pid → (ppid, cumulative CPU seconds, args) from ``ps -eo pid,ppid,times,args``."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,times=,args="], capture_output=True, text=True,
                         check=True).stdout
    procs = {}
    for line in out.splitlines():
        parts = line.split(None, 3)
        if len(parts) < 3:
            continue
        procs[int(parts[0])] = (int(parts[1]), float(parts[2]), parts[3] if len(parts) > 3 else "")
    return procs


def _own_tree(procs: dict[int, tuple[int, float, str]]) -> set[int]:
    """This process, its ancestors and all its descendants."""
    me = os.getpid()
    own = {me}
    p = me
    while p in procs and procs[p][0] not in (0, p):
        p = procs[p][0]
        own.add(p)
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    stack = [me]
    while stack:
        for c in children.get(stack.pop(), []):
            if c not in own:
                own.add(c)
                stack.append(c)
    return own


def busy_processes(threshold: float = 30.0, window: float = 5.0) -> list[dict[str, Any]]:
    """Processes outside our own tree that used more than ``threshold`` % of one core during the
    last ``window`` seconds (two ``ps`` snapshots of cumulative CPU time; ps's own %CPU column is a
    lifetime average and would miss a process that just started or flag one that went idle)."""
    a = _ps_cpu_seconds()
    t = time.monotonic()
    time.sleep(window)
    b = _ps_cpu_seconds()
    dt = time.monotonic() - t
    own = _own_tree(b)
    busy = []
    for pid, (_, cpu, args) in b.items():
        if pid in own or pid not in a:
            continue
        pct = 100.0 * (cpu - a[pid][1]) / dt
        if pct > threshold:
            busy.append({"pid": pid, "cpu_percent": round(pct), "args": args[:120]})
    return busy


def wait_for_quiet_cpu(max_wait: float = 1200.0, poll: float = 15.0, threshold: float = 30.0,
                       log: Any = None) -> dict[str, Any]:
    """Block until no process outside our tree uses > ``threshold`` % CPU, polling every ``poll`` s
    for at most ``max_wait`` s. Returns ``{"waited_s", "timed_out", "busy"}`` (``busy``: what was
    still running when the wait gave up, else empty)."""
    t0 = time.monotonic()
    while True:
        busy = busy_processes(threshold)
        waited = time.monotonic() - t0
        if not busy:
            return {"waited_s": round(waited, 1), "timed_out": False, "busy": []}
        if waited >= max_wait:
            return {"waited_s": round(waited, 1), "timed_out": True, "busy": busy}
        if log is not None:
            names = "; ".join(f"{p['pid']} {p['cpu_percent']}% {p['args'][:60]}" for p in busy)
            log(f"  waiting for a quiet CPU ({waited:.0f}s so far): {names}")
        time.sleep(max(0.0, poll - 5.0))


class OthersCPU:
    """Context manager: CPU used by processes outside our tree while the block ran, in % of one core
    (``.percent``; 200 on 2 cores means another process kept both busy). Processes that started
    during the block count with all their CPU time; ones that ended during it are missed."""

    def __enter__(self) -> "OthersCPU":
        self._a = _ps_cpu_seconds()
        self._t = time.monotonic()
        return self

    def __exit__(self, *exc: Any) -> None:
        b = _ps_cpu_seconds()
        dt = max(time.monotonic() - self._t, 1e-9)
        own = _own_tree(b)
        used: dict[int, float] = {}
        for pid, (_, cpu, args) in b.items():
            if pid in own:
                continue
            d = cpu - self._a[pid][1] if pid in self._a else cpu
            if d > 0:
                used[pid] = d
        self.percent = round(100.0 * sum(used.values()) / dt, 1)
        top = sorted(used, key=used.get, reverse=True)[:3]
        self.top = [{"pid": pid, "cpu_percent": round(100.0 * used[pid] / dt), "args": b[pid][2][:120]}
                    for pid in top if 100.0 * used[pid] / dt >= 5]

    def record(self) -> dict[str, Any]:
        return {"others_cpu_percent": self.percent, "others_top": self.top}


def contended(side: dict[str, Any], threshold: float = 30.0) -> bool:
    """True when a timed call ran next to other work: its quiet-CPU wait timed out, or other
    processes used more than ``threshold`` % CPU during it."""
    wait = side.get("cpu_wait") or {}
    during = side.get("cpu_during") or {}
    return bool(wait.get("timed_out")) or during.get("others_cpu_percent", 0.0) > threshold


def perplexity(model: Any, windows: Any, batch_size: int = 4) -> float:
    """Same formula as moonshot_fx.data.perplexity: exp(mean next-token NLL), use_cache=False."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, windows.shape[0], batch_size):
            batch = windows[s:s + batch_size]
            logits = model(input_ids=batch, use_cache=False).logits
            shift = logits[:, :-1, :].float().reshape(-1, logits.shape[-1])
            targets = batch[:, 1:].reshape(-1)
            total += F.cross_entropy(shift, targets, reduction="sum").item()
            count += targets.numel()
    return math.exp(total / count)


def linear_sparsity(model: Any) -> float:
    """Fraction of zeros over all Linear weights except lm_head."""
    import torch

    zeros = total = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"):
            zeros += int((m.weight == 0).sum())
            total += m.weight.numel()
    return zeros / max(total, 1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--calib", required=True, help=".pt LongTensor (n, seqlen) of calibration token ids")
    p.add_argument("--eval", required=True, help=".pt LongTensor (k, seqlen) of evaluation windows")
    p.add_argument("--method", choices=["sparsegpt", "wanda", "dense"], required=True)
    p.add_argument("--sparsity", default="0.5", help="fraction or N:M")
    p.add_argument("--batch", type=int, default=8, help="calibration batch size")
    p.add_argument("--max-wait", type=float, default=1200.0, help="longest wait for a quiet CPU (s); 0: don't wait")
    p.add_argument("--out", required=True)
    p.add_argument("--save-weights", help="also save the pruned decoder-layer weights (.pt state dict) here")
    args = p.parse_args(argv)

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import rss_bytes, timed  # noqa: E402  (torch + stdlib only)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    model.eval()
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    calib = torch.load(args.calib)
    ev = torch.load(args.eval)
    res: dict[str, Any] = {"method": args.method, "sparsity": args.sparsity, "torch": torch.__version__,
                           "transformers": transformers.__version__, "torch_threads": torch.get_num_threads()}
    if args.method != "dense":
        import llmcompressor
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

        res["llmcompressor"] = llmcompressor.__version__
        n, seqlen = calib.shape
        ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
        if ":" in args.sparsity:
            n_zero, m = (int(x) for x in args.sparsity.split(":"))  # N zeros in every M (2:4 → 0.5)
            sparsity, mask_structure = n_zero / m, args.sparsity
        else:
            sparsity, mask_structure = float(args.sparsity), "0:0"
        common_kw = dict(sparsity=sparsity, mask_structure=mask_structure, targets=["Linear"], ignore=["re:.*lm_head"])
        if args.method == "sparsegpt":
            modifier = SparseGPTModifier(block_size=128, dampening_frac=0.01, **common_kw)
        else:
            modifier = WandaPruningModifier(**common_kw)
        res["modifier"] = repr(modifier)
        res["cpu_wait"] = wait_for_quiet_cpu(args.max_wait, log=log) if args.max_wait > 0 else None
        gc.collect()
        try:  # hand freed heap back to the OS, as peers.py does before our call
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        res["start_rss_mb"] = rss_bytes() / 2**20
        with OthersCPU() as others:
            _, wall, peak = timed(lambda: oneshot(model=model, processor=tok, dataset=ds, recipe=modifier,
                                                  num_calibration_samples=n, max_seq_length=seqlen,
                                                  batch_size=args.batch, shuffle_calibration_samples=False))
        res.update(prune_seconds=wall, peak_rss_mb=peak / 2**20, cpu_during=others.record())
        log(f"llm-compressor {args.method} {args.sparsity}: oneshot {wall:.1f}s, peak RSS {peak / 2**20:.0f} MB")
    res["linear_sparsity"] = linear_sparsity(model)
    if args.save_weights:
        torch.save({k: v for k, v in model.state_dict().items() if ".layers." in k}, args.save_weights)
    t = time.perf_counter()
    res["quality"] = perplexity(model, ev, batch_size=4)
    res["eval_seconds"] = time.perf_counter() - t
    log(f"llm-compressor {args.method} {args.sparsity}: perplexity {res['quality']:.3f}")
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
