"""Weak scaling of a LongNetLM training step under sequence parallelism, on real processes.

    OMP_NUM_THREADS=1 python benchmarks/weak_scaling.py [--tokens-per-rank 1024] \
        [--world-sizes 1,2,4,8] [--patterns to-global,pairs] [--repeats 9] \
        [--json benchmarks/results/weak-scaling.json] [--plot docs/capacity/weak-scaling.png]

Issue 17, items 5 and 3. For each world size P the script starts `torchrun --standalone
--nproc_per_node P` (gloo, one thread per rank) on a sequence of P x --tokens-per-rank tokens, so
every rank holds the same number of tokens at every P. Each rank builds longnet-tiny as the
trainer does (launch/trainer.py: LongNetLM(config, attention_fn=runtime.attention(grid)) on the
grid of runtime.start(sp = P)), takes its slice with runtime.shard and runs full training steps:
forward with labels and return_logits=False, the loss over the group's tokens, backward, the
gradients summed over the group, torch's AdamW (float32, no ZeRO). Per rank:

- peak memory of one step (after a first step made AdamW's states) by torch's MemTracker on the
  real CPU tensors, with longnet's attention ops opened as launch/capacity.py does (the
  sequence-parallel ops too), so their workspace and exchange buffers are seen;
- bytes the attention exchange sends and receives per step (longnet.distributed.communication
  for each layer, forward and backward);
- CPU time of forward+backward and of the whole step (time.process_time: this process only),
  best of --repeats after the warm-up, each started after a barrier; of it, the CPU inside the
  collectives (the attention's all_to_all_single, the all_reduce of the loss's token count, the
  gradients' all_reduce, one flat bucket as DeepSpeed's);
- the same forward+backward with one device's attention on the rank's shard (the same weights,
  no exchange), timed in turn with the SP step in the same processes: P processes on few cores
  slow each other down even in process_time (cache, SMT, switches), and this reference shows by
  how much, so that SP / reference is the sequence-parallel cost with the machine's share out.

Pattern sets (both extend longnet-tiny's w = 64, 128, 256, r = 1, 2, 4 by doubling w and r, so
w / r = 64 throughout; causal):

  to-global  up to the global sequence of the largest P (8 x 1024 = 8192 at the defaults): the
             same model at every P, whose longest segments span more ranks as P grows
  pairs      up to 2 x tokens per rank: at every P >= 2 the sequence is at least the longest
             segment, the regime of LongNet's constant-communication argument

The launcher prints, per pattern set, tables with ratios against P = 1 (memory, CPU time) and
P = 2 (bytes received) and whether each is flat (10% memory and bytes, 15% time), then item 3:
each rank's measured peak against `longnet-capacity`'s estimate for that configuration
(launch.capacity.estimate with sp = P, zero 0, fp32: the model states of torch's AdamW, as in
the measured step). It writes --json and the --plot figure (results: benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, _MemRefType

from longnet import LongNetConfig, LongNetLM
from longnet.distributed import communication
from longnet.distributed import sequence_parallel as sp_module
from longnet.launch import capacity, runtime

PATTERN_SETS = ("to-global", "pairs")
MEMORY_FLATNESS, BYTES_FLATNESS, TIME_FLATNESS = 1.10, 1.10, 1.15
STATES = (_MemRefType.PARAM, _MemRefType.BUFFER, _MemRefType.GRAD, _MemRefType.OPT)
MIB = 1 << 20


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens-per-rank", type=int, default=1024)
    parser.add_argument("--world-sizes", type=_ints, default=[1, 2, 4, 8])
    parser.add_argument("--patterns", type=lambda s: s.split(","), default=list(PATTERN_SETS))
    parser.add_argument("--repeats", type=int, default=9, help="timed steps (best is kept)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/weak-scaling.json"))
    parser.add_argument("--plot", type=Path, default=Path("docs/capacity/weak-scaling.png"))
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)  # a torchrun rank
    args = parser.parse_args(argv)
    unknown = sorted(set(args.patterns) - set(PATTERN_SETS))
    if unknown:
        parser.error(f"--patterns {unknown}: choose from {list(PATTERN_SETS)}")
    return args


def pattern_config(name: str, tokens_per_rank: int, largest_world: int) -> LongNetConfig:
    """longnet-tiny with its patterns doubled (w, r) -> (2w, 2r) up to the set's longest."""
    base = LongNetConfig.preset("longnet-tiny")
    longest = tokens_per_rank * (largest_world if name == "to-global" else 2)
    lengths, rates = list(base.segment_lengths), list(base.dilation_rates)
    while 2 * lengths[-1] <= longest:
        lengths.append(2 * lengths[-1])
        rates.append(2 * rates[-1])
    return replace(base, segment_lengths=tuple(lengths), dilation_rates=tuple(rates))


