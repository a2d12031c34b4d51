"""Region reconstruction inside the block-sequential pass (``SparsifyConfig.reconstruct="region"``).

After a block's sites are pruned, the block is re-run region by region. A *region* is the part of
a block between two *region ends*: site nodes whose output reaches a residual add (without passing
another site) whose other operand is the region's skip input — a value that feeds the input of
this or an earlier site of the block without passing a site (attention's ``o_proj`` and the MLP's
``down_proj`` in a decoder layer, the last conv of a residual branch). For each end, in order:

1. the *dense* region is run on the block's current (pruned, already reconstructed) values: the
   region's sites read their dense weights, everything before the region its pruned ones; the
   end's input there is ``X_d``;
2. the pruned model is run up to the end: its input there is ``X_p``;
3. the end's kept weights are refit, mask fixed, so that ``X_p Ŵᵀ ≈ X_d W_dᵀ`` — the dense
   region's output on the same inputs (:func:`moonshot_fx.region.refit_with_holdout`), on the
   first batches, and kept only where the region error on the held-out batches
   (``SparsifyConfig.region_holdout``; with one batch, its last rows) drops;
4. the pruned run continues through the end with the weights chosen.

Memory: besides the block's own activations, one end's ``X_d`` per batch (kept until ``X_p``
arrives) and one ``d_in × d_in`` pair of sums; nothing survives the block. Time: every region runs
once more (dense) than block-sequential pruning does, plus one matrix refit per end.
"""
from __future__ import annotations

import contextlib
import logging
import operator
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from moonshot_fx.config import SparsifyConfig
from moonshot_fx.region import RegionFit, refit_with_holdout
from moonshot_fx.stats import input_rows

from .discover import Site
from .prune import SiteResult, from_matrix, parameter, to_matrix
from .runner import GraphRunner

log = logging.getLogger(__name__)

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add, torch.Tensor.add, torch.Tensor.add_,
                  torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor}


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADD_FUNCTIONS
    return node.op == "call_method" and node.target in ("add", "add_")


def _input_node(node: fx.Node, site: Site) -> fx.Node:
    name = site.inputs[site.nodes.index(node.name)]
    return next(a for a in node.all_input_nodes if a.name == name)


def _upstream_without_sites(start: fx.Node, site_nodes: set[fx.Node], into: set[fx.Node]) -> None:
    """Add ``start`` and every node it is computed from without passing a site node to ``into``."""
    stack = [start]
    while stack:
        n = stack.pop()
        if n in into or n in site_nodes:
            continue
        into.add(n)
        stack.extend(n.all_input_nodes)


def _reaches_residual_add(node: fx.Node, site_nodes: set[fx.Node], skips: set[fx.Node]) -> bool:
    """Whether ``node``'s output reaches, without passing a site, an add with an operand in ``skips``."""
    stack, seen = [node], {node}
    while stack:
        n = stack.pop()
        for u in n.users:
            if u in seen or u in site_nodes:
                continue
            seen.add(u)
            if _is_add(u) and any(a in skips for a in u.all_input_nodes if a is not n):
                return True
            stack.append(u)
    return False


@dataclass
class Region:
    """One region of a block: its end node and site, and the sites it spans (end included)."""

    end: fx.Node
    site: Site
    sites: list[Site]


def block_regions(runner: GraphRunner, seg_nodes: Sequence[fx.Node]) -> list[Region]:
    """The regions of one segment (graph order), see the module docstring. Ends are ordinary
    single-use sites (no expert slice, no weight shared between several nodes)."""
    site_nodes = set(runner.site_of_node)
    skips: set[fx.Node] = set()
    out: list[Region] = []
    spanned: list[Site] = []
    for node in seg_nodes:
        node_sites = runner.sites_of_node[node]
        spanned.extend(s for s in node_sites if s not in spanned)
        for s in node_sites:
            _upstream_without_sites(_input_node(node, s), site_nodes, skips)
        if len(node_sites) != 1 or node_sites[0].slice_index is not None or len(node_sites[0].nodes) != 1:
            continue
        if _reaches_residual_add(node, site_nodes, skips):
            out.append(Region(end=node, site=node_sites[0], sites=spanned))
            spanned = []
    return out


@contextlib.contextmanager
def _dense(weights: dict[str, torch.Tensor], names: Sequence[str]) -> Iterator[None]:
    """Temporarily remove ``names`` from the substitutes (their sites read the dense weights)."""
    saved = {n: weights.pop(n) for n in names if n in weights}
    try:
        yield
    finally:
        weights.update(saved)


