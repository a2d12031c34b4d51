"""ONNX export of pruned models, verified with ONNX Runtime (the verification is in
:mod:`moonshot_fx.backends.onnx_verify`, provider options in :mod:`moonshot_fx.backends.onnx_providers`).

:func:`export_onnx` exports with ``torch.onnx.export(..., dynamo=True)``, then checks three things
before the file appears at its destination:

* **parity** — ONNX Runtime (``CPUExecutionProvider``) on *fresh* inputs whose dynamic dimensions
  differ from the export example (batch + 1, sequence + 3, spatial × 1.5) against eager PyTorch;
* **zeros** — for every pruned parameter (a floating weight of two or more dimensions with at least
  one exact zero) the ONNX initializer that carries it is located, in the exported file and in the
  ORT-optimised model, and every pruned position must still be exactly zero there;
* **patterns** — optionally, that those initializers satisfy an N:M pattern
  (:func:`moonshot_fx.check_pattern`) along the input dimension of the layer each came from:
  dimension 0 of a weight stored ``(in, out)`` (GPT-2's ``Conv1D``, ``x @ W``), dimension 1 of an
  ``(out, in)`` one; the layout comes from the pruning report, the module, or the ONNX graph
  (:mod:`moonshot_fx.backends.onnx_layout`).

A dimension marked dynamic is exported from an example of size at least 2 along it (a size-1
example is repeated to 2 first): ``torch.export`` specialises size-1 dimensions, which leaves
the exported graph tied to that size even where the ONNX input says it is dynamic.

Locating an initializer: by name (ONNX keeps parameter FQNs when nothing rewrote the tensor), else
by value in the same layout or transposed (the exporter constant-folds ``W.T`` for ``MatMul``),
else by value up to a per-output-row scale (BatchNorm folded into a preceding Conv), else through
ORT's blocked NCHWc Conv layouts (``ORT_ENABLE_ALL`` on x86; undone before checking), else by the
multiset of values (only the zero *count* can be checked then). Parameters found none of these ways are listed in
:attr:`OnnxReport.not_found`.

Files are written atomically: everything is written into a temporary directory next to the
destination, verified there, and moved into place only on success, so a failed export or a failed
verification leaves no file (and an earlier file at that path untouched).

ONNX Runtime converts sparse initializers to dense at load, so the file stores dense fp32 weights
with zeros in them; speed-ups from 2:4 come from an execution provider that exploits the pattern,
such as TensorRT with ``trt_sparsity_enable`` (see ``tensorrt_config_path``).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Union

import torch
from torch import nn
from torch.utils import _pytree as pytree

from moonshot_fx.config import PatternLike
from moonshot_fx.errors import ConfigError

from . import onnx_layout
from .onnx_files import _atomic_write_text, _file_size, _Staging
from .onnx_inputs import _dynamic_dims, _Flat, _input_names, _split_inputs, _widened
from .onnx_providers import _OPT_LEVELS, _require, _session, _tensorrt_config
from .onnx_report import OnnxExportError, OnnxReport, OnnxVerificationError
from .onnx_verify import (
    _candidate_inputs,
    _check_zeros,
    _fresh_like,
    _initializers,
    _max_abs,
    _max_diff,
    _pruned_params,
)

PatternSpec = Union[None, PatternLike, Mapping[str, Union[PatternLike, None]]]

# ---------------------------------------------------------------------------------------------
# export


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    dynamic: bool = True,
    verify: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-5,
    optimized_path: str | os.PathLike[str] | None = None,
    tensorrt_config_path: str | os.PathLike[str] | None = None,
    patterns: PatternSpec = None,
    optimization_level: str = "extended",
    opset_version: int | None = None,
    seed: int = 0,
) -> OnnxReport:
    """Export ``model`` to ONNX at ``path`` and verify it with ONNX Runtime.

    Args:
        model: the (pruned) model; exported in its current train/eval mode (call ``.eval()``).
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs
            (Hugging Face style: ``{"input_ids": ids}``). Non-tensor values are baked in as
            constants. For HF models ``use_cache=False`` is added and only ``.logits`` exported.
        path: destination ``.onnx`` file (written atomically).
        dynamic: mark batch and sequence/spatial dimensions dynamic (``torch.export.Dim.AUTO``:
            dimensions the model fixes, such as fixed image sizes, stay static; the report lists
            which became dynamic in ``dynamic_dims``). A size-1 example dimension is repeated to
            size 2 for the export (``torch.export`` would specialise it to 1) unless the model
            rejects that; ``export_shapes`` in the report are the shapes exported from.
        verify: run the checks and raise :class:`OnnxVerificationError` when parity exceeds
            ``atol``, a pruned zero was lost, or a pattern is violated. With ``verify=False`` the
            checks still run and are reported, but nothing is raised.
        atol, rtol: the max absolute difference ORT vs eager may be at most
            ``atol + rtol * max|eager output|`` (the fp32 default; pass ``rtol=0`` for a purely
            absolute bound).
        optimized_path: also save ONNX Runtime's optimised model there (the zero check always
            runs on an optimised model, kept in a temporary file when this is None).
        tensorrt_config_path: write a JSON file with provider options for ORT's TensorRT execution
            provider with ``trt_sparsity_enable`` (see :func:`tensorrt_provider_options`):
            ``cfg = json.load(f); ort.InferenceSession(cfg["model"], providers=[tuple(p) for p
            in cfg["providers"]])``.
        patterns: check N:M validity of the pruned initializers: one pattern for all pruned
            parameters (``"2:4"``) or ``{glob on parameter FQN: pattern or None}``. Groups run
            along each weight's input dimension (``InitializerCheck.weight_layout``).
        optimization_level: ORT level of the optimised model: ``"extended"`` (default; portable,
            keeps weight layouts), ``"all"`` (adds hardware-specific NCHWc Conv layouts, which the
            zero check undoes), ``"basic"``, ``"disabled"``.
        opset_version: ONNX opset (default: the exporter's).
        seed: seed of the fresh verification inputs.

    Returns:
        An :class:`OnnxReport`.

    Raises:
        BackendUnavailableError: onnx / onnxruntime / onnxscript missing.
        OnnxExportError: ``torch.onnx.export`` failed.
        OnnxVerificationError: a check failed (``verify=True``); no file is left at ``path``.
    """
    _require()
    if optimization_level not in _OPT_LEVELS:
        raise ConfigError(f"optimization_level must be one of {', '.join(_OPT_LEVELS)}, not {optimization_level!r}.")
    import onnxruntime as ort

    final = Path(path)
    opt_final = Path(optimized_path) if optimized_path is not None else None
    if opt_final is not None and opt_final.resolve() == final.resolve():
        raise ConfigError("optimized_path must differ from path.")

    args, kwargs = _split_inputs(model, example_inputs)
    leaves, spec = pytree.tree_flatten((args, kwargs))
    tensor_idx = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
    if not tensor_idx:
        raise ConfigError("example_inputs contain no tensor.")
    flat = [leaves[i] for i in tensor_idx]
    names = _input_names(model, args, kwargs, tensor_idx)
    wrapper = _Flat(model, spec, leaves, tensor_idx)
    prefix = "inner."

    with torch.no_grad():
        ref_example = wrapper(*flat)
    output_names = ["logits"] if (len(ref_example) == 1 and getattr(model, "config", None) is not None) \
        else [f"output_{i}" for i in range(len(ref_example))]

    dynamic_shapes = None
    export_flat = flat
    if dynamic:
        auto = torch.export.Dim.AUTO
        dynamic_shapes = (tuple({d: auto for d in _dynamic_dims(t)} or None for t in flat),)
        export_flat = _widened(flat, wrapper)

    staging = _Staging(final)
    opt_staging = None
    try:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(
                    wrapper, tuple(export_flat), dynamo=True, dynamic_shapes=dynamic_shapes,
                    input_names=names, output_names=output_names, opset_version=opset_version,
                    verbose=False, optimize=True,
                )
        except Exception as e:
            raise OnnxExportError(f"torch.onnx.export(dynamo=True) failed for {type(model).__name__}: "
                                  f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        if program is None:  # pragma: no cover - dynamo=True always returns a program
            raise OnnxExportError("torch.onnx.export returned no ONNXProgram.")
        program.save(str(staging.path))

        # which dimensions really are dynamic in the file
        import onnx

        header = onnx.load(str(staging.path), load_external_data=False)
        sym: list[list[int]] = []
        dyn_report: dict[str, list[int]] = {}
        graph_inputs = {i.name: i for i in header.graph.input}
        for n, t in zip(names, flat):
            gi = graph_inputs.get(n)
            dims = []
            if gi is not None:
                for d, dim in enumerate(gi.type.tensor_type.shape.dim):
                    if dim.HasField("dim_param") or not dim.HasField("dim_value"):
                        dims.append(d)
            sym.append(dims)
            dyn_report[n] = dims
        del header

        # ORT-optimised model (in a staging dir next to its destination, or a temporary one)
        if opt_final is not None:
            opt_staging = _Staging(opt_final)
            opt_file = opt_staging.path
        else:
            opt_file = staging.dir / "optimized.tmp.onnx"
        sess = _session(staging.path, "all")
        _session(staging.path, optimization_level, optimized_to=opt_file)
        opt_sess = _session(opt_file, "disabled")

        # parity
        with torch.no_grad():
            ex_diff = _max_diff(sess, names, flat, ref_example)
            fresh_diff = opt_diff = None
            verify_shapes: dict[str, list[int]] = {}
            for cand in _candidate_inputs(export_flat, sym, seed):  # sizes the export did not see
                try:
                    ref = wrapper(*cand)
                except Exception:
                    continue  # the eager model itself rejects this shape (e.g. fixed image size)
                try:
                    fresh_diff = _max_diff(sess, names, cand, ref)
                    opt_diff = _max_diff(opt_sess, names, cand, ref)
                except OnnxExportError:
                    raise
                except Exception as e:
                    raise OnnxVerificationError(
                        f"ONNX Runtime failed on fresh inputs of shapes {[list(c.shape) for c in cand]} "
                        f"that eager PyTorch accepts: {type(e).__name__}: {e}", _empty_report(final)) from e
                verify_shapes = {n: list(c.shape) for n, c in zip(names, cand)}
                break
            if fresh_diff is None:  # no dynamic dimension, or none the model accepts: reuse shapes
                gen = torch.Generator().manual_seed(seed)
                cand = [_fresh_like(t, t.shape, gen) for t in flat]
                ref = wrapper(*cand)
                fresh_diff = _max_diff(sess, names, cand, ref)
                opt_diff = _max_diff(opt_sess, names, cand, ref)
                verify_shapes = {n: list(c.shape) for n, c in zip(names, cand)}
            scale = max(_max_abs(ref_example), _max_abs(ref))  # ref: the fresh-shape reference
        providers = list(sess.get_providers())
        del sess, opt_sess

        # zeros and patterns
        params = _pruned_params(model)
        layouts = onnx_layout.param_layouts(model)
        checks = _check_zeros("export", params, _initializers(staging.path), prefix, patterns, layouts,
                              onnx_layout.graph_layouts(staging.path) if patterns is not None else None)
        checks += _check_zeros("optimized", params, _initializers(opt_file), prefix, patterns, layouts,
                               onnx_layout.graph_layouts(opt_file) if patterns is not None else None)

        report = OnnxReport(
            path=str(final), size_bytes=_file_size(staging.path),
            max_abs_diff=fresh_diff, example_max_abs_diff=ex_diff,
            optimized_path=str(opt_final) if opt_final is not None else None,
            optimized_size_bytes=_file_size(opt_file) if opt_final is not None else None,
            optimized_max_abs_diff=opt_diff, optimization_level=optimization_level,
            input_names=names, output_names=output_names,
            export_shapes={n: list(t.shape) for n, t in zip(names, export_flat)},
            verify_shapes=verify_shapes, dynamic_dims=dyn_report, checks=checks,
            providers=providers, available_providers=list(ort.get_available_providers()), atol=atol,
            rtol=rtol, output_scale=scale,
        )
        if verify and not report.ok:
            raise OnnxVerificationError(_failure_message(report), report)

        if opt_final is None and opt_file.exists():
            opt_file.unlink()
        staging.commit()
        if opt_staging is not None:
            opt_staging.commit()
    finally:
        staging.cleanup()
        if opt_staging is not None:
            opt_staging.cleanup()

    if tensorrt_config_path is not None:
        trt = Path(tensorrt_config_path)
        _atomic_write_text(trt, json.dumps(_tensorrt_config(final.resolve()), indent=2) + "\n")
        report.tensorrt_config_path = str(trt)
    return report


def _empty_report(final: Path) -> OnnxReport:
    return OnnxReport(path=str(final), size_bytes=0, max_abs_diff=None, example_max_abs_diff=None,
                      optimized_path=None, optimized_size_bytes=None, optimized_max_abs_diff=None,
                      optimization_level="", input_names=[], output_names=[], export_shapes={},
                      verify_shapes={}, dynamic_dims={}, checks=[], providers=[], available_providers=[])


def _failure_message(r: OnnxReport) -> str:
    parts = []
    for label, d in (("fresh-shape", r.max_abs_diff), ("example-shape", r.example_max_abs_diff),
                     ("optimised-model", r.optimized_max_abs_diff)):
        if d is not None and d > r.tolerance:
            parts.append(f"{label} max |ORT - torch| = {d:.3g} > tolerance {r.tolerance:.3g} "
                         f"(atol {r.atol:g} + rtol {r.rtol:g} x max|output| {r.output_scale:.3g})")
    for c in r.checks:
        if c.zeros_preserved is False or c.pattern_ok is False:
            parts.append(f"{c.param} ({c.stage}, {c.initializer}): {'; '.join(c.problems)}")
    return ("ONNX export verification failed, no file written: " + "; ".join(parts[:10])
            + (" …" if len(parts) > 10 else "") + ". Pass verify=False to write it anyway.")


# ---------------------------------------------------------------------------------------------
# CLI helper
