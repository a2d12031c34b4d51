"""``moonshot-fx`` command line: prune, evaluate and export the bundled models or your own.

Examples::

    moonshot-fx prune --model stories260k --sparsity 2:4 --method moonshot --alpha auto --eval --out pruned.pt
    moonshot-fx prune --model resnet20 --sparsity 0.5 --method sparsegpt --calib-images 256 --eval
    moonshot-fx eval --model stories260k --checkpoint pruned.pt
    moonshot-fx export --model stories260k --checkpoint pruned.pt --out pruned.onnx --pattern 2:4

    moonshot-fx prune --model ./my-llama --calibration notes.txt --sparsity 2:4 --method sparsegpt --out ./my-llama-2of4
    moonshot-fx eval --model ./my-llama-2of4 --text held-out.jsonl
    moonshot-fx prune --model timm:resnet18 --checkpoint r18.pt --calibration images.npz --out r18-2of4.pt

Your own model (``--model``, see :mod:`moonshot_fx.user_models`; nothing is ever downloaded):

* a Hugging Face model directory (``config.json`` + safetensors or ``pytorch_model.bin``) with its
  tokenizer (or ``--tokenizer PATH``); a ``.gguf`` file (dequantized by transformers' GGUF reader);
* ``timm:NAME`` / ``torchvision:NAME`` with ``--checkpoint FILE`` (its state_dict; the
  architecture is built with random weights first).

``--calibration FILE`` is plain text or JSON Lines with a ``text`` field (default: the bundled
WikiText-2 validation text), tokenized and sampled into ``--calib-windows`` x ``--seqlen`` windows;
for timm/torchvision models it is a ``.npz``/``.pt`` of images (a model with 3x32x32 inputs may use
the bundled CIFAR-10 calibration images instead; see :mod:`moonshot_fx.user_data`). ``--text FILE``
is the perplexity text of ``eval`` and ``prune --eval`` (default: the WikiText-2 raw test text).
For a transformers model ``--out DIR`` writes a Hugging Face directory (:mod:`moonshot_fx.hf_export`:
config, tokenizer, dense safetensors with the zeros, no ``sparsity_config``, ``moonshot_report.json``;
atomic; an existing DIR needs ``--overwrite``); an ``--out`` ending in .pt/.pth, and the ``--out`` of
every other model, is a state_dict file.

Bundled models and data (all local, see :mod:`moonshot_fx.data`):

* ``stories260k`` — llama2.c's 260K TinyStories model. The bundled TinyStories sample is split in
  two halves: calibration windows are drawn from the first, perplexity is measured on the second.
* ``smollm2`` — SmolLM2-135M-Instruct; calibration on WikiText-2 validation, perplexity on the
  WikiText-2 raw test text (the first ``--eval-windows`` windows; ``0`` for all of it).
* ``resnet20`` / ``resnet56`` — pretrained CIFAR-10 ResNets; calibration on the 1,000-image
  calibration split, top-1 on ``--eval-images`` test images (``load_cifar``'s fixed sample of
  all classes; all 10,000 by default).

With an N:M pattern, layers whose input size is not a multiple of M (e.g. a ResNet's 27-input
stem convolution) cannot take the pattern; ``prune`` keeps them dense and says so.
"""
from __future__ import annotations

import argparse
import logging
import math
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .api import NM_SKIP_MARK
from .config import BASES, METHODS, SparsifyConfig, parse_pattern
from .errors import ConfigError, MoonshotError, PatternWarning
from .user_models import FORMS_HELP, model_arg_type, parse_model_arg

from .cli_models import (MODELS, STATE_DICT_SUFFIXES, Loaded, format_metric, apply_defaults, calibration_batches, evaluate,
                         load_checkpoint, load_model, save_state_dict, weight_sparsity)

log = logging.getLogger("moonshot_fx.cli")


def _alpha(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"alpha must be a number in [0, 1] or 'auto', got {text!r}") from None


