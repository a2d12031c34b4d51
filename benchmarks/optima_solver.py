"""Time OPTIMA's two exact solvers against SparseGPT on SmolLM2-135M layer shapes (CPU).

Usage::

    python benchmarks/optima_solver.py                  # synthetic correlated H, SmolLM2 shapes
    python benchmarks/optima_solver.py --small          # small-d sweep behind solver="auto"
    python benchmarks/optima_solver.py --smollm2 15     # real Hessians of SmolLM2 block 15
    python benchmarks/optima_solver.py --threads 1 --cpu-time   # work, robust on a loaded machine

The tables in :mod:`moonshot_fx.pruners.optima` were produced with ``--threads 1 --cpu-time``
(and ``--small``, ``--smollm2 15``): the shared 2-core machine was too loaded for wall clock.

For every shape and pattern it prints the best-of-``--repeats`` wall time of ``sparsegpt_prune``,
``optima_prune`` (mask from SparseGPT, then the exact re-solve) with ``solver="cg"`` and
``solver="cholesky"``, and OPTIMA / SparseGPT. Runs are interleaved so that load from other
processes hits all methods alike. The last line sums one SmolLM2 transformer block
(q, k, v, o, gate, up, down) — 30 such blocks make the model, so the block ratio is the model
ratio. With ``--smollm2`` the rows use o_proj (q/o), k_proj (k/v), up_proj and down_proj of the
block, with H from 16 wikitext2 windows of 256 tokens. The synthetic ``H = XᵀX`` has correlated inputs with log-normal column scales
(``X = (Z A + 0.1 Z') · diag(e^s)``, ``n = 4d``), which needs about as many CG iterations as
real SmolLM2 Hessians.
"""
from __future__ import annotations

import argparse
import time

import torch

from moonshot_fx.config import Pattern
from moonshot_fx.pruners.optima import optima_prune, pick_solver
from moonshot_fx.pruners.sparsegpt import sparsegpt_prune

#: (name, out, d, count per SmolLM2 block); q/o and gate/up share shapes
SMOLLM2 = [("q/o", 576, 576, 2), ("k/v", 192, 576, 2), ("gate/up", 1536, 576, 2), ("down", 576, 1536, 1)]
SMALL = [("small", 256, d, 1) for d in (16, 32, 48, 64, 96, 128, 192, 256)] + [("small", 64, 172, 1)]


def synthetic(out: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    scale = torch.exp(torch.randn(d, generator=g))
    x = (torch.randn(4 * d, d, generator=g) @ mix + 0.1 * torch.randn(4 * d, d, generator=g)) * scale
    return torch.randn(out, d, generator=g), x.T @ x


def smollm2_block(layer: int, windows: int = 16, seqlen: int = 256) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (W, H)}`` for q, k, o, up, down of one SmolLM2 block (wikitext2 calibration)."""
    from moonshot_fx.data import calibration_windows, load_smollm2, load_text, tokenize

    model, tok = load_smollm2()
    ids = tokenize(tok, load_text("wikitext2_valid")[:300_000])
    block = model.model.layers[layer]
    mods = {"q/o": block.self_attn.o_proj, "k/v": block.self_attn.k_proj, "gate/up": block.mlp.up_proj,
            "down": block.mlp.down_proj}
    hs: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(_m, inp, _o):
            x = inp[0].reshape(-1, inp[0].shape[-1]).to(torch.float64)
            hs[name] = hs.get(name, 0) + x.T @ x
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in mods.items()]
    with torch.no_grad():
        model(calibration_windows(ids, windows, seqlen))
    for h in handles:
        h.remove()
    return {n: (m.weight.detach().clone(), hs[n].to(torch.float32)) for n, m in mods.items()}


def bench(weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern, repeats: int, cholesky: bool,
          clock=time.perf_counter) -> dict[str, float]:
    fns = {
        "sparsegpt": lambda: sparsegpt_prune(weight, hessian, pattern),
        "cg": lambda: optima_prune(weight, hessian, pattern, solver="cg"),
    }
    if cholesky and weight.shape[1] <= 1000:  # d = 1536 takes ~10 s per call: skipped
        fns["cholesky"] = lambda: optima_prune(weight, hessian, pattern, solver="cholesky")
    best = {k: float("inf") for k in fns}
    for f in fns.values():  # warm-up (allocator, MKL threads)
        f()
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = clock()
            f()
            best[k] = min(best[k], clock() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="small-d sweep (the auto rule's crossover)")
    ap.add_argument("--smollm2", type=int, default=None, metavar="LAYER", help="real Hessians of this block")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with process CPU time instead of wall time (steadier on a loaded machine; "
                         "use with --threads 1)")
    ap.add_argument("--no-cholesky", action="store_true", help="skip the (slow) direct solver")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    shapes = SMALL if args.small else SMOLLM2
    real = smollm2_block(args.smollm2) if args.smollm2 is not None else None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'CPU' if args.cpu_time else 'wall'} time, "
          f"H: {'SmolLM2 block %d' % args.smollm2 if real else 'synthetic correlated'}")
    print(f"{'layer':8} {'out x d':>11} {'pattern':>7} {'sgpt s':>8} {'cg s':>8} {'chol s':>8} "
          f"{'cg/sgpt':>8} {'chol/sgpt':>9} {'auto':>8}")
    totals: dict[str, dict[str, float]] = {}
    for name, out, d, count in shapes:
        w, h = real[name] if real else synthetic(out, d)
        for pattern in (Pattern(0.5), Pattern(n=2, m=4)):
            t = bench(w, h, pattern, args.repeats, cholesky=not args.no_cholesky,
                      clock=time.process_time if args.cpu_time else time.perf_counter)
            chol = t.get("cholesky", float("nan"))
            auto = pick_solver(int(sparsegpt_prune(w, h, pattern)[1].sum(dim=1).max()))
            print(f"{name:8} {out:>5}x{d:<5} {str(pattern):>7} {t['sparsegpt']:8.3f} {t['cg']:8.3f} {chol:8.3f} "
                  f"{t['cg'] / t['sparsegpt']:8.2f} {chol / t['sparsegpt']:9.2f} {auto:>8}")
            tot = totals.setdefault(str(pattern), {"sparsegpt": 0.0, "optima": 0.0})
            tot["sparsegpt"] += count * t["sparsegpt"]
            tot["optima"] += count * (t["cg"] if auto == "cg" else chol)
    if not args.small:
        for pat, tot in totals.items():
            print(f"SmolLM2 block (q,k,v,o,gate,up,down) {pat}: sparsegpt {tot['sparsegpt']:.3f} s, "
                  f"optima(auto) {tot['optima']:.3f} s, ratio {tot['optima'] / tot['sparsegpt']:.2f}")


if __name__ == "__main__":
    main()
