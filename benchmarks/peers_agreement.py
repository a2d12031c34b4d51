"""Is our SparseGPT the same algorithm as llm-compressor's? Prune the same model on the same
windows with both and compare the weights they produce.

    python benchmarks/peers_agreement.py --pattern 2:4 --seed 0

Ours runs with ``sequential_unit="block"``, llm-compressor's unit. Layer 0 then sees identical
inputs on both sides (the embeddings of the same token ids, then dense layer-0 weights inside the
block), so any difference there comes from the pruning itself. For
each layer-0 site the script reports the fraction of mask entries that agree, the relative
difference of the pruned weights, and both sides' reconstruction error
``tr(Δ H Δᵀ) / tr(W H Wᵀ)`` with ``H = XᵀX`` from forward hooks on the eager transformers model,
accumulated in fp64. Every later layer is calibrated on inputs that went through that side's own
pruned layers, so its mask agreement shows how far rounding-level differences travel down the
network. Both sides also report perplexity on the evaluation windows of ``peers.py``.

Writes ``benchmarks/results/peers_agreement_smollm2.json`` (its ``markdown`` key is the table).
Runs llm-compressor through ``peers_worker.py`` in the venv ``peers.py`` creates.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULTS, machine, write_json  # noqa: E402
from peers import WORK, load_dense, log, prepare, run_peer  # noqa: E402

import moonshot_fx  # noqa: E402
from moonshot_fx import data  # noqa: E402

SITES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def layer0_hessians(batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp64 ``XᵀX`` of every layer-0 projection's input, from the dense eager model."""
    model = load_dense()
    model.model.layers = model.model.layers[:1]  # nothing after layer 0 is needed
    layer = model.model.layers[0]
    hess: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Any:
        def fn(_m: torch.nn.Module, inp: tuple[torch.Tensor, ...], _out: Any) -> None:
            x = inp[0].reshape(-1, inp[0].shape[-1]).double()
            hess[name] = hess.get(name, 0) + x.T @ x
        return fn

    handles = [layer.get_submodule(n).register_forward_hook(hook(n)) for n in SITES]
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return hess


def rel_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """``tr(Δ H Δᵀ) / tr(W H Wᵀ)`` in fp64."""
    w, d = w.double(), (w - w_hat).double()
    return float(((d @ h) * d).sum() / ((w @ h) * w).sum())


def compare(dense: dict[str, torch.Tensor], peer: dict[str, torch.Tensor], ours: dict[str, torch.Tensor],
            hess: dict[str, torch.Tensor]) -> dict[str, Any]:
    layer0 = []
    for site in SITES:
        k = f"model.layers.0.{site}.weight"
        wp, wo = peer[k], ours[k]
        layer0.append({"site": site, "mask_agreement": float(((wp == 0) == (wo == 0)).float().mean()),
                       "rel_weight_diff": float((wp - wo).norm() / wp.norm()),
                       "rel_error_peer": rel_error(dense[k], wp, hess[site]),
                       "rel_error_ours": rel_error(dense[k], wo, hess[site])})
    per_layer: dict[int, list[float]] = {}
    for k, wp in peer.items():
        m = re.match(r"model\.layers\.(\d+)\..*proj\.weight$", k)
        if m:
            per_layer.setdefault(int(m.group(1)), []).append(float(((wp == 0) == (ours[k] == 0)).float().mean()))
    return {"layer0": layer0,
            "mask_agreement_by_layer": {i: sum(v) / len(v) for i, v in sorted(per_layer.items())}}


