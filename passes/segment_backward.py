"""The Fisher pass's backward, one repeated block at a time (recomputation, bounded memory).

MOONSHOT needs ``δ = ∂loss/∂(site output)`` for every site. One backward through the whole
graph keeps autograd's saved tensors of every layer alive at once (SmolLM2-135M, one 512-token
sample: about 2 GB of fp32 activations), so the gradient pass, not pruning, set the peak memory.
Here the graph is cut after the last site node of each repeated block (the segments of
:mod:`.partition`):

1. a forward pass without autograd keeps only the values alive at each cut (for a decoder: the
   residual stream and the shared position tensors, a few MB per cut);
2. the segments are then re-run from the last to the first, each from its cut's values turned
   into leaves that require grad: the last one through the loss, every other one with the
   gradients its successor returned for the values at the next cut as ``grad_outputs``.

Each backward yields the gradients of the segment's site outputs and of its starting values, so
only one segment's autograd graph exists at a time: memory is one block's activations plus the
head's, independent of depth, at the cost of a second forward. The gradients are those of the
single backward (the chain rule split at the cuts); summation order inside a segment is the
same, across a cut one more addition happens per value, so results agree to rounding.

Values that cross a cut and are not tensors but hold floating-point tensors (a tuple, say)
cannot become leaves; :func:`backward_by_segments` then returns None and the caller falls back
to the one-backward path.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from moonshot_fx.memory import release_freed_memory

from .runner import GraphRunner, SiteHook

#: per-batch environment of the runner (node → one value per batch; here one batch)
Env = dict[fx.Node, list[Any]]


def block_cuts(runner: GraphRunner) -> list[fx.Node]:
    """The cut points: the last site node of every block segment but the last (graph order)."""
    return [seg[-1] for seg in runner.block_segments()[:-1]]


def _holds_float_tensor(value: Any) -> bool:
    return any(isinstance(x, torch.Tensor) and x.is_floating_point() for x in pytree.tree_leaves(value))


def backward_by_segments(
    runner: GraphRunner,
    flat: list[Any],
    losses_of: Callable[[list[Any]], torch.Tensor],
    cuts: Sequence[fx.Node],
    on_site: SiteHook,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor | None]] | None:
    """Per-sample losses, site outputs and their gradients for one batch of flat inputs.

    ``losses_of(flat_outputs)`` gives the per-sample losses; ``on_site`` is called for every site
    node with its inputs as the segments are re-run (in reverse segment order). Returns
    ``(losses, outputs, grads)`` keyed by node name (outputs detached), or None when a value
    crossing a cut cannot carry a gradient (see the module docstring)."""
    env = runner.start([flat])
    starts: list[tuple[int, Env]] = [(0, dict(env))]
    pos = 0
    with torch.no_grad():
        for cut in cuts:
            _, pos = runner.advance(env, 1, pos, stop_at=cut)
            if any(not isinstance(v[0], torch.Tensor) and _holds_float_tensor(v[0]) for v in env.values()):
                return None
            starts.append((pos, dict(env)))
    del env
    outputs: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor | None] = {}
    upstream: dict[fx.Node, torch.Tensor] = {}  # gradients of the values at the next cut
    losses: torch.Tensor | None = None
    for k in range(len(starts) - 1, -1, -1):
        pos, start_env = starts.pop()
        leaves: dict[fx.Node, torch.Tensor] = {}
        work: Env = {}
        for node, vals in start_env.items():
            v = vals[0]
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                leaves[node] = v.detach().requires_grad_(True)
                work[node] = [leaves[node]]
            else:
                work[node] = list(vals)
        del start_env
        seg_out: dict[str, torch.Tensor] = {}

        def on_output(node: fx.Node, outs: list[Any]) -> None:
            seg_out[node.name] = outs[0]

        with torch.enable_grad():
            if k == len(cuts):  # the last segment runs on to the graph's output and the loss
                flat_out, _ = runner.advance(work, 1, pos, on_site=on_site, on_output=on_output)
                assert flat_out is not None
                losses = losses_of(flat_out[0])
                roots, root_grads = [losses.sum()], [None]
            else:
                runner.advance(work, 1, pos, on_site=on_site, on_output=on_output, stop_at=cuts[k])
                pairs = [(work[n][0], g) for n, g in upstream.items() if n in work]
                roots = [r for r, _ in pairs]
                root_grads = [g for _, g in pairs]
            names = [n for n, t in seg_out.items() if isinstance(t, torch.Tensor) and t.requires_grad]
            wrt = [seg_out[n] for n in names] + list(leaves.values())
            live = [r.requires_grad for r in roots]
            got = torch.autograd.grad([r for r, ok in zip(roots, live) if ok],
                                      wrt, grad_outputs=[g for g, ok in zip(root_grads, live) if ok],
                                      allow_unused=True) if any(live) and wrt else [None] * len(wrt)
        for n, t in seg_out.items():
            outputs[n] = t.detach()
            grads[n] = None
        for n, g in zip(names, got[:len(names)]):
            grads[n] = None if g is None else g.detach()
        upstream = {node: g.detach() for node, g in zip(leaves, got[len(names):]) if g is not None}
        del work, leaves, got, roots
        release_freed_memory()  # this segment's autograd graph is gone: return its pages
    assert losses is not None
    return losses.detach(), outputs, grads
