"""What train, evaluate, export and generate run on: the process group and the (dp, sp) grid, the
resume decision every rank agrees on, a model loaded from a run or an exported folder, and a
batch sharded over the sequence-parallel ranks.

    start(sp)            join the launch's process group on the backend of this rank's device
                         (NCCL on CUDA, gloo on CPU); lay the world out as (world / sp) x sp
                         (longnet.distributed.ParallelDims) and return this rank's ProcessGrid
    finish()             leave it, once every rank is done
    attention(grid)      the attention function of a model sequence-parallel over grid.sp_group
    agree_on_resume()    rank 0 decides (checkpoint.plan_resume) and every rank gets its answer
    load(folder)         an exported folder or a run's checkpoint, verified; the run's config
    shard(batch, grid)   this rank's slice of each row and the position of its first token;
                         unshard gathers slices back

Before the group exists, world_size() and rank() read what the launcher (torchrun, deepspeed)
set; plain `python` is a world of one. The grid holds plain process groups, not a DeviceMesh:
DeepSpeed's mpu and the attention take ProcessGroups, and nothing here shards tensors as DTensors.
"""

from __future__ import annotations

import functools
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

from longnet import LongNetLM
from longnet.distributed import (
    ParallelDims,
    ProcessGrid,
    sequence_parallel_dilated_attention,
    shard_sequence,
)
from longnet.launch import checkpoint
from longnet.launch.config import Config, load_config
from longnet.model import CONFIG_FILE

RUN_CONFIG = "config.yaml"
_WORKER_DRAIN_S = 0.2

# -- processes ------------------------------------------------------------------------------------


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def device() -> torch.device:
    """This rank's device: the accelerator's (CUDA) of its LOCAL_RANK, else the CPU."""
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    if accelerator is None:
        return torch.device("cpu")
    return torch.device(accelerator.type, local_rank())