def _check_user_args(args: argparse.Namespace) -> Any:
    """Fail fast, before a slow load, on options that cannot work for a user model; returns its source."""
    source = parse_model_arg(args.model)
    wants_eval = args.command == "eval" or getattr(args, "eval", False)
    if wants_eval and source.kind in ("timm", "torchvision"):
        raise ConfigError(f"{args.command} {'--eval ' if args.command == 'prune' else ''}measures perplexity of "
                          f"language models; top-1 of {source.text} needs your own labelled data (use the API).")
    out = getattr(args, "out", None)
    if out and source.is_hf and not _is_state_dict_path(out):
        from .hf_export import check_destination

        check_destination(out, overwrite=getattr(args, "overwrite", False))
    return source


def _is_state_dict_path(out: str) -> bool:
    return Path(out).suffix.lower() in STATE_DICT_SUFFIXES


def _save(loaded: Loaded, args: argparse.Namespace) -> None:
    """``--out``: a Hugging Face directory for transformers models, else a state_dict file."""
    if loaded.user is None or not loaded.user.source.is_hf or _is_state_dict_path(args.out):
        dest = save_state_dict(loaded.model, args.out)
        print(f"saved state_dict to {dest}")
        return
    from .hf_export import save_hf_directory

    user, model = loaded.user, loaded.model
    dtype = user.source_dtype
    if dtype in (torch.float16, torch.bfloat16):  # back to the stored dtype: zeros stay zeros
        model.to(dtype)
    argv = getattr(args, "argv", None)
    command = "moonshot-fx " + shlex.join(argv) if argv is not None else ""
    dest = save_hf_directory(model, user.tokenizer, args.out, model.moonshot_report,  # type: ignore[attr-defined]
                             extra={"command": command, "source": user.source.text}, overwrite=args.overwrite)
    where = f" ({str(dtype).replace('torch.', '')})" if dtype in (torch.float16, torch.bfloat16) else ""
    print(f"saved Hugging Face directory{where} to {dest}")


