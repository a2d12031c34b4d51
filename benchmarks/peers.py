"""Against llm-compressor: its SparseGPT and Wanda next to ours on the same model, data and metric.

    python benchmarks/peers.py --calib-windows 32 --seqlen 512 --eval-windows 32 \
        --patterns 2:4 0.5 --methods sparsegpt wanda --ours-extra moonshot-sparsegpt

Writes ``benchmarks/results/peers_smollm2.json`` (after every pair, atomically; its ``markdown``
key is the table ``render.py`` shows), prints the table and re-renders RESULTS.md and the README
results section (``render.py``).

How the comparison is kept fair:
* Model: SmolLM2-135M from ``moonshot_fx.data.load_smollm2``, saved once as a plain HF directory
  (``benchmarks/.cache/smollm2-hf``); both sides load that directory in fp32.
* Data: this script writes the calibration token ids (``calibration_windows`` on
  wikitext2_valid, seed 0 as ``quality.py`` unless ``--seed`` picks other windows) and the evaluation windows (the first
  ``--eval-windows`` × ``--seqlen`` tokens of wikitext2_raw_test) as ``.pt`` files; both sides
  read the same tensors and use the same calibration batch size (``--batch``).
* Metric: exp of the mean next-token NLL over all evaluation windows, ``use_cache=False``
  (``peers_worker.perplexity`` re-implements ``moonshot_fx.data.perplexity``; the dense model is
  evaluated on both sides as a check).
* Peer settings: ``oneshot`` with ``SparseGPTModifier(block_size=128, dampening_frac=0.01)`` or
  ``WandaPruningModifier``, ``mask_structure="2:4"`` for 2:4 else ``"0:0"``, sparsity 0.5, targets
  Linear, ignore lm_head, its default (sequential) pipeline, no shuffling. Ours: ``sparsify`` with
  its defaults (dampening 0.01, block size 128, block-level sequential like the peer's pipeline),
  lm_head kept dense.
* Timing: only the pruning call (``oneshot`` / ``sparsify``), wall clock, with peak RSS of the
  process sampled every 20 ms (``common.timed``). Peer and ours run back to back for each pattern ×
  method on a freshly loaded dense model; before each timed call the process waits (polling every
  15 s, at most ``--max-wait`` s) until no process outside its own tree uses more than 30 % CPU;
  every row records whether that wait timed out.
* llm-compressor pins torch ≤ 2.13, so it runs in its own venv (``benchmarks/.cache/venv-peers``,
  created on first use) through ``peers_worker.py``, which does not import moonshot_fx.
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULTS, machine, parse_method, rss_bytes, timed, write_json  # noqa: E402
from peers_worker import OthersCPU, contended, wait_for_quiet_cpu  # noqa: E402  (stdlib only at import)

import moonshot_fx  # noqa: E402
from moonshot_fx import data  # noqa: E402
from moonshot_fx.memory import release_freed_memory  # noqa: E402

CACHE = HERE / ".cache"
VENV = CACHE / "venv-peers"
VENV_PY = VENV / "bin" / "python"
HF_DIR = CACHE / "smollm2-hf"
WORK = CACHE / "peers"
PEER_PACKAGES = ["torch==2.13.0", "llmcompressor==0.14.0.1", "gguf", "accelerate"]
PEER_NAMES = {"sparsegpt": "SparseGPTModifier", "wanda": "WandaPruningModifier"}


def log(msg: str) -> None:
    print(msg, flush=True)


def ensure_venv() -> None:
    """Create the llm-compressor venv on first use (torch 2.13.0 CPU first, so pip keeps it)."""
    if VENV_PY.exists():
        return
    log(f"creating {VENV} (first use; a few minutes)")
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(VENV / "bin" / "pip"), "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True)
    subprocess.run(pip + PEER_PACKAGES, check=True)


def ensure_hf_dir() -> None:
    """Save the GGUF-dequantized SmolLM2 once as a plain HF directory (llm-compressor reloads the
    config from ``name_or_path`` and cannot use a GGUF-loaded model)."""
    if (HF_DIR / "config.json").exists():
        return
    log(f"writing {HF_DIR}")
    model, tok = data.load_smollm2(progress=False)
    tmp = HF_DIR.with_name(HF_DIR.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(HF_DIR)
    del model


def gguf_tokenizer() -> Any:
    """The tokenizer ``load_smollm2`` returns (read from the GGUF file), without the model."""
    from transformers import AutoTokenizer

    path = data.smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS, so the next start RSS is a clean baseline."""
    gc.collect()
    release_freed_memory()


def load_dense() -> Any:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(HF_DIR, dtype=torch.float32)
    return model.eval()


