"""MOONSHOT from a checkpoint (streamed, one layer resident) against MOONSHOT in memory, on SmolLM2.

    python benchmarks/stream_moonshot.py [--windows 4] [--seq 512] [--alpha 0.75]

Each side runs in its own process (so each peak RSS is its own): ``sparsify_checkpoint`` from
SmolLM2's HF directory (written once into the cache from the packaged GGUF), and ``sparsify`` on
the model loaded from the same directory, with the same calibration windows. Records wall time,
peak RSS, mask agreement, the largest weight difference and perplexity of both on WikiText-2
test and C4 (``benchmarks/results/stream-moonshot_smollm2.json``). Times are indicative only
when other work shares the machine.

A third process repeats the in-memory run with the same windows in batches of another size
(``--repeat-batch``, default twice ``--batch``): the same maths with another floating-point
summation order (each batch's ``XᵀX`` is one fp32 product). (A repeat with another thread count
would do too, but two threads beside another busy process slow down more than tenfold here.) Its mask agreement with
the first in-memory run is the yardstick for the streamed one — MOONSHOT's sequential pass turns
rounding-level differences in its statistics into mask flips that grow layer by layer (per-layer
agreement in ``layers``), so streamed and in-memory cannot agree better than two in-memory runs do.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, timed, write_json  # noqa: E402

from moonshot_fx import data  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache"


def hf_dir(cache: Path) -> Path:
    """SmolLM2-135M as a Hugging Face directory (safetensors), made once from the packaged GGUF."""
    path = cache / "smollm2-hf"
    if not (path / "config.json").is_file():
        model, tok = data.load_smollm2(progress=False)
        tmp = Path(tempfile.mkdtemp(dir=cache))
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(path)
    return path


def calibration(args: argparse.Namespace) -> list[torch.Tensor]:
    _, tok = data.load_smollm2(progress=False)
    ids = data.tokenize(tok, data.load_text("wikitext2_valid"))
    cal = data.calibration_windows(ids, args.windows, args.seq, seed=0)
    return [cal[i:i + args.batch] for i in range(0, cal.shape[0], args.batch)]


def run_side(args: argparse.Namespace) -> None:
    """Child process: one side; writes {wall, peak_rss_mb} and the pruned weights into args.work."""
    import moonshot_fx

    src, work = Path(args.src), Path(args.work)
    calib = calibration(args)
    opts = dict(method="moonshot", base="sparsegpt", alpha=args.alpha)
    if args.side == "stream":
        _, wall, peak = timed(lambda: moonshot_fx.sparsify_checkpoint(src, work / "stream", calibration=calib,
                                                                      sparsity=args.pattern, **opts))
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        _, wall, peak = timed(lambda: moonshot_fx.sparsify(model, calibration=[{"input_ids": c} for c in calib],
                                                           sparsity=args.pattern, progress=False, **opts))
        model.save_pretrained(work / args.side)
    (work / f"{args.side}.json").write_text(json.dumps({"wall_s": wall, "peak_rss_mb": peak / 2**20}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--alpha", type=float, default=0.75)
    p.add_argument("--pattern", default="2:4")
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--cache", type=Path, default=CACHE)
    p.add_argument("--repeat-batch", type=int, default=None, help="batch size of the repeated in-memory run")
    p.add_argument("--side", choices=["stream", "memory", "repeat"], help=argparse.SUPPRESS)
    p.add_argument("--src", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        return run_side(args)
    args.cache.mkdir(parents=True, exist_ok=True)
    src = hf_dir(args.cache)
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(dir=args.cache) as tmp:
        side = {}
        repeat_batch = args.repeat_batch or 2 * args.batch
        for s in ("memory", "stream", "repeat"):
            cmd = [sys.executable, __file__, "--side", s, "--src", str(src), "--work", tmp,
                   "--windows", str(args.windows), "--seq", str(args.seq),
                   "--batch", str(repeat_batch if s == "repeat" else args.batch),
                   "--alpha", str(args.alpha), "--pattern", args.pattern]
            subprocess.run(cmd, check=True)
            side[s] = json.loads((Path(tmp) / f"{s}.json").read_text())
        a = AutoModelForCausalLM.from_pretrained(Path(tmp) / "memory", dtype=torch.float32)
        b = AutoModelForCausalLM.from_pretrained(Path(tmp) / "stream", dtype=torch.float32)
        c = AutoModelForCausalLM.from_pretrained(Path(tmp) / "repeat", dtype=torch.float32)
        sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
        names = [k for k in sa if ".layers." in k and sa[k].dim() == 2]
        total = sum(sa[k].numel() for k in names)

        def agreement(other: dict, keys: list[str]) -> float:
            return sum(int(((sa[k] == 0) == (other[k] == 0)).sum()) for k in keys) / sum(sa[k].numel() for k in keys)

        agree, agree_repeat = agreement(sb, names), agreement(sc, names)
        depth = 1 + max(int(k.split(".layers.")[1].split(".")[0]) for k in names)
        per_layer = [{"layer": i, "stream": agreement(sb, ks), "repeat": agreement(sc, ks)}
                     for i in range(depth) for ks in [[k for k in names if f".layers.{i}." in k]]]
        diff = max(float((sa[k] - sb[k]).abs().max()) for k in names)
        _, tok = data.load_smollm2(progress=False)
        texts = {"wikitext2_test": data.load_text("wikitext2_test"), "c4": data.load_text("c4_valid")}
        ppl = {}
        for name, text in texts.items():
            ev = data.eval_windows(data.tokenize(tok, text), args.seq, args.eval_windows)
            ppl[name] = {"memory": data.perplexity(a, ev), "stream": data.perplexity(b, ev),
                         "repeat": data.perplexity(c, ev)}
    out = {"model": "smollm2", "command": "python benchmarks/" + Path(__file__).name + " " + " ".join(sys.argv[1:]),
           "settings": {"calibration": f"{args.windows}x{args.seq} tokens wikitext2_valid seed 0, batch {args.batch}",
                        "method": f"moonshot-sparsegpt alpha {args.alpha} (fisher auto)", "pattern": args.pattern,
                        "evaluation": f"first {args.eval_windows}x{args.seq} tokens of each text"},
           "machine": machine(), "memory": side["memory"], "stream": side["stream"], "repeat": side["repeat"],
           "repeat_batch": repeat_batch, "mask_agreement": agree, "mask_agreement_repeat": agree_repeat,
           "mask_entries": total, "max_abs_weight_difference": diff, "perplexity": ppl, "layers": per_layer}
    write_json(RESULTS / "stream-moonshot_smollm2.json", out)
    print(json.dumps({k: v for k, v in out.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()
