"""Loading the user's own model for the command line (``moonshot-fx prune/eval/export --model``).

``--model`` takes, besides the bundled names of :mod:`moonshot_fx.cli`:

* a **Hugging Face model directory** (``config.json`` plus ``model.safetensors`` /
  ``pytorch_model.bin``, sharded or not): the class named in ``config.architectures`` (e.g.
  ``LlamaForCausalLM``, ``BertForSequenceClassification``), else ``AutoModelForCausalLM`` when the
  config is a causal LM, else ``AutoModel``; its tokenizer from the same directory or ``tokenizer=``;
* a **``.gguf`` file**, read by transformers' GGUF reader
  (``AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)``, dequantized to dense fp32), its
  tokenizer from the same file;
* **``timm:NAME``** or **``torchvision:NAME``**: the architecture built with random weights
  (``pretrained=False`` / ``weights=None``), then the state_dict of ``checkpoint=`` loaded into it.

Nothing is ever downloaded: transformers is called with ``local_files_only=True`` and
``trust_remote_code=False``. Every failure is a :class:`~moonshot_fx.errors.ModelLoadError` that
says what was wrong and what to pass instead.
"""
from __future__ import annotations

import argparse
import difflib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from .errors import ModelLoadError

__all__ = [
    "ModelSource", "UserModel", "parse_model_arg", "load_user_model", "load_state_dict_file",
    "example_inputs", "FORMS_HELP", "model_arg_type",
]

#: one line describing the accepted forms, for error messages and ``--help``
FORMS_HELP = ("a Hugging Face model directory (config.json + safetensors or pytorch_model.bin), a .gguf file, "
              "or timm:NAME / torchvision:NAME with --checkpoint FILE")

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSource:
    """What a ``--model`` argument names: ``kind`` is ``"hf"``, ``"gguf"``, ``"timm"`` or ``"torchvision"``."""

    kind: str
    text: str
    path: Path | None = None
    name: str = ""

    @property
    def is_hf(self) -> bool:
        """Loaded through transformers (saved back as a Hugging Face directory)."""
        return self.kind in ("hf", "gguf")


@dataclass
class UserModel:
    """A loaded user model and what the CLI needs to calibrate, evaluate and save it."""

    source: ModelSource
    model: nn.Module
    tokenizer: Any = None
    #: a transformers causal LM (perplexity makes sense)
    is_causal_lm: bool = False
    #: vision models: (C, H, W) the architecture expects, and the normalisation of its inputs
    input_size: tuple[int, int, int] | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    #: the parameter dtype stored in the source (HF ``config.dtype``), when known
    source_dtype: torch.dtype | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def uses_text(self) -> bool:
        """Calibrated on token windows (any transformers model) rather than images."""
        return self.source.is_hf

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model's config allows, when it says."""
        cfg = getattr(self.model, "config", None)
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None


def model_arg_type(bundled: Sequence[str]) -> Callable[[str], str]:
    """The argparse ``type`` of a ``--model`` option next to the ``bundled`` names: a bundled name
    passes, and so does anything that looks like a path or a ``timm:``/``torchvision:`` name
    (:func:`parse_model_arg` checks it when loading); a bare unknown word is a usage error."""
    def check(text: str) -> str:
        if text in bundled or ":" in text or os.sep in text or "." in text or Path(text).exists():
            return text
        raise argparse.ArgumentTypeError(f"{text!r} is not a bundled model ({', '.join(bundled)}) nor an existing "
                                         f"path; --model takes a bundled name, {FORMS_HELP}")
    return check


def parse_model_arg(text: str) -> ModelSource:
    """Classify a ``--model`` value (not a bundled name); raises :class:`ModelLoadError` when it is
    none of the supported forms or names a path that does not exist."""
    for prefix in ("timm", "torchvision"):
        if text.startswith(prefix + ":"):
            name = text[len(prefix) + 1:].strip()
            if not name:
                raise ModelLoadError(f"--model {text!r}: give the architecture after the colon, e.g. {prefix}:resnet18")
            return ModelSource(prefix, text, name=name)
    path = Path(text).expanduser()
    if not path.exists():
        raise ModelLoadError(f"--model {text!r}: no such file or directory. --model takes a bundled name, {FORMS_HELP}.")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ModelSource("gguf", text, path=path)
        hint = (" Pass the directory that holds it and its config.json." if path.suffix in (".safetensors", ".bin")
                else " For a state_dict of a timm/torchvision model pass --model timm:NAME --checkpoint FILE.")
        raise ModelLoadError(f"--model {text!r} is a file but not a .gguf file.{hint}")
    if not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f" It holds {ggufs[0]}: pass --model {path / ggufs[0]}." if ggufs else ""
        raise ModelLoadError(f"--model {text!r} is a directory without config.json, so not a Hugging Face "
                             f"model directory.{hint}")
    if not any((path / f).is_file() for f in _WEIGHT_FILES) and not list(path.glob("*.safetensors")):
        raise ModelLoadError(f"--model {text!r} has a config.json but no weights ({', '.join(_WEIGHT_FILES)}).")
    return ModelSource("hf", text, path=path)