def start(sequence_parallel: int = 1) -> ProcessGrid:
    """Join the process group of this launch (under plain `python`: a world of one) on the
    default backend of this rank's device, make the device current, and build the grid
    (ParallelDims: ValueError when sequence_parallel does not divide the world). A collective:
    every rank calls it, once."""
    if "RANK" not in os.environ:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
    here, world = device(), world_size()
    if here.type == "cpu":
        if "OMP_NUM_THREADS" not in os.environ:
            # The node's cores, shared by its ranks (torchrun sets OMP_NUM_THREADS itself).
            local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    else:
        torch.accelerator.set_device_index(here.index)
    backend = dist.get_default_backend_for_device(here)
    # Bound to its device, NCCL connects at once (several ranks only: one has no peer).
    options = {"device_id": here} if here.type == "cuda" and world > 1 else {}
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None:
        dist.init_process_group(backend, **options)
    else:
        # NOTE: torchrun --max-restarts reuses its store across restarts (torch 2.13), so a
        # restarted group would read the dead group's addresses and hang or fail; keys prefixed
        # per restart keep the attempts apart.
        store, this, _ = next(dist.rendezvous("env://"))
        store = dist.PrefixStore(f"longnet/attempt_{restart}", store)
        dist.init_process_group(backend, store=store, rank=this, world_size=world, **options)
    return ParallelDims(world // sequence_parallel, sequence_parallel, world).build()


def finish() -> None:
    """Leave the process group once every rank got here (no rank tears down while another still
    works); nothing in a process that never joined one."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        # NOTE: a gloo worker thread frees its last collective's tensors after the caller's wait
        # returned, and freeing a tensor Python dropped takes the GIL. Past this point the
        # interpreter may be finalizing, where a thread taking the GIL exits and the process
        # aborts ("terminate called without an active exception", torch 2.13). Releasing the GIL
        # for a moment lets those threads finish while it can still be taken.
        time.sleep(_WORKER_DRAIN_S)


def attention(grid: ProcessGrid):
    """The attention function of a model whose layers run sequence-parallel over grid.sp_group."""
    return functools.partial(sequence_parallel_dilated_attention, group=grid.sp_group)


def agree_on_resume(
    resume: str, output_dir: str | Path, current: dict[str, int], hashes: bool = True
) -> tuple[Path, str] | None:
    """checkpoint.plan_resume decided (and reported) on rank 0 and broadcast: every rank gets the
    same answer, or the same ValueError (on a shared filesystem that lags, ranks listing the
    folder themselves can see different latest steps). A collective: every rank calls it."""
    decision = [None, None]
    if dist.get_rank() == 0:
        try:
            decision[0] = checkpoint.plan_resume(resume, output_dir, current, hashes)
        except ValueError as error:
            decision[1] = str(error)
    dist.broadcast_object_list(decision, src=0)
    if decision[1] is not None:
        raise ValueError(decision[1])
    return decision[0]


# -- models ---------------------------------------------------------------------------------------


def is_export(folder: Path) -> bool:
    """True for an exported model folder, False for a run folder, else ValueError."""
    if (folder / CONFIG_FILE).is_file():
        return True
    if (folder / RUN_CONFIG).is_file():
        return False
    raise ValueError(f"{str(folder)!r} is neither a run folder nor an exported model")


def load(
    folder: Path, tag: str | None = None, hashes: bool = True
) -> tuple[LongNetLM, Config | None]:
    """The model of an exported folder or of a run's checkpoint (see load_run), in eval mode on
    the CPU, and the run's config (None for an exported folder)."""
    if not is_export(folder):
        return load_run(folder, tag, hashes)
    if tag is not None:
        raise ValueError(f"{folder} is an exported model: it has no checkpoint {tag}")
    return LongNetLM.from_pretrained(folder), None


def load_run(
    run: Path, tag: str | None = None, hashes: bool = True, merge_shards: bool = False
) -> tuple[LongNetLM, Config]:
    """The model of checkpoint `tag` (default: the latest complete one) of a run, verified against
    its manifest (content hashes when `hashes`), and the run's config. Its weights: the model
    file of ZeRO 0-2, read as tensors only (ZeRO-3, sharded, is refused); with `merge_shards`
    the float32 weights of any stage (checkpoint.merged_weights)."""
    config = load_config(run / RUN_CONFIG)
    stage = config.deepspeed.get("zero_optimization", {}).get("stage", 0)
    if stage == 3 and not merge_shards:
        raise ValueError(
            f"{run} trained with ZeRO-3, whose checkpoints hold shards: run "
            f"`python launch/export.py {run} OUT` and pass OUT"
        )
    directory = checkpoint.checkpoint_dir(run)
    steps = checkpoint.complete_steps(directory)
    if tag is None and not steps:
        raise ValueError(f"{run} has no complete checkpoint")
    tag = tag or checkpoint.tag(steps[-1])
    if not (directory / tag / checkpoint.COMPLETE).is_file():
        raise ValueError(f"--checkpoint {tag}: no complete checkpoint of that name in {directory}")
    checkpoint.verified(directory / tag, hashes)  # reads every byte of the checkpoint
    model = LongNetLM(config.model.build())
    if merge_shards:
        model.load_state_dict(checkpoint.merged_weights(directory, tag))
    else:
        model.load_state_dict(checkpoint.model_weights(directory / tag))
    return model.eval(), config


# -- batches --------------------------------------------------------------------------------------


def shard(
    batch: dict[str, torch.Tensor], grid: ProcessGrid | None, to: torch.device | None = None
) -> tuple[dict[str, torch.Tensor], int]:
    """This rank's contiguous slice (b, n / sp) of each (b, n) tensor of `batch` over
    grid.sp_group, moved `to` a device, and the global position of its first token (the model's
    position_offset). grid None (one process, no group): the whole batch, offset 0."""
    if grid is None:
        return {key: value.to(to) for key, value in batch.items()}, 0
    mine = {key: shard_sequence(value, grid.sp_group).to(to) for key, value in batch.items()}
    length = next(iter(mine.values())).shape[1]
    return mine, grid.sp_rank * length


def unshard(x: torch.Tensor, grid: ProcessGrid | None) -> torch.Tensor:
    """The whole (b, n, ...) of the slices (b, n / sp, ...) that shard gave the ranks of this
    rank's SP group, on every one of them (a collective over the group)."""
    if grid is None or grid.dims.sequence_parallel == 1:
        return x
    slices = [torch.empty_like(x) for _ in range(grid.dims.sequence_parallel)]
    dist.all_gather(slices, x.contiguous(), group=grid.sp_group)
    return torch.cat(slices, dim=1)
