"""Partition a graph's prunable nodes into sequential segments (one per repeated block).

A *block* is named by the weight FQN up to its first numeric component: every site of
``model.layers.3.…`` belongs to block ``model.layers.3``, of ``layer2.1.conv1.weight`` to
``layer2.1``, of ``blocks.0.attn.qkv.weight`` to ``blocks.0``; a weight with no numeric
component (``features.conv.weight``) is a block of its own. A *segment* is a maximal run of
consecutive prunable nodes (graph order) of one block, extended until every input group it has
started is complete, so a weight used at several places is never split across segments.

Block-level sequential pruning (SparseGPT's and llm-compressor's loop) calibrates every group of
a segment on the segment's inputs with the segment's own weights still dense, prunes them all,
then re-runs the segment with the pruned weights to feed the next one.
"""
from __future__ import annotations

from typing import Mapping, Sequence


def block_key(name: str) -> str:
    """The block a weight FQN belongs to: the prefix up to its first all-digit component."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return name


def segments(node_names: Sequence[str], block_of: Mapping[str, str], group_of: Mapping[str, str]) -> list[list[str]]:
    """Split prunable node names (graph order) into segments.

    Args:
        node_names: the prunable nodes in graph order.
        block_of: node name → block key (see :func:`block_key`).
        group_of: node name → input group; every node of a group must land in one segment.
    """
    remaining: dict[str, int] = {}
    for n in node_names:
        remaining[group_of[n]] = remaining.get(group_of[n], 0) + 1
    out: list[list[str]] = []
    current: list[str] = []
    open_groups: set[str] = set()
    for i, n in enumerate(node_names):
        current.append(n)
        g = group_of[n]
        remaining[g] -= 1
        open_groups.add(g)
        if remaining[g] == 0:
            open_groups.discard(g)
        last = i == len(node_names) - 1
        if last or (block_of[node_names[i + 1]] != block_of[n] and not open_groups):
            out.append(current)
            current = []
    return out
