"""``moonshot-fx prune --model DIR --stream --out DIR``: the CLI's front end to
:func:`moonshot_fx.streaming.sparsify_checkpoint` (a checkpoint pruned one decoder layer at a
time from its safetensors shards)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .config import SparsifyConfig
from .errors import ConfigError
from .plots import plot_site_errors


def prune_command(args: Any, cfg: SparsifyConfig) -> int:
    """``moonshot-fx prune --model DIR --stream --out DIR``: tokenize the calibration text with the
    directory's tokenizer (or ``--tokenizer``) and call :func:`sparsify_checkpoint`."""
    import shlex

    from transformers import AutoTokenizer

    from .data import calibration_windows, load_text
    from .user_data import read_text_file, token_stream

    if not args.out:
        raise ConfigError("--stream writes the pruned checkpoint to disk: give --out DIR.")
    if args.eval or args.prune_head:
        raise ConfigError("--stream does not take --eval or --prune-head; evaluate the output directory with "
                          "`moonshot-fx eval --model OUT` afterwards.")
    src = Path(args.model).expanduser()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or src)
    text = read_text_file(args.calibration) if args.calibration else load_text("wikitext2_valid")
    seqlen = args.seqlen or 512
    ids = token_stream(tokenizer, text, source=str(args.calibration or "wikitext2 valid"), need=seqlen)
    windows = calibration_windows(ids, args.calib_windows or 32, min(seqlen, ids.numel()), seed=args.seed)
    batch = args.batch_size or 4
    calib = list(windows.split(max(d for d in range(1, min(batch, len(windows)) + 1) if len(windows) % d == 0)))
    argv = getattr(args, "argv", None)
    options = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(SparsifyConfig)
               if f.name not in ("sparsity", "method")}
    from .streaming import sparsify_checkpoint

    report = sparsify_checkpoint(src, args.out, calibration=calib, sparsity=cfg.sparsity, method=cfg.method,
                                 overwrite=args.overwrite, layer_device=args.layer_device,
                                 offload_activations=args.offload_activations,
                                 extra={"command": "moonshot-fx " + shlex.join(argv) if argv else ""}, **options)
    print(f"pruned (streaming): {len(report.sites)} layers with {cfg.method}; {100 * report.overall_sparsity:.1f}% of "
          f"{report.total_params:,} weights are zero; {report.timings['total']:.1f}s; saved to {args.out}")
    if getattr(args, "plot", None):
        plot_site_errors(report, args.plot, title=f"{src.name}: {cfg.method} {cfg.sparsity}")
        print(f"per-layer error figure written to {args.plot}")
    return 0
