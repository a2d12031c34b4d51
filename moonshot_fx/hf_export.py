"""Saving a pruned transformers model as a Hugging Face directory that loaders accept as is.

:func:`save_hf_directory` writes what ``AutoModelForCausalLM.from_pretrained(out_dir)`` (and vLLM,
and anything else reading a Hugging Face checkpoint) loads: ``config.json``, the generation config,
the tokenizer when there is one, and **dense** safetensors shards in which the pruned weights are
plain zeros. ``config.json`` carries no ``sparsity_config`` and no ``quantization_config`` (vLLM
≥ 0.24 rejects any ``sparsity_config``, and a leftover GGUF ``quantization_config`` would make
loaders try to dequantize dense weights); both keys are removed if present. Next to them,
``moonshot_report.json`` holds the pruning report (per-site pattern, sparsity, error) plus whatever
``extra`` adds (the CLI adds the command line).

The directory appears atomically: everything is written into a temporary directory in the same
parent, then renamed into place. An existing ``out_dir`` is refused unless ``overwrite=True`` (then
it is replaced only after the new one is complete); a failure leaves no partial directory.
"""
from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch.nn as nn

from .errors import SaveError

__all__ = ["save_hf_directory", "REPORT_FILE", "STRIPPED_CONFIG_KEYS", "check_destination"]

#: the report's file name inside the saved directory
REPORT_FILE = "moonshot_report.json"
#: config.json keys removed before saving (serving stacks misread them on dense weights)
STRIPPED_CONFIG_KEYS = ("sparsity_config", "quantization_config")


def check_destination(out_dir: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """``out_dir`` as a Path; raises :class:`SaveError` when it exists and ``overwrite`` is False,
    or is an existing file (a directory is wanted)."""
    dest = Path(out_dir).expanduser()
    if dest.exists() and not dest.is_dir():
        raise SaveError(f"--out {out_dir} is an existing file; a Hugging Face model is saved as a directory "
                        "(give a new directory name, or a .pt path for a state_dict).")
    if dest.exists() and not overwrite:
        raise SaveError(f"--out {out_dir} already exists; pass --overwrite to replace it, or choose another directory.")
    return dest


def save_hf_directory(model: nn.Module, tokenizer: Any, out_dir: str | os.PathLike[str], report: Any = None,
                      extra: Mapping[str, Any] | None = None, *, overwrite: bool = False) -> Path:
    """Write ``model`` (a transformers ``PreTrainedModel``) as a Hugging Face directory at ``out_dir``.

    Args:
        model: the pruned model; saved with ``save_pretrained`` (safetensors) in its current dtype.
            Its config object is not modified (the keys are stripped from the written file only).
        tokenizer: saved with ``save_pretrained`` when not None.
        out_dir: the destination directory; its parent is created if needed.
        report: a :class:`~moonshot_fx.report.SparsityReport` (anything with ``to_json()``) or a
            dict, written to ``moonshot_report.json``; None: no report file.
        extra: entries added at the top level of the report JSON (e.g. ``{"command": "..."}``).
        overwrite: replace an existing ``out_dir`` (only once the new directory is complete).

    Returns:
        ``out_dir`` as a Path.

    Raises:
        SaveError: ``out_dir`` exists (without ``overwrite``) or is a file, or ``model`` cannot
            ``save_pretrained``.
    """
    dest = check_destination(out_dir, overwrite)
    if not hasattr(model, "save_pretrained"):
        raise SaveError(f"{type(model).__name__} is not a transformers model (no save_pretrained); "
                        "save its state_dict instead.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
        save = getattr(model, "save_pretrained")
        params = inspect.signature(save).parameters
        kw = {"safe_serialization": True} if "safe_serialization" in params else {}
        save(tmp, **kw)
        _strip_config(tmp / "config.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            write_report(tmp, report, extra)
        _replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def write_report(directory: Path, report: Any, extra: Mapping[str, Any] | None = None) -> None:
    """Write ``report`` (a :class:`~moonshot_fx.report.SparsityReport` or a mapping), updated with
    ``extra``, as ``directory/moonshot_report.json``."""
    body = json.loads(report.to_json()) if hasattr(report, "to_json") else dict(report)
    body.update(extra or {})
    (directory / REPORT_FILE).write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")


def _strip_config(path: Path) -> None:
    if not path.is_file():
        raise SaveError(f"save_pretrained wrote no config.json into {path.parent}")
    config = json.loads(path.read_text(encoding="utf-8"))
    if any(k in config for k in STRIPPED_CONFIG_KEYS):
        for k in STRIPPED_CONFIG_KEYS:
            config.pop(k, None)
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Move the finished ``tmp`` to ``dest``; an old ``dest`` is moved aside first, removed after."""
    if not dest.exists():
        os.replace(tmp, dest)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
    old.rmdir()
    os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except BaseException:
        os.replace(old, dest)  # put the previous directory back
        raise
    shutil.rmtree(old, ignore_errors=True)
