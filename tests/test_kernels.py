"""The fused Triton OBS-block kernel against the torch reference, run in Triton's CPU interpreter.

Triton 3.8 reads ``TRITON_INTERPRET`` when a function is decorated with ``@triton.jit`` — and
triton.language's own helpers (``tl.sum``, ``tl.max`` …) are decorated when triton is first
imported. So the interpreter only works if the variable is set before ``import triton``, which a
pytest session (where other modules may import triton first) cannot guarantee. The kernel checks
therefore run once, in a subprocess started with ``TRITON_INTERPRET=1 MOONSHOT_FX_TRITON=1``
(:func:`_interpreter_checks`), and the tests below assert on its JSON report. The interpreter
runs each program in numpy, so the shapes are tiny.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moonshot_fx.kernels import obs_block as ob
from moonshot_fx.linalg import inverse_cholesky_upper, prepare_hessian

try:
    import triton  # noqa: F401
    _HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    _HAVE_TRITON = False

needs_triton = pytest.mark.skipif(not _HAVE_TRITON, reason="triton is not importable")


def _block(rows: int, count: int, seed: int):
    """A random block: weights and the inverse-Hessian Cholesky factor of correlated inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * count, count, generator=g) @ (torch.eye(count) + 0.3 * torch.randn(count, count, generator=g))
    x = x * torch.exp(0.5 * torch.randn(count, generator=g))
    U = inverse_cholesky_upper(x.T @ x)
    W = torch.randn(rows, count, generator=g)
    return W, U


BLOCK_CASES = [  # (rows, count, n, m, block_r)
    (37, 16, 2, 4, 16),  # three programs, the last one partial
    (37, 32, 2, 4, None),
    (37, 32, 4, 8, None),
    (37, 16, 4, 8, None),
    (37, 24, 2, 4, None),  # count not a power of two: padded columns
    (37, 16, 0, 0, 16),  # unstructured, mask given
    (37, 32, 0, 0, None),
]
PRUNE_CASES = ["2:4", "4:8", "0.5"]


def _case_id(case) -> str:
    return "-".join("x" if v is None else str(v) for v in case)


