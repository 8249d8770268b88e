"""launch/runtime.py, what the programs run on: a batch sharded over sequence-parallel ranks (on
real gloo groups of the worker processes), a model loaded from a run or its export, and the
process group a launched program joins."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import distributed_utils
import pytest
import torch
from distributed_utils import ROOT, reference_run, torchrun_command

from longnet import LongNetConfig, LongNetLM
from longnet.distributed import ParallelDims
from longnet.launch import export, runtime

pytestmark = pytest.mark.slow  # worker processes, a training run, torchrun

CONFIG = LongNetConfig(
    vocab_size=50, d_model=32, num_layers=2, num_heads=4, ffn_dim=64,
    segment_lengths=(4, 8, 16), dilation_rates=(1, 2, 4), position="rotary",
)  # fmt: skip


def batch() -> dict[str, torch.Tensor]:
    tokens = torch.randint(
        0, CONFIG.vocab_size, (3, 17), generator=torch.Generator().manual_seed(0)
    )
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}


def shard_on_the_grid(dp: int, sp: int) -> tuple:
    """Worker: this rank's (dp_rank, sp_rank), its shard of batch() and position offset, the
    batch gathered back over its SP group, and the model's logits on its shard (attention over
    the SP group) beside the one-process logits of the whole batch."""
    grid = ParallelDims(dp, sp, distributed_utils.WORLD_SIZE).build()
    mine, offset = runtime.shard(batch(), grid)
    whole = {key: runtime.unshard(value, grid) for key, value in mine.items()}
    torch.manual_seed(0)
    alone = LongNetLM(CONFIG).eval()
    parallel = LongNetLM(CONFIG, attention_fn=runtime.attention(grid)).eval()
    parallel.load_state_dict(alone.state_dict())
    with torch.no_grad():
        logits = parallel(mine["input_ids"], position_offset=offset).logits
        expected = alone(batch()["input_ids"]).logits
    return (
        (grid.dp_rank, grid.sp_rank),
        mine,
        offset,
        whole,
        runtime.unshard(logits, grid),
        expected,
    )


@pytest.mark.parametrize("dp, sp", [(2, 2), (1, 4), (4, 1)])
def test_shards_and_offsets_put_together_are_the_batch(dp, sp):
    results = distributed_utils.run(shard_on_the_grid, dp, sp)
    rows = batch()
    for (_, sp_rank), mine, offset, whole, logits, expected in results:
        n = rows["input_ids"].shape[1] // sp
        assert offset == sp_rank * n
        for key, value in rows.items():
            assert torch.equal(mine[key], value[:, offset : offset + n])
            assert torch.equal(whole[key], value)
        # The offsets place each shard's tokens where they are in the whole sequence.
        assert (logits - expected).abs().max().item() < 1e-5
    for dp_rank in range(dp):  # each SP group's shards, in sp_rank order, tile the batch
        shards = sorted((r[0][1], r[1]) for r in results if r[0][0] == dp_rank)
        for key, value in rows.items():
            assert torch.equal(torch.cat([m[key] for _, m in shards], dim=1), value)


def test_one_process_takes_the_whole_batch():
    mine, offset = runtime.shard(batch(), None)
    assert offset == 0 and all(torch.equal(mine[k], v) for k, v in batch().items())
    assert runtime.unshard(mine["labels"], None) is mine["labels"]


def test_a_run_and_its_export_load_the_same_model(tmp_path):
    run = reference_run("baseline")
    export.export(run, tmp_path / "model")
    from_run, config = runtime.load(run)
    from_export, none = runtime.load(tmp_path / "model")
    assert config.model.build() == from_run.config == from_export.config and none is None
    assert not from_run.training and not from_export.training
    tokens = torch.arange(300).remainder(250).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(from_run(tokens).logits, from_export(tokens).logits)
    with pytest.raises(ValueError, match="neither a run folder nor an exported model"):
        runtime.load(tmp_path)
    with pytest.raises(ValueError, match="no checkpoint step_000003"):
        runtime.load(tmp_path / "model", "step_000003")


# Two launched ranks: the group's backend is the default of the device, the grid is dp 1 x sp 2,
# and a shard of the same rows on each rank gathers back to them.
STARTED = textwrap.dedent("""
    import torch, torch.distributed as dist
    from longnet.launch import runtime

    grid = runtime.start(sequence_parallel=2)
    here = runtime.device()
    assert dist.get_backend() == dist.get_default_backend_for_device(here), dist.get_backend()
    assert (grid.dims.data_parallel, grid.dims.sequence_parallel) == (1, 2)
    assert grid.sp_rank == runtime.rank() == dist.get_rank()
    rows = torch.arange(24).reshape(2, 12)
    mine, offset = runtime.shard({"rows": rows}, grid, here)
    assert mine["rows"].device.type == here.type and offset == 6 * grid.sp_rank
    assert torch.equal(runtime.unshard(mine["rows"], grid).cpu(), rows)
    runtime.finish()
    assert not dist.is_initialized()
    print("started", here, flush=True)
""")


def test_launched_ranks_join_the_group_on_the_devices_backend(tmp_path):
    script = tmp_path / "started.py"
    script.write_text(STARTED)
    launcher = ["--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        torchrun_command(launcher, str(script)),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("started") == 2, result.stdout
    one = subprocess.run(
        [sys.executable, "-c", "from longnet.launch import runtime; print(runtime.start().dims)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    assert "world_size=1" in one.stdout  # plain python: a world of one
