"""Default per-sample losses for MOONSHOT's Fisher pass and ``alpha="auto"`` scoring.

:func:`default_loss` reads everything it needs from the model output and the batch:

* **causal LM** (logits ``(B, T, V)`` with ``input_ids`` or an integer first input): next-token
  cross-entropy, logits at ``t`` against the token at ``t + 1`` (``labels`` when given, else the
  inputs; padding from ``attention_mask`` is ignored);
* **seq2seq** (HF ``Seq2Seq*Output`` or ``decoder_input_ids`` in the batch): ``labels`` are the
  decoder targets and are *not* shifted (the model shifts them into its decoder inputs); with
  ``decoder_input_ids`` and no labels, next-token cross-entropy on the decoder ids; with neither,
  the dense model's own predictions;
* **masked LM** (HF ``MaskedLMOutput``): ``labels`` not shifted; without labels, the dense
  model's own predictions at every (non-padding) position;
* **classifier** (logits ``(B, C)``): cross-entropy on ``labels``, or on the dense model's own
  predictions;

always the mean over a sample's counted tokens, positions labelled ``-100`` left out. Anything
else raises :class:`LossError` saying how to pass ``loss_fn``.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from moonshot_fx.errors import LossError

LossFn = Callable[[Any, tuple[Any, ...], dict[str, Any]], torch.Tensor]

#: label value left out of every loss (the HF / PyTorch convention)
IGNORE_INDEX = -100

LOSS_FN_HINT = ("pass loss_fn=(output, args, kwargs) -> torch.Tensor of per-sample losses, shape (batch,); "
                "e.g. loss_fn=lambda out, args, kwargs: F.cross_entropy(out, kwargs['target'], reduction='none')")


def _describe(output: Any) -> str:
    if isinstance(output, torch.Tensor):
        return f"a {output.dtype} tensor of shape {tuple(output.shape)}"
    if isinstance(output, Mapping):
        return f"{type(output).__name__} with keys {list(output.keys())}"
    if isinstance(output, (tuple, list)):
        return f"a {type(output).__name__} of {len(output)} element(s)"
    return f"a {type(output).__name__}"


def output_logits(output: Any) -> torch.Tensor:
    """The logits of a model output: a tensor itself, ``.logits`` (HF), a dict's ``"logits"``
    (or its only tensor), or the first tensor of at least two dims in a tuple/list.

    Raises:
        LossError: none of these holds a floating-point tensor.
    """
    logits: Any = None
    if isinstance(output, torch.Tensor):
        logits = output
    elif isinstance(output, Mapping):
        logits = output.get("logits")
        if logits is None:
            tensors = [v for v in output.values() if isinstance(v, torch.Tensor)]
            logits = tensors[0] if len(tensors) == 1 else None
    elif isinstance(output, (tuple, list)):
        tensors = [v for v in output if isinstance(v, torch.Tensor)]
        logits = next((t for t in tensors if t.dim() >= 2), tensors[0] if tensors else None)
    else:
        logits = getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise LossError(f"cannot find logits in the model output ({_describe(output)}); {LOSS_FN_HINT}.")
    return logits


def _token_ids(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
        ids = args[0]
    return ids


def _is_seq2seq(output: Any, kwargs: dict[str, Any]) -> bool:
    return ("decoder_input_ids" in kwargs or type(output).__name__.startswith("Seq2Seq")
            or (isinstance(output, Mapping) and "encoder_last_hidden_state" in output))


def loss_task(output: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """Which default loss applies: ``"classifier"``, ``"causal_lm"``, ``"seq2seq"`` or ``"masked_lm"``.

    Raises:
        LossError: no default fits (e.g. a 4-D output, or a sequence output without token ids).
    """
    logits = output_logits(output)
    if logits.dim() == 2:
        return "classifier"
    if logits.dim() == 3:
        if _is_seq2seq(output, kwargs):
            return "seq2seq"
        if "MaskedLM" in type(output).__name__:
            return "masked_lm"
        if _token_ids(args, kwargs) is not None or kwargs.get("labels") is not None:
            return "causal_lm"
    raise LossError(
        f"no default loss for a model output of shape {tuple(logits.shape)} ({_describe(output)}): the defaults "
        "cover classifiers (batch, classes), and causal / masked / seq2seq LMs (batch, tokens, vocab) fed "
        f"token ids; {LOSS_FN_HINT}.")


def scores_own_predictions(output: Any, kwargs: dict[str, Any], args: tuple[Any, ...] = ()) -> bool:
    """True when :func:`default_loss` has no targets in the batch and scores the model against
    its own predictions (a classifier or masked LM without labels, a seq2seq LM without labels or
    decoder ids)."""
    if kwargs.get("labels") is not None:
        return False
    try:
        task = loss_task(output, args, kwargs)
    except LossError:  # no default loss at all: the loss itself says so when it is needed
        return False
    return task in ("classifier", "masked_lm") or (task == "seq2seq" and "decoder_input_ids" not in kwargs)


def is_label_free_classifier(output: Any, kwargs: dict[str, Any]) -> bool:
    """True for classifier logits ``(B, C)`` and no ``labels`` (scored on its own predictions)."""
    return output_logits(output).dim() == 2 and kwargs.get("labels") is None


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample mean cross-entropy of ``logits (B, T, V)`` against ``targets (B, T)``, over
    the positions whose target is not :data:`IGNORE_INDEX` (0 for a sample with none)."""
    if targets.shape != logits.shape[:2]:
        raise LossError(f"targets of shape {tuple(targets.shape)} do not match logits of shape "
                        f"{tuple(logits.shape)} (expected {tuple(logits.shape[:2])}); {LOSS_FN_HINT}.")
    if targets.is_floating_point():
        raise LossError(f"token targets must be integer ids, got {targets.dtype}; {LOSS_FN_HINT}.")
    per_token = F.cross_entropy(logits.transpose(1, 2).float(), targets.long(), reduction="none",
                                ignore_index=IGNORE_INDEX)
    counted = (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return per_token.sum(dim=1) / counted


def _masked(ids: torch.Tensor, mask: Any) -> torch.Tensor:
    """``ids`` with the positions where ``mask`` is 0 set to :data:`IGNORE_INDEX`."""
    if isinstance(mask, torch.Tensor) and mask.shape == ids.shape:
        return ids.masked_fill(mask == 0, IGNORE_INDEX)
    return ids


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample causal-LM loss: position t predicts token t + 1 (mean over positions)."""
    return token_cross_entropy(logits[:, :-1], targets[:, 1:])


def _own_predictions(logits: torch.Tensor, mask: Any = None) -> torch.Tensor:
    return _masked(logits.detach().argmax(dim=-1), mask)


def default_loss(output: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """Per-sample losses ``(B,)`` for the task :func:`loss_task` recognises (module docstring).

    Raises:
        LossError: no default fits the output, or the labels do not match the logits.
    """
    task = loss_task(output, args, kwargs)
    logits = output_logits(output)
    labels = kwargs.get("labels")
    if task == "classifier":
        if labels is None:
            labels = logits.detach().argmax(dim=-1)
        if labels.shape != logits.shape[:1] or labels.is_floating_point():
            raise LossError(f"classifier labels must be class ids of shape {tuple(logits.shape[:1])}, got "
                            f"{labels.dtype} {tuple(labels.shape)}; {LOSS_FN_HINT}.")
        return F.cross_entropy(logits.float(), labels.long(), reduction="none")
    if task == "seq2seq":
        if labels is not None:
            return token_cross_entropy(logits, labels)
        dec = kwargs.get("decoder_input_ids")
        if dec is not None:
            return next_token_loss(logits, _masked(dec, kwargs.get("decoder_attention_mask")))
        return token_cross_entropy(logits, _own_predictions(logits, kwargs.get("decoder_attention_mask")))
    if task == "masked_lm":
        targets = labels if labels is not None else _own_predictions(logits, kwargs.get("attention_mask"))
        return token_cross_entropy(logits, targets)
    # causal LM
    if labels is not None:
        return next_token_loss(logits, labels)
    ids = _token_ids(args, kwargs)
    assert ids is not None  # loss_task checked
    return next_token_loss(logits, _masked(ids, kwargs.get("attention_mask")))


def soft_target_loss(logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy of ``logits`` against the dense model's probabilities ``probs``
    (same shape): ``(B, C)`` classifiers, or ``(B, T, V)`` token outputs (mean over tokens)."""
    if logits.dim() == 2:
        return F.cross_entropy(logits.float(), probs, reduction="none")
    return F.cross_entropy(logits.float().transpose(1, 2), probs.transpose(1, 2), reduction="none").mean(dim=1)


class SampledLabelLoss:
    """Cross-entropy against labels drawn from the model's own predictive distribution.

    The gradients of this loss give a one-sample Monte Carlo estimate of the *true* Fisher
    ``E_{y∼p(·|x)}[∇ log p(y|x) ∇ log p(y|x)ᵀ]``, instead of the empirical Fisher of the data's
    own labels: it depends on the inputs only, not on which next token the calibration text
    happened to have (``fisher_labels="model"``). Classifier logits ``(B, C)`` draw one class per
    sample; token logits ``(B, T, V)`` one token per position (positions masked out by
    ``attention_mask`` are ignored), averaged over positions like :func:`token_cross_entropy`.
    The draws come from a generator seeded once, so a run is reproducible.
    """

    #: losses are per sample, so the gradient pass may split batches into micro-batches
    per_sample = True

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def _draw(self, logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.detach().float().reshape(-1, logits.shape[-1]), dim=-1)
        return torch.multinomial(probs.cpu(), 1, generator=self.generator).reshape(logits.shape[:-1]).to(logits.device)

    def __call__(self, output: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        logits = output_logits(output)
        if logits.dim() == 2:
            return F.cross_entropy(logits.float(), self._draw(logits), reduction="none")
        if logits.dim() != 3:
            raise LossError(f"fisher_labels='model' needs (B, C) or (B, T, V) logits, got {tuple(logits.shape)}; "
                            f"{LOSS_FN_HINT}.")
        mask = kwargs.get("decoder_attention_mask") if _is_seq2seq(output, kwargs) else kwargs.get("attention_mask")
        return token_cross_entropy(logits, _masked(self._draw(logits), mask))
