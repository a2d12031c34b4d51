"""Distributed calibration with ``torch.distributed`` (issue 19, part 2).

Under ``torchrun --nproc-per-node N`` (any backend: gloo on CPU, NCCL on GPU) with an
initialised default process group of more than one rank, :func:`moonshot_fx.sparsify`:

* **shards the calibration batches** — every rank receives the *full* list and keeps
  ``batches[rank::world]`` (:func:`shard`); give every rank the same list, in the same order;
* **reduces each group's statistics** where they are finalised (``XᵀX``, the token / row-cluster
  Fisher terms, the row and batch counts; :func:`reduce_stats`) with ``all_reduce(SUM)`` in
  float64, keys in sorted order, so every rank holds the same totals;
* **solves once and broadcasts**: every rank runs the (deterministic) solve on the identical
  reduced statistics, then rank 0's pruned weights are broadcast (:func:`broadcast_results`) so
  the ranks agree bit for bit even if a solver were not deterministic;
* in sequential mode, every rank then **propagates its own shard** through the pruned block.

Without a process group (or with one rank) nothing here runs: today's path is unchanged, bit
for bit. Equality with one process: the statistics are sums of per-batch fp64 partials (each
batch's product in fp32, as :func:`moonshot_fx.stats.accumulate_hessian`); summed per rank
then across ranks, they are added in a different order than one process does, so they differ
by fp64 rounding (~1e-16 relative), which is not bit-identical but is far below the solve's fp32
precision — masks agree except on near-ties. MOONSHOT with the token Fisher accumulates ``H``
and ``F`` separately under distribution (instead of forming ``H_mix`` in one product, which needs
every row at once) and mixes them in the pruner: the same maths, a different rounding.
Not distributed yet (a :class:`~moonshot_fx.errors.ConfigError` says so): ``alpha="auto"`` and
the ``sample`` / ``weight`` / ``kron`` Fisher kinds.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def _dist():
    import torch.distributed as dist

    return dist


def is_distributed() -> bool:
    """True when a default process group with more than one rank is initialised."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without a process group."""
    if not is_distributed():
        return 0, 1
    dist = _dist()
    return dist.get_rank(), dist.get_world_size()


def shard(batches: Sequence[T]) -> list[T]:
    """This rank's calibration batches: ``batches[rank::world]`` (all of them in one process)."""
    rank, world = rank_and_world()
    if world > 1 and len(batches) < world:
        from .errors import CalibrationError

        raise CalibrationError(f"{len(batches)} calibration batches cannot be shared by {world} ranks; "
                               "give at least one batch per rank.")
    return list(batches[rank::world])


def _device() -> torch.device:
    dist = _dist()
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    dist = _dist()
    dev = _device()
    buf = t.to(dev).contiguous()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def reduce_stats(stats: Any) -> Any:
    """Sum a :class:`moonshot_fx.stats.LayerStats` over the ranks in place (and return it).

    Every rank must call it for the same groups in the same order. A rank whose shard never
    reached the group contributes zeros (its ``hessian`` may be None)."""
    if not is_distributed():
        return stats
    if stats.mixed:
        raise ValueError("H_mix is formed from every row at once and cannot be reduced across ranks")
    counts = torch.tensor([stats.rows, stats.batches], dtype=torch.int64)
    counts = _all_reduce(counts)
    stats.rows, stats.batches = int(counts[0]), int(counts[1])
    if stats.hessian is None:
        raise ValueError("distributed calibration needs every rank to see every group; give each rank batches")
    stats.hessian = _all_reduce(stats.hessian)
    for site in sorted(stats.fisher):
        stats.fisher[site] = _all_reduce(stats.fisher[site])
    return stats


def broadcast_results(results: Sequence[Any], src: int = 0) -> None:
    """Replace every result's ``weight`` by rank ``src``'s (in place; same order on every rank)."""
    if not is_distributed():
        return
    dist = _dist()
    dev = _device()
    for r in results:
        buf = r.weight.detach().to(dev).contiguous().clone()
        dist.broadcast(buf, src=src)
        r.weight = buf.to(r.weight.device, r.weight.dtype)


def check_supported(method: str, alpha: Any, fisher: str) -> None:
    """Raise :class:`ConfigError` for options that are not distributed yet."""
    if not is_distributed() or method != "moonshot":
        return
    from .errors import ConfigError

    if alpha == "auto":
        raise ConfigError("alpha='auto' is not supported under torch.distributed yet; pass a fixed alpha.")
    if fisher not in ("token", "row"):
        raise ConfigError(f"fisher={fisher!r} is not supported under torch.distributed yet; "
                          "use fisher='token' or 'row'.")
