"""alpha="auto" chosen per block inside the sequential pass (passes/block_alpha.py)."""
from __future__ import annotations

import copy

import pytest
import torch

import moonshot_fx
from moonshot_fx.errors import ConfigError
from moonshot_fx.masks import check_pattern
from moonshot_fx.passes.block_alpha import boundary_error, descend, held_out_batches

from test_row_fisher import tiny_llama


def _calib(n: int = 6, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 64, (2, 16), generator=g)} for _ in range(n)]


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("proj.weight")}


def test_held_out_batches_and_boundary_error() -> None:
    assert held_out_batches(8, 0.25) == [6, 7] and held_out_batches(2, 0.25) == [1]
    assert held_out_batches(1, 0.25) == [0] and held_out_batches(3, 0.9) == [1, 2]
    d = {"a": [torch.ones(2, 3)], "mask": [torch.ones(2, dtype=torch.bool)]}
    p = {"a": [torch.ones(2, 3) * 1.5], "mask": [torch.ones(2, dtype=torch.bool)]}
    assert boundary_error(p, d) == pytest.approx(0.25)  # ‖0.5‖² / ‖1‖²; the bool mask is ignored
    assert boundary_error(d, d) == 0.0


def test_single_point_grid_is_the_fixed_alpha_block_unit_run() -> None:
    """With grid (1,) the search has one candidate: the base pruner in the block unit, bit for bit."""
    calib = _calib()
    base = tiny_llama()
    searched = copy.deepcopy(base)
    moonshot_fx.sparsify(base, calibration=calib, sparsity="2:4", method="sparsegpt", sequential=True,
                         sequential_unit="block", progress=False)
    moonshot_fx.sparsify(searched, calibration=calib, sparsity="2:4", method="moonshot", base="sparsegpt",
                         alpha="auto", alpha_grid=(1.0,), sequential=True, progress=False)
    rep = searched.moonshot_report
    assert set(rep.block_alphas) == {"model.layers.0", "model.layers.1"}
    assert all(v["alpha"] == 1.0 for v in rep.block_alphas.values())
    assert rep.config["alpha_search"] == "block" and rep.config["sequential_unit"] == "block"
    for name, w in _weights(base).items():
        assert torch.equal(w, _weights(searched)[name]), name


def test_descend_reaches_the_local_minimum_scoring_only_what_it_needs() -> None:
    grid = [0.0, 0.25, 0.5, 0.75, 1.0]
    seen: list[float] = []

    def score(a: float) -> float:
        seen.append(a)
        return (a - 0.25) ** 2

    assert descend(grid, 3, score) == 0.25
    assert sorted(set(seen)) == grid  # walked 0.75 → 0.5 → 0.25, checking 0.0 and 1.0 on the way
    seen.clear()
    assert descend(grid, 1, score) == 0.25 and sorted(set(seen)) == [0.0, 0.25, 0.5]  # 3 points, not 5
    bimodal = {0.0: 0.0, 0.25: 2.0, 0.5: 1.0, 0.75: 0.5, 1.0: 0.7}
    assert descend(grid, 3, bimodal.__getitem__) == 0.75  # a local search: the far minimum is not seen
    assert descend([0.5], 0, score) == 0.5


@pytest.mark.parametrize("fisher,search", [("token", "grid"), ("row", "grid"), ("token", "local")])
def test_per_block_choice_is_the_grid_minimum_and_prunes_as_that_alpha(fisher: str, search: str) -> None:
    """Each block keeps the grid point with the lowest held-out boundary error (the exhaustive
    search scores every point; the local one at least the chosen point's neighbours); the first
    block (whose inputs are the dense model's) is pruned exactly as a fixed-α block-unit run with
    the chosen α prunes it; every weight satisfies 2:4."""
    calib = _calib()
    model = tiny_llama()
    dense = copy.deepcopy(model)
    grid = [0.0, 0.5, 1.0]
    moonshot_fx.sparsify(model, calibration=calib, sparsity="2:4", method="moonshot", alpha="auto",
                         alpha_grid=tuple(grid), fisher=fisher, sequential=True, progress=False,
                         alpha_block_search=search)
    rep = model.moonshot_report
    assert set(rep.block_alphas) == {"model.layers.0", "model.layers.1"}
    for key, v in rep.block_alphas.items():
        errors = {float(a): e for a, e in v["held_out_error"].items()}
        i = grid.index(v["alpha"])
        assert set(errors) <= set(grid) and v["held_out"]
        assert set(grid[max(i - 1, 0):i + 2]) <= set(errors)
        assert sorted(errors) == grid or search == "local"
        assert errors[v["alpha"]] == min(errors.values()) and min(errors.values()) > 0
    assert sorted(rep.block_alphas["model.layers.0"]["held_out_error"]) == ["0", "0.5", "1"]  # starts at 0.5
    assert rep.alpha is None and "alpha_search" not in rep.timings
    for s in rep.sites:
        w = dict(model.named_parameters())[s.name].detach()
        assert check_pattern(w, "2:4")
    a0 = rep.block_alphas["model.layers.0"]["alpha"]
    fixed = copy.deepcopy(dense)
    moonshot_fx.sparsify(fixed, calibration=calib, sparsity="2:4", method="moonshot", alpha=a0, fisher=fisher,
                         sequential=True, sequential_unit="block", progress=False)
    got, want = _weights(model), _weights(fixed)
    for name in [n for n in got if n.startswith("model.layers.0.")]:
        same = float(((got[name] != 0) == (want[name] != 0)).float().mean())
        assert same >= 0.99, (name, same)  # the fixed run premixes H_mix: fp32 rounding only
        assert torch.allclose(got[name], want[name], atol=1e-3, rtol=1e-2) or same < 1.0, name


def test_block_search_needs_the_sequential_pass() -> None:
    with pytest.raises(ConfigError, match="alpha_search='block'"):
        moonshot_fx.sparsify(tiny_llama(), calibration=_calib(2), sparsity=0.5, method="moonshot", alpha="auto",
                             alpha_search="block", sequential=False, progress=False)
    with pytest.raises(ConfigError, match="alpha_search"):
        moonshot_fx.SparsifyConfig(alpha_search="layer")
    with pytest.raises(ConfigError, match="alpha_block_search"):
        moonshot_fx.SparsifyConfig(alpha_block_search="golden")


def test_kron_candidates_are_previews_and_the_chosen_alpha_is_pruned_in_full() -> None:
    """fisher="kron": candidates skip the joint re-solve, the chosen α gets it — so a one-point grid
    equals the fixed-α block-unit Kronecker run bit for bit (neither premixes H_mix)."""
    calib = _calib()
    fixed, searched = tiny_llama(), tiny_llama()
    moonshot_fx.sparsify(fixed, calibration=calib, sparsity="2:4", method="moonshot", alpha=0.5, fisher="kron",
                         sequential=True, sequential_unit="block", progress=False)
    moonshot_fx.sparsify(searched, calibration=calib, sparsity="2:4", method="moonshot", alpha="auto",
                         alpha_grid=(0.5,), fisher="kron", sequential=True, progress=False)
    assert searched.moonshot_report.kron_sites
    for name, w in _weights(fixed).items():
        assert torch.equal(w, _weights(searched)[name]), name
