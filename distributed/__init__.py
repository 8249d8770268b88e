"""Sequence parallelism for dilated attention (LongNet paper, section 3.1).

Installed as ``longnet.distributed``. Every torch.distributed call of the project lives here,
so that ``longnet`` itself stays a set of pure PyTorch modules.

`sequence_parallel_dilated_attention` returns each rank's shard of exactly what
`longnet.dilated_attention` returns for the whole sequence. It runs the same planner and
executor as one device (longnet/plan.py, longnet/engine.py) and adds the exchange of sparse keys
and values for segments that span ranks; docs/sequence-parallel.md has the algorithm and its
byte formula. `communication(...)` computes from the plan the bytes a call sends and receives;
`ParallelDims` lays the world out as data_parallel x sequence_parallel and builds the groups.
"""

from longnet.distributed.grid import ParallelDims, ProcessGrid
from longnet.distributed.sequence_parallel import (
    Communication,
    check_layout,
    communication,
    sequence_parallel_dilated_attention,
    shard_sequence,
)

__all__ = [
    "Communication",
    "check_layout",
    "ParallelDims",
    "ProcessGrid",
    "communication",
    "sequence_parallel_dilated_attention",
    "shard_sequence",
]