# -- one rank (under torchrun) --------------------------------------------------------------------


class _OpenAttention(capacity._OpenAttention):
    """launch/capacity.py's mode, opening the sequence-parallel ops as well: the tracker sees
    their workspace, send buffers and received K/V (a custom op is one opaque call otherwise)."""

    def __init__(self, tracker):
        super().__init__(tracker)
        ops = torch.ops.longnet
        self.bodies[ops.sequence_parallel_attention.default] = sp_module._attention_op._init_fn
        self.bodies[ops.sequence_parallel_attention_backward.default] = (
            sp_module._attention_backward_op._init_fn
        )


class _CollectiveClock:
    """CPU seconds this process spends inside torch.distributed's all_to_all_single (the
    attention exchange) and all_reduce while installed: it wraps the module attributes, which
    distributed/sequence_parallel.py and this script call through."""

    def __init__(self):
        self.seconds = {"all_to_all_single": 0.0, "all_reduce": 0.0}
        self.saved = {}

    def __enter__(self):
        self.saved = {name: getattr(dist, name) for name in self.seconds}
        for name, fn in self.saved.items():
            setattr(dist, name, self._timed(name, fn))
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)

    def _timed(self, name, fn):
        def timed(*args, **kwargs):
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.process_time() - start

        return timed


def train_step(model, optimizer, mine: dict, offset: int, group, times=None, clock=None):
    """The trainer's micro-batch (launch/trainer.py _loss: this rank's slice, the loss over the
    group's tokens), the gradients summed over the group (one flat all-reduce, as DeepSpeed's
    bucket), AdamW. times: CPU seconds of forward+backward and of the whole step, and (with a
    _CollectiveClock) of the collectives in each."""
    clock = clock or _CollectiveClock()
    start, before = time.process_time(), dict(clock.seconds)
    out = model(
        mine["input_ids"], labels=mine["labels"], position_offset=offset, return_logits=False
    )
    tokens = out.num_tokens.detach().clone()
    dist.all_reduce(tokens, group=group)
    (out.loss_sum / tokens.clamp(min=1)).backward()
    middle, after = time.process_time(), dict(clock.seconds)
    grads = [p.grad for p in model.parameters()]
    flat = torch._utils._flatten_dense_tensors(grads)  # one bucket, as DeepSpeed's
    dist.all_reduce(flat, group=group)
    summed = torch._utils._unflatten_dense_tensors(flat, grads)
    for grad, total in zip(grads, summed, strict=True):
        grad.copy_(total)
    del flat, summed
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    if times is not None:
        times["fwd_bwd_cpu_s"].append(middle - start)
        times["step_cpu_s"].append(time.process_time() - start)
        for name, key in (("all_to_all_single", "exchange"), ("all_reduce", "token_all_reduce")):
            times[f"fwd_bwd_{key}_cpu_s"].append(after[name] - before[name])
        times["gradient_all_reduce_cpu_s"].append(clock.seconds["all_reduce"] - after["all_reduce"])


def exchanged_bytes(model, config, mine: dict, group) -> dict:
    """Bytes this rank's attention exchange sends and receives in one step, over all layers
    (longnet.distributed.communication: forward K/V, backward their gradients)."""
    batch, length = mine["input_ids"].shape
    heads, kv_heads, dim = config.num_heads, config.num_kv_heads, config.head_dim
    q = torch.empty(batch, length, heads, dim)
    k = torch.empty(batch, length, kv_heads, dim)
    total = dict(forward_sent=0, forward_received=0, backward_sent=0, backward_received=0)
    layers = [m for m in model.modules() if hasattr(m, "attention_fn")]
    for layer in layers:
        c = communication(
            q, k, k, config.segment_lengths, config.dilation_rates, group=group, causal=True,
            head_shift=layer.head_shift,
        )  # fmt: skip
        for key in total:
            total[key] += getattr(c, key)
    total["layers"] = len(layers)
    return total