def load_user_model(source: ModelSource, *, tokenizer: str | os.PathLike[str] | None = None,
                    checkpoint: str | os.PathLike[str] | None = None, need_tokenizer: bool = True,
                    require_checkpoint: bool = True, num_classes: int | None = None) -> UserModel:
    """Load ``source`` in eval mode, on CPU, in float32.

    Args:
        tokenizer: a directory or file to take the tokenizer from instead of the model's own.
        checkpoint: timm/torchvision: the state_dict file (``torch.load(weights_only=True)`` or
            ``.safetensors``; ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers and ``module.``
            prefixes are accepted). For an HF model it is loaded on top of the directory's weights.
        need_tokenizer: raise when no tokenizer is found (calibration and evaluation need one).
        require_checkpoint: timm/torchvision without ``checkpoint`` is an error (random weights).
        num_classes: timm/torchvision classifier size, when the checkpoint's differs from the default.
    """
    if source.kind in ("hf", "gguf"):
        out = _load_transformers(source, tokenizer, need_tokenizer)
    elif source.kind in ("timm", "torchvision"):
        if checkpoint is None and require_checkpoint:
            raise ModelLoadError(f"--model {source.text} needs --checkpoint FILE (its state_dict): moonshot-fx never "
                                 "downloads pretrained weights, and pruning random weights means nothing.")
        out = _load_vision(source, num_classes)
    else:  # pragma: no cover - parse_model_arg makes only these kinds
        raise ModelLoadError(f"unknown model kind {source.kind!r}")
    if checkpoint is not None:
        state = load_state_dict_file(checkpoint)
        try:
            out.model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise ModelLoadError(f"--checkpoint {checkpoint} does not fit {source.text}: "
                                 f"{' '.join(x.strip() for x in first[:4])[:600]}"
                                 + (" (a different classifier size? pass --num-classes N)"
                                    if "size mismatch" in str(e) and not source.is_hf else "")) from None
    out.model.eval()
    return out


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A state_dict from ``path`` (``.safetensors`` or a ``torch.save`` file, loaded with
    ``weights_only=True``); unwraps ``state_dict``/``model`` entries and drops ``module.`` prefixes."""
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"--checkpoint {path}: no such file.")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(p))
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise ModelLoadError(f"--checkpoint {path} is not a readable state_dict ({type(e).__name__}: {e})") from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelLoadError(f"--checkpoint {path} does not hold a state_dict (a dict of tensors); "
                             f"got {type(sd).__name__}. Save one with torch.save(model.state_dict(), path).")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def example_inputs(user: UserModel, batch: int = 2, seqlen: int = 16) -> Any:
    """A random example batch for tracing/export: token ids for transformers models, images otherwise."""
    g = torch.Generator().manual_seed(0)
    if user.uses_text:
        vocab = int(getattr(user.model.config, "vocab_size", 0) or 0)
        if vocab <= 0:
            raise ModelLoadError(f"{user.source.text}: the config has no vocab_size to draw example token ids from.")
        return {"input_ids": torch.randint(0, vocab, (batch, seqlen), generator=g)}
    assert user.input_size is not None
    return torch.randn(batch, *user.input_size, generator=g)


# ----------------------------------------------------------------------------- transformers


def _require(module: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ModelLoadError(f"{what} needs the `{module}` package: pip install {module} "
                             "(or pip install 'moonshot-fx[models]').")


def _load_transformers(source: ModelSource, tokenizer: str | os.PathLike[str] | None,
                       need_tokenizer: bool) -> UserModel:
    _require("transformers", f"--model {source.text}")
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    assert source.path is not None
    common: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    if source.kind == "gguf":
        _require("gguf", "reading a .gguf file")
        _require("accelerate", "reading a .gguf file")
        where, extra = str(source.path.parent), {"gguf_file": source.path.name}
    else:
        where, extra = str(source.path), {}
    try:
        config = transformers.AutoConfig.from_pretrained(where, **extra, **common)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a bad config
        raise ModelLoadError(f"--model {source.text}: transformers cannot read its config "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls: Any = getattr(transformers, arch, None) if isinstance(arch, str) else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        cls = (transformers.AutoModelForCausalLM if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING
               else transformers.AutoModel)
    try:
        model = cls.from_pretrained(where, dtype=torch.float32, **extra, **common)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"--model {source.text}: {getattr(cls, '__name__', cls)}.from_pretrained failed "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    _strip_quantization(model)
    source_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(source_dtype, str):
        source_dtype = getattr(torch, source_dtype, None)
    causal = type(model) in set(MODEL_FOR_CAUSAL_LM_MAPPING.values())
    tok = _load_tokenizer(source, tokenizer, need_tokenizer, extra, common)
    return UserModel(source, model, tok, is_causal_lm=causal,
                     source_dtype=source_dtype if isinstance(source_dtype, torch.dtype) else None)


def _load_tokenizer(source: ModelSource, tokenizer: str | os.PathLike[str] | None, need: bool,
                    extra: dict[str, Any], common: dict[str, Any]) -> Any:
    import transformers

    if tokenizer is not None:
        tpath = Path(tokenizer).expanduser()
        if not tpath.exists():
            raise ModelLoadError(f"--tokenizer {tokenizer}: no such file or directory.")
        if tpath.is_file() and tpath.suffix.lower() == ".gguf":
            where, kw = str(tpath.parent), {"gguf_file": tpath.name}
        elif tpath.is_file():
            where, kw = str(tpath.parent), {}
        else:
            where, kw = str(tpath), {}
        label = f"--tokenizer {tokenizer}"
    else:
        assert source.path is not None
        where = str(source.path.parent if source.kind == "gguf" else source.path)
        kw, label = extra, f"--model {source.text}"
    try:
        return transformers.AutoTokenizer.from_pretrained(where, **kw, **common)
    except Exception as e:  # noqa: BLE001 - a missing tokenizer shows up as many error kinds
        if not need:
            return None
        raise ModelLoadError(f"{label}: no tokenizer could be loaded ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:300] if str(e) else ''}). Calibration text must be tokenized: "
                             "add tokenizer.json / tokenizer_config.json to the directory or pass --tokenizer PATH.") from None


def _strip_quantization(model: Any) -> None:
    """Drop quantization markers a GGUF load leaves (the weights are dense already), so the model
    saves as plain safetensors."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "quantization_config", None) is not None:
        try:
            delattr(config, "quantization_config")
        except AttributeError:
            config.quantization_config = None
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        try:
            model.is_quantized = False
        except AttributeError:  # a read-only property in some versions
            pass


