"""ONNX Runtime and TensorRT provider configuration: availability, session options and optimisation
levels, TensorRT execution-provider options (``trt_sparsity_enable``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from moonshot_fx.errors import BackendUnavailableError

_OPT_LEVELS = ("disabled", "basic", "extended", "all")


def is_available() -> tuple[bool, str]:
    """Whether ONNX export and verification can run here, and why (not)."""
    missing, versions = [], []
    for mod in ("onnx", "onnxruntime", "onnxscript"):
        try:
            m = __import__(mod)
            versions.append(f"{mod} {getattr(m, '__version__', '?')}")
        except Exception as e:  # ImportError, or a broken install
            missing.append(f"{mod} ({type(e).__name__}: {e})")
    if missing:
        return False, (f"missing {', '.join(missing)}; install them with "
                       "`pip install 'moonshot-fx[onnx]'` (onnx, onnxruntime, onnxscript).")
    import onnxruntime as ort

    return True, f"{', '.join(versions)}; ONNX Runtime providers: {', '.join(ort.get_available_providers())}"


def _require() -> None:
    ok, reason = is_available()
    if not ok:
        raise BackendUnavailableError(f"ONNX export is unavailable: {reason}")


# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------
# TensorRT provider options


def tensorrt_provider_options(*, fp16: bool = True, engine_cache_path: str | None = None,
                              device_id: int = 0) -> dict[str, str]:
    """Provider options for ONNX Runtime's ``TensorrtExecutionProvider`` with 2:4 sparsity on.

    ``trt_sparsity_enable`` lets TensorRT pick sparse tensor-core kernels for layers whose weights
    are 2:4 (Ampere and later); it only takes effect in fp16/int8 precision, hence
    ``trt_fp16_enable``. Values are strings, as ORT's C API takes them.
    """
    opts = {
        "device_id": str(device_id),
        "trt_sparsity_enable": "True",
        "trt_fp16_enable": "True" if fp16 else "False",
        "trt_engine_cache_enable": "True" if engine_cache_path else "False",
    }
    if engine_cache_path:
        opts["trt_engine_cache_path"] = engine_cache_path
    return opts


def _tensorrt_config(model_path: Path) -> dict[str, Any]:
    return {
        "model": str(model_path),
        "providers": [
            ["TensorrtExecutionProvider",
             tensorrt_provider_options(engine_cache_path=str(model_path.parent / "trt_cache"))],
            ["CUDAExecutionProvider", {"device_id": "0"}],
            ["CPUExecutionProvider", {}],
        ],
        "usage": ("cfg = json.load(open(this_file)); onnxruntime.InferenceSession(cfg['model'], "
                  "providers=[tuple(p) for p in cfg['providers']]) -- needs onnxruntime-gpu with "
                  "TensorRT; sparse kernels need 2:4 weights and an Ampere or newer GPU."),
    }


# ---------------------------------------------------------------------------------------------
# ORT sessions and parity


def _ort_level(name: str) -> Any:
    import onnxruntime as ort

    levels = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    return levels[name]


def _session(path: Path, level: str = "all", optimized_to: Path | None = None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = _ort_level(level)
    so.log_severity_level = 3  # errors only (ORT warns about hardware-specific optimised files)
    if optimized_to is not None:
        so.optimized_model_filepath = str(optimized_to)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
