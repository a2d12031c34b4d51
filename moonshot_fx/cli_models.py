"""The CLI's models and data: the bundled models (stories260K, SmolLM2-135M, CIFAR-10 ResNets)
and the user's own (:mod:`moonshot_fx.user_models`), their calibration batches, their quality
metric (perplexity or top-1), and state_dict checkpoints. Used by :mod:`moonshot_fx.cli`; no
argument parsing here beyond reading the parsed ``argparse.Namespace``.
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .errors import ConfigError
from .user_models import UserModel, load_user_model, parse_model_arg

log = logging.getLogger("moonshot_fx.cli")

MODELS = ("stories260k", "smollm2", "resnet20", "resnet56")
LM_MODELS = ("stories260k", "smollm2")

#: per-model defaults: calibration windows/seqlen, evaluation windows/seqlen, batch size
LM_DEFAULTS: dict[str, dict[str, int]] = {
    "stories260k": {"calib_windows": 32, "seqlen": 128, "eval_windows": 0, "eval_seqlen": 128, "batch_size": 8},
    "smollm2": {"calib_windows": 32, "seqlen": 512, "eval_windows": 16, "eval_seqlen": 512, "batch_size": 4},
}
VISION_DEFAULTS = {"calib_images": 256, "eval_images": 10000, "batch_size": 64}
#: defaults for the user's own transformers models (seqlen clipped to the model's positions)
USER_LM_DEFAULTS = {"calib_windows": 32, "seqlen": 512, "eval_windows": 16, "eval_seqlen": 512, "batch_size": 4}
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin")


# ----------------------------------------------------------------------------- models and data


@dataclass
class Loaded:
    """A model plus what is needed to calibrate and evaluate it."""

    name: str
    model: nn.Module
    tokenizer: Any = None
    calib_ids: torch.Tensor | None = None  # LM: token stream for calibration windows
    eval_ids: torch.Tensor | None = None  # LM: token stream for perplexity
    eval_corpus: str = ""
    calib_corpus: str = ""
    user: UserModel | None = None  # the user's own model (None: a bundled one)

    @property
    def is_lm(self) -> bool:
        """Calibrated on token windows."""
        return self.name in LM_MODELS or (self.user is not None and self.user.uses_text)

    @property
    def has_perplexity(self) -> bool:
        return self.name in LM_MODELS or (self.user is not None and self.user.is_causal_lm)


def _data() -> Any:
    try:
        from . import data
    except ImportError as e:  # pragma: no cover - data ships with the package
        raise SystemExit(f"moonshot-fx: error: moonshot_fx.data is unavailable: {e}") from e
    return data


def load_model(name: str, *, need_text: bool = True, args: argparse.Namespace | None = None) -> Loaded:
    """Load ``name`` (one of :data:`MODELS`, or a user model form of :mod:`moonshot_fx.user_models`
    configured by ``args``) and, for LMs, its calibration/evaluation token streams."""
    if name not in MODELS:
        return _load_user(name, args if args is not None else argparse.Namespace(), need_text)
    data = _data()
    t0 = time.perf_counter()
    if name == "stories260k":
        model, tok = data.load_stories260k()
        out = Loaded(name, model, tok, eval_corpus="tinystories, 2nd half")
        if need_text:
            ids = torch.tensor(tok.encode_documents(data.load_text("tinystories")), dtype=torch.long)
            half = ids.numel() // 2
            out.calib_ids, out.eval_ids = ids[:half], ids[half:]
    elif name == "smollm2":
        model, tok = data.load_smollm2()
        out = Loaded(name, model, tok, eval_corpus="wikitext2 test")
        if need_text:
            out.calib_ids = data.tokenize(tok, data.load_text("wikitext2_valid"))
            out.eval_ids = data.tokenize(tok, data.load_text("wikitext2_test"))
    elif name in ("resnet20", "resnet56"):
        out = Loaded(name, data.load_cifar_resnet(int(name[len("resnet"):])), eval_corpus="CIFAR-10 test")
    else:  # argparse restricts the choices
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    out.model.eval()
    log.info("loaded %s in %.1fs", name, time.perf_counter() - t0)
    return out


def _load_user(name: str, args: argparse.Namespace, need_text: bool) -> Loaded:
    """The user's model (``--model PATH|timm:NAME|torchvision:NAME``) and its text streams."""
    from .user_data import read_text_file, token_stream

    t0 = time.perf_counter()
    source = parse_model_arg(name)
    user = load_user_model(source, tokenizer=getattr(args, "tokenizer", None),
                           checkpoint=getattr(args, "checkpoint", None), need_tokenizer=need_text,
                           num_classes=getattr(args, "num_classes", None))
    log.info("loaded %s in %.1fs", name, time.perf_counter() - t0)
    out = Loaded(name, user.model, user.tokenizer, user=user)
    given = {k for k in ("seqlen", "eval_seqlen") if getattr(args, k, None) is not None}
    apply_defaults(args, user)
    if not (user.uses_text and need_text):
        return out
    if (args.command == "eval" or getattr(args, "eval", False)) and not user.is_causal_lm:
        raise ConfigError(f"{name} is a {type(user.model).__name__}, not a causal LM: perplexity does not apply "
                          f"(prune it without --eval, and evaluate it on your task with the API).")
    limit = user.max_positions
    for key in ("seqlen", "eval_seqlen"):
        if limit is not None and getattr(args, key) > limit:
            if key in given:
                print(f"note: --{key.replace('_', '-')} {getattr(args, key)} is longer than the model's "
                      f"{limit} positions; using {limit}")
            setattr(args, key, limit)
    calib = getattr(args, "calibration", None)
    data = _data()
    if getattr(args, "command", "") == "prune":
        text = read_text_file(calib) if calib else data.load_text("wikitext2_valid")
        out.calib_corpus = str(calib) if calib else "wikitext2 valid"
        out.calib_ids = token_stream(user.tokenizer, text, source=out.calib_corpus, need=args.seqlen)
    if user.is_causal_lm and (args.command == "eval" or getattr(args, "eval", False)):
        text_file = getattr(args, "text", None)
        text = read_text_file(text_file) if text_file else data.load_text("wikitext2_test")
        out.eval_corpus = str(text_file) if text_file else "wikitext2 test"
        out.eval_ids = token_stream(user.tokenizer, text, source=out.eval_corpus, need=args.eval_seqlen)
    return out


