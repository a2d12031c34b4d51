"""Calibration pass: stream batches through the graph and accumulate per-site statistics.

* :func:`collect_hessians` — ``H = XᵀX`` per input group (q/k/v and gate/up share one), the
  token-level Fisher ``Xᵀdiag(‖δ_t‖²)X`` when row weights are given; no activation is kept beyond
  the batch in flight; the run stops after the last prunable node (an LM's logits are never made).
* :func:`collect_gradients` — one backward pass per batch of the model's loss, recorded at every
  site's output: token-level row weights ``‖δ_t‖²`` (tiny: one float per row) and/or the
  sample-level Fisher ``Σ_k G_kᵀG_k``. Weight gradients are never formed (``autograd.grad`` on
  the site outputs only).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx

from moonshot_fx.config import SparsifyConfig
from moonshot_fx.errors import CalibrationError
from moonshot_fx.memory import release_freed_memory
from moonshot_fx.stats import (LayerStats, accumulate_hessian, input_rows, kron_output_factor, output_rows, sample_fisher, squared_row_norms,
                               token_fisher,
                               weight_fisher_diagonal)

from .capture import CapturedGraph
from .discover import Site
from .losses import LossFn, default_loss, is_label_free_classifier, output_logits  # noqa: F401 - re-exported
from .runner import GraphRunner
from .segment_backward import backward_by_segments, block_cuts

log = logging.getLogger(__name__)

def needs_diagonal_only(config: "SparsifyConfig") -> bool:
    """Wanda (also as MOONSHOT's base) reads only Hessian diagonals: skip the d×d products."""
    return config.method == "wanda" or (config.method == "moonshot" and config.base == "wanda"
                                        and config.fisher != "sample")


def accumulation_key(node: str, site: Site) -> str:
    """Key of one accumulation point: the node name, or ``"node|site"`` for an expert slice
    (the experts of a 3-D parameter share one grouped-product node, each with its own rows)."""
    return node if site.slice_index is None else f"{node}|{site.name}"


def accumulating_nodes(sites: Sequence[Site]) -> dict[str, str]:
    """accumulation key (:func:`accumulation_key`) → group, for the nodes whose input is
    accumulated (one node per shared input)."""
    out: dict[str, str] = {}
    seen: set[str] = set()
    for s in sites:
        for node, inp in zip(s.nodes, s.inputs):
            key = accumulation_key(node, s)
            if len(s.nodes) > 1:
                out[key] = s.group
            elif s.group not in seen:
                out[key] = s.group
                seen.add(s.group)
    return out


def group_sites(sites: Sequence[Site]) -> dict[str, list[Site]]:
    """group → its sites, in graph order."""
    groups: dict[str, list[Site]] = {}
    for s in sites:
        groups.setdefault(s.group, []).append(s)
    return groups


class StatsCollector:
    """The ``on_site`` hook that accumulates statistics into ``stats`` (group → LayerStats)."""

    def __init__(self, sites: Sequence[Site], row_weights: dict[str, list[torch.Tensor]] | None = None,
                 diagonal_only: bool = False, mix_alpha: float | None = None):
        self.sites = list(sites)
        self.diagonal_only = diagonal_only
        #: MOONSHOT's fixed α (token Fisher): form each site's H_mix in one product when a call
        #: brings all of a group's rows (the sequential passes), instead of XᵀX plus Xᵀdiag(w)X
        self.mix_alpha = mix_alpha
        self.accumulate_at = accumulating_nodes(self.sites)
        self.groups = group_sites(self.sites)
        self.stats: dict[str, LayerStats] = {}
        self.row_weights = row_weights or {}
        self.batch_offset = 0  # index of the first batch of the current run in row_weights
        self.cursor: dict[tuple[str, int], int] = {}  # (site, batch) -> rows consumed so far

    def group_at(self, node: fx.Node, site: Site) -> str | None:
        """The group whose statistics ``site``'s input at ``node`` feeds, if accumulated there."""
        return self.accumulate_at.get(accumulation_key(node.name, site))

    def __call__(self, node: fx.Node, site: Site, xs: list[torch.Tensor]) -> None:
        group = self.group_at(node, site)
        if group is None:
            return
        st = self.stats.setdefault(group, LayerStats(diagonal_only=self.diagonal_only))
        if self._mix_directly(group, st):
            rows = [input_rows(x.detach(), site.kind, site.conv) for x in xs]
            norms = squared_row_norms(rows)  # shared by the group's sites
            for s in self.groups[group]:
                weights = [self.row_weights[s.name][self.batch_offset + b] for b in range(len(rows))]
                if any(w.shape[0] != r.shape[0] for w, r in zip(weights, rows)):
                    raise CalibrationError(f"{s.name}: the gradient pass saw other inputs than calibration does")
                st.add_mixed(s.name, rows, weights, float(self.mix_alpha), norms)  # type: ignore[arg-type]
            st.rows += sum(r.shape[0] for r in rows)
            st.batches += len(rows)
            return
        for b, x in enumerate(xs):
            rows = input_rows(x.detach(), site.kind, site.conv)
            st.add_rows(rows)
            for s in self.groups[group]:
                weights = self.row_weights.get(s.name)
                if weights is not None:
                    key = (s.name, self.batch_offset + b)
                    start = self.cursor.get(key, 0)
                    w = weights[self.batch_offset + b][start : start + rows.shape[0]]
                    self.cursor[key] = start + rows.shape[0]
                    st.add_token_fisher(s.name, rows, w)

    def _mix_directly(self, group: str, st: LayerStats) -> bool:
        """Whether this group's H_mix can be formed from this one call's rows: a fixed α, full
        matrices, every site with row weights and used at one place only, nothing accumulated yet."""
        return (self.mix_alpha is not None and not self.diagonal_only and st.hessian is None and not st.mixed
                and all(len(s.nodes) == 1 and s.name in self.row_weights for s in self.groups[group]))


def collect_hessians(
    captured: CapturedGraph,
    sites: Sequence[Site],
    flat_batches: Iterable[list[Any]],
    *,
    row_weights: dict[str, list[torch.Tensor]] | None = None,
    diagonal_only: bool = False,
    progress: Callable[[Iterable[Any]], Iterable[Any]] = lambda x: x,
) -> dict[str, LayerStats]:
    """Accumulate statistics of every group over ``flat_batches`` (one batch in flight)."""
    runner = GraphRunner(captured, sites)
    collector = StatsCollector(sites, row_weights, diagonal_only)
    stop = runner.last_site_node()
    with torch.no_grad():
        for i, flat in enumerate(progress(flat_batches)):
            collector.batch_offset = i
            runner.run([flat], on_site=collector, stop_after=stop)
    missing = {s.group for s in sites} - set(collector.stats)
    if missing:
        raise CalibrationError(f"no calibration data reached the inputs {sorted(missing)[:4]}; are they used by forward?")
    return collector.stats


def split_batch(args: tuple[Any, ...], kwargs: dict[str, Any], size: int) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """Split a batch along dim 0 into chunks of ``size`` samples (non-tensors are shared)."""
    from torch.utils import _pytree as pytree

    leaves = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor) and x.dim() > 0]
    if size < 1 or not leaves or len({x.shape[0] for x in leaves}) != 1 or leaves[0].shape[0] <= size:
        return [(args, kwargs)]
    n = leaves[0].shape[0]
    out = []
    for start in range(0, n, size):
        pick = lambda x: x[start:start + size] if isinstance(x, torch.Tensor) and x.dim() > 0 else x  # noqa: E731
        out.append(pytree.tree_map(pick, (args, kwargs)))
    return out


