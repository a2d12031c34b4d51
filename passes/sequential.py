"""Sequential mode: prune in graph order, each part calibrated on already-pruned inputs.

All calibration batches advance through the graph together (:class:`GraphRunner`), at one of
two granularities (``SparsifyConfig.sequential_unit``):

* ``"block"`` — the SparseGPT / llm-compressor loop made generic over any traced graph: every
  group of a repeated block (a decoder layer, a residual block; see :mod:`.partition`) is
  calibrated on the block's inputs, which come from the already-pruned earlier blocks, with the
  block's own weights still dense; the block's groups are pruned, then the block is re-run with
  its pruned weights to feed the next one (each block runs twice).
* ``"group"`` — "true sequential": each input group is pruned as soon as its statistics are
  complete, so later groups of the same block (o_proj after q/k/v) already see pruned inputs.

With ``SparsifyConfig.reconstruct="region"`` the block loop runs for either unit (the group unit
prunes inside the block's calibration pass), and each pruned block is re-run region by region,
refitting each region's end to the dense region's output (:mod:`.region`).

Only one block's (or group's) statistics are alive at a time, and values die after their last
user, so memory follows the widest activation, not the depth. The run stops after the last site.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from moonshot_fx import distributed
from moonshot_fx.config import SparsifyConfig
from moonshot_fx.errors import CalibrationError, ConfigError
from moonshot_fx.memory import release_freed_memory

from .apply import WeightJournal
from .block_alpha import BlockAlphaChooser
from .calibrate import StatsCollector, accumulation_key, needs_diagonal_only
from .capture import CapturedGraph
from .discover import Site
from .prune import SiteResult, group_cost, prune_group
from .region import RegionReconstructor
from .runner import GraphRunner, SiteHook

log = logging.getLogger(__name__)


def sequential_prune(
    captured: CapturedGraph,
    model: nn.Module,
    sites: Sequence[Site],
    flat_batches: list[list[Any]],
    config: SparsifyConfig,
    *,
    row_weights: dict[str, list[torch.Tensor]] | None = None,
    sample_fishers: dict[str, torch.Tensor] | None = None,
    alpha: float | None = None,
    alpha_grid: Sequence[float] | None = None,
    on_group: Callable[[list[SiteResult]], None] = lambda r: None,
    journal: WeightJournal | None = None,
    block_alphas: dict[str, Any] | None = None,
) -> dict[str, SiteResult]:
    """Prune every site sequentially; returns name → result.

    Without ``journal`` the model is not modified: later parts run with the pruned values as
    substitutes, and each result holds its own pruned tensor. With one, each group's result is
    written into the model as soon as it is pruned (the journal keeps the dense values on disk
    for a rollback) and the result's ``weight`` is the model's own storage — no second copy of
    the pruned weights is held. Region reconstruction ignores ``journal`` (see below).

    ``alpha_grid`` (MOONSHOT, ``alpha="auto"``): choose α per block from this grid inside the
    pass (:mod:`.block_alpha`; the block loop runs, with the block unit's statistics); the choices
    are in the returned results' notes and in ``block_alphas`` (filled in when given)."""
    if config.reconstruct == "region":
        # region refits read the dense weights from the model and the pruned ones from the
        # substitutes until the end, so they keep the in-memory copy
        journal = None
    substitutes: dict[str, torch.Tensor] = {}
    results: dict[str, SiteResult] = {}
    mix_alpha = alpha if (config.method == "moonshot" and config.fisher in ("token", "row") and alpha is not None
                          and alpha < 1.0 and row_weights) else None
    if distributed.is_distributed():
        mix_alpha = None  # H_mix needs every row at once: keep H and F apart and reduce them
    collector = StatsCollector(sites, row_weights, needs_diagonal_only(config), mix_alpha=mix_alpha)

    loads = [0.0] * distributed.rank_and_world()[1]  # solve cost each rank has owned so far

    def record(group_results: list[SiteResult]) -> None:
        if journal is not None:  # into the model now; the result points at the model's storage
            written = journal.write({r.name: r.weight for r in group_results})
            for r in group_results:
                substitutes.pop(r.name, None)
                r.weight = written[r.name]
        else:
            substitutes.update((r.name, r.weight) for r in group_results)
        results.update((r.name, r) for r in group_results)
        on_group(group_results)

    def prune(*groups: str) -> None:
        """Prune ``groups`` (calibrated together), each solved by its owner rank when distributed."""
        jobs = []
        for group in groups:
            stats = collector.stats.pop(group, None)
            if stats is None:
                raise CalibrationError(f"no calibration data reached the input of {group!r}; is it used by forward?")
            jobs.append((stats, group_cost(collector.groups[group], stats)))

        def solve(j: int) -> list[SiteResult]:
            return prune_group(collector.groups[groups[j]], jobs[j][0], model, config, weights=substitutes,
                               sample_fishers=sample_fishers, alpha=alpha, release=True)

        for group_results in distributed.solve_by_owner(jobs, solve, loads):
            record(group_results)
        release_freed_memory()  # the groups' statistics and solver temporaries: back to the OS

    region = RegionReconstructor(model, config, substitutes, results) if config.reconstruct == "region" else None
    if region is not None and distributed.is_distributed():
        raise ConfigError("reconstruct='region' runs in one process only: drop it or run without torchrun.")
    chooser = None
    if alpha_grid is not None:
        if distributed.is_distributed():
            raise ConfigError("the per-block alpha search runs in one process only (use alpha_search='model').")

        def candidate(groups: Sequence[str], a: float, preview: bool = True) -> list[SiteResult]:
            out: list[SiteResult] = []
            for g in groups:
                out.extend(prune_group(collector.groups[g], collector.stats[g], model, config, weights=substitutes,
                                       sample_fishers=sample_fishers, alpha=a, release=False, preview=preview))
            return out

        chooser = BlockAlphaChooser(alpha_grid, config.region_holdout, substitutes, candidate,
                                    final=(lambda groups, a: candidate(groups, a, preview=False))
                                    if config.fisher == "kron" else None,
                                    search=config.alpha_block_search)
    if config.sequential_unit == "block" or region is not None or chooser is not None:
        group_hook = _group_hook(collector, prune) if config.sequential_unit == "group" and chooser is None else None

        def choose(runner: GraphRunner, env: dict[fx.Node, list[Any]], nb: int, pos: int, seg: list[fx.Node],
                   groups: list[str], next_start: fx.Node | None) -> None:
            assert chooser is not None
            for g in groups:
                if g not in collector.stats:
                    raise CalibrationError(f"no calibration data reached the input of {g!r}; is it used by forward?")
            chosen = chooser.choose(runner, env, nb, pos, seg, groups, next_start)
            for g in groups:
                collector.stats.pop(g, None)
            record(chosen)
            release_freed_memory()

        _run_blocks(captured, sites, flat_batches, collector, substitutes, prune, group_hook=group_hook, region=region,
                    choose=choose if chooser is not None else None)
        if chooser is not None and block_alphas is not None:
            block_alphas.update((k, v.to_dict()) for k, v in chooser.chosen.items())
        return results
    runner = GraphRunner(captured, sites, weights=substitutes)
    with torch.no_grad():
        runner.run(flat_batches, on_site=_group_hook(collector, prune), stop_after=runner.last_site_node())
    return results


def _group_hook(collector: StatsCollector, prune: Callable[[str], None]) -> SiteHook:
    """``on_site`` hook of the group unit: accumulate, and prune a group once its last use is seen."""
    remaining_nodes = {g: [accumulation_key(n, s) for s in ss for n in s.nodes
                           if collector.accumulate_at.get(accumulation_key(n, s)) == g]
                       for g, ss in collector.groups.items()}

    def on_site(node: fx.Node, site: Site, xs: list[torch.Tensor]) -> None:
        group = collector.group_at(node, site)
        if group is None:
            return
        collector(node, site, xs)
        remaining_nodes[group].remove(accumulation_key(node.name, site))
        if remaining_nodes[group]:
            return  # a parameter used at several places: prune after its last use is seen
        prune(group)

    return on_site


def _run_blocks(captured: CapturedGraph, sites: Sequence[Site], flat_batches: list[list[Any]],
                collector: StatsCollector, substitutes: dict[str, torch.Tensor],
                prune: Callable[..., None], *, group_hook: SiteHook | None = None,
                region: RegionReconstructor | None = None,
                choose: Callable[..., None] | None = None) -> None:
    """Block-level loop: per segment, calibrate and prune, then re-run the segment pruned.

    Calibration runs on a copy of the segment's inputs: with the block's weights dense, pruning
    every group after it (block unit), or through ``group_hook``, which prunes each group as its
    statistics complete (group unit, only used with ``region``). ``region`` re-runs the pruned
    segment region by region, refitting each region's end (:mod:`.region`). ``choose`` replaces
    ``prune`` for the per-block α search (:mod:`.block_alpha`)."""
    runner = GraphRunner(captured, sites, weights=substitutes)
    env = runner.start(flat_batches)
    nb, pos = len(flat_batches), 0
    with torch.no_grad():
        segs = runner.block_segments()
        for i, seg in enumerate(segs):
            last = seg[-1]
            final = i == len(segs) - 1
            # calibration pass on a copy (the last block needs none, unless it is reconstructed)
            scratch = env if final and region is None and choose is None else dict(env)
            runner.advance(scratch, nb, pos, on_site=group_hook or collector, stop_at=last, execute_stop=False)
            del scratch
            release_freed_memory()  # the calibration pass's activations
            if choose is not None:
                choose(runner, env, nb, pos, seg, list(dict.fromkeys(s.group for n in seg for s in runner.sites_of_node[n])),
                       None if final else segs[i + 1][0])
            elif group_hook is None:  # every group of the segment's nodes (a grouped expert product: one per expert)
                prune(*dict.fromkeys(s.group for n in seg for s in runner.sites_of_node[n]))
            if region is not None:
                pos = region.run_segment(runner, env, nb, pos, seg, final)
            elif not final:  # propagate with the pruned weights; nothing reads the last block's output
                _, pos = runner.advance(env, nb, pos, stop_at=last)