def run_peer(method: str, pattern: str, args: argparse.Namespace, calib: Path, ev: Path,
             extra: Sequence[str] = ()) -> dict[str, Any]:
    """Run ``peers_worker.py`` in the peer venv (``extra``: more worker arguments); its result dict."""
    tag = f"{method}_{pattern.replace(':', 'of')}"
    out, log_path = WORK / f"peer_{tag}.json", WORK / f"peer_{tag}.log"
    out.unlink(missing_ok=True)
    cmd = [str(VENV_PY), str(HERE / "peers_worker.py"), "--model-dir", str(HF_DIR), "--calib", str(calib),
           "--eval", str(ev), "--method", method, "--sparsity", pattern, "--batch", str(args.batch),
           "--max-wait", str(args.max_wait), "--out", str(out), *extra]
    with open(log_path, "w") as f:
        proc = subprocess.run(cmd, cwd=WORK, stdout=f, stderr=subprocess.STDOUT)
    lines = log_path.read_text(errors="replace").splitlines()
    for line in lines:  # the worker's own progress lines (not llm-compressor's logs and bars)
        if line.startswith(("  waiting for a quiet CPU", "llm-compressor ")):
            log(f"  [peer] {line.strip()}")
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join(lines[-15:])
        raise RuntimeError(f"peer worker failed (rc {proc.returncode}); see {log_path}:\n{tail}")
    return json.loads(out.read_text())


def run_ours(label: str, pattern: str, batches: list[Any], ev: torch.Tensor,
             args: argparse.Namespace) -> dict[str, Any]:
    spec = parse_method(label)
    release_memory()
    model = load_dense()
    wait = wait_for_quiet_cpu(args.max_wait, log=log) if args.max_wait > 0 else None
    start = rss_bytes()
    with OthersCPU() as others:
        _, wall, peak = timed(lambda m=model: moonshot_fx.sparsify(m, calibration=batches, sparsity=pattern,
                                                           method=spec.method, progress=False, **spec.kwargs()))
    report = model.moonshot_report
    t = time.perf_counter()
    q = data.perplexity(model, ev, batch_size=4)
    row = {"quality": q, "prune_seconds": wall, "peak_rss_mb": peak / 2**20, "start_rss_mb": start / 2**20,
           "eval_seconds": time.perf_counter() - t, "cpu_wait": wait, "cpu_during": others.record(), "alpha": report.alpha,
           "sequential": report.sequential, "sequential_unit": report.config.get("sequential_unit"), "sparsity": report.overall_sparsity, "sites": len(report.sites),
           "timings": report.timings}
    del model
    release_memory()
    return row


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a is not None and b else "–"


