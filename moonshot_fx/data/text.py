"""Text data helpers: loading corpora, tokenizing, sampling windows, and perplexity."""

from __future__ import annotations

import inspect
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .paths import data_file

__all__ = [
    "TEXT_FILES",
    "load_documents",
    "load_text",
    "tokenize",
    "calibration_windows",
    "eval_windows",
    "perplexity",
]

#: Named text corpora, relative to the data root.
TEXT_FILES: dict[str, str] = {
    "wikitext2_test": "text/wikitext2_raw_test.txt",
    "wikitext2_valid": "text/wikitext2_valid.txt",
    "tinystories": "text/tinystories_sample.txt",
    "c4_valid": "text/c4_valid_sample.jsonl",
}


def _corpus_path(name: str | os.PathLike[str]) -> Path:
    if isinstance(name, str) and name in TEXT_FILES:
        return data_file(TEXT_FILES[name])
    path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(
            f"{name!s} is neither a known corpus ({', '.join(TEXT_FILES)}) nor an existing file."
        )
    return path


def load_documents(name: str | os.PathLike[str]) -> list[str]:
    """A corpus as its documents, in file order: the ``"text"`` of each line of a ``.jsonl``
    corpus (``"c4_valid"``: 332 documents), or the whole text of any other file as one document.
    ``name`` as for :func:`load_text`, which joins these by blank lines.

    Raises:
        FileNotFoundError: if the file does not exist.
    """
    path = _corpus_path(name)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        import json

        return [json.loads(line)["text"] for line in text.splitlines() if line.strip()]
    return [text]


def load_text(name: str | os.PathLike[str]) -> str:
    """Load a text corpus as one string.

    Args:
        name: one of ``"wikitext2_test"`` (raw WikiText-2 test, the usual perplexity text),
            ``"wikitext2_valid"`` (tokenized WikiText-2 validation, for calibration),
            ``"tinystories"`` (a few TinyStories stories separated by ``<|endoftext|>``),
            ``"c4_valid"`` (332 C4 validation documents, joined by blank lines: the
            out-of-domain perplexity text), or a path to a UTF-8 text file (``.jsonl``: the
            ``"text"`` of each line, joined by blank lines).

    Raises:
        FileNotFoundError: if the file does not exist.
    """
    return "\n\n".join(load_documents(name))


def _is_hf_tokenizer(tokenizer: Any) -> bool:
    tf = sys.modules.get("transformers")
    if tf is None:
        return False
    base = getattr(tf, "PreTrainedTokenizerBase", None)
    return base is not None and isinstance(tokenizer, base)


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """Tokenize ``text`` into a 1-D ``torch.long`` tensor of token ids.

    Handles Hugging Face tokenizers (called with default special tokens, as SparseGPT/Wanda
    do for WikiText-2), ``sentencepiece.SentencePieceProcessor`` and any object with an
    ``encode(text) -> list[int]`` method (e.g. :class:`moonshot_fx.data.llama2c.Llama2cTokenizer`).
    """
    if _is_hf_tokenizer(tokenizer):
        # verbose=False silences the "sequence longer than model_max_length" warning:
        # long texts are cut into windows afterwards.
        ids = tokenizer(text, verbose=False)["input_ids"]
    elif hasattr(tokenizer, "encode"):
        ids = tokenizer.encode(text)
    else:
        raise TypeError(f"Don't know how to tokenize with {type(tokenizer).__name__}")
    if isinstance(ids, torch.Tensor):
        return ids.reshape(-1).long()
    return torch.tensor(list(ids), dtype=torch.long)


def _check_ids(token_ids: torch.Tensor, seqlen: int) -> torch.Tensor:
    if token_ids.dim() == 2 and token_ids.shape[0] == 1:
        token_ids = token_ids[0]
    if token_ids.dim() != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {tuple(token_ids.shape)}")
    if seqlen <= 0:
        raise ValueError(f"seqlen must be positive, got {seqlen}")
    if token_ids.numel() < seqlen:
        raise ValueError(f"need at least seqlen={seqlen} tokens, got {token_ids.numel()}")
    return token_ids.long()


def calibration_windows(token_ids: torch.Tensor, n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """Sample ``n`` random windows of ``seqlen`` tokens (SparseGPT-style calibration data).

    Start offsets are drawn uniformly from ``[0, len - seqlen]`` with a ``torch.Generator``
    seeded by ``seed``, so the result is deterministic and independent of global RNG state.
    Windows may overlap.

    Returns:
        ``LongTensor`` of shape ``(n, seqlen)``.
    """
    ids = _check_ids(token_ids, seqlen)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (n,), generator=g)
    offsets = torch.arange(seqlen)
    return ids[starts[:, None] + offsets[None, :]].clone()


