"""``alpha="auto"`` inside the sequential pass: MOONSHOT's α chosen block by block.

The whole-model search (:mod:`moonshot_fx.alpha_search`) prunes the model once per grid α on
dense statistics and scores each candidate with the model loss: ``len(grid)`` prunes, and every
site's statistics alive at once. Here the choice is made where the pruning happens. For each
repeated block (a decoder layer, a residual block), with its statistics collected once on the
block's inputs — which come from the already-pruned earlier blocks — and the reconstruction and
Fisher terms kept apart:

1. the last ``holdout`` fraction of the calibration batches is set aside (with one batch, no
   rows are held out and the choice is made on the fitting rows; the report says so);
2. the dense block is run on those held-out inputs: its *values at the block boundary* are the
   reference — every value the block leaves alive for what follows (the residual stream and,
   before the next block's first site, that site's input), or the last site's output for the
   model's final block;
3. for each grid α the block's groups are pruned with that mix (statistics shared, only the
   mixing differs) and the pruned block is run on the held-out inputs (with ``fisher="kron"`` the
   candidates skip the joint re-solve, which only the chosen α then gets);
4. the α whose boundary values are closest to the reference (mean relative squared error over
   the boundary tensors) is kept; its pruned weights feed the next block. By default
   (``alpha_block_search="local"``) not every grid point is tried: the search descends from the
   previous block's α to the nearest local minimum on the grid (see :class:`BlockAlphaChooser`).

The statistics are the block unit's (the block's weights dense while they are gathered; see
:mod:`.sequential`), so this path runs the block loop whatever ``sequential_unit`` says. Cost on
top of a fixed-α block-unit run, with ``k`` grid points scored (``len(grid)`` for the exhaustive
search, usually 3 for the local one): ``k − 1`` more prunes of each block and ``k + 1`` runs of
the block on the held-out batches; no statistics outlive their block, and at most two
candidate weight sets (the best so far and the current one) exist at a time.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from .discover import Site
from .partition import block_key
from .prune import SiteResult
from .region import holdout_count
from .runner import GraphRunner

log = logging.getLogger(__name__)


@dataclass
class BlockAlpha:
    """The α chosen for one block and the held-out boundary error of every grid point."""

    alpha: float
    errors: dict[float, float] = field(default_factory=dict)
    #: False when there was a single calibration batch and the choice used the fitting rows
    held_out: bool = True

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (the report's ``block_alphas`` values)."""
        return {"alpha": self.alpha, "held_out_error": {f"{a:g}": e for a, e in self.errors.items()},
                "held_out": self.held_out}


def held_out_batches(nb: int, holdout: float) -> list[int]:
    """Indices of the held-out batches: the last ``round(holdout · nb)`` (at least one, leaving
    one to fit); with a single batch, that batch (nothing can be held out)."""
    if nb < 2:
        return list(range(nb))
    return list(range(nb - holdout_count(nb, holdout), nb))


def boundary_error(pruned: dict[fx.Node, list[Any]], dense: dict[fx.Node, list[Any]]) -> float:
    """Mean over the boundary tensors of ``‖p − d‖² / ‖d‖²`` (each summed over batches, float64);
    tensors that are identical in both (masks, positions) or not floating point are ignored."""
    terms = []
    for node, ds in dense.items():
        ps = pruned[node]
        err = norm = 0.0
        for p, d in zip(ps, ds, strict=True):
            if not (isinstance(d, torch.Tensor) and d.is_floating_point()):
                continue
            diff = (p.detach().double() - d.detach().double()).pow(2).sum()
            err += float(diff)
            norm += float(d.detach().double().pow(2).sum())
        if norm > 0 and err > 0:
            terms.append(err / norm)
    return sum(terms) / len(terms) if terms else 0.0


def descend(order: Sequence[float], start: int, score: Callable[[float], float]) -> float:
    """From ``order[start]``, move to the better of the two neighbours on ``order`` while one
    scores lower; returns the local minimum reached. ``score`` is called once per point it needs
    (the caller caches): the point and its neighbours, plus the neighbours of every point moved to."""
    i = start
    while True:
        here = score(order[i])
        steps = [j for j in (i - 1, i + 1) if 0 <= j < len(order)]
        if not steps:
            return order[i]
        j = min(steps, key=lambda k: score(order[k]))
        if score(order[j]) >= here:
            return order[i]
        i = j