# ----------------------------------------------------------------------------- timm / torchvision


def _close(name: str, names: Sequence[str]) -> str:
    near = difflib.get_close_matches(name, list(names), n=5, cutoff=0.5)
    return f" Close names: {', '.join(near)}." if near else ""


def _load_vision(source: ModelSource, num_classes: int | None) -> UserModel:
    kw: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    if source.kind == "timm":
        _require("timm", f"--model {source.text}")
        import timm

        if not timm.is_model(source.name):
            raise ModelLoadError(f"--model {source.text}: timm has no architecture {source.name!r}."
                                 + _close(source.name, timm.list_models()) + " List them with timm.list_models().")
        model = timm.create_model(source.name, pretrained=False, **kw)
        cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        size = tuple(int(x) for x in cfg.get("input_size", (3, 224, 224)))
        return UserModel(source, model, input_size=(size[0], size[1], size[2]),
                         mean=tuple(cfg.get("mean", IMAGENET_MEAN)), std=tuple(cfg.get("std", IMAGENET_STD)))
    _require("torchvision", f"--model {source.text}")
    import torchvision

    names = torchvision.models.list_models()
    if source.name not in names:
        raise ModelLoadError(f"--model {source.text}: torchvision has no architecture {source.name!r}."
                             + _close(source.name, names) + " List them with torchvision.models.list_models().")
    model = torchvision.models.get_model(source.name, weights=None, **kw)
    side = getattr(model, "image_size", None)  # VisionTransformer records its input size
    side = int(side) if isinstance(side, int) else 299 if source.name.startswith("inception") else 224
    return UserModel(source, model, input_size=(3, side, side))
