"""Loading Karpathy's llama2.c ``stories260K`` checkpoint into Hugging Face ``LlamaForCausalLM``.

The legacy llama2.c ``.bin`` format is a 7 x int32 little-endian header
``(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len)`` (a negative
``vocab_size`` means the classifier is untied and stored at the end), followed by fp32 arrays
``tok_emb, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, freq_cis_real,
freq_cis_imag[, wcls]``.  Linear weights are stored as PyTorch ``(out, in)`` matrices.

llama2.c applies RoPE to interleaved pairs ``(x0, x1), (x2, x3), ...`` of each head, whereas
HF Llama uses the rotate-half layout ``(x0, x_{d/2}), (x1, x_{d/2+1}), ...``; the rows of
``wq`` / ``wk`` are therefore permuted per head (see :func:`permute_rope_rows`).
"""

from __future__ import annotations

import inspect
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .paths import data_file

if TYPE_CHECKING:  # pragma: no cover
    from transformers import LlamaForCausalLM

__all__ = [
    "Llama2cTokenizer",
    "permute_rope_rows",
    "unpermute_rope_rows",
    "read_llama2c_checkpoint",
    "load_stories260k",
    "STORIES260K_BIN",
    "STORIES260K_TOKENIZER",
]

STORIES260K_BIN = "lm/stories260K/stories260K.bin"
STORIES260K_TOKENIZER = "lm/stories260K/tok512.model"

_HEADER = struct.Struct("<7i")


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder projection rows from interleaved RoPE pairs to HF rotate-half layout.

    Same operation as ``permute`` in HF's ``convert_llama_weights_to_hf.py``:
    within each head of size ``d``, output row ``j < d/2`` is input row ``2j`` and output
    row ``d/2 + j`` is input row ``2j + 1``.

    Args:
        w: weight of shape ``(n_heads * head_dim, in_features)`` (``wq``; for ``wk`` under GQA
            pass ``n_heads = n_kv_heads``).
        n_heads: number of heads that ``w`` projects to.
    """
    rows, cols = w.shape
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows is not divisible into {n_heads} heads of even size")
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`permute_rope_rows` (rotate-half layout back to interleaved)."""
    rows, cols = w.shape
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows is not divisible into {n_heads} heads of even size")
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


class Llama2cTokenizer:
    """Small wrapper around ``sentencepiece.SentencePieceProcessor`` for llama2.c models.

    ``encode`` prefixes the BOS token (id 1) like llama2.c does for each story.
    """

    bos_id: int = 1
    eos_id: int = 2

    def __init__(self, model_file: str | os.PathLike[str]) -> None:
        try:
            import sentencepiece as spm
        except ImportError as e:  # pragma: no cover - depends on environment
            raise ImportError(
                "The llama2.c tokenizer needs sentencepiece: pip install sentencepiece "
                "(or pip install 'moonshot-fx[models]')."
            ) from e
        if not Path(model_file).is_file():
            raise FileNotFoundError(f"SentencePiece model {model_file!s} not found")
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else 1
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else 2

    @property
    def vocab_size(self) -> int:
        """Number of tokens in the vocabulary."""
        return int(self.sp.get_piece_size())

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Encode ``text`` to token ids, with a leading BOS (and optional trailing EOS)."""
        ids: list[int] = list(self.sp.encode(text))
        if bos:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def encode_documents(self, text: str, separator: str = "<|endoftext|>") -> list[int]:
        """Split ``text`` on ``separator``, encode each non-empty stripped document with BOS,
        and concatenate (the usual way to evaluate TinyStories models)."""
        ids: list[int] = []
        for doc in text.split(separator):
            doc = doc.strip()
            if doc:
                ids.extend(self.encode(doc))
        return ids

    def decode(self, ids: Any) -> str:
        """Decode token ids (list or tensor) back to text."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return str(self.sp.decode(list(ids)))