class BlockAlphaChooser:
    """Chooses and applies the per-block α of one sequential run (module docstring).

    ``prune_candidate(groups, alpha)`` prunes ``groups`` of the current block with mix ``alpha``
    from the block's (kept) statistics, reading the dense weights of the block's sites; the
    chooser puts the candidate in ``substitutes`` while it is scored and takes it out again.
    ``final(groups, alpha)``, when given, re-prunes the chosen α in full: the
    candidates were previews (the Kronecker form scores each α on its mask and base weights, and
    only the chosen one gets the joint re-solve, which costs more than the rest of the prune).

    ``search="grid"`` scores every grid point. ``search="local"`` descends on the sorted grid: it
    starts from the previous block's choice (the first block from the grid point nearest
    ``first``), scores that point and its two neighbours, and moves to a better neighbour until
    none is better — the grid minimum whenever the error is unimodal in α, for 2–3 prunes per
    block instead of ``len(grid)`` when neighbouring blocks want the same α."""

    def __init__(self, grid: Sequence[float], holdout: float, substitutes: dict[str, torch.Tensor],
                 prune_candidate: Callable[[Sequence[str], float], list[SiteResult]],
                 final: Callable[[Sequence[str], float], list[SiteResult]] | None = None,
                 search: str = "local", first: float = 0.75):
        self.grid = [float(a) for a in grid]
        self.search = search
        self.first = float(first)
        self._start: float | None = None
        self.holdout = holdout
        self.substitutes = substitutes
        self.prune_candidate = prune_candidate
        self.final = final
        self.chosen: dict[str, BlockAlpha] = {}

    def _boundary(self, runner: GraphRunner, env: dict[fx.Node, list[Any]], pos: int, stop: fx.Node | None,
                  final_node: fx.Node) -> dict[fx.Node, list[Any]]:
        """Run from ``pos`` to just before ``stop`` (or through ``final_node`` when ``stop`` is None)
        on a copy of ``env``; returns the values computed there that are still alive."""
        scratch = dict(env)
        before = set(scratch)
        nb = len(next(iter(env.values()))) if env else 0
        if stop is None:
            runner.advance(scratch, nb, pos, stop_at=final_node)
            return {final_node: scratch[final_node]}
        runner.advance(scratch, nb, pos, stop_at=stop, execute_stop=False)
        return {n: v for n, v in scratch.items() if n not in before}

    def choose(self, runner: GraphRunner, env: dict[fx.Node, list[Any]], nb: int, pos: int,
               seg: Sequence[fx.Node], groups: Sequence[str], next_start: fx.Node | None) -> list[SiteResult]:
        """Pick the α of the block ``seg`` (its ``groups`` calibrated) and return its results; the
        chosen weights are left in ``substitutes``. ``next_start`` is the next block's first site
        node (None for the last block: its last site's output is the boundary)."""
        hold = held_out_batches(nb, self.holdout)
        henv = {n: [v[i] for i in hold] for n, v in env.items()}
        sites: list[Site] = list({s.name: s for n in seg for s in runner.sites_of_node[n]}.values())
        names = [s.name for s in sites]
        for name in names:
            self.substitutes.pop(name, None)
        reference = self._boundary(runner, henv, pos, next_start, seg[-1])
        best: tuple[float, float, list[SiteResult]] | None = None
        errors: dict[float, float] = {}

        def score(alpha: float) -> float:
            nonlocal best
            if alpha not in errors:
                candidate = self.prune_candidate(groups, alpha)
                self.substitutes.update((r.name, r.weight) for r in candidate)
                err = boundary_error(self._boundary(runner, henv, pos, next_start, seg[-1]), reference)
                for name in names:
                    self.substitutes.pop(name, None)
                errors[alpha] = err
                if best is None or err < best[0]:
                    best = (err, alpha, candidate)
                del candidate
            return errors[alpha]

        if self.search == "grid":
            for alpha in self.grid:
                score(alpha)
        else:  # descend on the sorted grid from the previous block's choice
            order = sorted(set(self.grid))
            start = self._start if self._start in order else min(order, key=lambda a: (abs(a - self.first), a))
            descend(order, order.index(start), score)
        assert best is not None
        _, alpha, results = best
        if self.final is not None:  # candidates were previews: prune the chosen α in full
            results = self.final(groups, alpha)
        key = block_key(sites[0].name) if sites else str(pos)
        self.chosen[key] = BlockAlpha(alpha=alpha, errors=errors, held_out=nb >= 2)
        self._start = alpha
        note = f"alpha {alpha:g} chosen for block {key} (held-out boundary error " + ", ".join(
            f"{a:g}: {e:.4g}" for a, e in errors.items()) + ")"
        for r in results:
            r.note = f"{r.note}; {note}" if r.note else note
        log.info("%s", note)
        self.substitutes.update((r.name, r.weight) for r in results)
        return results


__all__ = ["BlockAlpha", "BlockAlphaChooser", "boundary_error", "descend", "held_out_batches"]
