"""Sequential mode: prune in graph order, each group calibrated on already-pruned inputs.

All calibration batches advance through the graph together (:class:`GraphRunner`); when they reach
a prunable group's input, the group's statistics are accumulated over every batch, the group is
pruned, and its pruned weights are used from then on — the SparseGPT "layer by layer with
propagated outputs" loop made generic over any traced graph, at the granularity of one input
group. Only that group's statistics are alive at a time, and values die after their last user,
so memory follows the widest activation, not the depth. The run stops after the last site.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from moonshot_fx.config import SparsifyConfig

from .calibrate import StatsCollector, needs_diagonal_only
from .capture import CapturedGraph
from .discover import Site
from .prune import SiteResult, prune_group
from .runner import GraphRunner

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
    on_group: Callable[[list[SiteResult]], None] = lambda r: None,
) -> dict[str, SiteResult]:
    """Prune every site sequentially; returns name → result (the model is not modified)."""
    substitutes: dict[str, torch.Tensor] = {}
    results: dict[str, SiteResult] = {}
    collector = StatsCollector(sites, row_weights, needs_diagonal_only(config))
    remaining_nodes = {g: [n for s in ss for n, _ in zip(s.nodes, s.inputs) if collector.accumulate_at.get(n) == g]
                       for g, ss in collector.groups.items()}
    runner = GraphRunner(captured, sites, weights=substitutes)

    def on_site(node: fx.Node, site: Site, xs: list[torch.Tensor]) -> None:
        group = collector.accumulate_at.get(node.name)
        if group is None:
            return
        collector(node, site, xs)
        remaining_nodes[group].remove(node.name)
        if remaining_nodes[group]:
            return  # a parameter used at several places: prune after its last use is seen
        stats = collector.stats.pop(group)
        group_results = prune_group(collector.groups[group], stats, model, config, weights=substitutes,
                                    sample_fishers=sample_fishers, alpha=alpha)
        for r in group_results:
            substitutes[r.name] = r.weight
            results[r.name] = r
        on_group(group_results)

    with torch.no_grad():
        runner.run(flat_batches, on_site=on_site, stop_after=runner.last_site_node())
    return results