def _kron_fits(site: Site, limit: int | None) -> bool:
    d_out, d_in = site.shape[0], math.prod(site.shape[1:])
    return limit is None or max(d_out, d_in) <= limit


def collect_gradients(
    captured: CapturedGraph,
    sites: Sequence[Site],
    batches: Sequence[tuple[tuple[Any, ...], dict[str, Any]]],
    *,
    kind: str = "token",
    loss_fn: LossFn | None = None,
    micro_batch: int = 1,
    clusters: dict[str, int] | None = None,
    kron_max_width: int | None = None,
    progress: Callable[[Iterable[Any]], Iterable[Any]] = lambda x: x,
    segmented: bool = True,
) -> tuple[dict[str, list[torch.Tensor]], dict[str, torch.Tensor], float]:
    """Backward passes of the loss; returns ``(row_weights, sample_fisher, mean_loss)``.

    ``row_weights[site][b]`` are ``‖δ_t‖²`` for the rows of batch ``b`` (token kind), or
    ``(rows, C)`` with ``Σ_{i∈c} δ_ti²`` for the ``clusters[site] = C`` equal blocks of output
    rows (row kind; experts and sites missing from ``clusters`` get ``C = 1``); the kron kind
    gives the token kind's ``row_weights`` and, in ``sample_fisher[site]``, the Kronecker output
    factor ``G = Σ_t ‖x_t‖² δ_t δ_tᵀ`` (``d_out × d_out``; expert slices: their token Fisher; not
    gathered for a site wider than ``kron_max_width`` in either dimension);
    ``sample_fisher[site]`` is ``Σ_k G_kᵀG_k`` over all samples (sample kind, fp32), or the
    per-weight diagonal ``Σ_t δ_ti² x_tj²`` shaped like the weight matrix (weight kind).
    With the default loss the backward runs ``micro_batch`` samples at a time, so the memory of
    autograd's saved activations (and an LM's logits) does not grow with the batch size; with
    ``segmented`` (default) it also runs one repeated block at a time
    (:mod:`.segment_backward`), so it does not grow with depth either.
    """
    loss_fn = loss_fn or default_loss
    splittable = loss_fn is default_loss or getattr(loss_fn, "per_sample", False)
    clusters = clusters or {}
    runner = GraphRunner(captured, sites)
    cuts = block_cuts(runner) if segmented else []
    node_order = {n.name: i for i, n in enumerate(runner.nodes)}
    params = [p for p in captured.gm.parameters()]
    flags = [p.requires_grad for p in params]
    plain = [s for s in sites if s.slice_index is None]
    row_weights: dict[str, list[torch.Tensor]] = {s.name: [] for s in plain}
    fishers: dict[str, torch.Tensor] = {}
    expert_rows: dict[str, int] = {}
    total, count = 0.0, 0
    try:
        for p in params:
            p.requires_grad_(True)
        for b_args, b_kwargs in progress(batches):
            # the default loss reads everything from the batch, so the backward can run on
            # micro-batches (exact: losses are per sample); a user loss_fn sees whole batches
            chunks = split_batch(b_args, b_kwargs, micro_batch) if splittable else [(b_args, b_kwargs)]
            if not all(captured.matches(a, k) for a, k in chunks):
                chunks = [(b_args, b_kwargs)]  # a static-shape graph runs whole batches only
            batch_rows: dict[str, list[list[torch.Tensor]]] = {s.name: [] for s in sites}  # site -> use -> chunks
            for args, kwargs in chunks:
                inputs: dict[tuple[str, str], list[torch.Tensor]] = {}  # (node, site) -> per batch
                outputs: dict[str, list[torch.Tensor]] = {}
                node_sites: dict[str, list[Site]] = {}

                def on_site(node: fx.Node, site: Site, xs: list[torch.Tensor]) -> None:
                    inputs[(node.name, site.name)] = [x.detach() for x in xs]
                    node_sites.setdefault(node.name, []).append(site)

                def on_output(node: fx.Node, outs: list[Any]) -> None:
                    outputs[node.name] = outs

                def losses_of(flat_out: list[Any], args: Any = args, kwargs: Any = kwargs) -> torch.Tensor:
                    out = loss_fn(captured.unflatten(flat_out), args, kwargs)
                    if out.dim() != 1:
                        raise CalibrationError("loss_fn must return per-sample losses of shape (batch,)")
                    return out

                # block by block with recomputation (bounded memory), else one backward
                seg = backward_by_segments(runner, captured.flat_inputs(args, kwargs), losses_of, cuts,
                                           on_site) if cuts else None
                if seg is not None:
                    losses, seg_outputs, seg_grads = seg
                    names = sorted(seg_outputs, key=node_order.__getitem__)  # graph order, as below
                    outputs.update({n: [seg_outputs[n]] for n in names})
                    grads = tuple(seg_grads[n] for n in names)
                    del seg, seg_outputs, seg_grads
                else:
                    with torch.enable_grad():
                        flat = runner.run([captured.flat_inputs(args, kwargs)], on_site=on_site, on_output=on_output)
                        assert flat is not None
                        losses = losses_of(flat[0])
                        names = list(outputs)
                        grads = torch.autograd.grad(losses.sum(), [outputs[n][0] for n in names], allow_unused=True)
                total += float(losses.detach().sum())
                count += losses.shape[0]
                samples = losses.shape[0]
                per_site: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # site -> (input, δ rows) per use
                by_name = {n.name: n for n in runner.site_of_node}
                for name, g in zip(names, grads):
                    grad = torch.zeros_like(outputs[name][0]) if g is None else g.detach()
                    for site in node_sites[name]:
                        rows = runner.rows_of(by_name[name], site)  # an expert's routed rows only
                        d = output_rows(grad if rows is None else grad[rows], site.kind)
                        per_site.setdefault(site.name, []).append((inputs[(name, site.name)][0], d))
                for site in sites:
                    pairs = per_site.get(site.name, [])
                    if kind in ("token", "row", "kron") and site.slice_index is not None:
                        # an expert's rows are the tokens routed to it, which pruning earlier layers
                        # changes (sequential mode): its token Fisher is formed here, on the dense model
                        for x, d in pairs:
                            w = d.to(torch.float32).square().sum(dim=1)
                            rows = input_rows(x, site.kind, site.conv)
                            fishers[site.name] = accumulate_hessian(fishers.get(site.name), rows, w)
                            expert_rows[site.name] = expert_rows.get(site.name, 0) + rows.shape[0]
                    elif kind in ("token", "row", "kron"):
                        uses = batch_rows[site.name]
                        while len(uses) < len(pairs):
                            uses.append([])
                        for u, (_, d) in enumerate(pairs):
                            sq = d.to(torch.float32).square()
                            if kind == "row":  # (rows, C): squared gradients summed per row cluster
                                uses[u].append(sq.reshape(sq.shape[0], clusters.get(site.name, 1), -1).sum(dim=2))
                            else:
                                uses[u].append(sq.sum(dim=1))
                        if kind == "kron" and _kron_fits(site, kron_max_width):  # the output factor G = Σ_t ‖x_t‖² δ_t δ_tᵀ, reduced on the fly
                            for x, d in pairs:
                                g = kron_output_factor(input_rows(x, site.kind, site.conv), d)
                                fishers[site.name] = fishers[site.name].add_(g) if site.name in fishers else g
                    elif kind == "weight":
                        for x, d in pairs:
                            upd = weight_fisher_diagonal(input_rows(x, site.kind, site.conv), d)
                            fishers[site.name] = fishers[site.name].add_(upd) if site.name in fishers else upd
                    else:
                        for x, d in pairs:
                            rows = input_rows(x, site.kind, site.conv)
                            if site.slice_index is not None and samples > 1:
                                # an expert's routed rows do not say which sample they came from
                                # (a user loss_fn runs whole batches): token-level Fisher for it
                                upd = token_fisher(rows, d).to(torch.float32)
                            else:
                                upd = sample_fisher(rows, d, samples).to(torch.float32)
                            fishers[site.name] = fishers[site.name].add_(upd) if site.name in fishers else upd
                inputs.clear()
                outputs.clear()
                del grads, per_site
                release_freed_memory()  # the chunk's activations: back to the OS, not kept in the heap
            if kind in ("token", "row", "kron"):  # per batch: uses in graph order, each over all its samples
                for site in plain:
                    row_weights[site.name].append(torch.cat([torch.cat(parts) for parts in batch_rows[site.name]]))
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    for name, n in expert_rows.items():  # the mean over the expert's rows, as LayerStats.mean_fisher
        fishers[name] = (fishers[name] / max(1, n)).to(torch.float32)
    if not all(torch.isfinite(f).all() for f in fishers.values()):
        raise CalibrationError("non-finite gradients during the Fisher pass; check the loss and inputs.")
    return row_weights, fishers, total / max(1, count)
