"""Prune pass: turn a group's statistics into new weights (graph-free; calls the pure pruners).

Weights are read from ``weights`` (substitutes from earlier groups) or the parameter itself and
never written here: :mod:`moonshot_fx.passes.apply` writes all results at the end, so a failure
leaves the user's model untouched.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from moonshot_fx import distributed
from moonshot_fx.config import SparsifyConfig
from moonshot_fx.linalg import inverse_cholesky_upper, prepare_hessian
from moonshot_fx.progress import progress_bar
from moonshot_fx.pruners import cluster_quadratic_error, prune_layer
from moonshot_fx.stats import LayerStats

from .calibrate import group_sites
from .discover import Site
from .experts import split_slice_name


@dataclass
class SiteResult:
    """What pruning one site produced."""

    name: str
    weight: torch.Tensor  # new value, shaped like the parameter
    pattern: str
    sparsity: float  # achieved fraction of zeros
    #: ‖X(W−Ŵ)ᵀ‖² / ‖XWᵀ‖² on the calibration statistics: tr(ΔCΔᵀ)/tr(WCWᵀ) with C = H, or
    #: MOONSHOT's H_mix where the sequential pass formed it instead of H (token Fisher, fixed α)
    rel_error: float
    seconds: float
    #: how the site was handled when that differs from the method (e.g. an expert no
    #: calibration token reached, pruned by magnitude)
    note: str = ""
    #: non-empty: the site was left dense for this reason (``weight`` is its unchanged value;
    #: the caller reports it in ``report.skipped`` and does not write it)
    skipped: str = ""
    #: the rank that solved it under torch.distributed (0 in one process)
    solved_by: int = 0


def parameter(model: nn.Module, name: str) -> torch.Tensor:
    """The parameter called ``name`` in ``model``; for an expert slice ``"<param>[e]"`` the view
    ``param[e]`` of the 3-D parameter (see :mod:`moonshot_fx.passes.experts`)."""
    base, index = split_slice_name(name)
    if index is None:
        return model.get_parameter(name)
    return model.get_parameter(base)[index]


UNROUTED_NOTE = "no calibration token was routed to this expert: pruned by magnitude"
UNROUTED_DENSE = "no calibration token was routed to this expert: left dense (unrouted_experts='dense')"


def to_matrix(site: Site, w: torch.Tensor) -> torch.Tensor:
    """Parameter value → the ``(out, in·k)`` matrix the pruners see."""
    return w.T if site.transposed else w.reshape(w.shape[0], -1)


def from_matrix(site: Site, m: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_matrix`."""
    return m.T.contiguous() if site.transposed else m.reshape(site.shape)


def prune_group(
    sites: list[Site],
    stats: LayerStats,
    model: nn.Module,
    config: SparsifyConfig,
    *,
    weights: dict[str, torch.Tensor] | None = None,
    sample_fishers: dict[str, torch.Tensor] | None = None,
    alpha: float | None = None,
    release: bool = False,
    preview: bool = False,
) -> list[SiteResult]:
    """Prune every site of one input group against the group's shared Hessian.

    ``release``: the caller is done with ``stats`` — its fp64 ``XᵀX`` is dropped as soon as the
    fp32 mean is formed (for a 13824-wide input that is 1.5 GB less during the solves).
    ``preview``: MOONSHOT's Kronecker form skips its joint re-solve (the mask and the base
    pruner's weights only; the per-block α search scores candidates so)."""
    weights = weights or {}
    if config.method != "magnitude" and stats.rows == 0 and sites and all(s.slice_index is not None for s in sites):
        return [_unrouted(site, model, config, weights) for site in sites]
    # MOONSHOT's H_mix formed directly per site (sequential, token Fisher): no shared H exists
    H = stats.mean_hessian() if config.method != "magnitude" and not stats.mixed else None
    if release and H is not None:
        stats.hessian = None
    shared_u = None
    if config.method in ("sparsegpt", "admm") and H is not None and len(sites) > 1:  # admm: its warm start
        prepared, _ = prepare_hessian(H)
        shared_u = inverse_cholesky_upper(prepared, config.dampening)
    results = []
    for site in sites:
        t0 = time.perf_counter()
        param = weights.get(site.name, parameter(model, site.name)).detach()
        device = torch.device(config.device) if config.device else param.device
        W = to_matrix(site, param).to(device=device, dtype=torch.float32)
        pattern = config.pattern_for(site.name)
        options: dict[str, Any] = {"dampening": config.dampening, "blocksize": config.blocksize}
        if shared_u is not None:
            options["hinv_upper"] = shared_u
        mixed = stats.mixed_hessian(site.name)
        if config.method == "moonshot":
            if mixed is None:  # else H_mix already: the base pruner runs on it as is
                fisher = None
                if config.fisher in ("token", "row", "kron") and site.name in stats.fisher:  # row: (C, d, d)
                    fisher = stats.mean_fisher(site.name)
                    if config.fisher == "kron" and sample_fishers and site.name in sample_fishers:
                        options["kron_g"] = sample_fishers[site.name]  # the output factor G (d_out²)
                elif sample_fishers is not None and site.name in sample_fishers:
                    fisher = sample_fishers[site.name].to(torch.float32)
                options["weight_fisher" if config.fisher == "weight" else "fisher"] = fisher
            options.update(alpha=config.alpha if alpha is None else alpha, base=config.base)
            if preview:
                options["kron_resolve"] = False
            if config.base == "optima":
                options["mask_from"] = config.mask_from
        elif config.method == "optima":
            options["mask_from"] = config.mask_from
        curvature = mixed if mixed is not None else H
        Hd = curvature.to(device) if curvature is not None else None
        new, _ = prune_layer(W, Hd, pattern, method=config.method, **options)
        if Hd is not None and not stats.diagonal_only:
            base = cluster_quadratic_error(W, W.new_zeros(()).expand_as(W), Hd)  # zeros without their storage
            rel = cluster_quadratic_error(W, new, Hd) / base if base > 0 else 0.0
        else:
            rel = float("nan")
        value = from_matrix(site, new.to(param.dtype)).to(param.device)
        results.append(SiteResult(
            name=site.name, weight=value, pattern=str(pattern), sparsity=float((new == 0).float().mean()),
            rel_error=rel, seconds=time.perf_counter() - t0,
        ))
    return results


