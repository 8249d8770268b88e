"""Sequence parallelism for dilated attention (LongNet paper, section 3.1).

Installed as ``longnet.distributed``. Every torch.distributed call of the project lives here,
so that ``longnet`` itself stays a set of pure PyTorch modules.

The P ranks of a sequence-parallel group hold contiguous shards of L = n / P tokens; positions
are global. `sequence_parallel_dilated_attention` returns each rank's shard of exactly what
`longnet.dilated_attention` returns for the whole sequence:

- A pattern whose segments fit in a shard (w <= L, L a multiple of w) runs the single-device
  block plan on the shard, with no communication. When every pattern does (P = 1 included),
  the call IS `longnet.dilated_attention` on the shard.
- A pattern whose segment of min(w, n) tokens spans whole shards: each rank SPARSIFIES its K and
  V first (only the (position, kv head) entries some query head keeps; the head offset counts
  from the segment start, so it shifts with the rank's place in the segment), then ONE
  all_to_all_single per layer, for all patterns, hands them to the other ranks of the segment
  only (ranks of other segments exchange zero bytes). Received bytes per rank and pattern:
  2 (min(w, n) / r) H d b (1 - L / min(w, n)) as in SPEC.md, which stays flat as n grows with
  w / r fixed. With causal masking keys travel to LATER ranks only: earlier ranks' keys are all
  visible (one non-causal kernel call), the rank's own keys are causal (one causal call), later
  ranks' keys are neither sent nor computed.
- All partial (out, log-sum-exp) pairs merge by longnet.dilated.merge_block (paper Eq. 10). The
  backward reruns every kernel backward with the MERGED out and lse, sums dK/dV per gathered
  entry and sends them back to their owners (all_to_all again: the reduce-scatter that is the
  gradient of the all-gather), in the accumulation dtype.

`last_communication()` reports the bytes of the last call; `ParallelDims` lays the world out as
data_parallel x sequence_parallel and builds the groups.
"""

from longnet.distributed.grid import ParallelDims, ProcessGrid
from longnet.distributed.sequence_parallel import (
    Communication,
    check_layout,
    last_communication,
    sequence_parallel_dilated_attention,
    shard_sequence,
)

__all__ = [
    "Communication",
    "check_layout",
    "ParallelDims",
    "ProcessGrid",
    "last_communication",
    "sequence_parallel_dilated_attention",
    "shard_sequence",
]
