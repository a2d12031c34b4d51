"""Region reconstruction: the masked least-squares refit (closed forms) and its plumbing."""
from __future__ import annotations

import pytest
import torch

from moonshot_fx.region import cross_stats, masked_refit, refit_with_holdout, region_error


def _layer(seed: int = 0, rows: int = 400, d: int = 24, out: int = 6, noise: float = 0.3):
    """Dense inputs X_d, pruned-model inputs X_p = X_d + noise (as after pruning earlier layers),
    a dense weight and a 2:4-pruned copy of it."""
    g = torch.Generator().manual_seed(seed)
    Xd = torch.randn(rows, d, generator=g) @ (torch.eye(d) + 0.3 * torch.randn(d, d, generator=g))
    Xp = Xd + noise * torch.randn(rows, d, generator=g)
    Wd = torch.randn(out, d, generator=g)
    keep = torch.zeros(out, d, dtype=torch.bool)
    idx = Wd.abs().reshape(out, d // 4, 4).topk(2, dim=2).indices
    keep.reshape(out, d // 4, 4).scatter_(2, idx, True)
    return Xp, Xd, Wd, Wd * keep, keep


def test_refit_is_the_least_squares_solution_on_the_kept_support() -> None:
    Xp, Xd, Wd, Wp, keep = _layer()
    H, K = cross_stats([Xp[:200], Xp[200:]], [Xd[:200], Xd[200:]])
    lam = 1e-3
    got = masked_refit(Wp, Wd, H, K, dampening=lam, solver="cholesky")
    assert torch.equal(got != 0, keep)  # the mask is fixed
    ridge = (lam * torch.diagonal(H).mean()).sqrt().item()
    Y = (Xd.double() @ Wd.double().T)
    for r in range(Wd.shape[0]):
        S = keep[r].nonzero().squeeze(1)
        A = torch.cat([Xp.double()[:, S], ridge * torch.eye(len(S), dtype=torch.float64)])
        b = torch.cat([Y[:, r], torch.zeros(len(S), dtype=torch.float64)])
        ref = torch.linalg.lstsq(A, b.unsqueeze(1)).solution.squeeze(1)
        torch.testing.assert_close(got[r, S].double(), ref, rtol=1e-4, atol=1e-5)


def test_refit_lowers_the_target_error_on_the_fit_rows() -> None:
    Xp, Xd, Wd, Wp, _ = _layer(seed=1)
    H, K = cross_stats([Xp], [Xd])
    for solver in ("cholesky", "cg"):
        refit = masked_refit(Wp, Wd, H, K, dampening=1e-4, solver=solver)
        before, _ = region_error([Xp], [Xd], Wp, Wd)
        after, _ = region_error([Xp], [Xd], refit, Wd)
        assert after < 0.8 * before


def test_cross_stats_are_the_gram_and_cross_products() -> None:
    Xp, Xd, *_ = _layer(seed=2)
    H, K = cross_stats([Xp[:150], Xp[150:]], [Xd[:150], Xd[150:]])
    torch.testing.assert_close(H, Xp.double().T @ Xp.double(), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(K, Xp.double().T @ Xd.double(), rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="align"):
        cross_stats([Xp], [Xd[:10]])


def test_holdout_keeps_a_refit_that_generalises() -> None:
    Xp, Xd, Wd, Wp, _ = _layer(seed=3)
    fit = refit_with_holdout(Wp, Wd, [Xp[:300]], [Xd[:300]], [Xp[300:]], [Xd[300:]], dampening=1e-3)
    assert fit.kept and fit.holdout_after == fit.holdout_refit < fit.holdout_before
    err, norm = region_error([Xp[300:]], [Xd[300:]], fit.weight, Wd)
    assert err / norm == pytest.approx(fit.holdout_after, rel=1e-6)


def test_holdout_reverts_an_overfitted_refit() -> None:
    """Fewer fit rows than kept weights per row: the refit interpolates the fit rows' noise and
    is worse on held-out rows, so the pruned weights stay and the held-out error does not rise."""
    g = torch.Generator().manual_seed(4)
    d, out = 64, 4
    Xd = torch.randn(600, d, generator=g)
    Xp = Xd.clone()  # the pruned model's inputs equal the dense ones here
    Wd = torch.randn(out, d, generator=g)
    Wp = Wd.clone()
    Wp[:, 1::2] = 0  # half the weights kept
    # the fit rows see a corrupted copy of the inputs (a calibration quirk the held-out rows lack)
    fit_p = Xp[:8] + 3.0 * torch.randn(8, d, generator=g)
    fit = refit_with_holdout(Wp, Wd, [fit_p], [Xd[:8]], [Xp[8:]], [Xd[8:]], dampening=1e-6)
    assert not fit.kept
    assert torch.equal(fit.weight, Wp)
    assert fit.holdout_refit > fit.holdout_before == fit.holdout_after
