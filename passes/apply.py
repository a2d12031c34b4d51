"""Apply pass: write pruned weights into the user's own parameters, all or nothing
(:func:`write_weights` for a whole set at once, :class:`WeightJournal` for sets written one after
another, e.g. block by block, with an undo record on disk).

A name ``"<param>[e]"`` (an expert slice, see :mod:`moonshot_fx.passes.experts`) is written into
slice ``e`` of the 3-D parameter ``param``.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from moonshot_fx.errors import PatternError

from .experts import split_slice_name


def read_weights(model: nn.Module, names: list[str] | dict[str, object]) -> dict[str, torch.Tensor]:
    """Copies of the current values of ``names`` (parameters or expert slices), for a snapshot
    that :func:`write_weights` can restore."""
    out = {}
    for name in names:
        base, index = split_slice_name(name)
        p = model.get_parameter(base)
        out[name] = (p if index is None else p[index]).detach().clone()
    return out


def write_weights(model: nn.Module, new: dict[str, torch.Tensor]) -> None:
    """Copy ``new[name]`` into ``model``'s parameter ``name`` in place (same object, same class).

    Every value is validated first (shape, finiteness, slice index) so that nothing is written
    unless everything can be; a tied parameter is written once and seen by all its aliases.
    """
    targets: dict[str, tuple[torch.Tensor, int | None]] = {}
    for name, value in new.items():
        base, index = split_slice_name(name)
        p = model.get_parameter(base)
        if index is not None and not (p.dim() >= 3 and 0 <= index < p.shape[0]):
            raise PatternError(f"{name}: {base} of shape {tuple(p.shape)} has no expert slice {index}")
        shape = tuple(p.shape) if index is None else tuple(p.shape[1:])
        if tuple(value.shape) != shape:
            raise PatternError(f"pruned {name} has shape {tuple(value.shape)}, expected {shape}")
        if not torch.isfinite(value).all():
            raise PatternError(f"pruned {name} has non-finite values; model left unchanged")
        targets[name] = (p, index)
    with torch.no_grad():
        for name, value in new.items():
            p, index = targets[name]
            (p if index is None else p[index]).copy_(value)


def weight_view(model: nn.Module, name: str) -> torch.Tensor:
    """The model's own storage of ``name`` (a parameter, or slice ``e`` of a 3-D parameter)."""
    base, index = split_slice_name(name)
    p = model.get_parameter(base).detach()
    return p if index is None else p[index]


class WeightJournal:
    """Write pruned weights into the model as they are produced, all or nothing, without a second
    in-memory copy of the weights.

    :meth:`write` first saves the values it replaces into a temporary directory (one file per
    call), then writes the new ones in place; :meth:`rollback` reads them back and restores
    every weight written so far. Memory holds only the call's own tensors; the dense weights of
    the sites written so far live on disk (the temporary directory of :mod:`tempfile`, ``TMPDIR``),
    which is removed by :meth:`close`. Used as a context manager, an exception rolls back.
    """

    def __init__(self, model: nn.Module, directory: str | None = None):
        self.model = model
        self._dir = Path(tempfile.mkdtemp(prefix="moonshot-fx-undo-", dir=directory))
        self._files: list[Path] = []
        self.written: list[str] = []

    def write(self, new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Save the current values of ``new``'s names, write ``new`` in place (validated as by
        :func:`write_weights`); returns name → the model's own storage now holding the value."""
        if not new:
            return {}
        old = read_weights(self.model, list(new))
        path = self._dir / f"{len(self._files):06d}.pt"
        torch.save(old, path)
        self._files.append(path)
        del old
        write_weights(self.model, new)
        self.written += list(new)
        return {name: weight_view(self.model, name) for name in new}

    def rollback(self) -> None:
        """Restore every weight written through this journal (latest first), then forget them."""
        for path in reversed(self._files):
            write_weights(self.model, torch.load(path, weights_only=True))
            path.unlink()
        self._files.clear()
        self.written.clear()

    def close(self) -> None:
        """Remove the saved values (the written weights stay)."""
        shutil.rmtree(self._dir, ignore_errors=True)
        self._files.clear()

    def __enter__(self) -> "WeightJournal":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is not None:
                self.rollback()
        finally:
            self.close()