def _even_chunks(x: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Split ``x`` along dim 0 into equal chunks of at most ``batch_size`` (one shape for tracing)."""
    n = x.shape[0]
    size = max(d for d in range(1, min(batch_size, n) + 1) if n % d == 0)
    return list(x.split(size))


def calibration_batches(loaded: Loaded, args: argparse.Namespace) -> tuple[list[Any], str]:
    """The calibration batches and a one-line description."""
    data = _data()
    if loaded.is_lm:
        assert loaded.calib_ids is not None
        seqlen = min(args.seqlen, loaded.calib_ids.numel())
        windows = data.calibration_windows(loaded.calib_ids, args.calib_windows, seqlen, seed=args.seed)
        batches = [{"input_ids": w} for w in _even_chunks(windows, args.batch_size)]
        where = loaded.calib_corpus or ("tinystories, 1st half" if loaded.name == "stories260k" else "wikitext2 valid")
        return batches, f"{args.calib_windows} windows x {seqlen} tokens ({where})"
    if loaded.user is not None:
        return _user_images(loaded.user, args)
    images, _ = data.load_cifar("calib", n=args.calib_images)
    return _even_chunks(images, args.batch_size), f"{images.shape[0]} CIFAR-10 calibration images"


def _user_images(user: UserModel, args: argparse.Namespace) -> tuple[list[Any], str]:
    """Calibration images of a timm/torchvision model: ``--calibration`` or, for 3x32x32 inputs, CIFAR-10."""
    from .errors import DataFileError
    from .user_data import load_calibration_images

    assert user.input_size is not None
    if args.calibration:
        images = load_calibration_images(args.calibration, args.calib_images, user.input_size[0], user.mean, user.std)
        desc = f"{images.shape[0]} images from {args.calibration}"
    elif tuple(user.input_size) == (3, 32, 32):
        images, _ = _data().load_cifar("calib", n=args.calib_images)
        desc = f"{images.shape[0]} CIFAR-10 calibration images"
    else:
        c, h, w = user.input_size
        raise DataFileError(f"{user.source.text} takes {c}x{h}x{w} inputs and the bundled calibration images are "
                            "3x32x32 CIFAR-10: pass --calibration IMAGES (.npz with an `images` array, N x H x W x 3 "
                            "uint8 RGB, or N x 3 x H x W float already normalised; or a .pt tensor).")
    return _even_chunks(images, args.batch_size), desc


def evaluate(loaded: Loaded, args: argparse.Namespace) -> tuple[str, float, str]:
    """``(metric name, value, description)``: perplexity for LMs, top-1 (%) for ResNets."""
    data = _data()
    t0 = time.perf_counter()
    if loaded.has_perplexity:
        assert loaded.eval_ids is not None
        seqlen = min(args.eval_seqlen, loaded.eval_ids.numel())
        windows = data.eval_windows(loaded.eval_ids, seqlen, n=args.eval_windows or None)
        value = data.perplexity(loaded.model, windows, batch_size=args.batch_size)
        desc = f"{loaded.eval_corpus}, {windows.shape[0]} x {seqlen} tokens"
        metric = "perplexity"
    else:
        images, labels = data.load_cifar("test", n=args.eval_images)
        value = data.top1(loaded.model, images, labels)
        desc = f"{loaded.eval_corpus}, {images.shape[0]} images"
        metric = "top-1"
    log.info("%s evaluated in %.1fs", metric, time.perf_counter() - t0)
    return metric, value, desc


def format_metric(metric: str, value: float) -> str:
    return f"{value:.2f}%" if metric == "top-1" else f"{value:.3f}"


# ----------------------------------------------------------------------------- checkpoints


def save_state_dict(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """``torch.save(model.state_dict())`` atomically: a temp file in the same folder, then os.replace."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(model.state_dict(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def load_checkpoint(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a state_dict saved by ``prune --out`` (``weights_only=True``; ``module.`` prefixes dropped)."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path} does not hold a state_dict (got {type(sd).__name__})")
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True)


def weight_sparsity(model: nn.Module) -> tuple[float, int]:
    """Fraction of zeros over the matrix/conv weights (dim >= 2) outside embeddings, and their count."""
    zeros = total = 0
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if p.dim() < 2 or id(p) in seen or "embed" in name:
            continue
        seen.add(id(p))
        zeros += int((p == 0).sum())
        total += p.numel()
    return (zeros / total if total else 0.0), total


# ----------------------------------------------------------------------------- commands


def apply_defaults(args: argparse.Namespace, user: UserModel | None = None) -> None:
    """Fill the calibration/evaluation sizes the user left unset with the model's defaults."""
    if user is not None:
        defaults: dict[str, int] = USER_LM_DEFAULTS if user.uses_text else VISION_DEFAULTS
    else:
        defaults = LM_DEFAULTS[args.model] if args.model in LM_MODELS else VISION_DEFAULTS
    for key, value in {**LM_DEFAULTS["stories260k"], **VISION_DEFAULTS, **defaults}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
