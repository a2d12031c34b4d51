"""The user's own calibration and evaluation data for the command line.

* **Text** (``--calibration FILE`` / ``--text FILE`` of a language model): a UTF-8 plain-text file,
  or JSON Lines (a ``.jsonl`` / ``.ndjson`` file) with one object per line whose ``text`` field is a
  document; documents are joined with blank lines. The whole text is tokenized once and windows are
  cut from the token stream (:func:`moonshot_fx.data.calibration_windows` / ``eval_windows``).
* **Images** (``--calibration FILE`` of a timm/torchvision model): a ``.npz`` with an ``images``
  array (or a single array) or a ``.pt`` file holding a tensor or a dict with ``images``. ``uint8``
  images (N×H×W×C or N×C×H×W, RGB) are scaled to [0, 1] and normalised with the model's mean/std;
  floating-point images must be N×C×H×W and are used as they are (already preprocessed). Without a
  file, a model whose input is 3×32×32 is calibrated on the bundled CIFAR-10 calibration images;
  any other input size needs a file (nothing is resized or invented).

Problems are reported as :class:`~moonshot_fx.errors.DataFileError` naming the file and the line.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DataFileError

__all__ = ["read_text_file", "token_stream", "load_calibration_images"]

JSONL_SUFFIXES = (".jsonl", ".ndjson")


def read_text_file(path: str | os.PathLike[str]) -> str:
    """The text of ``path``: plain text, or the ``text`` fields of a JSON Lines file joined by blank lines."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataFileError(f"{path}: no such file (give a plain-text file or a .jsonl file with a `text` field).")
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataFileError(f"{path} is not UTF-8 text ({e}).") from None
    if p.suffix.lower() not in JSONL_SUFFIXES:
        if not raw.strip():
            raise DataFileError(f"{path} is empty.")
        return raw
    docs: list[str] = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFileError(f"{path} line {lineno} is not JSON ({e.msg}); a .jsonl file holds one "
                                '{"text": ...} object per line.') from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            keys = f" (its keys: {', '.join(map(str, obj))})" if isinstance(obj, dict) else ""
            raise DataFileError(f"{path} line {lineno} has no string `text` field{keys}; each line must be "
                                '{"text": "..."}.')
        docs.append(obj["text"])
    if not any(d.strip() for d in docs):
        raise DataFileError(f"{path} holds no text (no line with a non-empty `text` field).")
    return "\n\n".join(docs)


def token_stream(tokenizer: Any, text: str, *, source: str, need: int) -> torch.Tensor:
    """Tokenize ``text`` (1-D ids); raises when it has fewer than ``need`` tokens (one window)."""
    from .data import tokenize

    ids = tokenize(tokenizer, text)
    if ids.numel() < need:
        raise DataFileError(f"{source} has {ids.numel()} tokens, fewer than one window of {need}: "
                            "give more text or a smaller --seqlen / --eval-seqlen.")
    return ids


def load_calibration_images(path: str | os.PathLike[str], n: int, channels: int,
                            mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """The first ``n`` images of ``path`` as float32 N×C×H×W (see the module docstring for the layouts)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataFileError(f"--calibration {path}: no such file (give a .npz or .pt file of images).")
    x = _read_array(p)
    if x.dim() != 4:
        raise DataFileError(f"--calibration {path}: images must be a 4-D array N×H×W×C or N×C×H×W, "
                            f"got shape {tuple(x.shape)}.")
    if x.dtype == torch.uint8:
        if x.shape[1] != channels and x.shape[-1] == channels:
            x = x.permute(0, 3, 1, 2)
        x = x.float().div_(255.0)
        if x.shape[1] == len(mean) == len(std):
            x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    elif x.is_floating_point():
        x = x.float()
    else:
        raise DataFileError(f"--calibration {path}: images must be uint8 or floating point, got {x.dtype}.")
    if x.shape[1] != channels:
        raise DataFileError(f"--calibration {path}: the model takes {channels}-channel images, the file's are "
                            f"shape {tuple(x.shape)} (floating-point images must be N×C×H×W).")
    return x[:n].contiguous()


def _read_array(p: Path) -> torch.Tensor:
    try:
        if p.suffix == ".npz":
            with np.load(p) as d:
                keys = list(d.keys())
                if "images" not in keys and len(keys) != 1:
                    raise DataFileError(f"--calibration {p}: a .npz needs an `images` array (it has {', '.join(keys)}).")
                return torch.from_numpy(np.ascontiguousarray(d["images" if "images" in keys else keys[0]]))
        if p.suffix in (".pt", ".pth"):
            obj = torch.load(p, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                obj = obj.get("images")
            if not isinstance(obj, torch.Tensor):
                raise DataFileError(f"--calibration {p}: a .pt file must hold an image tensor or {{'images': tensor}}.")
            return obj
    except DataFileError:
        raise
    except Exception as e:  # noqa: BLE001 - an unreadable file is one user error
        raise DataFileError(f"--calibration {p} cannot be read ({type(e).__name__}: {e}).") from None
    raise DataFileError(f"--calibration {p}: images come as .npz or .pt (got {p.suffix or 'no suffix'}).")
