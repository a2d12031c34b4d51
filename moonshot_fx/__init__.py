"""moonshot-fx: one-shot pruning of pretrained PyTorch models as an FX compiler pass.

Public API::

    import moonshot_fx
    model = moonshot_fx.sparsify(model, example_inputs, calibration=batches, sparsity="2:4",
                                 method="moonshot")
    table = moonshot_fx.inspect(model, example_inputs)
    w_hat, mask = moonshot_fx.prune_layer(weight, hessian, 0.5, method="sparsegpt")
"""
from __future__ import annotations

from typing import Any

from .config import Pattern, SparsifyConfig, parse_pattern
from .errors import (
    BackendUnavailableError, CalibrationError, ConfigError, LinalgError, LossError, MetaDeviceError,
    MoonshotError, NoPrunableSitesError, PatternError, TraceError,
)
from .errors import DataFileError, MissingExtraError, ModelLoadError, SaveError
from .masks import check_pattern
from .pruners import prune_layer, reconstruction_error

__version__ = "0.1.0"

_LAZY = {
    "sparsify": ("moonshot_fx.api", "sparsify"),
    "inspect": ("moonshot_fx.api", "inspect"),
    "SparsityReport": ("moonshot_fx.report", "SparsityReport"),
    "backend": ("moonshot_fx.backends.compile", "backend"),
    "to_semi_structured": ("moonshot_fx.backends.semi_structured", "to_semi_structured"),
    "export_onnx": ("moonshot_fx.backends.onnx", "export_onnx"),
    "save_hf_directory": ("moonshot_fx.hf_export", "save_hf_directory"),
    "sparsify_checkpoint": ("moonshot_fx.streaming", "sparsify_checkpoint"),
    "plot_site_errors": ("moonshot_fx.plots", "plot_site_errors"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'moonshot_fx' has no attribute {name!r}")


__all__ = [
    "BackendUnavailableError", "CalibrationError", "ConfigError", "LinalgError", "LossError", "MetaDeviceError", "MoonshotError",
    "NoPrunableSitesError", "Pattern", "PatternError", "SparsifyConfig", "TraceError",
    "DataFileError", "MissingExtraError", "ModelLoadError", "SaveError",
    "check_pattern", "parse_pattern", "prune_layer", "reconstruction_error", *_LAZY,
]