def measure_rank(config: LongNetConfig, grid, args) -> dict:
    world, group = grid.dims.sequence_parallel, grid.sp_group
    torch.manual_seed(0)  # the same weights on every rank
    model = LongNetLM(config, attention_fn=runtime.attention(grid))
    optimizer = torch.optim.AdamW(model.parameters(), foreach=False)  # as measured_peak
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(
        0, config.vocab_size, (1, world * args.tokens_per_rank + 1), generator=generator
    )
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    mine, offset = runtime.shard(batch, grid)

    def step(times=None, clock=None):
        train_step(model, optimizer, mine, offset, group, times, clock)

    step()  # warm-up: AdamW's states, the plans, the layout check of the SP op
    tracker = capacity._Tracker()
    tracker.track_external(model, optimizer)
    dist.barrier()
    with tracker, _OpenAttention(tracker):
        step()
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    states = sum(peak.get(kind, 0) for kind in STATES)
    # The reference: the same weights with one device's attention on this rank's shard (no
    # exchange, segments cut at the shard), timed in turn with the SP step under the same load:
    # its growth with P is the machine's (P processes on the cores), SP / reference the SP cost.
    reference = LongNetLM(config)
    reference.load_state_dict(model.state_dict())
    reference_optimizer = torch.optim.AdamW(reference.parameters(), foreach=False)

    def reference_step(times=None):
        start = time.process_time()
        out = reference(
            mine["input_ids"], labels=mine["labels"], position_offset=offset, return_logits=False
        )
        out.loss.backward()
        if times is not None:
            times["reference_fwd_bwd_cpu_s"].append(time.process_time() - start)
        reference_optimizer.step()
        reference_optimizer.zero_grad(set_to_none=False)

    reference_step()
    keys = ("fwd_bwd_cpu_s", "step_cpu_s", "step_wall_s", "reference_fwd_bwd_cpu_s")
    keys += (
        "fwd_bwd_exchange_cpu_s",
        "fwd_bwd_token_all_reduce_cpu_s",
        "gradient_all_reduce_cpu_s",
    )
    times = {key: [] for key in keys}
    with _CollectiveClock() as clock:
        for _ in range(args.repeats):
            dist.barrier()
            start = time.perf_counter()
            step(times, clock)
            times["step_wall_s"].append(time.perf_counter() - start)
            dist.barrier()
            reference_step(times)
    best = min(range(args.repeats), key=times["fwd_bwd_cpu_s"].__getitem__)
    return dict(
        rank=grid.sp_rank,
        position_offset=offset,
        peak_bytes=peak[_TOTAL_KEY],
        peak_by_kind={kind.value: peak.get(kind, 0) for kind in _MemRefType},
        model_state_bytes=states,
        beyond_states_bytes=peak[_TOTAL_KEY] - states,
        exchange=exchanged_bytes(model, config, mine, group),
        **times,
        **{f"best_{key}": min(value) for key, value in times.items()},
        at_best_fwd_bwd={key: value[best] for key, value in times.items()},
    )


def empty_exchange_cpu(group, calls: int = 100) -> float:
    """CPU seconds of one all_to_all_single that moves nothing (every split 0) over `group`: the
    exchange's cost per call apart from its bytes."""
    world = dist.get_world_size(group)
    empty = torch.empty(0)
    dist.barrier(group=group)
    start = time.process_time()
    for _ in range(calls):
        dist.all_to_all_single(empty, empty, [0] * world, [0] * world, group=group)
    return (time.process_time() - start) / calls


def run_rank(args) -> None:
    grid = runtime.start(sequence_parallel=runtime.world_size())
    largest = max(args.world_sizes)
    rows = {}
    for name in args.patterns:
        rows[name] = measure_rank(pattern_config(name, args.tokens_per_rank, largest), grid, args)
    rows["empty_all_to_all_cpu_s"] = empty_exchange_cpu(grid.sp_group)
    gathered = [None] * grid.dims.sequence_parallel
    dist.all_gather_object(gathered, rows, group=grid.sp_group)
    if grid.sp_rank == 0:
        result = dict(
            world_size=grid.dims.sequence_parallel,
            threads=torch.get_num_threads(),
            ranks={name: [g[name] for g in gathered] for name in args.patterns},
            empty_all_to_all_cpu_s=max(g["empty_all_to_all_cpu_s"] for g in gathered),
        )
        args.worker_out.write_text(json.dumps(result))
    runtime.finish()