def cmd_prune(args: argparse.Namespace) -> int:
    if args.model in MODELS:
        apply_defaults(args)
    else:
        _check_user_args(args)
    pattern = parse_pattern(args.sparsity)  # PatternError before the (slow) model load
    options: dict[str, Any] = {"base": args.base}
    if args.alpha is not None:
        options["alpha"] = args.alpha
    if args.sequential is not None:
        options["sequential"] = args.sequential
    if args.sequential_unit is not None:
        options["sequential_unit"] = args.sequential_unit
    if args.fisher is not None:
        options["fisher"] = args.fisher
    if getattr(args, "alpha_search", None) is not None:
        options["alpha_search"] = args.alpha_search
    if getattr(args, "alpha_block_search", None) is not None:
        options["alpha_block_search"] = args.alpha_block_search
    if args.recalibrate_norms is not None:  # None: the API's default (on for BatchNorm models)
        options["recalibrate_norms"] = args.recalibrate_norms
    if args.plot:  # MissingExtraError now, not after a long prune
        from .plots import pyplot

        pyplot()
    exclude = tuple(args.exclude or ())  # added to DEFAULT_EXCLUDE by the config
    cfg = SparsifyConfig(sparsity=args.sparsity, method=args.method, exclude=exclude,
                         include=tuple(args.include or ("*",)), **options)

    stream = getattr(args, "stream", False)
    if not stream and (args.offload_activations or args.layer_device):
        raise ConfigError("--offload-activations and --layer-device apply to --stream only; add --stream "
                          "(a Hugging Face directory pruned layer by layer) or drop them.")
    if stream:  # layer by layer from the safetensors shards (moonshot_fx.streaming)
        from .cli_stream import prune_command

        return prune_command(args, cfg)
    loaded = load_model(args.model, need_text=True, args=args)
    if args.checkpoint and loaded.user is None:
        load_checkpoint(loaded.model, args.checkpoint)
    model = loaded.model
    print(f"model: {args.model} ({sum(p.numel() for p in model.parameters()):,} parameters)")
    batches, calib_desc = calibration_batches(loaded, args)
    print(f"calibration: {calib_desc}")

    dense_metric = None
    if args.eval:
        metric, value, desc = evaluate(loaded, args)
        dense_metric = value
        print(f"dense  {metric} ({desc}): {format_metric(metric, value)}")

    t0 = time.perf_counter()
    calib = batches if args.method != "magnitude" else []
    from .api import sparsify

    with warnings.catch_warnings():  # the N:M misfits are printed below from the report
        warnings.simplefilter("ignore", PatternWarning)
        sparsify(model, batches[0], calibration=calib, config=cfg, prune_head=args.prune_head,
                 progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    report = model.moonshot_report  # type: ignore[attr-defined]
    misfits = [n for n, r in report.skipped.items() if NM_SKIP_MARK in r]
    if misfits:
        print(f"note: keeping {len(misfits)} layer(s) dense: input size not a multiple of {pattern.m} "
              f"for {pattern}: {', '.join(misfits)}")
    if report.norms_recalibrated:
        print("BatchNorm statistics re-estimated on the calibration data"
              + (" (default for BatchNorm models; --no-recalibrate-norms to keep them)"
                 if report.norms_recalibrated_by_default else ""))
    alpha = f", alpha={report.alpha:g}" if report.alpha is not None else ""
    if report.block_alphas:  # alpha="auto" chosen per block
        counts: dict[float, int] = {}
        for v in report.block_alphas.values():
            counts[v["alpha"]] = counts.get(v["alpha"], 0) + 1
        alpha = ", alpha per block (" + ", ".join(f"{a:g}: {n} blocks" for a, n in sorted(counts.items())) + ")"
    print(f"pruned: {len(report.sites)} layers to {pattern} with {args.method}{alpha}; "
          f"{100 * report.overall_sparsity:.1f}% of {report.total_params:,} weights are zero; {seconds:.1f}s")
    if args.eval:
        metric, value, desc = evaluate(loaded, args)
        change = ""
        if dense_metric is not None and math.isfinite(value):
            change = f" (dense {format_metric(metric, dense_metric)}, {value - dense_metric:+.3g})"
        print(f"pruned {metric} ({desc}): {format_metric(metric, value)}{change}")
    if args.report:
        Path(args.report).write_text(report.to_json(indent=2), encoding="utf-8")
        print(f"report written to {args.report}")
    if args.plot:
        _plot(report, args)
    if args.out:
        _save(loaded, args)
    return 0


def _plot(report: Any, args: argparse.Namespace) -> None:
    from .plots import plot_site_errors

    try:
        plot_site_errors(report, args.plot, title=f"{args.model}: {args.method} {args.sparsity}")
    except ValueError as exc:  # Wanda / magnitude: no reconstruction statistics
        print(f"note: no per-layer figure: {exc}")
        return
    print(f"per-layer error figure written to {args.plot}")


def cmd_eval(args: argparse.Namespace) -> int:
    if args.model in MODELS:
        if args.text:
            raise ConfigError(f"--text is for your own models; {args.model} is evaluated on its bundled text.")
        apply_defaults(args)
    else:
        _check_user_args(args)
    loaded = load_model(args.model, need_text=True, args=args)
    if args.checkpoint:
        if loaded.user is None:  # a user model loaded it already
            load_checkpoint(loaded.model, args.checkpoint)
        print(f"checkpoint: {args.checkpoint}")
    sparsity, count = weight_sparsity(loaded.model)
    print(f"model: {args.model}; {100 * sparsity:.1f}% of {count:,} layer weights are zero")
    metric, value, desc = evaluate(loaded, args)
    print(f"{metric} ({desc}): {format_metric(metric, value)}")
    return 0


def _onnx_backend() -> Any:
    try:
        from .backends import onnx
    except Exception as e:  # noqa: BLE001 - any import failure means: no export here
        log.debug("moonshot_fx.backends.onnx failed to import", exc_info=True)
        return e
    return onnx


def cmd_export(args: argparse.Namespace) -> int:
    backend = _onnx_backend()
    export_main = getattr(backend, "export_main", None)
    if export_main is None:
        why = f" ({type(backend).__name__}: {backend})" if isinstance(backend, Exception) else ""
        print("moonshot-fx: error: ONNX export is not available: moonshot_fx.backends.onnx.export_main "
              f"is missing{why}. Install the extra with `pip install 'moonshot-fx[onnx]'`.", file=sys.stderr)
        return 2
    forwarded = getattr(args, "export_args", None)
    return int(export_main(args if forwarded is None else forwarded) or 0)


# ----------------------------------------------------------------------------- parser


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=model_arg_type(MODELS),
                   help=f"a bundled model ({', '.join(MODELS)}), {FORMS_HELP}")
    p.add_argument("--checkpoint", help="state_dict file (torch.load(weights_only=True) or .safetensors) loaded "
                                        "into the model; required for timm:/torchvision: models")
    p.add_argument("--tokenizer", metavar="PATH", help="your model's tokenizer (a directory or .gguf file) "
                                                       "when it is not next to the model")
    p.add_argument("--num-classes", type=int, default=None,
                   help="timm/torchvision: classifier size of --checkpoint when not the default (1000)")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--text", metavar="FILE", help="your LM's perplexity text: plain text or .jsonl with a `text` "
                                                  "field (default: WikiText-2 raw test)")
    g.add_argument("--eval-windows", type=int, default=None,
                   help="LMs: evaluate on the first N windows (0 = all; default: stories260k all, smollm2 and "
                        "your own 16)")
    g.add_argument("--eval-seqlen", type=int, default=None, help="LMs: tokens per evaluation window "
                   "(default 128 stories260k, else 512 or the model's positions)")
    g.add_argument("--eval-images", type=int, default=None, help="ResNets: N test images, a fixed random sample (default: all 10000)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="windows/images per forward pass (default: 8 stories260k, 4 other LMs, 64 vision models)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moonshot-fx", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v: info, -vv: debug logging")
    sub = parser.add_subparsers(dest="command", metavar="{prune,eval,export}", required=True)

    p = sub.add_parser("prune", help="prune a bundled model or your own one-shot and optionally evaluate/save it")
    _add_model_args(p)
    p.add_argument("--calibration", metavar="FILE",
                   help="your model's calibration data: plain text or .jsonl with a `text` field (default: "
                        "WikiText-2 validation); timm/torchvision: a .npz/.pt of images")
    p.add_argument("--sparsity", default="2:4", help="fraction in [0, 1) or N:M (default 2:4)")
    p.add_argument("--method", default="sparsegpt", choices=METHODS)
    p.add_argument("--base", default="admm", choices=BASES,
                   help="base pruner of --method moonshot (default admm, the best measured; sparsegpt is faster)")
    p.add_argument("--alpha", type=_alpha, default=None, help="MOONSHOT alpha in [0, 1] or 'auto' (default 0.75)")
    p.add_argument("--calib-windows", type=int, default=None, help="LMs: calibration windows (default 32)")
    p.add_argument("--seqlen", type=int, default=None, help="LMs: tokens per calibration window "
                   "(default 128 stories260k, else 512 or the model's positions)")
    p.add_argument("--calib-images", type=int, default=None, help="vision models: calibration images (CIFAR-10: a fixed sample of all "
                   "classes; --calibration: the first N; default 256)")
    p.add_argument("--seed", type=int, default=0, help="LMs: seed of the calibration window sampler")
    seq = p.add_mutually_exclusive_group()
    seq.add_argument("--sequential", dest="sequential", action="store_true", default=None,
                     help="prune in graph order on already-pruned inputs (default: automatic)")
    seq.add_argument("--no-sequential", dest="sequential", action="store_false")
    p.add_argument("--sequential-unit", choices=["auto", "block", "group"], default=None,
                   help="sequential granularity: a whole repeated block at once or each input group "
                        "(default auto: group for sparsegpt/optima, block for wanda/magnitude)")
    p.add_argument("--fisher", choices=["auto", "token", "row", "kron", "sample", "weight"], default=None,
                   help="MOONSHOT Fisher form (default auto: sample-level for CNNs, per-weight for wanda/magnitude "
                        "bases, Kronecker-factored otherwise)")
    p.add_argument("--alpha-search", choices=["auto", "block", "model"], default=None,
                   help="how --alpha auto chooses: per block inside the sequential pass, or one alpha by the "
                        "model loss (default auto: block when sequential without BatchNorm re-estimation)")
    p.add_argument("--alpha-block-search", choices=["local", "grid"], default=None,
                   help="per-block search: descend from the previous block's alpha (local, default) or try "
                        "every grid point (grid)")
    p.add_argument("--include", action="append", metavar="GLOB", help="only prune weights matching GLOB (repeatable)")
    p.add_argument("--exclude", action="append", metavar="GLOB",
                   help="also keep weights matching GLOB dense (added to the defaults; repeatable)")
    p.add_argument("--prune-head", action="store_true", help="also prune the final classifier when the globs allow it")
    bn = p.add_mutually_exclusive_group()
    bn.add_argument("--recalibrate-norms", dest="recalibrate_norms", action="store_true", default=None,
                    help="re-estimate BatchNorm statistics on the calibration data after pruning "
                         "(default: on for models with BatchNorm; matters most at high sparsity)")
    bn.add_argument("--no-recalibrate-norms", dest="recalibrate_norms", action="store_false",
                    help="keep the dense model's BatchNorm statistics")
    p.add_argument("--eval", action="store_true", help="print dense and pruned perplexity / top-1")
    p.add_argument("--out", help="save the pruned model here (atomically): a Hugging Face directory for "
                                 "transformers models (unless it ends in .pt/.pth/.bin), else a state_dict file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.add_argument("--stream", action="store_true", help="Hugging Face directory of a Llama-family model: prune one "
                   "decoder layer at a time from its safetensors shards into --out DIR (models larger than memory)")
    p.add_argument("--offload-activations", metavar="DIR", help="with --stream: keep the calibration "
                   "activations in a memory-mapped file in DIR instead of memory (removed at the end)")
    p.add_argument("--layer-device", metavar="DEV", help="with --stream: run each layer on this device "
                   "(default: CUDA where available, else the CPU)")
    p.add_argument("--report", help="write the sparsity report as JSON here")
    p.add_argument("--plot", metavar="FILE", help="write a figure of each pruned layer's relative reconstruction "
                   "error here (PNG, or the format of FILE's suffix; needs the plots extra)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_eval_args(p)
    p.set_defaults(func=cmd_prune)

    e = sub.add_parser("eval", help="evaluate a bundled model or your own LM, optionally with a pruned checkpoint")
    _add_model_args(e)
    _add_eval_args(e)
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export", help="export to ONNX and verify it (moonshot_fx.backends.onnx)")
    backend = _onnx_backend()
    add = getattr(backend, "add_export_arguments", None)
    if add is not None:
        add(x)
    else:  # no argument spec available: everything after `export` is forwarded as a list
        x.set_defaults(export_args=[])
    x.set_defaults(func=cmd_export)
    return parser


def _setup_logging(verbosity: int) -> Callable[[], None]:
    """Log moonshot_fx messages to stderr (warnings by default, -v info, -vv debug) for the duration
    of one :func:`main` call; returns the function that undoes it."""
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logger = logging.getLogger("moonshot_fx")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False

    def undo() -> None:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]

    return undo


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 on success)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extra = parser.parse_known_args(argv)
    args.argv = argv
    if extra:
        if args.command == "export" and getattr(args, "export_args", None) is not None:
            args.export_args = list(extra)
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    undo_logging = _setup_logging(args.verbose)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except MoonshotError as e:
        print(f"moonshot-fx: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:  # missing data, too many windows/images asked, bad checkpoint
        log.debug("failed", exc_info=True)
        print(f"moonshot-fx: error: {e}", file=sys.stderr)
        return 1
    finally:
        undo_logging()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
