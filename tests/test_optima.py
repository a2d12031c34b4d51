"""OPTIMA: the exact row-wise re-solve equals an independent float64 closed form.

Reference: for each row, with S the kept and P the pruned inputs and H the dampened Hessian,
``ŵ_S = w_S + H_SS⁻¹ H_SP w_P`` solved by ``torch.linalg.solve`` row by row.
"""
from __future__ import annotations

import pytest
import torch

import moonshot_fx
from moonshot_fx.config import Pattern
from moonshot_fx.linalg import damped
from moonshot_fx.pruners import get_pruner, mix_hessians, prune_layer
from moonshot_fx.pruners import optima as optima_mod
from moonshot_fx.pruners.optima import optima_prune, pick_solver, reoptimize_rows

PATTERNS = [Pattern(0.5), Pattern(n=2, m=4)]
SELECTORS = ["magnitude", "wanda", "sparsegpt"]


def closed_form(weight: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor, dampening: float = 0.01) -> torch.Tensor:
    """Row-by-row ``w_S + H_SS⁻¹ H_SP w_P`` in float64 (dead inputs: unit diagonal, zero weight)."""
    w = weight.to(torch.float64).clone()
    h = hessian.to(torch.float64).clone()
    dead = torch.diagonal(h) == 0
    torch.diagonal(h)[dead] = 1.0
    w[:, dead] = 0
    h = damped(h, dampening)
    out = torch.zeros_like(w)
    for r in range(w.shape[0]):
        s, p = mask[r], ~mask[r]
        out[r, s] = w[r, s] + torch.linalg.solve(h[s][:, s], h[s][:, p] @ w[r, p])
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.to(torch.float64) - b.to(torch.float64)).norm() / b.to(torch.float64).norm())


@pytest.mark.parametrize("solver", ["cholesky", "cg"])
@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("mask_from", SELECTORS)
def test_matches_closed_form_and_beats_selector(correlated, solver: str, pattern: Pattern, mask_from: str) -> None:
    _, w, h = correlated(d=64, out=24)
    w_sel, mask_sel = get_pruner(mask_from)(w, h, pattern)
    w_hat, mask = optima_prune(w, h, pattern, mask_from=mask_from, solver=solver)
    # mask unchanged, zeros exactly where pruned, pattern valid
    assert torch.equal(mask, mask_sel)
    assert bool((w_hat[~mask] == 0).all())
    assert moonshot_fx.check_pattern(w_hat, pattern)
    assert w_hat.dtype == w.dtype and w_hat.shape == w.shape
    # exact optimum
    assert rel_err(w_hat, closed_form(w, h, mask)) <= 1e-5
    # never worse than the selector's weights for the same mask (SparseGPT's for mask_from=sparsegpt)
    err_opt = moonshot_fx.reconstruction_error(w, w_hat, h)
    err_sel = moonshot_fx.reconstruction_error(w, w_sel, h)
    assert err_opt <= err_sel * (1 + 1e-6)
    if mask_from == "sparsegpt":
        assert err_opt < err_sel  # SparseGPT freezes early columns; the re-solve strictly helps here


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_solvers_agree_and_chunking_is_invariant(correlated, pattern: Pattern) -> None:
    _, w, h = correlated(d=96, out=40, seed=1)
    _, mask = get_pruner("sparsegpt")(w, h, pattern)
    ref = reoptimize_rows(w, h, mask, solver="cholesky")
    cg = reoptimize_rows(w, h, mask, solver="cg")
    assert rel_err(cg, ref) <= 1e-5
    for solver, full in (("cholesky", ref), ("cg", cg)):
        chunked = reoptimize_rows(w, h, mask, solver=solver, row_chunk=7)
        assert rel_err(chunked, full) <= 1e-6
    # a tiny memory budget forces one-row chunks for the direct solver
    tiny = reoptimize_rows(w, h, mask, solver="cholesky", memory_budget=1)
    assert rel_err(tiny, ref) <= 1e-12


def test_variable_kept_counts_per_row(correlated) -> None:
    """Unstructured layer-wide masks give rows with very different |S| (incl. empty and full)."""
    _, w, h = correlated(d=48, out=16, seed=2)
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(16, 48, generator=g) < torch.linspace(0.0, 1.0, 16).unsqueeze(1)
    mask[0] = False
    mask[-1] = True
    ref = closed_form(w, h, mask)
    for solver in ("cholesky", "cg"):
        out = reoptimize_rows(w, h, mask, solver=solver)
        assert rel_err(out, ref) <= 1e-5
        assert bool((out[0] == 0).all())
        assert torch.allclose(out[-1], w[-1])  # nothing pruned: the dense row is optimal