def markdown(doc: dict[str, Any]) -> str:
    s = doc["settings"]
    lines = [f"**SmolLM2-135M, moonshot-fx vs llm-compressor {doc['peer']['llmcompressor']}** — "
             f"{s['calibration']}; {s['evaluation']}; dense perplexity **{doc['dense']['quality']:.2f}** "
             f"(llm-compressor's side: {doc['dense'].get('peer_quality', float('nan')):.2f}); "
             f"{doc['machine']['cpu_count']} CPU cores, {doc['date']}, `{doc['command']}`", "",
             "| pattern | method | ppl llm-compressor | ppl ours | ppl ours ÷ peer | prune s llm-compressor "
             "| prune s ours | time ours ÷ peer | peak RSS MB llm-compressor (growth) | peak RSS MB ours (growth) "
             "| growth ours ÷ peer |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in doc["pairs"]:
        p, o = r.get("peer") or {}, r.get("ours") or {}
        if "error" in p or "error" in o:
            lines.append(f"| {r['pattern']} | {r['method']} | failed: {(p.get('error') or o.get('error'))[:80]} "
                         "| | | | | | | | |")
            continue
        pg, og = p["peak_rss_mb"] - p["start_rss_mb"], o["peak_rss_mb"] - o["start_rss_mb"]
        method = r["method"] if r["method"] == r["peer_method"] else f"{r['method']} (vs {r['peer_method']})"
        pd, od = ("†" if contended(p) else ""), ("†" if contended(o) else "")
        lines.append(
            f"| {r['pattern']} | {method} | {p['quality']:.2f} | {o['quality']:.2f} | "
            f"{_ratio(o['quality'], p['quality'])} | {p['prune_seconds']:.1f}{pd} | {o['prune_seconds']:.1f}{od} | "
            f"{_ratio(o['prune_seconds'], p['prune_seconds'])} | {p['peak_rss_mb']:.0f} (+{pg:.0f}) | "
            f"{o['peak_rss_mb']:.0f} (+{og:.0f}) | {_ratio(og, pg)} |")
    sides = {id(x): x for r in doc["pairs"] for x in (r.get("peer"), r.get("ours")) if x and "error" not in x}
    waits = [x["cpu_wait"] for x in sides.values() if x.get("cpu_wait")]
    n_busy = sum(contended(x) for x in sides.values())
    n_out = sum(w["timed_out"] for w in waits)
    busy = (f"† marks the {n_busy} timing(s) taken while other processes still used more than 30 % CPU "
            "(even after the retry)." if n_busy else "No timing ran next to other busy processes.")
    lines += ["", "Prune time: wall clock of the `oneshot` / `sparsify` call alone. Peak RSS: the whole process, "
              "model included; growth: peak minus the RSS just before the call (ours runs in the benchmark's "
              "process, llm-compressor in a fresh worker with its own venv). Before each timed call the "
              f"benchmark waited for other processes to drop below 30 % CPU ({len(waits)} waits, "
              f"{sum(w['waited_s'] for w in waits):.0f} s in all, {n_out} timed out). {busy}"]
    return "\n".join(lines)


def prepare(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """Peer venv and HF directory ready, work folder made; returns ``(calibration windows,
    evaluation windows)`` from ``args.calib_windows`` / ``seqlen`` / ``seed`` / ``eval_windows``."""
    ensure_venv()
    ensure_hf_dir()
    WORK.mkdir(parents=True, exist_ok=True)
    tok = gguf_tokenizer()
    cal = data.calibration_windows(data.tokenize(tok, data.load_text("wikitext2_valid")),
                                   args.calib_windows, args.seqlen, seed=args.seed)
    ev = data.eval_windows(data.tokenize(tok, data.load_text("wikitext2_test")), args.seqlen, args.eval_windows)
    return cal, ev


def run(args: argparse.Namespace) -> Path:
    cal, ev = prepare(args)
    calib_path = WORK / f"calib_{args.calib_windows}x{args.seqlen}_seed{args.seed}.pt"
    eval_path = WORK / f"eval_{ev.shape[0]}x{args.seqlen}.pt"
    torch.save(cal, calib_path)
    torch.save(ev, eval_path)
    batches = [{"input_ids": cal[i:i + args.batch]} for i in range(0, cal.shape[0], args.batch)]

    peer_versions = subprocess.run(
        [str(VENV_PY), "-c", "import importlib.metadata as m; import json; print(json.dumps("
         "{p: m.version(p) for p in ('llmcompressor', 'torch', 'transformers', 'compressed-tensors')}))"],
        capture_output=True, text=True, check=True).stdout
    out_path = RESULTS / ("peers_smollm2.json" if args.seed == 0 else f"peers_smollm2_seed{args.seed}.json")
    doc: dict[str, Any] = {
        "model": "smollm2",
        "settings": {"calibration": f"{args.calib_windows}x{args.seqlen} tokens wikitext2_valid seed {args.seed} "
                                    f"(batch {args.batch})",
                     "evaluation": f"first {ev.shape[0]}x{args.seqlen} tokens wikitext2_raw_test",
                     "metric": "perplexity",
                     "peer": "oneshot(SparseGPTModifier(block_size=128, dampening_frac=0.01) | "
                             "WandaPruningModifier, targets=['Linear'], ignore=['re:.*lm_head'], "
                             "mask_structure='2:4' or '0:0', default pipeline, shuffle_calibration_samples=False)",
                     "ours": "moonshot_fx.sparsify(defaults: dampening 0.01, blocksize 128, lm_head dense)"},
        "machine": machine(), "peer": json.loads(peer_versions.strip().splitlines()[-1]),
        "ours_versions": {"moonshot_fx": getattr(moonshot_fx, "__version__", "?"), "torch": torch.__version__,
                          "transformers": __import__("transformers").__version__},
        "command": " ".join(["python", "benchmarks/peers.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M"), "pairs": []}

    model = load_dense()
    t = time.perf_counter()
    dense_q = data.perplexity(model, ev, batch_size=4)
    doc["dense"] = {"quality": dense_q, "eval_seconds": time.perf_counter() - t}
    del model
    release_memory()
    log(f"dense perplexity (ours) {dense_q:.3f}")
    try:
        peer_dense = run_peer("dense", "0.5", argparse.Namespace(**{**vars(args), "max_wait": 0}), calib_path, eval_path)
        doc["dense"]["peer_quality"] = peer_dense["quality"]
        log(f"dense perplexity (llm-compressor venv) {peer_dense['quality']:.3f}")
    except RuntimeError as exc:
        log(f"dense check in the peer venv failed: {exc}")

    peer_res: dict[tuple[str, str], dict[str, Any]] = {}  # (pattern, method) → worker result
    ours_res: dict[tuple[str, str], dict[str, Any]] = {}  # (pattern, label) → our result
    order: list[tuple[str, str, str]] = []  # (pattern, label, peer method)

    def save() -> None:
        doc["pairs"] = [{"pattern": pt, "method": lb, "peer_method": pm, "peer": peer_res.get((pt, pm)),
                         "ours": ours_res.get((pt, lb))} for pt, lb, pm in order]
        doc["markdown"] = markdown(doc)
        write_json(out_path, doc)

    def peer(pattern: str, method: str) -> dict[str, Any]:
        log(f"{pattern} {method}: llm-compressor {PEER_NAMES[method]}")
        try:
            return run_peer(method, pattern, args, calib_path, eval_path)
        except RuntimeError as exc:
            log(str(exc))
            return {"error": str(exc)[:500]}

    def ours(pattern: str, label: str) -> dict[str, Any]:
        log(f"{pattern} {label}: moonshot-fx")
        try:
            return run_ours(label, pattern, batches, ev, args)
        except moonshot_fx.MoonshotError as exc:
            return {"error": str(exc)[:500]}

    for pattern in args.patterns:
        for method in args.methods:
            order.append((pattern, method, method))
            peer_res[pattern, method] = peer(pattern, method)
            ours_res[pattern, method] = ours(pattern, method)
            save()
            _print_pair(doc["pairs"][-1])
        for label in args.ours_extra:
            spec = parse_method(label)
            base = spec.kwargs().get("base", spec.method)
            if (pattern, base) not in peer_res:
                log(f"{label}: no llm-compressor {base} row in this run to compare with; skipped")
                continue
            order.append((pattern, label, base))
            ours_res[pattern, label] = ours(pattern, label)
            save()
            _print_pair(doc["pairs"][-1])

    # Timings taken next to other work are redone once at the end (the pair back to back again);
    # the less disturbed attempt is kept, the other stays in the JSON under "other_attempt".
    def keep_better(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
        def load(r: dict[str, Any]) -> float:
            return (1e6 if "error" in r else 0.0) + (1e3 if (r.get("cpu_wait") or {}).get("timed_out") else 0.0) \
                + (r.get("cpu_during") or {}).get("others_cpu_percent", 0.0)
        best, other = (new, old) if load(new) <= load(old) else (old, new)
        return {**best, "other_attempt": {k: v for k, v in other.items() if k != "other_attempt"}}

    for _ in range(args.retries):
        redo = [(pt, lb, pm) for pt, lb, pm in order
                if contended(ours_res[pt, lb]) or (lb == pm and contended(peer_res[pt, pm]))]
        if not redo:
            break
        log(f"redoing {len(redo)} timing(s) taken while other processes were busy")
        for pt, lb, pm in redo:
            if lb == pm:
                peer_res[pt, pm] = keep_better(peer_res[pt, pm], peer(pt, pm))
            ours_res[pt, lb] = keep_better(ours_res[pt, lb], ours(pt, lb))
            save()
            _print_pair(next(r for r in doc["pairs"] if (r["pattern"], r["method"]) == (pt, lb)))
    doc["markdown"] = markdown(doc)
    write_json(out_path, doc)
    print()
    print(doc["markdown"])
    from render import render_all

    render_all()
    return out_path


def _print_pair(r: dict[str, Any]) -> None:
    p, o = r["peer"], r["ours"]
    if "error" in p or "error" in o:
        log(f"{r['pattern']:>5} {r['method']:<20} failed")
        return
    log(f"{r['pattern']:>5} {r['method']:<20} ppl {p['quality']:8.2f} (peer) {o['quality']:8.2f} (ours)  "
        f"prune {p['prune_seconds']:6.1f}s (peer) {o['prune_seconds']:6.1f}s (ours)  "
        f"RSS {p['peak_rss_mb']:5.0f} / {o['peak_rss_mb']:5.0f} MB")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--batch", type=int, default=8, help="calibration batch size, both sides")
    p.add_argument("--seed", type=int, default=0,
                   help="which calibration windows (quality.py uses 0); other seeds write peers_smollm2_seed<N>.json")
    p.add_argument("--patterns", nargs="+", default=["2:4", "0.5"])
    p.add_argument("--methods", nargs="+", default=["sparsegpt", "wanda"], choices=sorted(PEER_NAMES))
    p.add_argument("--ours-extra", nargs="*", default=["moonshot-sparsegpt"],
                   help="more of our methods, compared with the peer row of their base pruner")
    p.add_argument("--retries", type=int, default=1,
                   help="redo pairs timed next to other busy processes this many times at the end")
    p.add_argument("--max-wait", type=float, default=1200.0,
                   help="longest wait (s) for other processes to go quiet before a timed call; 0: no wait")
    args = p.parse_args(argv)
    print(run(args))


if __name__ == "__main__":
    main()