# -- the launcher ---------------------------------------------------------------------------------


def run_world(args, world: int, directory: Path) -> dict:
    out = directory / f"P{world}.json"
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
        f"--nproc_per_node={world}",
        __file__,
        f"--tokens-per-rank={args.tokens_per_rank}",
        f"--world-sizes={','.join(map(str, args.world_sizes))}",
        f"--patterns={','.join(args.patterns)}",
        f"--repeats={args.repeats}",
        f"--worker-out={out}",
    ]
    start = time.perf_counter()
    subprocess.run(command, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - start
    return result


def estimates(args, config: LongNetConfig, world: int) -> dict:
    """longnet-capacity's per-rank estimate of the measured step: sp = P, float32, torch's AdamW
    without ZeRO (zero 0), no checkpointing."""
    seq_len = world * args.tokens_per_rank
    step = capacity.Step(config, seq_len, sp=world, zero=0, dtype="fp32")
    result = capacity.estimate(step, False)
    memory = result["per_rank"]["memory"]
    states = sum(memory[k] for k in ("parameters", "gradients", "optimizer_states"))
    return dict(
        peak=result["per_rank"]["peak"],
        memory=memory,
        beyond_states=result["per_rank"]["peak"] - states,
        exchange_worst_rank=capacity.exchange(step),  # elements of one call (K and V entries)
    )


def slowest_rank(ranks: list[dict]) -> dict:
    """Where the slowest rank's forward+backward CPU time goes (its fastest repeat): inside the
    collectives (the attention exchange, the loss's token count) or outside, against the
    one-device reference on its shard; and the gradient all-reduce after it (the most over the
    ranks of each one's fastest)."""
    slowest = max(ranks, key=lambda r: r["best_fwd_bwd_cpu_s"])
    at_best = slowest["at_best_fwd_bwd"]
    exchange, token = at_best["fwd_bwd_exchange_cpu_s"], at_best["fwd_bwd_token_all_reduce_cpu_s"]
    outside = at_best["fwd_bwd_cpu_s"] - exchange - token
    return dict(
        slowest_rank=slowest["rank"],
        exchange_cpu=exchange,
        token_all_reduce_cpu=token,
        outside_over_reference=outside / slowest["best_reference_fwd_bwd_cpu_s"],
        gradient_all_reduce_cpu=max(r["best_gradient_all_reduce_cpu_s"] for r in ranks),
    )


def summarize(args, runs: dict) -> dict:
    """Per pattern set and P: max/min over ranks, ratios against P = 1 (P = 2 for bytes)."""
    out = {}
    for name in args.patterns:
        config = pattern_config(name, args.tokens_per_rank, max(args.world_sizes))
        rows = []
        for world, run in sorted(runs.items()):
            ranks = run["ranks"][name]
            received = [r["exchange"]["forward_received"] + r["exchange"]["backward_received"]
                        for r in ranks]  # fmt: skip
            sent = [r["exchange"]["forward_sent"] + r["exchange"]["backward_sent"] for r in ranks]
            rows.append(
                dict(
                    world_size=world,
                    seq_len=world * args.tokens_per_rank,
                    spanning=[w for w in config.segment_lengths
                              if min(w, world * args.tokens_per_rank) > args.tokens_per_rank],
                    peak_max=max(r["peak_bytes"] for r in ranks),
                    peak_min=min(r["peak_bytes"] for r in ranks),
                    received_max=max(received),
                    received_min=min(received),
                    sent_max=max(sent),
                    forward_received_per_layer_max=max(
                        r["exchange"]["forward_received"] // r["exchange"]["layers"] for r in ranks
                    ),
                    cpu_max=max(r["best_fwd_bwd_cpu_s"] for r in ranks),
                    cpu_min=min(r["best_fwd_bwd_cpu_s"] for r in ranks),
                    step_cpu_max=max(r["best_step_cpu_s"] for r in ranks),
                    reference_cpu_max=max(r["best_reference_fwd_bwd_cpu_s"] for r in ranks),
                    sp_over_reference=max(
                        r["best_fwd_bwd_cpu_s"] / r["best_reference_fwd_bwd_cpu_s"] for r in ranks
                    ),
                    **slowest_rank(ranks),
                    empty_all_to_all_cpu=run["empty_all_to_all_cpu_s"],
                    estimate=estimates(args, config, world),
                )
            )  # fmt: skip
        first = rows[0]
        two = next((r for r in rows if r["world_size"] == 2), None)
        for row in rows:
            row["peak_ratio"] = row["peak_max"] / first["peak_max"]
            row["cpu_ratio"] = row["cpu_max"] / first["cpu_max"]
            row["step_cpu_ratio"] = row["step_cpu_max"] / first["step_cpu_max"]
            row["reference_cpu_ratio"] = row["reference_cpu_max"] / first["reference_cpu_max"]
            row["received_ratio"] = (
                row["received_max"] / two["received_max"]
                if two and row["world_size"] >= 2 and two["received_max"]
                else None
            )
        out[name] = dict(
            segment_lengths=list(config.segment_lengths),
            dilation_rates=list(config.dilation_rates),
            rows=rows,
        )
    return out


def verdicts(rows: list[dict]) -> dict:
    """max / min over P of each per-rank quantity (max over ranks; bytes: P >= 2), and whether it
    is flat. cpu_vs_reference and compute_vs_reference divide by the one-device reference timed
    in the same processes (the machine's share out), the latter without the collectives."""

    def spread(key, worlds=1):
        values = [r[key] for r in rows if r["world_size"] >= worlds]
        return max(values) / min(values) if values and min(values) else None

    limits = dict(
        peak=(MEMORY_FLATNESS, spread("peak_max")),
        received=(BYTES_FLATNESS, spread("received_max", 2)),
        cpu=(TIME_FLATNESS, spread("cpu_max")),
        cpu_vs_reference=(TIME_FLATNESS, spread("sp_over_reference")),
        compute_vs_reference=(TIME_FLATNESS, spread("outside_over_reference")),
    )
    return {
        key: dict(max_over_min=value, flat=value <= limit)
        for key, (limit, value) in limits.items()
        if value is not None
    }


def print_tables(args, summary: dict, runs: dict) -> None:
    for name, result in summary.items():
        rows = result["rows"]
        print(
            f"\n{name}: longnet-tiny, w = {result['segment_lengths']}, r = "
            f"{result['dilation_rates']}, causal, {args.tokens_per_rank} tokens per rank"
        )
        print(
            "  P    seq span | peak MiB max (min)  ratio | fwd recv KiB/layer | "
            "recv KiB/step max (min)  ratio | sent KiB/step"
        )
        for r in rows:
            ratio = "-" if r["received_ratio"] is None else f"{r['received_ratio']:.3f}"
            print(
                f"{r['world_size']:>3} {r['seq_len']:>6} {len(r['spanning']):>4} | "
                f"{r['peak_max'] / MIB:7.2f} ({r['peak_min'] / MIB:6.2f}) {r['peak_ratio']:6.3f} | "
                f"{r['forward_received_per_layer_max'] / 1024:18.1f} | "
                f"{r['received_max'] / 1024:8.1f} ({r['received_min'] / 1024:6.1f}) {ratio:>6} | "
                f"{r['sent_max'] / 1024:13.1f}"
            )
        print(
            "  P | fwd+bwd CPU s max (min)  ratio | exchange  tokens | one-device ref.  ratio | "
            "SP / ref. | w/o coll. / ref. | empty a2a us | grad all-reduce | step CPU s  ratio"
        )
        for r in rows:
            print(
                f"{r['world_size']:>3} | {r['cpu_max']:13.4f} ({r['cpu_min']:6.4f}) "
                f"{r['cpu_ratio']:6.3f} | {r['exchange_cpu']:8.4f} "
                f"{r['token_all_reduce_cpu']:7.4f} | "
                f"{r['reference_cpu_max']:15.4f} {r['reference_cpu_ratio']:6.3f} | "
                f"{r['sp_over_reference']:9.3f} | {r['outside_over_reference']:16.3f} | "
                f"{r['empty_all_to_all_cpu'] * 1e6:12.0f} | "
                f"{r['gradient_all_reduce_cpu']:15.4f} | "
                f"{r['step_cpu_max']:10.4f} {r['step_cpu_ratio']:6.3f}"
            )
        labels = dict(
            peak="peak memory",
            received="bytes received (P >= 2)",
            cpu="forward+backward CPU",
            cpu_vs_reference="SP / one-device reference",
            compute_vs_reference="outside collectives / reference",
        )
        for key, v in verdicts(rows).items():
            state = "flat" if v["flat"] else "NOT flat"
            print(f"  {labels[key]} per rank, max over ranks: max / min over P "
                  f"{v['max_over_min']:.3f} ({state})")  # fmt: skip
        for r in rows:  # the planner's worst rank (longnet-capacity) against communication()
            worst = r["estimate"]["exchange_worst_rank"]["received"] * 4  # float32 elements
            found = r["forward_received_per_layer_max"]
            if worst != found:
                print(f"  P = {r['world_size']}: longnet-capacity's worst rank receives {worst} "
                      f"bytes per layer, communication() {found}")  # fmt: skip
        print("  item 3, longnet-capacity's estimate per rank (sp = P, zero 0, fp32):")
        print(
            "    P rank | measured MiB estimated   error | beyond model states: meas.  est.   error"
        )
        for r in rows:
            world = r["world_size"]
            if world < 2:
                continue
            e = r["estimate"]
            for rank in runs[world]["ranks"][name]:
                measured, beyond = rank["peak_bytes"], rank["beyond_states_bytes"]
                print(
                    f"  {world:>3} {rank['rank']:>4} | {measured / MIB:12.2f} "
                    f"{e['peak'] / MIB:9.2f} "
                    f"{e['peak'] / measured - 1:+7.2%} | {beyond / MIB:27.2f} "
                    f"{e['beyond_states'] / MIB:5.2f} {e['beyond_states'] / beyond - 1:+7.2%}"
                )


def plot(args, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(13, 4))
    for (name, result), color in zip(summary.items(), ("C0", "C1"), strict=False):
        rows = result["rows"]
        worlds = [r["world_size"] for r in rows]
        panels = (
            ([r["peak_max"] / MIB for r in rows], [r["peak_min"] / MIB for r in rows]),
            ([r["received_max"] / 1024 for r in rows], [r["received_min"] / 1024 for r in rows]),
            ([r["cpu_max"] for r in rows], [r["cpu_min"] for r in rows]),
        )
        for axis, (high, low) in zip(axes, panels, strict=True):
            axis.plot(worlds, high, "o-", color=color, label=f"{name}: max over ranks")
            axis.plot(worlds, low, "v:", color=color, label=f"{name}: min over ranks")
        estimated = [r["estimate"]["peak"] / MIB for r in rows]
        axes[0].plot(worlds, estimated, "x--", color=color, label=f"{name}: longnet-capacity")
        reference = [r["reference_cpu_max"] for r in rows]
        axes[2].plot(worlds, reference, "s--", color=color, label=f"{name}: one-device reference")
    titles = (
        "peak memory per rank (MiB, MemTracker)",
        "attention exchange received per rank (KiB / step)",
        "forward+backward CPU time per rank (s, best)",
    )
    for axis, title in zip(axes, titles, strict=True):
        axis.set_xscale("log", base=2)
        axis.set_xticks(args.world_sizes, [str(p) for p in args.world_sizes])
        axis.set_xlabel("processes P (tokens per rank fixed)")
        axis.set_title(title, fontsize=10)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower center")
    axes[2].legend(fontsize=7, loc="lower left")
    figure.suptitle(
        f"LongNet weak scaling: longnet-tiny training step, {args.tokens_per_rank} tokens per "
        f"rank, gloo, one thread per rank (CPU)",
        fontsize=11,
    )
    figure.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.plot, dpi=110)
    print(f"wrote {args.plot}")


def launch(args) -> None:
    started = time.perf_counter()
    print(
        f"weak scaling: {args.tokens_per_rank} tokens per rank, P = {args.world_sizes}, "
        f"patterns {args.patterns}, best of {args.repeats} steps",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        runs = {world: run_world(args, world, Path(tmp)) for world in args.world_sizes}
    summary = summarize(args, runs)
    print_tables(args, summary, runs)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    settings = {key: str(value) for key, value in vars(args).items()}
    verdict = {name: verdicts(s["rows"]) for name, s in summary.items()}
    args.json.write_text(
        json.dumps(
            dict(
                args=settings, runs=runs, summary=summary, verdicts=verdict, torch=torch.__version__
            ),
            indent=2,
        )  # fmt: skip
    )
    print(f"wrote {args.json}")
    if not args.no_plot:
        plot(args, summary)
    print(f"total {time.perf_counter() - started:.0f} s")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker_out is not None:
        run_rank(args)
    else:
        launch(args)


if __name__ == "__main__":
    main()