def _interpreter_checks() -> dict:
    """Run every kernel comparison (call only with TRITON_INTERPRET=1 set before importing triton)."""
    import time

    from moonshot_fx.config import parse_pattern
    from moonshot_fx.errors import PatternError
    from moonshot_fx.masks import prune_lowest
    from moonshot_fx.pruners.sparsegpt import sparsegpt_prune

    ok, reason = ob.triton_available("cpu")
    out: dict = {"available": ok, "reason": reason, "blocks": {}, "prune": {}}
    if not ok:
        return out

    def diff(a, b):
        return float((a - b).abs().max()) if a.numel() else 0.0

    t0 = time.perf_counter()
    for case in BLOCK_CASES:
        rows, count, n, m, block_r = case
        W, U = _block(rows, count, seed=count + 10 * n + m)
        M = None
        if not m:
            M = prune_lowest(W.square() / torch.diagonal(U).square(), rows * count // 2)
        t = time.perf_counter()
        Qt, Et, Mt = ob.obs_block_triton(W.clone(), U, M, n, m, block_r=block_r)
        secs = time.perf_counter() - t
        Qr, Er, Mr = ob.obs_block_torch(W.clone(), U, None if M is None else M.clone(), n, m)
        out["blocks"][_case_id(case)] = {
            "q": diff(Qt, Qr), "err": diff(Et, Er), "q_bitwise": torch.equal(Qt, Qr),
            "mask_bool": Mt.dtype == torch.bool, "mask_equal": torch.equal(Mt, Mr),
            "nm_exact": bool((Mt.reshape(rows, -1, m).sum(-1) == n).all()) if m else True,
            "pruned_zero": bool((Qt[~Mt] == 0).all()), "seconds": secs,
        }
    W, U = _block(5, 16, seed=0)
    try:
        ob.obs_block_triton(W[:, :10].clone(), U[:10, :10], None, 2, 4)
        out["rejects_10_cols_for_2_4"] = False
    except PatternError:
        out["rejects_10_cols_for_2_4"] = True

    # the whole pruner, kernel path vs torch path (one dead input)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 48, generator=g) @ (torch.eye(48) + 0.3 * torch.randn(48, 48, generator=g))
    x[:, 7] = 0
    h = x.T @ x
    w = torch.randn(12, 48, generator=g)
    real = ob.obs_block_triton
    calls: list = []

    def spy(*args, **kwargs):
        calls.append(list(args[0].shape))
        return real(*args, **kwargs)

    ob.obs_block_triton = spy
    try:
        for spec in PRUNE_CASES:
            pattern = parse_pattern(spec)
            calls.clear()
            os.environ["MOONSHOT_FX_TRITON"] = "1"
            t = time.perf_counter()
            Wt, Mt = sparsegpt_prune(w, h, pattern, blocksize=24)
            secs = time.perf_counter() - t
            kernel_calls = list(calls)
            os.environ["MOONSHOT_FX_TRITON"] = "0"
            Wr, Mr = sparsegpt_prune(w, h, pattern, blocksize=24)
            out["prune"][spec] = {
                "kernel_calls": kernel_calls, "torch_calls": len(calls) - len(kernel_calls),
                "w": diff(Wt, Wr), "mask_equal": torch.equal(Mt, Mr), "seconds": secs,
            }
    finally:
        ob.obs_block_triton = real
        os.environ["MOONSHOT_FX_TRITON"] = "1"
    out["total_seconds"] = time.perf_counter() - t0
    return out


@pytest.fixture(scope="module")
def interp():
    """The JSON report of :func:`_interpreter_checks`, run once in an interpreter subprocess."""
    if not _HAVE_TRITON:
        pytest.skip("triton is not importable")
    env = dict(os.environ, TRITON_INTERPRET="1", MOONSHOT_FX_TRITON="1")
    here = Path(__file__).resolve().parent
    code = (
        "import sys, json; sys.path.insert(0, sys.argv[1]); import test_kernels as t; "
        "print('@@' + json.dumps(t._interpreter_checks()))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(here)], env=env, capture_output=True, text=True, timeout=600,
        cwd=here.parent,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("@@"))
    report = json.loads(line[2:])
    if not report["available"]:
        pytest.skip(report["reason"])
    return report


@needs_triton
@pytest.mark.parametrize("case", BLOCK_CASES, ids=_case_id)
def test_triton_block_matches_torch(interp, case):
    r = interp["blocks"][_case_id(case)]
    assert r["mask_bool"] and r["mask_equal"], r
    assert r["q"] <= 1e-5 and r["err"] <= 1e-5, r
    assert r["nm_exact"] and r["pruned_zero"], r


@needs_triton
def test_triton_block_rejects_indivisible_nm(interp):
    assert interp["rejects_10_cols_for_2_4"]


@needs_triton
@pytest.mark.parametrize("spec", PRUNE_CASES)
def test_sparsegpt_triton_path_matches_torch(interp, spec):
    r = interp["prune"][spec]
    assert r["kernel_calls"] == [[12, 24], [12, 24]], r  # both blocks went through the kernel
    assert r["torch_calls"] == 0, r  # and the MOONSHOT_FX_TRITON=0 run did not
    assert r["mask_equal"], r
    assert r["w"] <= 1e-5, r


def test_dispatch_defaults_to_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("MOONSHOT_FX_TRITON", raising=False)
    W, U = _block(4, 8, seed=1)
    assert not ob.use_triton(W, 8, 2, 4)
    Q, E, M = ob.obs_block(W.clone(), U, None, 2, 4)
    Qr, Er, Mr = ob.obs_block_torch(W.clone(), U, None, 2, 4)
    assert torch.equal(Q, Qr) and torch.equal(E, Er) and torch.equal(M, Mr)


@needs_triton
def test_forced_triton_without_interpreter_on_cpu_raises(monkeypatch):
    monkeypatch.setenv("MOONSHOT_FX_TRITON", "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ok, reason = ob.triton_available("cpu")
    assert not ok and "TRITON_INTERPRET" in reason
    W, U = _block(4, 8, seed=1)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ob.obs_block(W, U, None, 2, 4)


def test_forced_triton_falls_back_for_oversized_blocks(monkeypatch):
    """Blocks the kernel does not take (count > 128) go to torch even when forced."""
    monkeypatch.setenv("MOONSHOT_FX_TRITON", "1")
    W = torch.zeros(2, 256)
    assert not ob.use_triton(W, 256, 2, 4)
    assert not ob.use_triton(W[:, :10], 10, 2, 4)  # indivisible N:M: torch raises the PatternError


def test_batched_inverse_cholesky_upper_matches_single(correlated):
    hs = []
    for seed in range(3):
        _, _, h = correlated(d=16, out=4, n=64, seed=seed)
        hs.append(prepare_hessian(h)[0])
    singular = torch.ones(16, 16)  # rank one: fails at the base dampening
    H = torch.stack(hs + [singular])
    U, lam = ob.batched_inverse_cholesky_upper(H, 0.01)
    for k in range(3):
        torch.testing.assert_close(U[k], inverse_cholesky_upper(hs[k], 0.01), rtol=1e-4, atol=1e-5)
        assert lam[k] == pytest.approx(0.01)
    assert lam[3] >= 0.01  # only the bad member may be raised
    assert bool(torch.isfinite(U).all())
    assert bool((torch.triu(U) == U).all())


@needs_triton
def test_kernel_compiles_for_sm90_without_a_gpu():
    """The interpreter is more permissive than the compiler: lower the kernel to a cubin for
    Hopper (no GPU needed: triton ships ptxas) so compile-only errors show up on CPU too."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("interpreter mode: @triton.jit gives no compilable function")
    import triton
    from triton.compiler import ASTSource

    try:
        from triton.backends.compiler import GPUTarget
    except ImportError:  # pragma: no cover - layout of other triton versions
        pytest.skip("triton.backends.compiler.GPUTarget not available")
    kernel = ob._build_kernel(False)
    names = ["W_ptr", "U_ptr", "Min_ptr", "Q_ptr", "E_ptr", "Mout_ptr", "rows", "count",
             "s_wr", "s_wc", "s_ur", "s_uc", "s_mr", "s_mc", "s_qr", "s_qc"]
    types = ["*fp32", "*fp32", "*i8", "*fp32", "*fp32", "*i8"] + ["i32"] * 10
    for nm, n, m, bc, br in [(True, 2, 4, 128, 16), (False, 0, 1, 32, 32)]:
        consts = {"N": n, "M": m, "NM": nm, "BLOCK_R": br, "BLOCK_C": bc}
        sig = dict(zip(names, types), **{k: "constexpr" for k in consts})
        try:
            compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts),
                                      target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        except (FileNotFoundError, RuntimeError) as exc:  # no ptxas / backend in this install
            if "ptxas" in str(exc).lower() or "backend" in str(exc).lower():
                pytest.skip(f"cannot run the CUDA toolchain here: {exc}")
            raise
        assert compiled.asm.get("cubin"), "no cubin produced"