def holdout_count(n: int, holdout: float) -> int:
    """How many of ``n ≥ 2`` batches (or rows) to hold out: ``round(holdout · n)``, at least one,
    leaving at least one to fit."""
    return min(n - 1, max(1, round(holdout * n)))


def split_rows(rows: list[torch.Tensor], holdout: float) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """``(fit, held-out)`` row batches: the last ``holdout`` fraction of the batches (at least one,
    leaving at least one to fit), or with one batch its last rows; None when there are fewer
    than two rows."""
    if len(rows) >= 2:
        n_hold = holdout_count(len(rows), holdout)
        return rows[:-n_hold], rows[-n_hold:]
    n = rows[0].shape[0]
    if n < 2:
        return None
    n_hold = holdout_count(n, holdout)
    return [rows[0][:-n_hold]], [rows[0][-n_hold:]]


def region_note(fit: RegionFit) -> str:
    """The report note of one refit (``kept`` or ``reverted``, with the held-out errors)."""
    if fit.kept:
        return f"region refit kept: held-out region error {fit.holdout_before:.4g} -> {fit.holdout_after:.4g}"
    return (f"region refit reverted: held-out region error {fit.holdout_before:.4g} "
            f"(refit {fit.holdout_refit:.4g})")


class RegionReconstructor:
    """Runs a pruned segment region by region, refitting each region end (module docstring).

    ``fits`` collects ``site name → RegionFit`` for every refit tried.
    """

    def __init__(self, model: nn.Module, config: SparsifyConfig, substitutes: dict[str, torch.Tensor],
                 results: dict[str, SiteResult]):
        self.model = model
        self.config = config
        self.substitutes = substitutes
        self.results = results
        self.fits: dict[str, RegionFit] = {}

    def run_segment(self, runner: GraphRunner, env: dict[fx.Node, list[Any]], nb: int, pos: int,
                    seg_nodes: Sequence[fx.Node], final: bool) -> int:
        """Advance ``env`` from ``pos`` through the (pruned) segment, refitting its region ends;
        returns the next node index (the segment's last node is executed unless ``final``)."""
        for region in block_regions(runner, seg_nodes):
            if region.site.name not in self.substitutes:
                continue  # not pruned (yet): nothing to reconstruct
            grab_d: list[torch.Tensor] = []
            grab_p: list[torch.Tensor] = []

            def grab(into: list[torch.Tensor], end: fx.Node = region.end) -> Any:
                def hook(node: fx.Node, site: Site, xs: list[torch.Tensor]) -> None:
                    if node is end:
                        into.extend(x.detach() for x in xs)
                return hook

            scratch = dict(env)
            with _dense(self.substitutes, [s.name for s in region.sites]):
                runner.advance(scratch, nb, pos, on_site=grab(grab_d), stop_at=region.end, execute_stop=False)
            del scratch
            _, pos = runner.advance(env, nb, pos, on_site=grab(grab_p), stop_at=region.end, execute_stop=False)
            self._refit(region.site, grab_p, grab_d)
            del grab_d, grab_p
        if not final:
            _, pos = runner.advance(env, nb, pos, stop_at=seg_nodes[-1])
        return pos

    def _refit(self, site: Site, xs_p: list[torch.Tensor], xs_d: list[torch.Tensor]) -> None:
        rows_p = [input_rows(x, site.kind, site.conv) for x in xs_p]
        rows_d = [input_rows(x, site.kind, site.conv) for x in xs_d]
        split_p = split_rows(rows_p, self.config.region_holdout)
        split_d = split_rows(rows_d, self.config.region_holdout)
        result = self.results[site.name]
        if split_p is None or split_d is None:
            result.note = _join(result.note, "region refit skipped: fewer than two calibration rows")
            return
        value = self.substitutes[site.name]
        device = torch.device(self.config.device) if self.config.device else value.device
        pruned = to_matrix(site, value).to(device=device, dtype=torch.float32)
        dense = to_matrix(site, parameter(self.model, site.name).detach()).to(device=device, dtype=torch.float32)
        on = [[r.to(device) for r in part] for part in (*split_p, *split_d)]
        fit = refit_with_holdout(pruned, dense, on[0], on[2], on[1], on[3], dampening=self.config.dampening)
        self.fits[site.name] = fit
        if fit.kept:
            new = from_matrix(site, fit.weight.to(value.dtype)).to(value.device)
            self.substitutes[site.name] = new
            result.weight = new
        result.note = _join(result.note, region_note(fit))
        log.info("%s: %s", site.name, region_note(fit))


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a else b
