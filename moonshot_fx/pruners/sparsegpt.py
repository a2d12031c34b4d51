"""SparseGPT (Frantar & Alistarh, 2023): blocked OBS pruning with lazy batch updates.

Names follow the paper. For a layer ``W`` (out × d) and ``H = XᵀX`` (d × d):

* ``U`` — upper Cholesky factor of the dampened ``H⁻¹``; row ``i`` of ``U`` scaled by ``1/U_ii`` is
  the OBS compensation for removing input ``i`` once inputs ``< i`` are fixed.
* columns are processed left to right in blocks of ``blocksize``; inside a block each column's
  error ``Err = (w - q) / U_ii`` is pushed onto the block's remaining columns at once, and onto
  the columns after the block lazily with one matrix product ``Err · U[block, after]``.
* the mask: unstructured patterns choose, per block, the lowest ``w² / U_ii²`` over the whole
  block (adaptive mask selection); N:M patterns choose per group of ``m`` columns when the
  group's first column is reached, with the already-updated weights.

Dead inputs (``H_jj = 0``) are zeroed before anything else. All maths in fp32. The per-column
loop of a block is :func:`~moonshot_fx.kernels.obs_block.obs_block` (a fused Triton kernel for
CUDA tensors, the torch reference otherwise).
"""
from __future__ import annotations

import torch

from ..config import Pattern
from ..linalg import inverse_cholesky_upper, prepare_hessian
from ..kernels.obs_block import obs_block
from ..masks import prune_lowest, quotas


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: Pattern,
    *,
    blocksize: int = 128,
    dampening: float = 0.01,
    hinv_upper: torch.Tensor | None = None,
    **_: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` (out × d) against ``hessian`` (d × d); returns ``(W_hat, mask)``.

    ``hinv_upper`` may carry a precomputed :func:`~moonshot_fx.linalg.inverse_cholesky_upper` of
    the same (prepared) Hessian, so sites that share an input factorise it once.
    """
    W = weight.to(torch.float32).clone()
    rows, cols = W.shape
    if hinv_upper is None:
        # the copy prepare_hessian makes is only needed to mend dead inputs (the factorisation
        # does not write into H): one d×d fp32 copy less for the widest layers
        H = prepare_hessian(hessian, W)[0] if bool((torch.diagonal(hessian) == 0).any()) else hessian.to(torch.float32)
        U = inverse_cholesky_upper(H, dampening)
        del H  # only U is needed from here on
    else:
        dead = torch.diagonal(hessian) == 0
        W[:, dead] = 0
        U = hinv_upper.to(torch.float32)
    if pattern.is_nm and blocksize % pattern.m:
        blocksize = max(pattern.m, blocksize - blocksize % pattern.m)
    mask = torch.ones_like(W, dtype=torch.bool)
    starts = list(range(0, cols, blocksize))
    widths = [min(blocksize, cols - s) for s in starts]
    block_quota = quotas([rows * w for w in widths], pattern.sparsity) if not pattern.is_nm else None

    for b, (i1, count) in enumerate(zip(starts, widths)):
        i2 = i1 + count
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        M1 = None
        if block_quota is not None:
            d1 = torch.diagonal(U1)
            M1 = prune_lowest(W1.square() / d1.square().unsqueeze(0), block_quota[b])
        # the per-column OBS loop (N:M masks chosen inside); fused Triton kernel on GPU
        Q1, Err1, M1 = obs_block(W1, U1, M1, pattern.n, pattern.m)
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = M1
        if i2 < cols:
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return W.to(weight.dtype), mask
