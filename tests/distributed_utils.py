"""Real gloo process groups for the distributed tests, started once per test session.

Starting a process that imports torch costs seconds, so WORLD_SIZE worker processes start on the
first call and then run every distributed test in turn: run(fn, *args) calls fn(*args) on every
rank at once and returns the per-rank results in rank order. fn must be a module-level function
(it is pickled by name, and the workers import its module). A failure on any rank raises here
with that rank's traceback, and the next call starts fresh workers.
"""

from __future__ import annotations

import atexit
import functools
import queue
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
