"""The ONNX backend's public names, in one place: ``moonshot_fx.backends.onnx``.

The work is split by job: :mod:`.onnx_export` (``export_onnx``: trace, write atomically, verify),
:mod:`.onnx_verify` (ONNX Runtime parity on fresh shapes; pruned zeros and N:M patterns in the
initializers, and where each parameter went), :mod:`.onnx_layout` (per-layout pattern checks),
:mod:`.onnx_providers` (availability, ORT sessions, TensorRT options), :mod:`.onnx_report` (the
report and errors), :mod:`.onnx_files` (staging and sizes); the ``moonshot-fx export`` subcommand
is :mod:`moonshot_fx.cli_export`.
"""
from __future__ import annotations

from moonshot_fx.cli_export import add_export_arguments, export_main

from . import onnx_layout
from .onnx_export import PatternSpec, _empty_report, _failure_message, export_onnx
from .onnx_providers import is_available, tensorrt_provider_options
from .onnx_report import (
    InitializerCheck,
    OnnxExportError,
    OnnxReport,
    OnnxVerificationError,
)
from .onnx_verify import PRUNED_ZERO_FRACTION, _check_zeros, _locate, _pruned_params

__all__ = [
    "InitializerCheck", "OnnxExportError", "OnnxReport", "OnnxVerificationError",
    "add_export_arguments", "export_main", "export_onnx", "is_available",
    "tensorrt_provider_options",
]
_ = (onnx_layout, PatternSpec, PRUNED_ZERO_FRACTION, _empty_report, _failure_message, _check_zeros, _locate,
     _pruned_params)  # re-exported for callers of the former single module
