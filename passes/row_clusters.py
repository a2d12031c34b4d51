"""Which output rows of a site share one Fisher curvature (MOONSHOT's ``fisher="row"``).

The exact per-row Fisher ``F_i = Σ_t δ_ti² x_t x_tᵀ`` costs one ``d_in × d_in`` product (and one
factorisation) per output row. Rows are therefore clustered into ``C`` equal contiguous blocks, each
with the block's summed Fisher: for an attention projection the natural block is one head, whose
rows attend with the same weights and so see the same tokens as important.

* ``"heads"`` (default): a site whose output the graph reshapes to ``(…, heads, head_dim)``
  (q/k/v projections in every HF attention) gets one cluster per head; every other site one
  cluster (the shared token Fisher).
* an integer ``k``: ``k`` equal blocks for every site whose output rows divide by ``k`` (others 1).
"""
from __future__ import annotations

from typing import Sequence, Union

import torch.fx as fx

from .discover import Site

#: reshaping ops through which a projection's output is split into heads
_RESHAPES = ("view", "reshape", "_unsafe_view", "unflatten")


def _target_name(node: fx.Node) -> str:
    target = node.target
    name = getattr(target, "__name__", None) or str(target)
    return name.split(".")[0]


def head_count(node: fx.Node, d_out: int) -> int:
    """Heads the output of ``node`` is split into (1 where it is not): the first reshaping user
    whose output ends in ``(…, h, d_out / h)`` with ``h > 1``."""
    for user in node.users:
        if _target_name(user) not in _RESHAPES:
            continue
        val = user.meta.get("val")
        shape = getattr(val, "shape", None)
        if shape is None or len(shape) < 2:
            continue
        try:
            heads, head_dim = int(shape[-2]), int(shape[-1])
        except TypeError:  # symbolic sizes
            continue
        if heads > 1 and heads * head_dim == d_out:
            return heads
    return 1


def row_clusters(gm: fx.GraphModule, sites: Sequence[Site], setting: Union[str, int] = "heads") -> dict[str, int]:
    """site name → number of equal output-row clusters for the row-clustered Fisher."""
    nodes = {n.name: n for n in gm.graph.nodes}
    out: dict[str, int] = {}
    for s in sites:
        d_out = s.matrix_shape[0]
        if s.slice_index is not None or len(s.nodes) != 1:
            out[s.name] = 1  # an expert's routed rows, or a weight used at several places: shared
        elif setting == "heads":
            node = nodes.get(s.nodes[0])
            out[s.name] = head_count(node, d_out) if node is not None and s.kind == "linear" else 1
        else:
            k = int(setting)
            out[s.name] = k if k >= 1 and d_out % k == 0 else 1
    return out
