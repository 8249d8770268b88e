"""The process grid: world = data_parallel x sequence_parallel.

Ranks fill a (data_parallel, sequence_parallel) grid row by row, like torchtitan's ParallelDims:
a sequence-parallel group is a run of consecutive ranks, so it stays inside one node when it can
(its all-to-all runs in every attention layer), and a data-parallel group takes the ranks at one
position of every SP group (stride sequence_parallel); it only averages gradients once a step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from longnet.checks import positive_int


@dataclass(frozen=True)
class ParallelDims:
    """The degrees of parallelism; validated on construction, no process group needed."""

    data_parallel: int
    sequence_parallel: int
    world_size: int

    def __post_init__(self):
        for name in ("data_parallel", "sequence_parallel", "world_size"):
            positive_int(name, getattr(self, name))
        if self.data_parallel * self.sequence_parallel != self.world_size:
            raise ValueError(
                f"data_parallel ({self.data_parallel}) x sequence_parallel "
                f"({self.sequence_parallel}) = {self.data_parallel * self.sequence_parallel} "
                f"must equal the world size ({self.world_size})"
            )

    @property
    def sequence_parallel_groups(self) -> list[list[int]]:
        """Ranks of each SP group: consecutive runs of sequence_parallel ranks."""
        sp = self.sequence_parallel
        return [list(range(start, start + sp)) for start in range(0, self.world_size, sp)]

    @property
    def data_parallel_groups(self) -> list[list[int]]:
        """Ranks of each DP group: one rank of every SP group, at the same SP position."""
        sp = self.sequence_parallel
        return [list(range(position, self.world_size, sp)) for position in range(sp)]

    def coordinates(self, rank: int) -> tuple[int, int]:
        """(dp_rank, sp_rank) of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank}")
        return divmod(rank, self.sequence_parallel)

    def build(self) -> ProcessGrid:
        """This rank's place and groups. A collective: every rank calls it, once, in step."""
        if not dist.is_initialized():
            raise RuntimeError("ParallelDims.build needs torch.distributed initialized")
        if dist.get_world_size() != self.world_size:
            raise ValueError(
                f"ParallelDims is for a world of {self.world_size} ranks, but torch.distributed "
                f"has {dist.get_world_size()}"
            )
        rank = dist.get_rank()
        dp_rank, sp_rank = self.coordinates(rank)
        return ProcessGrid(
            dims=self,
            rank=rank,
            dp_rank=dp_rank,
            sp_rank=sp_rank,
            dp_group=_group_of(rank, self.data_parallel_groups),
            sp_group=_group_of(rank, self.sequence_parallel_groups),
        )


@dataclass(frozen=True)
class ProcessGrid:
    """One rank's place on the grid and its two groups (to pass to the attention and DeepSpeed)."""

    dims: ParallelDims
    rank: int
    dp_rank: int
    sp_rank: int
    dp_group: dist.ProcessGroup
    sp_group: dist.ProcessGroup


_single_rank_group: dict = {}


def single_rank_group() -> dist.ProcessGroup:
    """A process group of this rank alone, made once per world.

    NOTE: new_group is collective over the world unless use_local_synchronization: creating a
    one-rank group per rank the usual way makes every rank create world_size groups, slow to start
    on large worlds. Only this rank takes part here (the group's name hashes its ranks, so it is
    made once per world and cached).
    """
    world = dist.group.WORLD
    cached = _single_rank_group.get("world")
    if cached is not world:
        group = dist.new_group([dist.get_rank()], use_local_synchronization=True)
        _single_rank_group.update(world=world, group=group)
    return _single_rank_group["group"]


def _group_of(rank: int, all_ranks: list[list[int]]) -> dist.ProcessGroup:
    if len(all_ranks[0]) == dist.get_world_size():
        return dist.group.WORLD
    if len(all_ranks[0]) == 1:
        return single_rank_group()
    # new_group is collective over the world: every rank creates every group, in the same order.
    mine = None
    for ranks in all_ranks:
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return mine