@pytest.mark.parametrize("solver", ["cholesky", "cg"])
def test_dead_inputs_stay_zero(correlated, solver: str) -> None:
    x, w, _ = correlated(d=64, out=20, seed=3)
    dead = torch.tensor([3, 17, 40, 41])
    x[:, dead] = 0
    h = x.T @ x
    assert bool((torch.diagonal(h)[dead] == 0).all())
    for pattern in PATTERNS:
        w_hat, mask = optima_prune(w, h, pattern, mask_from="magnitude", solver=solver)  # keeps some dead
        assert bool(mask[:, dead].any())
        assert bool((w_hat[:, dead] == 0).all())
        assert rel_err(w_hat, closed_form(w, h, mask)) <= 1e-5


def test_mixed_hessian_from_moonshot(correlated) -> None:
    """MOONSHOT with base='optima' hands OPTIMA a mixed Hessian; the re-solve is exact for it."""
    x, w, h = correlated(d=64, out=16, seed=4)
    g = torch.Generator().manual_seed(5)
    scale = torch.rand(x.shape[0], generator=g) * 3
    fisher = (x * scale.unsqueeze(1)).T @ x
    w_hat, mask = prune_layer(w, h, "2:4", method="moonshot", base="optima", fisher=fisher, alpha=0.5)
    h_mix = mix_hessians(h, fisher, 0.5)
    assert rel_err(w_hat, closed_form(w, h_mix, mask)) <= 1e-5
    assert moonshot_fx.check_pattern(w_hat, "2:4")


def test_prune_layer_entry_point_and_dtype(correlated) -> None:
    _, w, h = correlated(d=32, out=8, seed=6)
    w_hat, mask = prune_layer(w.to(torch.float64), h, 0.5, method="optima", mask_from="wanda")
    assert w_hat.dtype == torch.float64
    assert rel_err(w_hat, closed_form(w, h, mask)) <= 1e-5


def test_guard_keeps_selector_rows_when_solve_is_worse(correlated, monkeypatch: pytest.MonkeyPatch) -> None:
    _, w, h = correlated(d=32, out=8, seed=7)
    w_sel, mask = get_pruner("sparsegpt")(w, h, Pattern(0.5))
    real = optima_mod._solve_cholesky

    def broken(W, Hd, keep, row_chunk, budget):  # type: ignore[no-untyped-def]
        out = real(W, Hd, keep, row_chunk, budget)
        out[2] = 100.0 * W[2] * keep[2]  # a clearly bad row
        return out

    monkeypatch.setattr(optima_mod, "_solve_cholesky", broken)
    out = reoptimize_rows(w, h, mask, start=w_sel, solver="cholesky")
    assert torch.equal(out[2], w_sel[2])
    assert rel_err(out[3:], closed_form(w, h, mask)[3:].float()) <= 1e-5


def test_auto_rule_and_errors(correlated) -> None:
    assert pick_solver(16) == "cholesky"
    assert pick_solver(288) == "cg"
    _, w, h = correlated(d=16, out=4)
    mask = torch.ones_like(w, dtype=torch.bool)
    with pytest.raises(moonshot_fx.ConfigError):
        reoptimize_rows(w, h, mask, solver="lu")
    with pytest.raises(moonshot_fx.ConfigError):
        optima_prune(w, h, Pattern(0.5), mask_from="optima")


# ----------------------------------------------------------------------------- a real layer


@pytest.fixture(scope="module")
def stories_layer():  # type: ignore[no-untyped-def]
    """(W, H) of one MLP down-projection (d = 172) of stories260K, H from tinystories windows."""
    pytest.importorskip("transformers")
    pytest.importorskip("sentencepiece")
    data = pytest.importorskip("moonshot_fx.data")
    if not hasattr(data, "load_stories260k"):
        pytest.skip("moonshot_fx.data has no load_stories260k yet")
    try:
        model, tok = data.load_stories260k()
        ids = torch.tensor(tok.encode_documents(data.load_text("tinystories")))
    except FileNotFoundError as e:
        pytest.skip(f"stories260K data not available: {e}")
    windows = data.calibration_windows(ids, 8, 64, seed=0)
    layer = model.model.layers[1].mlp.down_proj
    acc: dict[str, torch.Tensor] = {}

    def hook(_m, inp, _o):  # type: ignore[no-untyped-def]
        x = inp[0].reshape(-1, inp[0].shape[-1]).to(torch.float64)
        acc["h"] = acc.get("h", 0) + x.T @ x

    handle = layer.register_forward_hook(hook)
    with torch.no_grad():
        model(windows)
    handle.remove()
    return layer.weight.detach().clone(), acc["h"].to(torch.float32)


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_real_layer_closed_form(stories_layer, pattern: Pattern) -> None:  # type: ignore[no-untyped-def]
    w, h = stories_layer
    w_sel, _ = get_pruner("sparsegpt")(w, h, pattern)
    ref = None
    for solver in ("cholesky", "cg"):
        w_hat, mask = optima_prune(w, h, pattern, solver=solver)
        if ref is None:
            ref = closed_form(w, h, mask)
        assert rel_err(w_hat, ref) <= 1e-5
        assert moonshot_fx.check_pattern(w_hat, pattern)
        assert moonshot_fx.reconstruction_error(w, w_hat, h) < moonshot_fx.reconstruction_error(w, w_sel, h)
