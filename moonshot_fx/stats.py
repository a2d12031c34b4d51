"""Per-site calibration statistics (pure tensor functions plus a small accumulator).

* :func:`input_rows` turns a site's input activation into the 2-D rows ``X`` the weight multiplies:
  tokens for linear layers, unfolded patches (``in_channels·kh·kw`` columns, with the conv's own
  padding/stride/dilation) for convolutions.
* :class:`LayerStats` accumulates ``H = XᵀX`` in fp64 (exact sums, no activation kept), the number
  of rows, and optionally a Fisher matrix ``F``.
* Fisher forms in the shared ``d_in × d_in`` shape every pruner takes:
  token-level ``F = Xᵀ diag(‖δ_t‖²) X`` (:func:`token_fisher`) and sample-level
  ``F = Σ_k G_kᵀ G_k`` with ``G_k = Δ_kᵀ X_k`` (:func:`sample_fisher`), where ``δ_t`` is the
  gradient of the loss w.r.t. the site's output at row ``t`` and ``Δ_k`` stacks those of sample ``k``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

ACC_DTYPE = torch.float64
MATMUL_DTYPE = torch.float32


def input_rows(x: torch.Tensor, kind: str, conv: Mapping[str, Any] | None = None) -> torch.Tensor:
    """Rows of the matrix the weight multiplies: ``(rows, d_in)``.

    ``kind`` is ``linear`` (last dim is d_in), ``conv2d`` or ``conv1d`` (``conv`` holds
    ``kernel_size``, ``stride``, ``padding``, ``dilation``).
    """
    if kind in ("linear", "matmul"):
        return x.reshape(-1, x.shape[-1])
    if kind in ("conv2d", "conv1d"):
        assert conv is not None
        if kind == "conv1d":
            x = x.unsqueeze(-2)
        cols = F.unfold(x, conv["kernel_size"], dilation=conv["dilation"], padding=conv["padding"], stride=conv["stride"])
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    raise ValueError(f"unknown site kind {kind!r}")


def rows_per_sample(x: torch.Tensor, rows: torch.Tensor) -> int:
    """How many rows of :func:`input_rows` belong to each leading-dim sample of ``x``."""
    return rows.shape[0] // max(1, x.shape[0])


def output_rows(grad: torch.Tensor, kind: str) -> torch.Tensor:
    """Output gradients ``δ`` as rows aligned with :func:`input_rows`: ``(rows, d_out)``."""
    if kind in ("linear", "matmul"):
        return grad.reshape(-1, grad.shape[-1])
    if kind == "conv2d":  # (B, C, H, W) -> (B·H·W, C), same order as unfold's L axis
        return grad.flatten(2).transpose(1, 2).reshape(-1, grad.shape[1])
    if kind == "conv1d":
        return grad.transpose(1, 2).reshape(-1, grad.shape[1])
    raise ValueError(f"unknown site kind {kind!r}")


#: below this width one GEMM is as fast as the blocked symmetric product
GRAM_BLOCKED_MIN = 384
GRAM_BLOCK = 192


def gram(x: torch.Tensor, block: int = GRAM_BLOCK) -> torch.Tensor:
    """``xᵀx`` computing only one triangle of column blocks and mirroring it.

    ``XᵀX`` is symmetric, so a full GEMM does twice the needed work. Column block ``j`` of the
    product needs only rows ``≤ j`` of blocks: ``x[:, :end_j]ᵀ x[:, block_j]``; the part above the
    diagonal block is copied to its mirror image. Measured on a 2-core AVX2 CPU with 4096 rows:
    66 ms instead of 104 ms at width 1536, 10 ms instead of 15 ms at 576 (BLAS ``syrk`` is not
    exposed by torch). Bitwise equal entries to ``x.T @ x`` are not promised; the difference is
    fp32 rounding of the same sums.
    """
    d = x.shape[1]
    if d < GRAM_BLOCKED_MIN:
        return x.T @ x
    out = torch.empty(d, d, dtype=x.dtype, device=x.device)
    for start, end, col in _gram_blocks(x, block):
        out[:end, start:end] = col
        out[start:end, :start] = col[:start].T
    return out


def _gram_blocks(x: torch.Tensor, block: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """:func:`gram`'s column blocks ``(start, end, x[:, :end]ᵀ x[:, start:end])``: rows 0..end of
    the block; the rows below are the mirror image of earlier blocks."""
    d = x.shape[1]
    for start in range(0, d, block):
        end = min(d, start + block)
        yield start, end, x[:, :end].T @ x[:, start:end]


def _add_gram_(h: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``h + gram(x)`` in ``ACC_DTYPE``, each fp32 column block added as it is formed: the same
    bits as converting a whole ``gram(x)``, without its d×d fp32 temporary (0.76 GB at d=13824)."""
    d = x.shape[1]
    if h is None:
        h = torch.zeros(d, d, dtype=ACC_DTYPE, device=x.device)
    for start, end, col in _gram_blocks(x, GRAM_BLOCK):
        h[:end, start:end] += col
        h[start:end, :start] += col[:start].T
    return h