def markdown(doc: dict[str, Any]) -> str:
    s = doc["settings"]
    lines = [f"**SmolLM2-135M, SparseGPT {s['pattern']}, moonshot-fx vs llm-compressor {doc['peer_version']}** — "
             f"{s['calibration']}; perplexity on {s['evaluation']}: llm-compressor {doc['peer_quality']:.2f}, "
             f"ours {doc['ours_quality']:.2f} ({doc['date']}, `{doc['command']}`)", "",
             "Layer 0 (identical inputs on both sides; error = tr(ΔHΔᵀ)/tr(WHWᵀ), H from eager transformers, fp64):", "",
             "| site | masks agreeing | ‖Ŵ_peer − Ŵ_ours‖ / ‖Ŵ_peer‖ | error llm-compressor | error ours |",
             "|---|---:|---:|---:|---:|"]
    for r in doc["comparison"]["layer0"]:
        lines.append(f"| {r['site']} | {100 * r['mask_agreement']:.3f} % | {r['rel_weight_diff']:.1e} | "
                     f"{r['rel_error_peer']:.6f} | {r['rel_error_ours']:.6f} |")
    by_layer = doc["comparison"]["mask_agreement_by_layer"]
    picks = [i for i in sorted(by_layer, key=int) if int(i) in (0, 1, 2, 3, 5, 10, 15, 20, 25, 29)]
    lines += ["", "Masks agreeing, mean over a layer's projections (later layers see the other side's rounding "
              "through their inputs):", "",
              "| layer | " + " | ".join(str(i) for i in picks) + " |",
              "|---|" + "---:|" * len(picks),
              "| agreeing | " + " | ".join(f"{100 * by_layer[i]:.1f} %" for i in picks) + " |"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> Path:
    cal, ev = prepare(args)
    tag = f"{args.pattern.replace(':', 'of')}_seed{args.seed}"
    calib_path, eval_path = WORK / f"agree_calib_{tag}.pt", WORK / f"agree_eval_{tag}.pt"
    torch.save(cal, calib_path)
    torch.save(ev, eval_path)
    peer_w = WORK / f"agree_peer_{tag}.pt"

    log(f"llm-compressor SparseGPT {args.pattern}")
    peer_res = run_peer("sparsegpt", args.pattern, argparse.Namespace(batch=args.batch, max_wait=0), calib_path,
                        eval_path, extra=["--save-weights", str(peer_w)])
    peer = torch.load(peer_w, weights_only=True)

    log(f"moonshot-fx SparseGPT {args.pattern}")
    model = load_dense()
    dense = {k: v.clone() for k, v in model.state_dict().items() if ".layers." in k}
    batches = [cal[i:i + args.batch] for i in range(0, cal.shape[0], args.batch)]
    # llm-compressor's pipeline is block-sequential: the same unit, so layer 0 sees the same inputs
    moonshot_fx.sparsify(model, calibration=[{"input_ids": b} for b in batches], sparsity=args.pattern,
                         method="sparsegpt", sequential_unit="block", progress=False)
    ours = {k: v for k, v in model.state_dict().items() if ".layers." in k}
    ours_q = data.perplexity(model, ev, batch_size=4)
    del model

    log("layer-0 Hessians (eager, fp64)")
    doc = {"model": "smollm2", "command": " ".join(["python", "benchmarks/peers_agreement.py", *sys.argv[1:]]),
           "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(),
           "settings": {"pattern": args.pattern, "calibration": f"{args.calib_windows}x{args.seqlen} tokens wikitext2_valid "
                        f"seed {args.seed} (batch {args.batch}); ours with sequential_unit='block'",
                        "evaluation": f"first {ev.shape[0]}x{args.seqlen} tokens wikitext2_raw_test"},
           "peer_version": peer_res.get("llmcompressor", "?"), "peer_quality": peer_res["quality"], "ours_quality": ours_q,
           "comparison": compare(dense, peer, ours, layer0_hessians(batches))}
    doc["markdown"] = markdown(doc)
    out = RESULTS / "peers_agreement_smollm2.json"
    write_json(out, doc)
    print(doc["markdown"])
    from render import render_all

    render_all()
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pattern", default="2:4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    print(run(p.parse_args(argv)))


if __name__ == "__main__":
    main()
