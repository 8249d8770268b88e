"""Real gloo process groups for the distributed tests, started once per test session; and the
training runs that tests/test_training.py and tests/test_export.py launch and compare.

Starting a process that imports torch costs seconds, so WORLD_SIZE worker processes start on the
first call and then run every distributed test in turn: run(fn, *args) calls fn(*args) on every
rank at once and returns the per-rank results in rank order. fn must be a module-level function
(it is pickled by name, and the workers import its module). A failure on any rank raises here
with that rank's traceback, and the next call starts fresh workers.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 4
# A collective that waits longer than this fails instead of hanging the test session.
COLLECTIVE_TIMEOUT = timedelta(seconds=60)
TASK_TIMEOUT_S = 120


def _serve(rank: int, world_size: int, store_path: str, tasks, results) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT
    )
    for fn, args in iter(tasks.get, None):
        try:
            results.put((rank, None, fn(*args)))
        except Exception:
            results.put((rank, traceback.format_exc(), None))
    dist.destroy_process_group()


class WorkerPool:
    def __init__(self, world_size: int):
        context = mp.get_context("spawn")
        self.world_size = world_size
        self.store_dir = tempfile.TemporaryDirectory(prefix="longnet-gloo-")
        store_path = str(Path(self.store_dir.name) / "store")
        self.tasks = [context.Queue() for _ in range(world_size)]
        self.results = context.Queue()
        self.processes = [
            context.Process(
                target=_serve,
                args=(rank, world_size, store_path, self.tasks[rank], self.results),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for process in self.processes:
            process.start()

    def run(self, fn, *args) -> list:
        for tasks in self.tasks:
            tasks.put((fn, args))
        results, errors = [None] * self.world_size, []
        deadline = time.monotonic() + TASK_TIMEOUT_S
        for _ in range(self.world_size):
            rank, error, result = self._next_result(fn.__name__, deadline)
            results[rank] = result
            if error:
                errors.append(f"rank {rank}:\n{error}")
        if errors:
            raise RuntimeError(f"{fn.__name__} failed\n" + "\n".join(errors))
        return results

    def _next_result(self, name: str, deadline: float) -> tuple:
        while True:
            try:
                return self.results.get(timeout=1)
            except queue.Empty:
                dead = [rank for rank, p in enumerate(self.processes) if not p.is_alive()]
                if dead:
                    raise RuntimeError(f"{name}: worker ranks {dead} died") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name}: no answer within {TASK_TIMEOUT_S} s") from None

    def close(self) -> None:
        for tasks in self.tasks:
            tasks.put(None)
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
        self.store_dir.cleanup()


_pool: WorkerPool | None = None


def run(fn, *args) -> list:
    """fn(*args) on each of the WORLD_SIZE gloo ranks; their results in rank order."""
    global _pool
    if _pool is None:
        _pool = WorkerPool(WORLD_SIZE)
    try:
        return _pool.run(fn, *args)
    except BaseException:
        close()
        raise


@atexit.register
def close() -> None:
    global _pool
    if _pool is not None:
        _pool.close()
        _pool = None


@functools.cache
def consecutive_group(size: int):
    """In a worker: the group of `size` consecutive ranks holding this rank (None when the
    leftover ranks cannot fill one; the world itself when size == WORLD_SIZE). Every rank
    creates every group, in the same order, as torch.distributed.new_group requires."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if size == world:
        return dist.group.WORLD
    mine = None
    for start in range(0, world - size + 1, size):
        group = dist.new_group(list(range(start, start + size)))
        if start <= rank < start + size:
            mine = group
    return mine


# -- training runs ------------------------------------------------------------------------------
# Real processes running launch/train.py on the tiny CPU config for STEPS steps, each step logged.
# The reference runs train once per test session and are shared by the test modules.

