"""OPTIMA (Mozaffari et al., 2025): exact row-wise re-solve of the weights for a given mask.

Problem
-------
A selector (SparseGPT, Wanda, magnitude, MOONSHOT) fixes the mask. For the layer ``W`` (out × d)
and ``H = XᵀX`` (d × d, dampened like every other pruner: ``H ← H + λ·mean(diag H)·I``) the
reconstruction objective

    f(Ŵ) = ‖XWᵀ − XŴᵀ‖² = tr((W − Ŵ) H (W − Ŵ)ᵀ) = Σ_i (w_i − ŵ_i)ᵀ H (w_i − ŵ_i)

splits into one independent quadratic program per output row ``i``. With ``S`` the kept and
``P`` the pruned inputs of that row (``ŵ_P = 0``), setting the gradient on ``S`` to zero gives the
global optimum

    ŵ_S = w_S + H_SS⁻¹ H_SP w_P,        ŵ_P = 0.                                          (1)

Every row has its own ``S``, so OPTIMA is ``out`` different linear systems that share one ``H``.
Two exact solvers are implemented, both batched over chunks of rows.

``solver="cholesky"`` — the primal systems, directly
    Row ``r`` solves ``H_r δ_r = M_r H (w_r ⊙ ¬m_r)`` with ``M_r = diag(m_r)`` and the *masked
    Hessian* ``H_r = M_r H M_r + (I − M_r)``: its pruned rows/columns are replaced by the identity,
    so ``H_r`` stays positive definite, ``δ_P = 0`` and ``δ_S = H_SS⁻¹ H_SP w_P``, i.e. (1) is
    ``ŵ_r = w_r ⊙ m_r + δ_r``. The frame is cut down to ``k = max_r |S_r|`` (the kept inputs of
    each row are gathered first, the rest of the ``k × k`` frame is identity), which is the same
    trick on a smaller matrix: one batched ``torch.linalg.cholesky`` + ``cholesky_solve`` over a
    ``(chunk, k, k)`` float64 tensor solves every row of the chunk. Cost ``≈ out · k³ / 3``.

``solver="cg"`` — the dual (OBS) systems, iteratively
    With ``G = H⁻¹`` (SparseGPT's ``H⁻¹``, one factorisation per layer), eliminating ``S`` from the
    row's KKT system gives the multi-weight OBS form of (1),

        ŵ = w − G_{:,P} y,     G_PP y = w_P,                                                (2)

    with ``ŵ_P = 0`` exactly at the solution (``y`` are the Lagrange multipliers of ``ŵ_P = 0``).
    (2) is solved by conjugate gradients on ``G_PP`` for all rows of a chunk at once — one
    ``(rows × d) @ (d × d)`` GEMM per iteration — with the Jacobi preconditioner ``diag(G)_P``
    (the OBS saliency denominators ``[H⁻¹]_qq``), started from the single-weight OBS multipliers
    ``y₀ = w_P / diag(G)_P``. ``y`` itself is never formed: the residual ``R = w_P − Y G`` is
    carried on all ``d`` inputs, and its ``S`` part is exactly the update, ``ŵ_S = w_S + R_S``.
    A row leaves the batch once ``rᵀD⁻¹r ≤ tol² · w_PᵀD⁻¹w_P``, so the work follows the *mean*
    iteration count over rows, not the maximum. The iteration runs in fp32; ``H`` is factorised
    in float64 and the factor inverted in fp32 (an fp32 factorisation of ``H``, κ ≈ 2·10⁴ on real
    layers, would cap the accuracy at ≈2e-5). Relative error of ``Ŵ`` against a float64 closed
    form of (1) is ≈ 0.2 · ``tol`` (default ``tol = 1e-5``: 1e-6–3e-6 on SmolLM2 layers).

Why the dual and not the primal: on real SmolLM2-135M Hessians (wikitext2, 8k tokens, blocks
0/7/15/29) the Jacobi-scaled ``G_PP`` of a row has its spectrum in ≈ [0.15, 2.6] (κ 5–175 over
rows), whereas ``H_SS`` has κ 500–20 000 (Jacobi-scaled 160–44 000) and ``G_SS H_SS`` (primal CG
preconditioned with ``H⁻¹``: two GEMMs per iteration) 75–1 600. To ``tol = 1e-6`` that is
90–500 primal Jacobi-PCG iterations, 30–53 primal ``G_SS``-PCG iterations (×2 GEMMs) and 20–45
dual ones (mean over rows 15–40). Other dual preconditioners were worse (``diag H``: ×1.3–2.5
iterations). Warm-starting from the selector's weights (its multipliers ``−[H(ŵ_sel − w)]_P``)
is *worse* than the OBS start in the dual (+1–9 iterations: SparseGPT never re-balances early
columns), and the best Ritz combination of both saves ≈ 1 iteration for one extra GEMM, so the
selector's weights serve only as the baseline of the guard below.

Cost and the ``auto`` rule, measured with ``benchmarks/optima_solver.py`` on this project's CPU
(AMD EPYC, 2 cores shared with other jobs, AVX2, MKL). Because the machine was loaded (load
average 5–7 on 2 cores) wall clock was unusable; the figures are **process CPU time with one
thread** (best of 3–5), ``optima_prune`` including its SparseGPT selector, synthetic correlated
``H`` (real block-15 Hessians in brackets), 50% / 2:4:

    ===========  ===================  =======================  ==================  =============
    out × d      sparsegpt s          optima (cg) s            optima / sparsegpt  (cholesky) s
    ===========  ===================  =======================  ==================  =============
    576 × 576    0.060 / 0.093        0.246 / 0.326            4.1 / 3.5 [6.3/4.4] 2.36 / 2.14
    192 × 576    0.055 / 0.069        0.148 / 0.161            2.7 / 2.3 [2.9/2.3] 0.96 / 0.74
    1536 × 576   0.093 / 0.081        0.581 / 0.545            6.3 / 6.8 [7.0/5.8] 5.83 / 4.38
    576 × 1536   0.249 / 0.295        1.363 / 1.496            5.5 / 5.1 [5.5/5.3] (≈ 10, skipped)
    ===========  ===================  =======================  ==================  =============

    one SmolLM2 block (q, k, v, o, gate, up, down): ratio 5.0 / 4.6 (real block 15: 5.6 / 4.9).
    Two threads, wall clock, on the loaded machine (every time ≈ 8× its idle value): block
    ratio 3.0 / 3.2 — oversubscription hurts SparseGPT's many small ops more than OPTIMA's GEMMs,
    so this is not the idle-machine ratio, which lies between the two measurements.

The dual CG costs ≈ 17–31 GEMM-equivalents per layer (mean row iterations at ``tol = 1e-5``) plus
three (guard objectives, start) and the ``H`` factorisation; SparseGPT (with its fused OBS-block
loop) costs only ≈ 6–16 on this CPU, so the issue's 3× target is *not* met in single-thread work
(≈ 4.6–5.6× per block). ``tol = 1e-4`` cuts ≈ 20% (relative error ≈ 2e-5), not enough either.
The batched float64 Cholesky is ≈ 2.5× (d = 128) to ≈ 10× (SmolLM2 shapes) slower than CG
(LAPACK's per-matrix cost and ``k³`` growth); on the small-``d`` sweep (256 rows, ``--small``) the two tie at
``k = max_r |S_r| ≈ 32`` (d = 64 at 2:4: 0.011 s each; d = 128: cholesky 0.05 s, cg 0.02 s), so
``auto`` = ``cholesky`` (exact, float64) when ``k ≤ 32``, else ``cg``.

Dead inputs (``diag H = 0``) are zeroed in ``W`` first (as SparseGPT does); they decouple from
every other input, so they stay exactly zero. After the solve each row keeps the new values only
where they do not raise that row's (dampened) objective above the selector's row — mathematically
never the case, but it protects against an ill-conditioned solve.
"""
from __future__ import annotations

