"""The DP x SP process grid: layout, validation, and real gloo groups on 4 processes."""

import distributed_utils
import pytest
import torch
import torch.distributed as dist

from longnet.distributed import ParallelDims


@pytest.mark.parametrize(
    "dp, sp, sp_groups, dp_groups",
    [
        (2, 2, [[0, 1], [2, 3]], [[0, 2], [1, 3]]),
        (1, 4, [[0, 1, 2, 3]], [[0], [1], [2], [3]]),
        (4, 1, [[0], [1], [2], [3]], [[0, 1, 2, 3]]),
        (2, 3, [[0, 1, 2], [3, 4, 5]], [[0, 3], [1, 4], [2, 5]]),
    ],
)
def test_layout(dp, sp, sp_groups, dp_groups):
    dims = ParallelDims(data_parallel=dp, sequence_parallel=sp, world_size=dp * sp)
    assert dims.sequence_parallel_groups == sp_groups
    assert dims.data_parallel_groups == dp_groups
    for rank in range(dp * sp):
        dp_rank, sp_rank = dims.coordinates(rank)
        assert sp_groups[dp_rank][sp_rank] == rank
        assert dp_groups[sp_rank][dp_rank] == rank


@pytest.mark.parametrize(
    "dp, sp, world, message",
    [
        (3, 2, 4, r"data_parallel \(3\) x sequence_parallel \(2\) = 6 .* world size \(4\)"),
        (1, 3, 4, r"data_parallel \(1\) x sequence_parallel \(3\) = 3 .* world size \(4\)"),
        (0, 4, 4, r"data_parallel must be a positive int, got 0"),
        (2, 2.0, 4, r"sequence_parallel must be a positive int, got 2.0"),
        (2, True, 2, r"sequence_parallel must be a positive int, got True"),
    ],
)
def test_invalid_degrees(dp, sp, world, message):
    with pytest.raises(ValueError, match=message):
        ParallelDims(data_parallel=dp, sequence_parallel=sp, world_size=world)


def test_rank_out_of_range():
    with pytest.raises(ValueError, match=r"rank must be in \[0, 4\), got 4"):
        ParallelDims(2, 2, 4).coordinates(4)


def build_grid(dp, sp):
    """Worker: this rank's grid coordinates, its groups' ranks, and all-reduced sums of the
    global ranks over each group (proof that the groups carry traffic)."""
    grid = ParallelDims(data_parallel=dp, sequence_parallel=sp, world_size=4).build()
    sums = []
    for group in (grid.sp_group, grid.dp_group):
        total = torch.tensor([dist.get_rank()])
        dist.all_reduce(total, group=group)
        sums.append(total.item())
    groups = [dist.get_process_group_ranks(g) for g in (grid.sp_group, grid.dp_group)]
    return grid.rank, grid.dp_rank, grid.sp_rank, groups, sums


@pytest.mark.parametrize("dp, sp", [(2, 2), (1, 4), (4, 1)])
def test_groups_on_four_processes(dp, sp):
    dims = ParallelDims(dp, sp, 4)
    for rank, (global_rank, dp_rank, sp_rank, groups, sums) in enumerate(
        distributed_utils.run(build_grid, dp, sp)
    ):
        sp_ranks = dims.sequence_parallel_groups[dp_rank]
        dp_ranks = dims.data_parallel_groups[sp_rank]
        assert global_rank == rank and (dp_rank, sp_rank) == (rank // sp, rank % sp)
        assert groups == [sp_ranks, dp_ranks]
        assert sums == [sum(sp_ranks), sum(dp_ranks)]


def build_wrong_world():
    try:
        ParallelDims(data_parallel=1, sequence_parallel=2, world_size=2).build()
    except ValueError as error:
        return str(error)


def test_build_checks_world_size():
    for message in distributed_utils.run(build_wrong_world):
        assert message == ("ParallelDims is for a world of 2 ranks, but torch.distributed has 4")
