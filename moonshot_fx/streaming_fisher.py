"""MOONSHOT's gradient pass for a streamed checkpoint: forward layer by layer, backward in reverse.

In memory, MOONSHOT's Fisher statistics come from one backward of the model's loss on the dense
model (:mod:`moonshot_fx.passes.segment_backward` already runs it one block at a time). A
checkpoint larger than memory gets the same chain rule with one decoder layer resident at a time:

1. **forward**: the calibration hidden states go through the dense layers in order; each layer's
   input is saved to a scratch file (``batches × B × T × hidden`` in the checkpoint's dtype per
   layer) and the layer is freed;
2. **head**: the final norm and the LM head turn the last hidden state into logits; the
   per-sample loss (next-token cross-entropy on the calibration ids, or on labels drawn from the
   model with ``fisher_labels="model"``) is differentiated with respect to that hidden state;
3. **backward**, last layer first: the layer is read again, its gradient pass
   (:func:`moonshot_fx.api.precompute_gradients`, the same code the in-memory run uses) runs on
   its saved inputs with the loss ``Σ ⟨output, g⟩`` whose gradient at the layer output is the
   stored gradient ``g`` — so every site inside the layer receives ``∂loss/∂(site output)`` of
   the whole model — and one more backward through the layer gives the gradient at its input,
   which the previous layer uses. Each layer's :class:`~moonshot_fx.fisher_pass.FisherStatistics`
   go to a scratch file that the pruning pass reads when it reaches that layer.

Cost: every layer runs three extra forwards and two backwards (the saved-input forward, the
gradient pass, the input-gradient pass), and scratch disk of one activation buffer per layer plus
each layer's Fisher statistics. Memory stays one layer plus two activation buffers (inputs and
gradients). Every step runs one sample at a time, as the in-memory backward does, so the
statistics are summed in the same order; tests check the result equals the in-memory run.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from .config import SparsifyConfig
from .errors import ConfigError
from .fisher_pass import FisherStatistics
from .passes.losses import SampledLabelLoss, next_token_loss

log = logging.getLogger(__name__)

#: ``load(i)`` gives decoder layer ``i`` (dense, from the source) inside its host; ``free(host)`` drops it
LoadLayer = Callable[[int], nn.Module]
FreeLayer = Callable[[nn.Module], None]


def check_streamable(cfg: SparsifyConfig) -> None:
    """MOONSHOT options streaming cannot honour (raise before anything is read)."""
    if cfg.method == "moonshot" and cfg.alpha == "auto":
        raise ConfigError("alpha='auto' is not available in streaming mode: it scores every candidate α on the whole "
                          "model. Give a fixed alpha (e.g. alpha=0.75, the LLM default) or prune in memory.")


def _grad_loss(output: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """Per-sample ``⟨output, g⟩``: its gradient at the layer's output is ``g`` (``kwargs['grad_out']``)."""
    out = output[0] if isinstance(output, (tuple, list)) else output
    return (out.float() * kwargs["grad_out"].float()).flatten(1).sum(dim=1)


_grad_loss.per_sample = True  # type: ignore[attr-defined]  # reads only its batch: the pass may split it per sample


def head_gradients(hidden: torch.Tensor, ids: Sequence[torch.Tensor], norm: nn.Module, head: nn.Module,
                   cfg: SparsifyConfig, device: torch.device | None = None) -> torch.Tensor:
    """``∂ Σ loss / ∂ hidden`` for every calibration batch (``hidden``: ``(batches, B, T, d)``, kept
    where it is; each sample runs on ``device``, where ``norm`` and ``head`` are)."""
    dev = device or hidden.device
    sampler = SampledLabelLoss(seed=0) if cfg.fisher_labels == "model" else None
    grads = torch.empty_like(hidden)
    for b, x in enumerate(ids):
        for s in range(x.shape[0]):  # one sample at a time, as the in-memory backward
            h = hidden[b, s:s + 1].to(dev).detach().requires_grad_(True)
            with torch.enable_grad():
                logits = head(norm(h))
                xs = x[s:s + 1].to(dev)
                losses = sampler(logits, (xs,), {}) if sampler is not None else next_token_loss(logits, xs)
                (g,) = torch.autograd.grad(losses.sum(), h)
            grads[b, s:s + 1] = g.to(grads.device)
    return grads