def _unrouted(site: Site, model: nn.Module, config: SparsifyConfig, weights: dict[str, torch.Tensor]) -> SiteResult:
    """An expert slice without calibration rows: magnitude-pruned, or left dense
    (``config.unrouted_experts``)."""
    t0 = time.perf_counter()
    param = weights.get(site.name, parameter(model, site.name)).detach()
    pattern = config.pattern_for(site.name)
    if config.unrouted_experts == "dense":
        return SiteResult(name=site.name, weight=param, pattern="dense", sparsity=float((param == 0).float().mean()),
                          rel_error=float("nan"), seconds=time.perf_counter() - t0, skipped=UNROUTED_DENSE)
    device = torch.device(config.device) if config.device else param.device
    W = to_matrix(site, param).to(device=device, dtype=torch.float32)
    new, _ = prune_layer(W, None, pattern, method="magnitude")
    value = from_matrix(site, new.to(param.dtype)).to(param.device)
    return SiteResult(name=site.name, weight=value, pattern=str(pattern), sparsity=float((new == 0).float().mean()),
                      rel_error=float("nan"), seconds=time.perf_counter() - t0, note=UNROUTED_NOTE)


class NoStats:
    """Stand-in statistics for data-free magnitude pruning."""

    fisher: dict[str, torch.Tensor] = {}
    mixed: dict[str, torch.Tensor] = {}
    diagonal_only = False
    rows = 0

    def mean_hessian(self) -> None:  # pragma: no cover - never called for magnitude
        return None

    def mixed_hessian(self, site: str) -> None:
        """No H_mix: prune_group asks every site, and magnitude needs no curvature."""
        return None


def prune_all_groups(model: nn.Module, sites: list[Site], stats: dict[str, Any], cfg: SparsifyConfig,
                     sample_fishers: dict[str, torch.Tensor] | None, alpha: float | None,
                     progress: bool = False) -> dict[str, SiteResult]:
    """Prune every input group with its statistics ``stats[group]`` (pure maths, nothing is
    written into the model); returns site name → result. Under torch.distributed each group is
    solved by its owner rank and broadcast (:func:`moonshot_fx.distributed.solve_by_owner`)."""
    groups = group_sites(sites)
    names = sorted(groups)  # the same order on every rank
    jobs = [(stats[g], group_cost(groups[g], stats[g])) for g in names]
    ticks = iter(progress_bar(progress, "prune", len(names))(names))

    def solve(j: int) -> list[SiteResult]:
        next(ticks, None)
        return prune_group(groups[names[j]], jobs[j][0], model, cfg, sample_fishers=sample_fishers, alpha=alpha)

    results = {r.name: r for rs in distributed.solve_by_owner(jobs, solve) for r in rs}
    for _ in ticks:  # under torch.distributed this rank solved only its own groups
        pass
    return results


def group_cost(sites: list[Site], stats: Any) -> float:
    """The solve cost of one input group (:func:`moonshot_fx.distributed.solve_cost`)."""
    return distributed.solve_cost([s.shape for s in sites], getattr(stats, "diagonal_only", False))