import logging

import torch

from ..config import Pattern
from ..errors import ConfigError, LinalgError
from ..linalg import damped, damped_cholesky, prepare_hessian

log = logging.getLogger(__name__)

#: Default memory budget (bytes) for one chunk of per-row work (masked Hessians or CG state).
MEMORY_BUDGET = 256 * 2**20
#: ``auto`` picks the direct solver up to this many kept inputs per row (see module docstring).
CHOLESKY_MAX_KEPT = 32
SOLVERS = ("auto", "cholesky", "cg")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _row_energy(delta: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per-row objective ``δ_r H δ_rᵀ`` (one GEMM; the products are summed in float64)."""
    return (delta * (delta @ hessian)).sum(dim=1, dtype=torch.float64)


def _chunks(rows: int, chunk: int) -> list[slice]:
    return [slice(s, min(rows, s + chunk)) for s in range(0, rows, chunk)]


# --------------------------------------------------------------------------------------------
# direct solver: batched Cholesky of the masked Hessians
# --------------------------------------------------------------------------------------------
def _solve_cholesky(W: torch.Tensor, Hd: torch.Tensor, keep: torch.Tensor, row_chunk: int | None,
                    budget: int) -> torch.Tensor:
    """Exact (1) for every row, float64 batched Cholesky on the ``k × k`` masked frames."""
    rows, d = W.shape
    W64, H64 = W.to(torch.float64), Hd.to(torch.float64)  # no-op copies for float64 input
    n_keep = keep.sum(dim=1)
    out = W64 * keep
    k_all = int(n_keep.max()) if rows else 0
    if k_all == 0:
        return out
    # ``H_r`` and its factor live together: 2 · k² doubles per row.
    chunk = row_chunk or max(1, budget // (2 * 8 * k_all * k_all))
    # rhs of the correction: M_r H (w_r ⊙ ¬m_r), one GEMM for all rows.
    rhs_full = (W64 * ~keep) @ H64
    for sl in _chunks(rows, chunk):
        m = keep[sl]
        k = int(n_keep[sl].max())
        if k == 0:
            continue
        # kept inputs first (stable, so in input order), then pruned ones: the frame is idx[:, :k]
        idx = torch.argsort((~m).to(torch.int8), dim=1, stable=True)[:, :k]
        valid = torch.arange(k, device=W.device).unsqueeze(0) < n_keep[sl].unsqueeze(1)
        vf = valid.to(H64.dtype)
        Hr = H64[idx.unsqueeze(2), idx.unsqueeze(1)]
        Hr.mul_(vf.unsqueeze(2)).mul_(vf.unsqueeze(1))
        torch.diagonal(Hr, dim1=1, dim2=2).add_(1.0 - vf)  # identity on the padding
        b = torch.gather(rhs_full[sl], 1, idx) * valid
        L, info = torch.linalg.cholesky_ex(Hr)
        if bool((info != 0).any()):  # a principal submatrix of a PD matrix is PD: only on broken input
            raise LinalgError("a masked Hessian H_SS is not positive definite; raise `dampening`.")
        delta = torch.cholesky_solve(b.unsqueeze(2), L).squeeze(2) * valid
        out[sl].scatter_add_(1, idx, delta)
    return out


# --------------------------------------------------------------------------------------------
# iterative solver: Jacobi-preconditioned CG on the dual (OBS) systems G_PP y = b_P
# --------------------------------------------------------------------------------------------
def _dual_cg(G: torch.Tensor, dinv: torch.Tensor, B: torch.Tensor, tol: float, max_iter: int) -> torch.Tensor:
    """Batched Jacobi-PCG for ``G_PP y_r = b_r`` (rows of ``B``, supported on P); returns ``B − Y G``.

    ``dinv = [P] / diag G`` is the preconditioner and doubles as the mask of P. The iterate ``Y``
    is never formed: the residual recurrence ``R = B − Y G`` runs on *all* d inputs (unmasked;
    the preconditioner zeroes S), so at convergence ``R_P ≈ 0`` and ``R_S = −(Y G)_S``, which is
    exactly the update (2) needs: ``ŵ_S = w_S + R_S``. Start: the single-weight OBS multipliers
    ``y₀ = b / diag G``. Stop per row when ``rᵀD⁻¹r ≤ tol² · bᵀD⁻¹b`` (preconditioner norm);
    converged rows leave the batch, so the work follows the mean, not the maximum, iteration count.
    """
    rows = B.shape[0]
    R = B - (B * dinv) @ G
    out = torch.empty_like(R)
    Z = R * dinv
    rz = (R * Z).sum(1)
    thr = (B * B * dinv).sum(1) * (tol * tol)
    idx = torch.arange(rows, device=B.device)
    live = rz > thr
    out[~live] = R[~live]
    idx, Rw, Zw, Dw, tw, rz = idx[live], R[live], Z[live], dinv[live], thr[live], rz[live]
    Pw = Zw.clone()
    Q = torch.empty_like(Pw)
    it = 0
    while idx.numel() and it < max_iter:
        it += 1
        torch.matmul(Pw, G, out=Q)
        pq = (Pw * Q).sum(1)
        ok = pq > 0
        alpha = torch.where(ok, rz / torch.where(ok, pq, torch.ones_like(pq)), torch.zeros_like(pq))
        Rw.addcmul_(alpha.unsqueeze(1), Q, value=-1.0)
        torch.mul(Rw, Dw, out=Zw)
        rzn = (Rw * Zw).sum(1)
        done = (rzn <= tw) | ~ok
        n_done = int(done.sum())
        # retire converged rows once they are worth a copy (a converged row that stays a little
        # longer only refines further; ``ok`` guards a zero curvature)
        if n_done and (8 * n_done >= idx.numel() or it % 8 == 0):
            out[idx[done]] = Rw[done]
            keep = ~done
            idx, Rw, Zw, Pw, Dw, tw, rz, rzn = (t[keep] for t in (idx, Rw, Zw, Pw, Dw, tw, rz, rzn))
            Q = torch.empty_like(Pw)
            if not idx.numel():
                break
        pos = rz > 0
        beta = torch.where(pos, rzn / torch.where(pos, rz, torch.ones_like(rz)), torch.zeros_like(rz))
        Pw.mul_(beta.unsqueeze(1)).add_(Zw)
        rz = rzn
    if idx.numel():
        out[idx] = Rw
        log.warning("OPTIMA CG: %d rows did not reach tol=%.1e in %d iterations (kept the last iterate)",
                    idx.numel(), tol, max_iter)
    return out


def _solve_cg(W: torch.Tensor, Hd: torch.Tensor, G: torch.Tensor, keep: torch.Tensor, W0: torch.Tensor,
              tol: float, max_iter: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dual CG for one chunk of rows; returns ``(Ŵ, err_new, err_selector)`` (row objectives)."""
    Mk = keep.to(W.dtype)
    dinv = (1.0 - Mk) / torch.diagonal(G).unsqueeze(0)
    B = W * (1.0 - Mk)                                   # w_P
    R = _dual_cg(G, dinv, B, tol, max_iter)
    X = (W + R).mul_(Mk)                                  # (2): ŵ_S = w_S − (G y)_S, ŵ_P = 0
    # both row objectives (new and selector's) from one GEMM with the exact H
    err = _row_energy(torch.cat([X - W, W0 - W]), Hd)
    return X, err[: W.shape[0]], err[W.shape[0]:]


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def pick_solver(kept_max: int) -> str:
    """The ``auto`` rule: direct Cholesky for ``max |S_r| ≤ CHOLESKY_MAX_KEPT``, else dual CG."""
    return "cholesky" if kept_max <= CHOLESKY_MAX_KEPT else "cg"


def reoptimize_rows(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    mask: torch.Tensor,
    *,
    start: torch.Tensor | None = None,
    dampening: float = 0.01,
    solver: str = "auto",
    row_chunk: int | None = None,
    tol: float = 1e-5,
    max_iter: int | None = None,
    memory_budget: int = MEMORY_BUDGET,
) -> torch.Tensor:
    """Globally optimal rows (1) of ``weight`` for a fixed ``mask``.

    Args:
        weight: dense ``(out, d)`` weight ``W``.
        hessian: ``(d, d)`` ``H = XᵀX`` (or MOONSHOT's mixed Hessian); dampened here as
            ``H + λ·mean(diag H)·I`` (λ grows ×10 on a Cholesky failure, as in :mod:`..linalg`).
        mask: bool ``(out, d)``, True = kept. Unstructured or N:M, any per-row counts.
        start: the selector's pruned weights, the baseline each new row must not be worse than
            (see the guard in the module docstring); default ``weight ⊙ mask``.
        dampening: relative dampening λ.
        solver: ``"cholesky"`` (direct, float64), ``"cg"`` (dual PCG in fp32, ``H⁻¹`` from float64) or
            ``"auto"`` (see :func:`pick_solver`).
        row_chunk: rows per batch; default from ``memory_budget`` (masked Hessians for Cholesky,
            CG state for CG).
        tol: CG relative residual tolerance on ``G_PP y = w_P`` (preconditioner norm); the
            relative error of ``Ŵ`` is ≈ ``0.2 · tol``.
        max_iter: CG iteration cap (default ``max(200, 2·d)``).
        memory_budget: bytes of per-chunk work memory.

    Returns:
        ``Ŵ`` shaped and typed like ``weight``; zero wherever ``mask`` is False and on dead inputs.
    """
    if solver not in SOLVERS:
        raise ConfigError(f"unknown OPTIMA solver {solver!r}: choose one of {', '.join(SOLVERS)}.")
    if weight.dim() != 2 or mask.shape != weight.shape:
        raise ConfigError(f"OPTIMA needs a 2-D weight and a mask of the same shape, got "
                          f"{tuple(weight.shape)} and {tuple(mask.shape)}.")
    rows, d = weight.shape
    if hessian.shape != (d, d):
        raise ConfigError(f"hessian shape {tuple(hessian.shape)} does not match weight inputs {d}")
    W = weight.detach().to(torch.float32).clone()
    keep = mask.detach().to(torch.bool)
    H, dead = prepare_hessian(hessian.detach(), W)  # zeroes W's dead columns
    W0 = (start.detach().to(torch.float32) if start is not None else W) * keep
    W0[:, dead] = 0
    if rows == 0 or d == 0:
        return W0.to(weight.dtype)
    kept_max = int(keep.sum(dim=1).max())
    method = pick_solver(kept_max) if solver == "auto" else solver
    # float64 factorisation (λ grows ×10 on failure, as everywhere); CG needs H⁻¹ from it
    H64 = H.to(torch.float64)
    chol, lam = damped_cholesky(H64, dampening)
    Hd64 = damped(H64, lam)
    max_iter = max_iter or max(200, 2 * d)

    if method == "cholesky":
        X64 = _solve_cholesky(W, Hd64, keep, row_chunk, memory_budget)
        W64 = W.to(torch.float64)
        Dn, Do = X64 - W64, W0.to(torch.float64) - W64
        err_new, err_old = _row_energy(Dn, Hd64), _row_energy(Do, Hd64)
        X = X64.to(torch.float32)
        slack = 1e-12
    else:
        # H⁻¹ from the float64 Cholesky factor, inverted in fp32: as accurate as a float64
        # inverse (≈2e-7 relative error in Ŵ on SmolLM2's worst layer) at 60% of its cost; an
        # fp32 *factorisation* of H (κ ≈ 2e4 on real layers) would leave ≈2e-5.
        G = torch.cholesky_inverse(chol.to(torch.float32))
        Hd = Hd64.to(torch.float32)
        chunk = row_chunk or max(1, memory_budget // (12 * 4 * d))
        X = torch.empty_like(W)
        err_new = torch.empty(rows, dtype=torch.float64, device=W.device)
        err_old = torch.empty_like(err_new)
        for sl in _chunks(rows, chunk):
            X[sl], err_new[sl], err_old[sl] = _solve_cg(W[sl], Hd, G, keep[sl], W0[sl], tol, max_iter)
        slack = 1e-6  # fp32 row objectives: differences below this are rounding

    # guard: a row keeps its new values only where they do not (measurably) raise its objective
    worse = ~(err_new <= err_old * (1 + slack) + 1e-30)
    if bool(worse.any()):
        log.warning("OPTIMA: %d of %d rows kept the selector's weights (re-solve did not lower the "
                    "objective; ill-conditioned Hessian?)", int(worse.sum()), rows)
        X[worse] = W0[worse]
    X.mul_(keep)
    X[:, dead] = 0
    return X.to(weight.dtype)


def optima_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: Pattern,
    *,
    mask_from: str = "sparsegpt",
    dampening: float = 0.01,
    blocksize: int = 128,
    solver: str = "auto",
    tol: float = 1e-5,
    row_chunk: int | None = None,
    **options: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask from the registered selector ``mask_from``, then every row re-solved exactly.

    ``options`` go to the selector (e.g. ``fisher``/``alpha``/``base`` for ``mask_from="moonshot"``,
    ``hinv_upper`` for SparseGPT). Returns ``(Ŵ, mask)`` with the selector's mask unchanged.
    """
    from . import get_pruner

    if mask_from == "optima":
        raise ConfigError("OPTIMA cannot take its mask from itself: use mask_from='sparsegpt', "
                          "'wanda', 'magnitude' or 'moonshot'.")
    w_sel, mask = get_pruner(mask_from)(weight, hessian, pattern, dampening=dampening,
                                        blocksize=blocksize, **options)
    w_hat = reoptimize_rows(weight, hessian, mask, start=w_sel, dampening=dampening, solver=solver,
                            row_chunk=row_chunk, tol=tol)
    return w_hat.to(weight.dtype), mask


__all__ = ["CHOLESKY_MAX_KEPT", "optima_prune", "pick_solver", "reoptimize_rows"]
