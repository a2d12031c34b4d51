"""Verification of an exported ONNX model: ONNX Runtime parity on fresh input shapes, and the
location of every pruned parameter among the initializers with its zeros and N:M pattern checked."""
from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, Union

import numpy as np
import torch
from torch import nn

from moonshot_fx.config import PatternLike, parse_pattern

from . import onnx_layout
from .onnx_report import InitializerCheck, OnnxExportError

PatternSpec = Union[None, PatternLike, Mapping[str, Union[PatternLike, None]]]


def _fresh_like(t: torch.Tensor, shape: Sequence[int], gen: torch.Generator) -> torch.Tensor:
    if t.dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool)
    if t.is_floating_point():
        return torch.randn(shape, generator=gen, dtype=torch.float32).to(t.dtype)
    if t.numel():  # token ids / masks: stay within the values seen (e.g. the vocabulary)
        lo, hi = int(t.min()), int(t.max())
    else:
        lo, hi = 0, 1
    return torch.randint(lo, hi + 1, tuple(shape), generator=gen, dtype=torch.int64).to(t.dtype)


def _grown(size: int, integer: bool, dim: int) -> int:
    if dim == 0:
        return size + 1
    return size + 3 if integer else size + max(1, size // 2)


def _candidate_inputs(flat: list[torch.Tensor], sym: list[list[int]], seed: int) -> Iterator[list[torch.Tensor]]:
    """Fresh inputs: every symbolic dimension grown, then only the batch grown."""
    gen = torch.Generator().manual_seed(seed)
    for grow in ("all", "batch"):
        shapes = []
        changed = False
        for t, dims in zip(flat, sym):
            shape = list(t.shape)
            for d in dims:
                if grow == "all" or d == 0:
                    shape[d] = _grown(shape[d], not t.is_floating_point(), d)
                    changed = True
            shapes.append(shape)
        if changed:
            yield [_fresh_like(t, s, gen) for t, s in zip(flat, shapes)]


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


def _max_abs(ref: tuple[torch.Tensor, ...]) -> float:
    """Largest |value| over the floating outputs (0 when there are none)."""
    return max((float(r.detach().abs().max()) for r in ref if r.is_floating_point() and r.numel()), default=0.0)


def _max_diff(sess: Any, names: list[str], inputs: list[torch.Tensor], ref: tuple[torch.Tensor, ...]) -> float:
    feed = {n: _to_numpy(t) for n, t in zip(names, inputs)}
    outs = sess.run(None, feed)
    if len(outs) != len(ref):
        raise OnnxExportError(f"ONNX model has {len(outs)} outputs but the torch model returned {len(ref)}.")
    worst = 0.0
    for o, r in zip(outs, ref):
        r_np = _to_numpy(r).astype(np.float64) if r.is_floating_point() else _to_numpy(r)
        if tuple(o.shape) != tuple(r_np.shape):
            return float("inf")
        if r_np.size:
            worst = max(worst, float(np.max(np.abs(o.astype(np.float64) - r_np))))
    return worst


# ---------------------------------------------------------------------------------------------
# zero-pattern check


#: without a pruning report, a >=2-D parameter counts as pruned when at least this fraction is zero
#: (an embedding table with a few zero entries is not a pruned weight)
PRUNED_ZERO_FRACTION = 0.25


def _pruned_params(model: nn.Module) -> dict[str, np.ndarray]:
    """Parameters to check: the sites of ``model.moonshot_report`` (left by ``sparsify``) when
    present, else every >=2-D float parameter with at least ``PRUNED_ZERO_FRACTION`` zeros."""
    report = getattr(model, "moonshot_report", None)
    out = {}
    if report is not None and getattr(report, "sites", None):
        named = dict(model.named_parameters(remove_duplicate=False))
        for site in report.sites:
            p = named.get(site.name)
            if p is not None and bool((p == 0).any()):
                out[site.name] = p.detach().cpu().float().numpy()
        return out
    for name, p in model.named_parameters():
        if p.dim() >= 2 and p.is_floating_point() and float((p == 0).float().mean()) >= PRUNED_ZERO_FRACTION:
            out[name] = p.detach().cpu().float().numpy()
    return out


def _pattern_for(name: str, patterns: PatternSpec) -> Any:
    if patterns is None:
        return None
    if isinstance(patterns, Mapping):
        for glob, pat in patterns.items():
            if fnmatch.fnmatchcase(name, glob):
                return None if pat is None else parse_pattern(pat)
        return None
    return parse_pattern(patterns)


def _initializers(model_path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(model_path))
    out = {}
    for init in m.graph.initializer:
        if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                              onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE) and len(init.dims) >= 2:
            arr = numpy_helper.to_array(init)
            out[init.name] = np.asarray(arr, dtype=np.float32)
    return out


def _match_exact(p: np.ndarray, a: np.ndarray, nz: np.ndarray) -> bool:
    return a.shape == p.shape and np.allclose(a[nz], p[nz], rtol=1e-6, atol=0.0)