def read_llama2c_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """Parse a legacy llama2.c ``.bin`` checkpoint.

    Returns:
        ``(header, arrays)``: header keys ``dim, hidden_dim, n_layers, n_heads, n_kv_heads,
        vocab_size, seq_len, shared_classifier``; arrays keyed by llama2.c names
        (``tok_emb, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, freq_cis_real,
        freq_cis_imag`` and ``wcls`` when untied), as float32 tensors with a leading layer axis.
        The projections are in llama2.c's interleaved-RoPE layout (not yet permuted).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"llama2.c checkpoint {path} not found")
    raw = path.read_bytes()
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = _HEADER.unpack_from(raw, 0)
    shared = vocab > 0
    vocab = abs(vocab)
    head_dim = dim // n_heads
    kv_dim = n_kv_heads * head_dim
    data = np.frombuffer(raw, dtype="<f4", offset=_HEADER.size)
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("tok_emb", (vocab, dim)),
        ("rms_att", (n_layers, dim)),
        ("wq", (n_layers, dim, dim)),
        ("wk", (n_layers, kv_dim, dim)),
        ("wv", (n_layers, kv_dim, dim)),
        ("wo", (n_layers, dim, dim)),
        ("rms_ffn", (n_layers, dim)),
        ("w1", (n_layers, hidden, dim)),
        ("w2", (n_layers, dim, hidden)),
        ("w3", (n_layers, hidden, dim)),
        ("rms_final", (dim,)),
        ("freq_cis_real", (seq_len, head_dim // 2)),
        ("freq_cis_imag", (seq_len, head_dim // 2)),
    ]
    if not shared:
        shapes.append(("wcls", (vocab, dim)))
    arrays: dict[str, torch.Tensor] = {}
    pos = 0
    for name, shape in shapes:
        size = int(np.prod(shape))
        if pos + size > data.size:
            raise ValueError(f"{path}: truncated checkpoint while reading {name}")
        arrays[name] = torch.from_numpy(data[pos : pos + size].reshape(shape).copy())
        pos += size
    if pos != data.size:
        raise ValueError(f"{path}: {data.size - pos} unexpected trailing floats; not a legacy llama2.c file?")
    header = dict(
        dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
        vocab_size=vocab, seq_len=seq_len, shared_classifier=int(shared),
    )
    return header, arrays


def load_stories260k(
    path: str | os.PathLike[str] | None = None,
    tokenizer_path: str | os.PathLike[str] | None = None,
    permute_rope: bool = True,
) -> tuple["LlamaForCausalLM", Llama2cTokenizer]:
    """Load the llama2.c ``stories260K`` model as a HF ``LlamaForCausalLM`` (fp32, eval mode).

    Args:
        path: the ``.bin`` checkpoint (default: ``lm/stories260K/stories260K.bin`` in the data root).
        tokenizer_path: SentencePiece model (default: ``tok512.model`` next to the checkpoint,
            else in the data root).
        permute_rope: convert ``wq``/``wk`` rows to HF's rotate-half RoPE layout. Only set to
            ``False`` to demonstrate that skipping it breaks the model.

    Returns:
        ``(model, tokenizer)``. Config: ``rms_norm_eps=1e-5``, RoPE theta 10000, tied embeddings
        when the checkpoint has a shared classifier.
    """
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as e:  # pragma: no cover - depends on environment
        raise ImportError(
            "load_stories260k needs transformers: pip install transformers "
            "(or pip install 'moonshot-fx[models]')."
        ) from e

    bin_path = Path(path) if path is not None else data_file(STORIES260K_BIN)
    if tokenizer_path is None:
        sibling = bin_path.parent / "tok512.model"
        tokenizer_path = sibling if sibling.is_file() else data_file(STORIES260K_TOKENIZER)
    hdr, w = read_llama2c_checkpoint(bin_path)
    n_heads, n_kv = hdr["n_heads"], hdr["n_kv_heads"]
    shared = bool(hdr["shared_classifier"])

    cfg_kwargs: dict[str, Any] = dict(
        vocab_size=hdr["vocab_size"],
        hidden_size=hdr["dim"],
        intermediate_size=hdr["hidden_dim"],
        num_hidden_layers=hdr["n_layers"],
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        max_position_embeddings=hdr["seq_len"],
        rms_norm_eps=1e-5,
        tie_word_embeddings=shared,
        bos_token_id=1,
        eos_token_id=2,
        hidden_act="silu",
    )
    if "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters:
        cfg_kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    else:  # transformers 4.x
        cfg_kwargs["rope_theta"] = 10000.0
    config = LlamaConfig(**cfg_kwargs)
    model = LlamaForCausalLM(config).float()

    sd: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": w["tok_emb"],
        "model.norm.weight": w["rms_final"],
        "lm_head.weight": w["tok_emb"] if shared else w["wcls"],
    }
    for i in range(hdr["n_layers"]):
        p = f"model.layers.{i}."
        wq, wk = w["wq"][i], w["wk"][i]
        if permute_rope:
            wq, wk = permute_rope_rows(wq, n_heads), permute_rope_rows(wk, n_kv)
        sd[p + "self_attn.q_proj.weight"] = wq
        sd[p + "self_attn.k_proj.weight"] = wk
        sd[p + "self_attn.v_proj.weight"] = w["wv"][i]
        sd[p + "self_attn.o_proj.weight"] = w["wo"][i]
        sd[p + "mlp.gate_proj.weight"] = w["w1"][i]
        sd[p + "mlp.down_proj.weight"] = w["w2"][i]
        sd[p + "mlp.up_proj.weight"] = w["w3"][i]
        sd[p + "input_layernorm.weight"] = w["rms_att"][i]
        sd[p + "post_attention_layernorm.weight"] = w["rms_ffn"][i]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"stories260K load mismatch: missing={missing} unexpected={unexpected}")
    if shared:
        model.tie_weights()
    model.eval()
    return model, Llama2cTokenizer(tokenizer_path)