def stream_gradients(load: LoadLayer, free: FreeLayer, n_layers: int, hidden: torch.Tensor,
                     side: Sequence[torch.Tensor], ids: Sequence[torch.Tensor], norm: nn.Module, head: nn.Module,
                     cfg: SparsifyConfig, work: Path,
                     device: torch.device | None = None) -> Callable[[int], FisherStatistics | None]:
    """Run the three steps of the module docstring; returns ``stats(i)``, which reads layer
    ``i``'s statistics back from ``work`` (a scratch directory the caller removes).

    ``hidden``: the embeddings of the calibration batches (consumed: it ends as the last hidden
    state); ``side``: the other layer inputs (``cos, sin[, mask]``). The layers, ``side``, ``norm``
    and ``head`` are on ``device`` (default: ``hidden``'s); the activations and gradients stay where
    ``hidden`` is and move there one sample at a time."""
    dev = device or hidden.device
    n = hidden.shape[1]  # samples per batch: every step below runs one sample at a time, as in memory
    with torch.no_grad():  # 1. dense forward, each layer's input kept on disk
        for li in range(n_layers):
            torch.save(hidden, work / f"input{li}.pt")
            host = load(li)
            for b in range(hidden.shape[0]):
                for s in range(n):
                    hidden[b, s:s + 1] = host(hidden[b, s:s + 1].to(dev), *_sample(side, s, n)).to(hidden.device)
            free(host)
    grads = head_gradients(hidden, ids, norm, head, cfg, dev)  # 2. the loss at the head
    del hidden
    for li in reversed(range(n_layers)):  # 3. backward, one layer at a time
        inputs = torch.load(work / f"input{li}.pt", mmap=True, weights_only=True)
        host = load(li)
        batches = [_batch(inputs[b].to(dev), side, grads[b].to(dev)) for b in range(inputs.shape[0])]
        stats = _precompute(host, batches, cfg)
        torch.save(None if stats is None else vars(stats), work / f"fisher{li}.pt")
        if li > 0:
            for b in range(inputs.shape[0]):
                for s in range(n):
                    x = inputs[b, s:s + 1].to(dev, copy=True).requires_grad_(True)
                    with torch.enable_grad():
                        out = host(x, *_sample(side, s, n))
                        (g,) = torch.autograd.grad(out, x, grad_outputs=grads[b, s:s + 1].to(dev))
                    grads[b, s:s + 1] = g.to(grads.device)
        del inputs, batches, stats
        (work / f"input{li}.pt").unlink()
        free(host)
        log.info("gradients: layer %d done", li)
    del grads

    def stats_of(li: int) -> FisherStatistics | None:
        body = torch.load(work / f"fisher{li}.pt", weights_only=True)
        return None if body is None else FisherStatistics(**body)

    return stats_of


def _sample(side: Sequence[torch.Tensor], s: int, n: int) -> list[torch.Tensor]:
    """The side inputs of sample ``s`` of a batch of ``n`` (those shared by the batch, dim 0 of 1, as they are)."""
    return [t[s:s + 1] if t.shape[0] == n else t for t in side]


def _batch(x: torch.Tensor, side: Sequence[torch.Tensor], g: torch.Tensor) -> dict[str, Any]:
    """A gradient-pass batch whose every tensor has the batch's samples on dim 0 (the side inputs
    are expanded, not copied), so that the pass splits it into single samples as the in-memory one does."""
    names = ("cos", "sin", "mask")
    n = x.shape[0]
    shared = {names[i]: t.expand(n, *t.shape[1:]) if t.shape[0] == 1 else t for i, t in enumerate(side)}
    return {"hidden": x, **shared, "grad_out": g}


def _precompute(host: nn.Module, batches: list[dict[str, Any]], cfg: SparsifyConfig) -> FisherStatistics | None:
    from .api import precompute_gradients

    return precompute_gradients(host, batches, cfg, loss_fn=_grad_loss)
