"""Peak resident memory per rank of the real trainer under ZeRO-1 and ZeRO-3 (CPU, gloo).

    python benchmarks/zero_memory.py [--processes 2] [--steps 3] [--preset longnet-125m]

Each stage runs twice under `torchrun --nproc_per_node P`, this file as the worker: once only
building the model as the trainer does (launch.trainer.build_model: inside deepspeed.zero.Init
under ZeRO-3), once as launch.trainer.Trainer followed by --steps optimizer steps. The model is
the preset's (patterns 128/256/512, 512 tokens, micro-batch 1, float32, AdamW, the stdlib
corpus). Each rank reports its max RSS (getrusage) after the imports and at the end. glibc's
mmap threshold is pinned (MALLOC_MMAP_THRESHOLD_) so that freed buffers leave the resident set.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).parent.parent
BUCKET_KEYS = (
    "reduce_bucket_size",
    "allgather_bucket_size",
    "stage3_prefetch_bucket_size",
    "stage3_max_live_parameters",
    "stage3_max_reuse_distance",
)


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(args: argparse.Namespace) -> None:
    import torch

    from longnet.distributed import ParallelDims
    from longnet.launch.config import load_config
    from longnet.launch.trainer import Trainer, build_model, count_parameters, deepspeed_config

    overrides = [
        f"run.output_dir={args.out / f'run-{args.stage}'}",
        "run.wandb_mode=disabled",
        f"train.steps={args.steps}",
        f"model.preset={args.preset}",
        "model.segment_lengths=[128, 256, 512]",
        "model.dilation_rates=[1, 2, 4]",
        "data.seq_len=512",
        "data.max_documents=60",
        f"data.cache_dir={args.out / 'data-cache'}",
        "deepspeed.train_micro_batch_size_per_gpu=1",
        f"deepspeed.zero_optimization.stage={args.stage}",
        "deepspeed.scheduler.params.warmup_num_steps=1",
        # DeepSpeed's defaults are sized for GPUs and exceed this model (buckets of 5e8
        # elements; ZeRO-3 keeps gathered parameters up to 1e9 of them, reused within 1e9): with
        # them ZeRO-3 keeps every gathered layer until the step ends. The same buckets for both.
        *[f"deepspeed.zero_optimization.{key}={args.bucket}" for key in BUCKET_KEYS],
    ]
    config = load_config(ROOT / "configs" / "tiny-cpu.yaml", overrides)
    imported = _max_rss_mib()
    if args.phase == "build":
        import deepspeed

        deepspeed.init_distributed(verbose=False)
        world = torch.distributed.get_world_size()
        grid = ParallelDims(world, 1, world).build()
        model = build_model(config, grid, deepspeed_config(config, world), None)
    else:
        trainer = Trainer(config)
        for _ in range(args.steps):
            trainer.train_step()
            trainer.step += 1
        model = trainer.engine.module
    record = {
        "stage": args.stage,
        "phase": args.phase,
        "rank": torch.distributed.get_rank(),
        "parameters": count_parameters(model),
        "imported_mib": imported,
        "peak_mib": _max_rss_mib(),
    }
    name = f"stage{args.stage}-{args.phase}-rank{record['rank']}.json"
    (args.out / name).write_text(json.dumps(record))
    torch.distributed.destroy_process_group()


def main(args: argparse.Namespace) -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.processes)),
        "MALLOC_MMAP_THRESHOLD_": str(1 << 20),
    }
    records = {}
    with tempfile.TemporaryDirectory(prefix="zero-memory-") as folder:
        out = Path(folder)
        for stage in (1, 3):
            for phase in ("build", "train"):
                command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", str(args.processes), __file__, "--worker",
                           "--phase", phase, "--stage", str(stage), "--steps", str(args.steps),
                           "--preset", args.preset, "--bucket", str(args.bucket),
                           "--out", str(out)]  # fmt: skip
                subprocess.run(command, cwd=ROOT, env=env, check=True)
        for path in out.glob("stage*.json"):
            r = json.loads(path.read_text())
            records[r["stage"], r["rank"], r["phase"]] = r
    parameters = next(iter(records.values()))["parameters"]
    print(f"\n{args.preset} layers: {parameters / 1e6:.1f}M parameters, "
          f"{parameters * 4 / 2**20:.0f} MiB in float32; {args.processes} ranks, {args.steps} "
          f"steps, buckets of {args.bucket:.0e} elements; max RSS per rank in MiB")  # fmt: skip
    print(f"{'stage':>5} {'rank':>4} {'imports':>8} {'model built':>12} {'trained':>8}")
    for stage, rank, _ in sorted(k for k in records if k[2] == "train"):
        build, train = records[stage, rank, "build"], records[stage, rank, "train"]
        print(f"{stage:>5} {rank:>4} {train['imported_mib']:>8.0f} {build['peak_mib']:>12.0f} "
              f"{train['peak_mib']:>8.0f}")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--preset", default="longnet-125m")
    parser.add_argument("--bucket", type=int, default=10**7, help="elements (see BUCKET_KEYS)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=("build", "train"), help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    (worker if arguments.worker else main)(arguments)