def eval_windows(token_ids: torch.Tensor, seqlen: int, n: int | None = None) -> torch.Tensor:
    """Cut ``token_ids`` into consecutive non-overlapping windows from the start.

    The trailing partial window is dropped (as in SparseGPT/Wanda evaluation).

    Args:
        n: keep only the first ``n`` windows (``None``: all full windows).

    Returns:
        ``LongTensor`` of shape ``(k, seqlen)``.

    Raises:
        ValueError: if ``n`` is larger than the number of full windows available.
    """
    ids = _check_ids(token_ids, seqlen)
    k = ids.numel() // seqlen
    if n is not None:
        if n > k:
            raise ValueError(f"asked for {n} windows of {seqlen} tokens but only {k} are available")
        k = n
    return ids[: k * seqlen].reshape(k, seqlen).clone()


def _forward_logits(model: Any, batch: torch.Tensor) -> torch.Tensor:
    fwd = getattr(model, "forward", model)
    try:
        params = inspect.signature(fwd).parameters
    except (TypeError, ValueError):
        params = {}
    has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if "input_ids" in params or has_var_kw:
        kwargs: dict[str, Any] = {"input_ids": batch}
        if "use_cache" in params:
            kwargs["use_cache"] = False
        out = model(**kwargs)
    else:
        out = model(batch)
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, dict):
        logits = out.get("logits")
    if logits is None and isinstance(out, (tuple, list)):
        logits = out[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"cannot find logits in model output of type {type(out).__name__}")
    return logits


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


@torch.no_grad()
def perplexity(model: Any, windows: torch.Tensor, batch_size: int = 4, progress: bool = False) -> float:
    """Perplexity of a causal language model on token windows.

    Computes ``exp(mean NLL)`` over every predicted token (positions 1..seqlen-1 of each
    window, each predicted from its prefix within the window).  The model is called as
    ``model(input_ids=batch, use_cache=False).logits`` when its forward accepts those
    arguments (Hugging Face causal LMs); otherwise ``model(batch)``, taking ``.logits``,
    ``["logits"]`` or the first element of the output, or the output itself if a tensor.

    Args:
        windows: ``LongTensor`` of shape ``(k, seqlen)``, e.g. from :func:`eval_windows`.
        batch_size: windows per forward pass.
        progress: show a tqdm progress bar.
    """
    if windows.dim() != 2:
        raise ValueError(f"windows must be (k, seqlen), got shape {tuple(windows.shape)}")
    device = _model_device(model)
    starts = range(0, windows.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="perplexity", unit="batch")
    total_nll = 0.0
    count = 0
    for s in starts:
        batch = windows[s : s + batch_size].to(device)
        logits = _forward_logits(model, batch)
        shift_logits = logits[:, :-1, :].float().reshape(-1, logits.shape[-1])
        targets = batch[:, 1:].reshape(-1)
        total_nll += F.cross_entropy(shift_logits, targets, reduction="sum").item()
        count += targets.numel()
    if count == 0:
        raise ValueError("no tokens to predict (need seqlen >= 2 and at least one window)")
    return math.exp(total_nll / count)


def sampled_windows(model: Any, n: int, seqlen: int, seed: int = 0, bos_id: int = 1) -> torch.Tensor:
    """``(n, seqlen)`` token windows sampled from ``model`` itself (temperature 1, no top-k).

    Data-free, in-domain calibration for a model whose training text is not at hand (stories260K):
    every window starts at ``bos_id``; sampling is seeded, so the windows are reproducible.
    """
    torch.manual_seed(seed)
    start = torch.full((n, 1), bos_id, dtype=torch.long)
    with torch.no_grad():
        return model.generate(start, do_sample=True, max_new_tokens=seqlen - 1, min_new_tokens=seqlen - 1, top_k=0)


def story_tokens(tokenizer: Any, name: str = "tinystories") -> torch.Tensor:
    """Token ids of a ``<|endoftext|>``-separated story file, each story prefixed with BOS."""
    stories = [s.strip() for s in load_text(name).split("<|endoftext|>") if s.strip()]
    return torch.tensor([t for s in stories for t in tokenizer.encode(s)])