ROOT = Path(__file__).parent.parent
BIN_DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
STEPS = 6
# float32 runs differ only in summation order: losses agree to TOLERANCE nats and gradient norms
# (before clipping) to TOLERANCE relative. The norm matters: AdamW is invariant to the scale of
# the gradient and clipping hides it, so a gradient scaled wrong still gives the same losses.
TOLERANCE = 1e-4


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@functools.cache
def session_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="longnet-runs-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def overrides(output_dir: Path, *extra: str) -> list[str]:
    return [
        f"run.output_dir={output_dir}",
        "run.wandb_mode=disabled",
        f"train.steps={STEPS}",
        "train.log_interval=1",
        "train.eval_interval=0",
        "train.eval_batches=1",
        "train.eval_seq_lens=[]",
        "checkpoint.interval=3",
        "data.max_documents=60",
        f"data.cache_dir={session_dir() / 'data-cache'}",
        "deepspeed.train_micro_batch_size_per_gpu=2",
        "deepspeed.scheduler.params.warmup_num_steps=2",
        *extra,
    ]


def python_command(script: str, *args: str) -> list[str]:
    return [sys.executable, script, *args]


def torchrun_command(launcher: list[str], script: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launcher, script, *args]


def train_args(config: str, run_overrides: list[str]) -> list[str]:
    return ["--config", f"configs/{config}", *run_overrides]


def run_command(command: list[str], timeout: float = 420) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def _standalone(processes: int) -> list[str]:
    return ["--standalone", "--nproc_per_node", str(processes)]


# name: (launcher (None: plain python), extra overrides). All read the tiny CPU config.
REFERENCE_RUNS = {
    # One process, micro-batch 2, ZeRO-1: the curve of every layout of a global batch of 2.
    "baseline": (None, []),
    # One process, a global batch of 4: the reference of DP x SP with accumulation.
    "batch4": (None, ["deepspeed.train_micro_batch_size_per_gpu=4"]),
    # ZeRO-3 over two data-parallel ranks (micro-batch 1): the model is built partitioned.
    "zero3-dp2": (
        _standalone(2),
        ["deepspeed.train_micro_batch_size_per_gpu=1", "deepspeed.zero_optimization.stage=3"],
    ),
}


@functools.cache
def reference_run(name: str) -> Path:
    """The output folder of REFERENCE_RUNS[name], trained on first use in this session."""
    launcher, extra = REFERENCE_RUNS[name]
    output = session_dir() / name
    args = train_args("tiny-cpu.yaml", overrides(output, *extra))
    if launcher is None:
        run_command(python_command("launch/train.py", *args))
    else:
        run_command(torchrun_command(launcher, "launch/train.py", *args))
    return output


def train_records(output_dir: Path) -> dict[int, dict]:
    from longnet.launch.metrics import read_metrics

    return {r["step"]: r for r in read_metrics(output_dir) if not r.get("eval")}


def curve_differences(run: Path, reference: Path) -> tuple[float, float]:
    """(largest loss difference, largest relative gradient-norm difference) over the steps,
    after checking that both runs logged every step."""
    got, expected = train_records(run), train_records(reference)
    assert sorted(got) == list(range(1, STEPS + 1)), sorted(got)
    assert sorted(expected) == list(range(1, STEPS + 1)), sorted(expected)
    loss = max(abs(got[s]["loss"] - expected[s]["loss"]) for s in expected)
    norm = max(
        abs(got[s]["grad_norm"] - expected[s]["grad_norm"]) / max(1.0, expected[s]["grad_norm"])
        for s in expected
    )
    return loss, norm


def assert_same_curve(run: Path, reference: Path) -> None:
    loss, norm = curve_differences(run, reference)
    assert loss < TOLERANCE and norm < TOLERANCE, (
        f"loss differs by {loss:.3g}, gradient norm by {norm:.3g} (relative)\n"
        f"{train_records(run)}\n{train_records(reference)}"
    )


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under folder: a run or checkpoint left untouched keeps them all."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
