"""Distributed calibration with ``torch.distributed`` (issue 19, part 2).

Under ``torchrun --nproc-per-node N`` (any backend: gloo on CPU, NCCL on GPU) with an
initialised default process group of more than one rank, :func:`moonshot_fx.sparsify`:

* **shards the calibration batches** — every rank receives the *full* list and keeps
  ``batches[rank::world]`` (:func:`shard`); give every rank the same list, in the same order;
* **gives each group an owner rank chosen by solve cost** (:func:`assign_owners`: longest
  processing time first, the cost of a group ``d_in³ + rows·d_in²`` — the Cholesky of its
  ``d_in × d_in`` Hessian plus the column sweep of its ``rows`` output rows — added to the load
  each rank already carries in this run), so the groups that are pruned together (all groups of
  a block in the block unit, all groups in one-pass mode) are solved in parallel;
* **reduces each group's statistics to its owner** where they are finalised (``XᵀX``, the token
  / row-cluster Fisher terms, the row and batch counts; :func:`reduce_stats`) with
  ``reduce(SUM)`` in float64, keys in sorted order; the other ranks drop theirs;
* **the owner solves and broadcasts** the pruned weights and their report fields
  (:func:`solve_by_owner`), so every rank holds the same result bit for bit; each result records
  the rank that solved it (``solved_by``);
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

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator, Sequence
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


_ALREADY_SHARDED: contextvars.ContextVar[bool] = contextvars.ContextVar("moonshot_fx_sharded", default=False)


@contextlib.contextmanager
def already_sharded() -> Iterator[None]:
    """Inside, :func:`shard` keeps every batch: the caller has sharded them already
    (``sparsify_checkpoint`` shards its windows once and calls ``sparsify`` per layer on its shard)."""
    token = _ALREADY_SHARDED.set(True)
    try:
        yield
    finally:
        _ALREADY_SHARDED.reset(token)


def barrier() -> None:
    """Wait for every rank (nothing in one process)."""
    if is_distributed():
        _dist().barrier()


def shard(batches: Sequence[T]) -> list[T]:
    """This rank's calibration batches: ``batches[rank::world]`` (all of them in one process, or
    inside :func:`already_sharded`)."""
    rank, world = rank_and_world()
    if _ALREADY_SHARDED.get():
        return list(batches)
    if world > 1 and len(batches) < world:
        from .errors import CalibrationError

        raise CalibrationError(f"{len(batches)} calibration batches cannot be shared by {world} ranks; "
                               "give at least one batch per rank.")
    return list(batches[rank::world])


def _device() -> torch.device:
    dist = _dist()
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _summed(t: torch.Tensor, dst: int | None) -> torch.Tensor:
    """``t`` summed over the ranks: on rank ``dst`` only (``reduce``), or on every rank (``None``:
    ``all_reduce``)."""
    dist = _dist()
    buf = t.to(_device()).contiguous()
    if dst is None:
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    else:
        dist.reduce(buf, dst=dst, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def reduce_stats(stats: Any, dst: int | None = None) -> Any:
    """Sum a :class:`moonshot_fx.stats.LayerStats` over the ranks in place (and return it): onto
    rank ``dst`` (the other ranks' statistics are then meaningless: drop them), or onto every
    rank with ``dst=None``.

    Every rank must call it for the same groups in the same order. A rank whose shard never
    reached the group contributes zeros (its ``hessian`` may be None)."""
    if not is_distributed():
        return stats
    if stats.mixed:
        raise ValueError("H_mix is formed from every row at once and cannot be reduced across ranks")
    counts = _summed(torch.tensor([stats.rows, stats.batches], dtype=torch.int64), dst)
    stats.rows, stats.batches = int(counts[0]), int(counts[1])
    if stats.hessian is None:
        raise ValueError("distributed calibration needs every rank to see every group; give each rank batches")
    stats.hessian = _summed(stats.hessian, dst)
    for site in sorted(stats.fisher):
        stats.fisher[site] = _summed(stats.fisher[site], dst)
    return stats


def solve_cost(shapes: Sequence[Sequence[int]], diagonal_only: bool = False) -> float:
    """The cost model of one input group's solve, from its sites' weight shapes ``(d_out, d_in…)``:
    ``d_in³ + rows·d_in²`` (Cholesky of the shared Hessian, then the sweep over every output row);
    ``rows·d_in`` for score-based pruning (``diagonal_only``: Wanda keeps only the Hessian diagonal)."""
    d_in = max(int(torch.Size(s[1:]).numel()) for s in shapes)
    rows = sum(int(s[0]) for s in shapes)
    return float(rows * d_in) if diagonal_only else float(d_in) ** 3 + float(rows) * d_in**2


def assign_owners(costs: Sequence[float], world: int, loads: list[float] | None = None) -> list[int]:
    """An owner rank per job: longest processing time first — jobs in decreasing cost (ties: in
    order), each to the rank with the least load so far (ties: the lowest rank). ``loads`` (one per
    rank, updated in place) carries the load of earlier calls, so a run of one-job calls rotates."""
    loads = loads if loads is not None else [0.0] * world
    owners = [0] * len(costs)
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        owner = min(range(world), key=lambda r: (loads[r], r))
        owners[j] = owner
        loads[owner] += costs[j]
    return owners


def solve_by_owner(jobs: Sequence[tuple[Any, float]], solve: Callable[[int], list[Any]],
                   loads: list[float] | None = None) -> list[list[Any]]:
    """Solve every job on its owner rank and give every rank every result.

    ``jobs``: ``(statistics, cost)`` per input group, the same list (order and costs) on every
    rank; ``solve(j)`` returns job ``j``'s :class:`~moonshot_fx.passes.prune.SiteResult` list
    (its statistics are ``jobs[j][0]``). In one process: ``solve`` on each, in order.
    Distributed: each job's statistics are reduced onto its owner (:func:`assign_owners`), each
    rank solves the jobs it owns, then each owner broadcasts its results (fields, then weights as
    bytes), job by job in order."""
    if not is_distributed():
        return [solve(j) for j in range(len(jobs))]
    rank, world = rank_and_world()
    owners = assign_owners([c for _, c in jobs], world, loads)
    for (stats, _), owner in zip(jobs, owners):
        reduce_stats(stats, dst=owner)
        if owner != rank:
            stats.hessian, stats.fisher = None, {}  # only the owner's sums are totals
    mine = {j: solve(j) for j, owner in enumerate(owners) if owner == rank}
    out = []
    for j, owner in enumerate(owners):
        out.append(_broadcast_group(mine.get(j), owner, rank))
    return out


def _broadcast_group(results: list[Any] | None, src: int, rank: int) -> list[Any]:
    """Rank ``src``'s results of one group on every rank: the fields (weights as shape and dtype)
    by object broadcast, then each weight's bytes."""
    dist = _dist()
    dev = _device()
    meta: list[Any] = [None]
    if rank == src:
        assert results is not None
        meta[0] = [(dataclasses.replace(r, weight=None, solved_by=src), tuple(r.weight.shape), r.weight.dtype,
                    r.weight.device.type) for r in results]
    dist.broadcast_object_list(meta, src=src, device=dev if dev.type == "cuda" else None)
    out = []
    for i, (fields, shape, dtype, kind) in enumerate(meta[0]):
        if rank == src:  # the sender's buffer is only read: no copy where the weight is on ``dev`` already
            buf = results[i].weight.detach().to(dev).contiguous()
        else:
            buf = torch.empty(shape, dtype=dtype, device=dev)
        dist.broadcast(buf.view(-1).view(torch.uint8), src=src)  # bytes: every dtype, every backend
        home = dev if kind == dev.type else torch.device("cpu")  # where the owner keeps it (this rank's GPU)
        out.append(dataclasses.replace(fields, weight=buf.to(home) if results is None else results[i].weight))
    return out


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