def accumulate_hessian(h: torch.Tensor | None, rows: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``h + Xᵀ diag(weights) X`` (``weights`` None means all ones).

    One batch's product is formed in fp32 (``MATMUL_DTYPE``: fp64 GEMMs cost ~2× on CPU and the
    relative error of one batch's sum is ~1e-6) with :func:`gram` (half the flops of a GEMM), and
    accumulated across batches in fp64, so long calibration runs do not drift. Non-negative
    weights (squared gradient norms) go in as ``√w`` on both sides, so they take the symmetric path.
    """
    x = rows.to(MATMUL_DTYPE)
    w = None if weights is None else weights.to(MATMUL_DTYPE)
    symmetric = w is None or bool((w >= 0).all())
    if symmetric and w is not None:
        x = x * w.sqrt().unsqueeze(1)
    if symmetric and x.dim() == 2 and x.shape[1] >= GRAM_BLOCKED_MIN:
        return _add_gram_(h, x)
    update = gram(x) if symmetric else (x * w.unsqueeze(1)).T @ x
    if h is None:
        return update.to(ACC_DTYPE)
    return _add_by_rows_(h, update)


def _add_by_rows_(h: torch.Tensor, update: torch.Tensor, rows_per_chunk: int = 256) -> torch.Tensor:
    """``h += update`` (fp64 += fp32) a chunk of rows at a time: a mixed-dtype ``add_`` converts
    the whole update first (a 13824-wide Hessian's fp64 copy is 1.5 GB); the bits are the same."""
    flat_h, flat_u = h.view(-1, h.shape[-1]), update.reshape(-1, update.shape[-1])
    for i in range(0, flat_h.shape[0], rows_per_chunk):
        flat_h[i:i + rows_per_chunk].add_(flat_u[i:i + rows_per_chunk])
    return h


def _divided_to_fp32(h: torch.Tensor, n: int, rows_per_chunk: int = 256) -> torch.Tensor:
    """``(h / n).to(float32)``, bit for bit, a chunk of rows at a time: no full-size temporary in
    ``h``'s dtype (for a 13824-wide fp64 Hessian that temporary would be 1.5 GB)."""
    out = torch.empty(h.shape, dtype=torch.float32, device=h.device)
    flat_in, flat_out = h.reshape(-1, h.shape[-1]), out.view(-1, h.shape[-1])
    for i in range(0, flat_in.shape[0], rows_per_chunk):
        flat_out[i:i + rows_per_chunk] = flat_in[i:i + rows_per_chunk] / n
    return out


def squared_row_norms(rows: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``‖x_t‖²`` of every row of every batch, in fp64 (no overflow for huge activations)."""
    return [r.to(ACC_DTYPE).square().sum(dim=1) for r in rows]


def mixed_curvature(rows: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], alpha: float,
                    row_norms: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """MOONSHOT's ``H_mix = α·H/c_rec + (1 − α)·F/c_tay`` for the token-level Fisher, in one product.

    ``rows[b]`` are batch ``b``'s input rows, ``weights[b]`` their ``‖δ_t‖²``. With
    ``S_h = Σ_t ‖x_t‖²`` and ``S_f = Σ_t w_t‖x_t‖²`` over all batches, the normalisers are
    ``c_rec = S_h / (N·d)`` and ``c_tay = S_f / (N·d)``, so

        H_mix = d · Xᵀ diag(α / S_h + (1 − α) · w_t / S_f) X,

    one weighted ``XᵀX`` instead of ``XᵀX`` plus ``Xᵀdiag(w)X``. Needs every row at once (the
    sequential passes have them: all batches advance together). A zero ``S_h`` or ``S_f`` drops
    that term, as :func:`moonshot_fx.pruners.mix_hessians` does. Returned in fp64 (sums of
    per-batch fp32 products, as :func:`accumulate_hessian`). The result does not depend on the
    scale of ``X``: where the per-row scales fall below float32's range (activations whose ``XᵀX``
    would overflow), the rows are scaled in fp64 before the float32 product. ``row_norms``:
    :func:`squared_row_norms` of ``rows`` when already computed (sites sharing an input share them).

    Row-clustered Fisher (``fisher="row"``): ``weights[b]`` of shape ``(rows, C)`` hold
    ``w_tc = Σ_{i∈c} δ_ti²`` for ``C`` equal clusters of output rows; the result is ``(C, d, d)``,
    cluster ``c``'s curvature ``d · Xᵀ diag(α / S_h + (1 − α) · C · w_tc / S_f) X`` with the *shared*
    ``S_f`` (see :func:`moonshot_fx.pruners.moonshot.mix_hessians`): a row of cluster ``c`` sees
    ``F_c / |c|``, the mean per-row Fisher of its cluster, on the scale of the mean per-row Fisher
    of the whole layer, so clusters with more gradient mass weigh the Taylor term more. ``C = 1``
    gives the shared form.
    """
    if len(rows) != len(weights) or not rows:
        raise ValueError("mixed_curvature needs one weight vector per batch of rows, and at least one batch")
    if weights[0].dim() == 2:
        clusters = weights[0].shape[1]
        totals = [w.to(ACC_DTYPE).sum(dim=1) for w in weights]
        sq = squared_row_norms(rows) if row_norms is None else row_norms
        return torch.stack([_mixed_one(rows, totals, [w[:, c] for w in weights], alpha, sq, scale=clusters)
                            for c in range(clusters)])
    return _mixed_one(rows, weights, weights, alpha, row_norms)


def _mixed_one(rows: Sequence[torch.Tensor], totals: Sequence[torch.Tensor], weights: Sequence[torch.Tensor],
               alpha: float, row_norms: Sequence[torch.Tensor] | None, scale: float = 1.0) -> torch.Tensor:
    """:func:`mixed_curvature` with ``S_f`` from ``totals`` and the Taylor weights ``scale · weights``."""
    sq = squared_row_norms(rows) if row_norms is None else row_norms
    s_h = float(sum(float(q.sum()) for q in sq))
    s_f = float(sum(float((q * w.to(ACC_DTYPE)).sum()) for q, w in zip(sq, totals)))
    d = rows[0].shape[1]
    a = d * alpha / s_h if s_h > 0 else 0.0
    b = scale * d * (1.0 - alpha) / s_f if s_f > 0 else 0.0
    out: torch.Tensor | None = None
    tiny = torch.finfo(MATMUL_DTYPE).tiny
    for r, w in zip(rows, weights):
        u = a + b * w.to(ACC_DTYPE)
        if bool((u[u > 0] >= tiny).all()):
            out = accumulate_hessian(out, r, u)
        else:  # scales below float32's range (huge activations): apply √u in fp64 first
            out = accumulate_hessian(out, (r.to(ACC_DTYPE) * u.sqrt().unsqueeze(1)).to(MATMUL_DTYPE))
    assert out is not None
    return out


def token_fisher(rows: torch.Tensor, grad_rows: torch.Tensor) -> torch.Tensor:
    """``Xᵀ diag(‖δ_t‖²) X`` for one batch."""
    return accumulate_hessian(None, rows, grad_rows.to(ACC_DTYPE).square().sum(dim=1))


def sample_fisher(rows: torch.Tensor, grad_rows: torch.Tensor, samples: int) -> torch.Tensor:
    """``Σ_k G_kᵀ G_k`` with ``G_k = Δ_kᵀ X_k`` for one batch of ``samples`` equal-length samples."""
    x = rows.to(ACC_DTYPE).reshape(samples, -1, rows.shape[1])
    d = grad_rows.to(ACC_DTYPE).reshape(samples, -1, grad_rows.shape[1])
    g = d.transpose(1, 2) @ x  # (samples, d_out, d_in): per-sample weight gradients
    return torch.einsum("koi,koj->ij", g, g)


def kron_output_factor(rows: torch.Tensor, grad_rows: torch.Tensor) -> torch.Tensor:
    """``Σ_t ‖x_t‖² δ_t δ_tᵀ`` (d_out × d_out) for one batch: tracing the inputs out of the token
    Fisher ``Σ_t (δ_t δ_tᵀ) ⊗ (x_t x_tᵀ)`` (``fisher="kron"``; fp64, accumulated by the caller)."""
    return accumulate_hessian(None, grad_rows, squared_row_norms([rows])[0])


def weight_fisher_diagonal(rows: torch.Tensor, grad_rows: torch.Tensor) -> torch.Tensor:
    """``Σ_t δ_ti² x_tj²`` (out, in): the diagonal of the token-level empirical Fisher of every
    single weight, ``E[(∂L/∂W_ij)²]`` with one gradient per row ``t``, not shared across rows."""
    return grad_rows.to(torch.float32).square().T @ rows.to(torch.float32).square()


def _non_finite(what: str) -> Exception:
    """The error for NaN/inf ``what`` reaching a prunable layer's statistics."""
    from .errors import CalibrationError

    return CalibrationError(
        f"non-finite {what} reached a prunable layer during calibration; check the calibration inputs "
        "(token ids in range, images normalised) and the model's dtype.")


@dataclass
class LayerStats:
    """Accumulated statistics of one input group (sites reading the same tensor share it)."""

    hessian: torch.Tensor | None = None
    rows: int = 0
    batches: int = 0
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)  # per site name
    #: MOONSHOT's H_mix per site, formed directly (:func:`mixed_curvature`) instead of H and F
    mixed: dict[str, torch.Tensor] = field(default_factory=dict)
    #: keep only diagonals (squared column norms): all Wanda needs, O(d) instead of O(d²) work
    diagonal_only: bool = False

    def add_rows(self, rows: torch.Tensor) -> None:
        """Accumulate ``XᵀX`` of one batch's rows; check they are finite.

        The check reads the update's diagonal ``Σ_t x_tj²``, which is non-finite exactly when a
        column holds a NaN/inf (or values whose squares overflow): d numbers instead of a pass
        over every activation (that pass cost ~4% of a SmolLM2 pruning run).
        """
        if self.diagonal_only:
            update = rows.to(ACC_DTYPE).square().sum(dim=0)
            diagonal = update
        else:
            update = accumulate_hessian(None, rows)
            diagonal = torch.diagonal(update)
        if not torch.isfinite(diagonal).all():
            from .errors import CalibrationError

            if torch.isfinite(rows).all():
                raise CalibrationError(
                    "calibration statistics overflow (activations too large for XᵀX in float32); "
                    "check the calibration inputs and the model's scale.")
            raise _non_finite("activations")
        self.hessian = update if self.hessian is None else self.hessian.add_(update)
        self.rows += rows.shape[0]
        self.batches += 1

    def add_token_fisher(self, site: str, rows: torch.Tensor, weights: torch.Tensor) -> None:
        """Accumulate ``Xᵀ diag(weights) X`` (its diagonal in diagonal-only mode) for ``site``;
        ``weights`` of shape ``(rows, C)`` accumulate one Fisher per row cluster."""
        if weights.dim() == 2:  # row clusters (fisher="row"): one Fisher per cluster, (C, d, d)
            update = torch.stack([self._fisher_update(rows, weights[:, c]) for c in range(weights.shape[1])])
        else:
            update = self._fisher_update(rows, weights)
        self.add_fisher(site, update)

    def _fisher_update(self, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.diagonal_only:
            return (rows.to(ACC_DTYPE).square() * weights.to(ACC_DTYPE).unsqueeze(1)).sum(dim=0)
        return accumulate_hessian(None, rows, weights)

    def add_mixed(self, site: str, rows: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], alpha: float,
                  row_norms: Sequence[torch.Tensor] | None = None) -> None:
        """Form ``site``'s ``H_mix`` from every row at once (see :func:`mixed_curvature`); no
        ``XᵀX`` or Fisher is kept for it. Call once per site, with all of the group's rows."""
        if site in self.mixed:
            raise ValueError(f"H_mix of {site!r} is formed once, from all rows; it cannot be accumulated")
        mix = mixed_curvature(rows, weights, alpha, row_norms)
        if not torch.isfinite(torch.diagonal(mix, dim1=-2, dim2=-1)).all():
            raise _non_finite("activations or gradients")
        self.mixed[site] = mix

    def mixed_hessian(self, site: str) -> torch.Tensor | None:
        """``site``'s ``H_mix`` in fp32 when it was formed directly, else None."""
        m = self.mixed.get(site)
        return None if m is None else m.to(torch.float32)

    def add_fisher(self, site: str, update: torch.Tensor) -> None:
        """Accumulate a Fisher term for ``site``."""
        if site in self.fisher:
            self.fisher[site].add_(update)
        else:
            self.fisher[site] = update

    def mean_hessian(self) -> torch.Tensor:
        """``XᵀX / rows`` in fp32 (the scale every pruner expects; scale-free otherwise)."""
        if self.hessian is None:
            from .errors import CalibrationError

            raise CalibrationError("no calibration rows reached this layer; is it used by the forward pass?")
        mean = _divided_to_fp32(self.hessian, max(1, self.rows))
        if self.diagonal_only:
            mean = torch.diag(mean)
        if not torch.isfinite(mean).all():
            from .errors import CalibrationError

            raise CalibrationError(
                "calibration statistics overflow float32 (activations too large for XᵀX); check the "
                "calibration inputs and the model's scale."
            )
        return mean

    def mean_fisher(self, site: str) -> torch.Tensor | None:
        """The token-level Fisher of ``site`` divided by the row count (a matrix), if any."""
        f = self.fisher.get(site)
        if f is None:
            return None
        f = (f / max(1, self.rows)).to(torch.float32)
        if self.diagonal_only:
            return torch.diag_embed(f)
        return f