def _match_rescaled(p: np.ndarray, a: np.ndarray, nz: np.ndarray) -> bool:
    """Same positions, values scaled by one factor per output row (dimension 0) on the kept weights."""
    if a.shape != p.shape:
        return False
    P, A, NZ = p.reshape(p.shape[0], -1), a.reshape(a.shape[0], -1), nz.reshape(nz.shape[0], -1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(NZ, A / np.where(NZ, P, 1.0), np.nan)
    rows = NZ.any(axis=1)
    if not rows.any():
        return False
    ratio = ratio[rows]
    if not np.all(np.isfinite(ratio[NZ[rows]])):
        return False
    hi, lo = np.nanmax(ratio, axis=1), np.nanmin(ratio, axis=1)
    return bool(np.all(hi - lo <= 1e-4 * np.maximum(np.abs(hi), np.abs(lo)) + 1e-7) and np.all(hi != 0))


def _un_nchwc(a: np.ndarray, shape: tuple[int, ...]) -> Iterator[tuple[int, np.ndarray]]:
    """Candidate OIHW views of a Conv weight that ORT's NCHWc transformer reordered.

    ORT (``ORT_ENABLE_ALL`` on x86) stores Conv filters as ``OIHWBiBo`` (blocks of B input and B
    output channels innermost) or, for the first Conv and depthwise ones, ``OIHWBo``; B is 8
    (AVX2) or 16 (AVX-512); channel counts are padded up to multiples of B.
    """
    if a.ndim != 4 or len(shape) != 4 or a.shape[2:] != shape[2:]:
        return
    op, ip, kh, kw = a.shape
    for b in (8, 16):
        if op % b:
            continue
        if ip % b == 0:
            blocked = a.reshape(op // b, ip // b, kh, kw, b, b).transpose(0, 5, 1, 4, 2, 3)
            yield b, blocked.reshape(op, ip, kh, kw)[: shape[0], : shape[1]]
        yield b, a.reshape(op // b, ip, kh, kw, b).transpose(0, 4, 1, 2, 3).reshape(op, ip, kh, kw)[: shape[0], : shape[1]]


def _locate(name: str, p: np.ndarray, inits: dict[str, np.ndarray], prefix: str) -> tuple[str | None, str, np.ndarray | None]:
    """(initializer name, layout, initializer in the parameter's layout or None)."""
    nz = p != 0
    # 1. by name (the exporter keeps FQNs of untouched parameters; ORT keeps names it rewrites
    #    in place, such as a Conv weight with a BatchNorm folded into it)
    for cand in (prefix + name, name):
        a = inits.get(cand)
        if a is not None and a.shape == p.shape:
            layout = "same" if _match_exact(p, a, nz) else "rescaled" if _match_rescaled(p, a, nz) else "by name"
            return cand, layout, a
    same = [(k, a) for k, a in inits.items() if a.shape == p.shape]
    # 2. by value, same layout or transposed
    for k, a in same:
        if _match_exact(p, a, nz):
            return k, "same", a
    if p.ndim == 2:
        for k, a in inits.items():
            if a.shape == p.shape[::-1] and _match_exact(p, a.T, nz):
                return k, "transposed", np.ascontiguousarray(a.T)
    # 3. by value up to a per-row scale (folded normalisation)
    for k, a in same:
        if _match_rescaled(p, a, nz):
            return k, "rescaled", a
    # 4. ORT's blocked NCHWc Conv layouts, possibly with a folded BatchNorm
    if p.ndim == 4:
        for k, a in inits.items():
            for b, view in _un_nchwc(a, p.shape):
                if view.shape == p.shape and (_match_exact(p, view, nz) or _match_rescaled(p, view, nz)):
                    return k, f"nchwc{b}", np.ascontiguousarray(view)
    # 5. same multiset of values in another order: positions unknowable
    ps = np.sort(p, axis=None)
    for k, a in inits.items():
        if a.size == p.size and np.array_equal(np.sort(a, axis=None), ps):
            return k, "permuted", None
    return None, "not found", None


def _check_zeros(stage: str, params: dict[str, np.ndarray], inits: dict[str, np.ndarray], prefix: str,
                 patterns: PatternSpec, model_layouts: dict[str, tuple[str, str]] | None = None,
                 init_layouts: dict[str, str] | None = None) -> list[InitializerCheck]:
    """One :class:`InitializerCheck` per pruned parameter; ``model_layouts`` (per parameter, see
    :func:`onnx_layout.param_layouts`) and ``init_layouts`` (per initializer, see
    :func:`onnx_layout.graph_layouts`) say along which dimension a pattern is checked."""
    checks = []
    for name, p in params.items():
        zeros = int((p == 0).sum())
        init_name, layout, a = _locate(name, p, inits, prefix)
        pat = _pattern_for(name, patterns)
        check = InitializerCheck(param=name, stage=stage, initializer=init_name, layout=layout,
                                 zeros_expected=zeros, zeros_preserved=None,
                                 pattern=None if pat is None else str(pat))
        if layout == "permuted":
            got = int((inits[init_name] == 0).sum())  # type: ignore[index]
            check.zeros_preserved = got >= zeros
            check.problems.append("initializer is reordered: zero count compared, positions not checkable")
        elif a is not None:
            lost = int(((p == 0) & (a != 0)).sum())
            check.zeros_preserved = lost == 0
            if lost:
                check.problems.append(f"{lost} of {zeros} pruned positions are non-zero in {init_name!r}")
            if pat is not None:
                wl, source = onnx_layout.resolve_layout(name, init_name, layout, model_layouts or {},
                                                        init_layouts or {})
                check.weight_layout, check.layout_source = wl, source
                bad = onnx_layout.layout_pattern_problems(a, pat, wl)
                check.pattern_ok = not bad
                check.problems.extend(f"not {pat}: {b}; weight layout {onnx_layout.describe(wl, source)}"
                                      for b in bad)
        checks.append(check)
    return checks


# ---------------------------------------------------------------------------------------------
# export
