"""Where a streamed checkpoint's calibration activations live, and where each layer runs.

:func:`moonshot_fx.sparsify_checkpoint` keeps the hidden states of every calibration window,
``(batches, B, T, hidden)`` in the checkpoint's dtype, between decoder layers. That is one
buffer — in memory, or (``offload_activations=DIR``) a memory-mapped file in ``DIR`` that the
kernel pages in and out, so its pages are reclaimable cache rather than anonymous memory (for
many long windows of a wide model: 256 × 2048 tokens × 8192 wide in bf16 is 8.6 GB). The file is
removed when the buffer is closed, on failure too.

``layer_device``: each layer, with its calibration activations, is onloaded to this device for
calibration, solving and propagation, and offloaded after (its weights are written from the
CPU). The default is the current CUDA device where one exists, else the CPU (where nothing
moves, so the CPU path is unchanged bit for bit).
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import torch


def onload_device(device: str | torch.device | None) -> torch.device:
    """The device layers run on: ``device``, else CUDA where available, else the CPU."""
    if device is not None:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            from .errors import ConfigError

            raise ConfigError(f"layer_device={device!r}: CUDA is not available here; pass 'cpu' or leave it out.")
        return dev
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class ActivationBuffer:
    """A ``shape`` tensor of ``dtype``: in memory, or memory-mapped from a file in ``directory``."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, directory: str | os.PathLike[str] | None = None):
        self.path: Path | None = None
        if directory is None:
            self.tensor = torch.empty(shape, dtype=dtype)
            return
        root = Path(directory).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".moonshot-activations.", suffix=".bin", dir=root)
        os.close(fd)
        self.path = Path(name)
        try:
            numel = math.prod(shape)
            os.truncate(name, numel * torch.empty((), dtype=dtype).element_size())
            self.tensor = torch.from_file(name, shared=True, size=numel, dtype=dtype).view(shape)
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise

    def like(self) -> ActivationBuffer:
        """A new buffer of the same shape, dtype and place, holding a copy of this one."""
        other = ActivationBuffer(tuple(self.tensor.shape), self.tensor.dtype,
                                 None if self.path is None else self.path.parent)
        other.tensor.copy_(self.tensor)
        return other

    def close(self) -> None:
        """Drop the tensor and remove its file (if any)."""
        self.tensor = torch.empty(0)
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None
