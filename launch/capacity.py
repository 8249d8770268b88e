"""longnet-capacity: the memory, exchange bytes and FLOPs of one rank's training step, estimated
without compute, and the longest sequence (or the fewest sequence-parallel ranks) that fits.

    longnet-capacity --preset longnet-125m --seq-len 1048576 --sp 8 --zero 2 --dtype bf16 \
        --activation-checkpointing --device-memory 80GiB [--json out.json]
    longnet-capacity --config configs/gpu-125m-1m-sp8.yaml --device-memory 80GiB
    ... --max-seq-len            the longest sequence the patterns allow that fits
    ... --target-seq-len 1e9     the smallest sequence-parallel degree that fits it

Per rank, at the step's peak (docs/capacity.md says what each number counts):
  model states      parameters, gradients, optimizer states: per ZeRO stage, with the bytes per
                    parameter of DeepSpeed's estimators (model_states)
  activations,      the REAL training step (LongNetLM forward with labels, return_logits=False,
  temporaries,      backward) run under FakeTensorMode with torch's MemTracker: shapes only, no
  attention         compute. A rank of a sequence-parallel group runs its shard of seq_len / sp
  workspace         tokens through the one-device model (the SP op's local work has its shapes)
  exchange buffers  the all-to-all of sparse K/V, from the planner's send and receive counts
  host memory       (not in the peak) what offload_checkpoints keeps in host memory: the
                    checkpointed blocks' inputs, copied out of the tracked device memory
The model's memory options count as set in its config or by --ffn-tile-tokens N (the FFN over
token tiles) and --offload-checkpoints (the checkpointed blocks' inputs in host memory).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import sys
import weakref
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from longnet import LongNetConfig, LongNetLM, dilated
from longnet.cost import pairs_per_token
from longnet.kernels import accumulation_dtype
from longnet.launch.cli import check_output_file, fail
from longnet.plan import make_plan

aten = torch.ops.aten
GIB = 1 << 30
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The longest shard run under the fake mode (~1 min for 125M on a busy core). A longer one is
# extrapolated from shards of EXACT_TOKENS / 2 and EXACT_TOKENS tokens: every byte of the step is
# linear in the tokens (flash kernels keep no (n, n) tensor), checked in docs/capacity.md.
EXACT_TOKENS = 1 << 17
UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
UNITS |= {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
# The modules that decide the host-read question by name (engine may not import it).
HOST_READERS = ("longnet.kernels", "longnet.model", "longnet.selection", "longnet.engine")
# The modules that take the model's offload context (longnet.layers.saved_on_host) by name.
OFFLOADERS = ("longnet.layers", "longnet.model")


@dataclass
class Step:
    """One rank's training step: the model, the sequence and the parallel layout."""

    config: LongNetConfig
    seq_len: int
    sp: int = 1
    dp: int = 1
    zero: int = 1
    dtype: str = "bf16"
    micro_batch: int = 1
    grad_accum: int = 1
    device_memory: int | None = None

    @property
    def shard(self) -> int:
        return self.seq_len // self.sp


# -- input ----------------------------------------------------------------------------------------


def parse_bytes(text: str) -> int:
    """'80GiB', '141GB', '512MiB' or a number of bytes; ValueError naming the text."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match and (match[2].lower() or "b")
    if not match or unit not in UNITS or float(match[1]) <= 0:
        raise ValueError(f"--device-memory {text!r}: expected a size such as 80GiB or 141GB")
    return int(float(match[1]) * UNITS[unit])


def parse_tokens(text: str) -> int:
    """'1048576' or '1e9' (a whole number > 0); ValueError naming the text."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value >= 1 and value == int(value)):
        raise ValueError(f"sequence length {text!r}: expected a whole number >= 1 such as 1e9")
    return int(value)


def whole_segments(shard: int, lengths) -> bool:
    """Whether a shard of `shard` tokens holds whole segments of every pattern, or a whole part
    of a longer one (distributed.sequence_parallel.check_layout's rule, on one rank too)."""
    return all(shard % w == 0 if w <= shard else w % shard == 0 for w in lengths)


def check(step: Step) -> None:
    """ValueError, naming the value, unless the step is one the trainer could run."""
    for name in ("seq_len", "sp", "dp", "micro_batch", "grad_accum"):
        value = getattr(step, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name.replace('_', '-')} must be a whole number >= 1, got {value}")
    if step.zero not in (0, 1, 2, 3):
        raise ValueError(f"zero must be 0, 1, 2 or 3, got {step.zero}")
    if step.zero == 3 and step.config.ffn_tile_tokens:
        raise ValueError(
            f"ffn-tile-tokens {step.config.ffn_tile_tokens} cannot go with zero 3 (the trainer "
            "refuses it: the tiles' backward recomputes the FFN while ZeRO-3 holds its weights "
            "partitioned)"
        )
    if step.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {step.dtype!r}")
    lengths = step.config.segment_lengths
    # One device takes any length (the last segment may be short); the searches use whole ones.
    if step.sp > 1 and (step.seq_len % step.sp or not whole_segments(step.shard, lengths)):
        raise ValueError(
            f"seq-len {step.seq_len} is not allowed at sp {step.sp} by segment_lengths "
            f"{list(lengths)}: each of the {step.sp} shards must hold whole segments or a whole "
            f"part of one (allowed near it: {', '.join(map(str, allowed_near(step)))})"
        )


def allowed_near(step: Step) -> list[int]:
    """The allowed sequence lengths next to step.seq_len at step.sp (for error messages)."""
    shards = shard_lengths(step.config.segment_lengths)
    below = [s for s in shards.below if s * step.sp <= step.seq_len][-1:]
    period = shards.period
    k = max(1, step.seq_len // step.sp // period)
    return sorted({step.sp * s for s in below + [k * period, (k + 1) * period]})


@dataclass
class ShardLengths:
    below: list[int]  # the allowed shards shorter than the longest segment
    period: int  # longer ones: multiples of lcm(segment_lengths)

    def nth(self, i: int) -> int:
        extra = i - len(self.below)
        return self.below[i] if extra < 0 else (extra + 1) * self.period


def shard_lengths(lengths) -> ShardLengths:
    longest = max(lengths)
    divisors = [s for s in range(1, math.isqrt(longest) + 1) if longest % s == 0]
    divisors = sorted({*divisors, *(longest // s for s in divisors)})
    below = [s for s in divisors if s < longest and whole_segments(s, lengths)]
    return ShardLengths(below, math.lcm(*lengths))


# -- model states ---------------------------------------------------------------------------------


def model_states(params: int, largest: int, zero: int, world: int, dtype: str) -> dict:
    """Bytes per rank of parameters, gradients and optimizer states (AdamW).

    The bytes per parameter of DeepSpeed's estimators: deepspeed.runtime.zero.stage_1_and_2.
    estimate_zero2_model_states_mem_needs(cpu_offload=False) = 2 P + 18 P / world, "2 = params
    16bit, 18 = 2 grads 16bit + 4 grads 32bit + 4 params 32bit + 8 optimizer states 32bit";
    stage3.estimate_zero3_model_states_mem_needs = 4 largest_layer + 18 P / world (its 18: the
    16-bit gradient partition is reduced into the fp32 one). ZeRO-1 shards what the optimizer
    owns (32-bit gradients, master weights, moments), not the 16-bit gradients. Without ZeRO,
    float32 AdamW holds parameters, gradients and two moments (16 P, torch's own optimizer).
    """
    width = DTYPES[dtype].itemsize
    shard = params / world
    if zero == 0 and width == 4:
        out = dict(parameters=4 * params, gradients=4 * params, optimizer_states=8 * params)
    elif zero == 3:  # the largest layer gathered (16-bit parameters and gradients)
        out = dict(
            parameters=width * shard + 4 * largest, gradients=4 * shard, optimizer_states=12 * shard
        )
    else:
        shared = 1 if zero == 0 else world  # ZeRO-1/2 shard the 32-bit copies
        out = dict(
            parameters=width * params,
            gradients=width * (params if zero < 2 else shard) + 4 * params / shared,
            optimizer_states=12 * params / shared,  # 32-bit master weights + 2 moments
        )
    return {key: int(value) for key, value in out.items()}


# -- the step under the fake mode ------------------------------------------------------------------


def _never_on_host(device) -> bool:
    return False


@contextlib.contextmanager
def accelerator_path():
    """The model takes the path it takes on an accelerator: no tensor value read on the host
    (token id checks, exact NaN bookkeeping), which fake tensors have no values for."""
    modules = [sys.modules.get(name) for name in HOST_READERS]
    saved = [(m, m.reads_values_on_host) for m in modules if hasattr(m, "reads_values_on_host")]
    for module, _ in saved:
        module.reads_values_on_host = _never_on_host
    try:
        yield
    finally:
        for module, original in saved:
            module.reads_values_on_host = original


class _HostCopies(torch.autograd.graph.saved_tensors_hooks):
    """saved_on_host as an accelerator runs it, on any device: each saved tensor is copied
    outside the tracker (host memory, counted here) and the tracked one is dropped; backward
    gets a new tracked copy (save_on_cpu's copy back to the device). On a CPU, save_on_cpu
    itself would keep the tensor where it is, in the memory the tracker counts."""

    def __init__(self):
        self.bytes = self.peak = 0

        def pack(tensor):
            with _disable_current_modes():  # neither the tracker nor a dispatch mode sees it
                copy = tensor.detach().clone()
            self.bytes += copy.nbytes
            self.peak = max(self.peak, self.bytes)
            weakref.finalize(copy, self._release, copy.nbytes)
            return tensor.device, copy

        def unpack(packed):
            device, copy = packed
            return copy.to(device, copy=True)

        super().__init__(pack, unpack)

    def _release(self, nbytes: int) -> None:
        self.bytes -= nbytes


@contextlib.contextmanager
def host_offload(hooks: _HostCopies):
    """The model's saved_on_host (offload_checkpoints) runs `hooks` during the step."""
    modules = [sys.modules.get(name) for name in OFFLOADERS]
    saved = [(m, m.saved_on_host) for m in modules if hasattr(m, "saved_on_host")]
    for module, _ in saved:
        module.saved_on_host = lambda device: hooks
    try:
        yield
    finally:
        for module, original in saved:
            module.saved_on_host = original


class _Tracker(MemTracker):
    """MemTracker keeping the device-wide peak only (its per-module peaks cost half the run), and
    the snapshot at the start of the attention call in progress at the peak."""

    attention_start = None  # {category: bytes} when the running attention call began
    peak_attention_start = None

    def _update_peak_stats(self, peak_state) -> None:
        for device, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(device, 0) < snap[_TOTAL_KEY]:
                self._peak_mem[device] = snap[_TOTAL_KEY]
                self._peak_mem_snap[device] = dict(snap)
                self.peak_attention_start = self.attention_start


class _OpenAttention(TorchDispatchMode):
    """Runs longnet's attention custom ops by their Python bodies, so the tracker (below this
    mode) sees their workspace: a custom op is one opaque call to a dispatch mode, and the fake
    mode would run only its fake kernel, which allocates the outputs."""

    def __init__(self, tracker: _Tracker):
        super().__init__()
        self.tracker = tracker
        self.bodies = {
            torch.ops.longnet.dilated_attention.default: dilated._attention_op._init_fn,
            torch.ops.longnet.dilated_attention_backward.default: (
                dilated._attention_backward_op._init_fn
            ),
        }

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        body = self.bodies.get(func)
        if body is None:
            return func(*args, **(kwargs or {}))
        self.tracker.attention_start = dict(next(iter(self.tracker._curr_mem_snap.values())))
        try:
            return body(*args, **(kwargs or {}))
        finally:
            self.tracker.attention_start = None


class _NoHostReads(TorchDispatchMode):
    """A value read on the host that the accelerator path still makes (a check not yet gated by
    reads_values_on_host) answers 0 / False: no NaN, ids in range. Counted in the result."""

    reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (aten._local_scalar_dense.default, aten.is_nonzero.default, aten.item.default):
            self.reads += 1
            return False if args[0].dtype == torch.bool else 0
        return func(*args, **(kwargs or {}))


def _build(config: LongNetConfig, dtype: torch.dtype) -> LongNetLM:
    # Built in the training dtype (DeepSpeed's bf16 casts the module); .to() cannot swap fake
    # parameters. Gradients exist before the step, as DeepSpeed's contiguous buffers do.
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = LongNetLM(config)
    finally:
        torch.set_default_dtype(default)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    return model


def tracked_step(model, tokens: int, batch: int, tracker: _Tracker, optimizer=None) -> None:
    """The trainer's micro-batch (launch/trainer.py: labels, return_logits=False, backward), and
    the optimizer step when given, under `tracker`."""
    ids = torch.zeros(batch, tokens, dtype=torch.long)  # (b, n)
    with tracker, _OpenAttention(tracker):
        model(ids, labels=ids, return_logits=False).loss.backward()
        if optimizer is not None:
            optimizer.step()


def _device_peak(tracker: _Tracker) -> dict:
    """The peak snapshot of the device the step runs on (CPU here: fake or real)."""
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]


def _split(tracker: _Tracker, grads: int) -> dict:
    """The peak's bytes beyond the model states: activations, temporaries, attention workspace.
    Gradients beyond the model's own (`grads` bytes, counted with the model states) are
    temporaries: the tiled FFN's sums over its tiles (longnet.layers.sequence_tiled)."""
    peak = _device_peak(tracker)
    start = tracker.peak_attention_start
    grown = {k: peak[k] - (start or peak)[k] for k in (_MemRefType.ACT, _MemRefType.TEMP)}
    extra_grads = peak[_MemRefType.GRAD] - grads
    return dict(
        activations=peak[_MemRefType.ACT] - grown[_MemRefType.ACT],
        temporaries=peak[_MemRefType.TEMP] - grown[_MemRefType.TEMP] + extra_grads,
        attention_workspace=sum(grown.values()),
    )


_runs: dict = {}


def fake_step(config: LongNetConfig, tokens: int, batch: int, dtype: str) -> dict:
    """{activations, temporaries, attention_workspace, host_offload, host_reads} of the peak of
    one micro-batch of `tokens` tokens per row, from the real step under FakeTensorMode (cached);
    host_offload: the peak of what offload_checkpoints keeps in host memory."""
    key = (repr(config), tokens, batch, dtype)
    if key not in _runs:
        tracker, reads, host = _Tracker(), _NoHostReads(), _HostCopies()
        with accelerator_path(), host_offload(host), FakeTensorMode(), reads:
            model = _build(config, DTYPES[dtype])
            tracker.track_external(model)
            tracked_step(model, tokens, batch, tracker)
            grads = sum(p.grad.nbytes for p in model.parameters())
        _runs[key] = _split(tracker, grads) | dict(host_offload=host.peak, host_reads=reads.reads)
    return _runs[key]


def step_memory(config: LongNetConfig, tokens: int, batch: int, dtype: str) -> dict:
    """fake_step, extrapolated (affine, per category) beyond EXACT_TOKENS tokens."""
    if tokens <= EXACT_TOKENS:
        return fake_step(config, tokens, batch, dtype) | dict(method="fake run")
    low, high = EXACT_TOKENS // 2, EXACT_TOKENS
    a, b = fake_step(config, low, batch, dtype), fake_step(config, high, batch, dtype)
    scale = (tokens - high) / (high - low)
    linear = ("activations", "temporaries", "host_offload")
    out = {k: int(b[k] + (b[k] - a[k]) * scale) for k in linear}
    out["attention_workspace"] = int(b["attention_workspace"] * tokens / high)
    return out | dict(host_reads=b["host_reads"], method=f"extrapolated from {low}, {high}")


def measured_peak(config: LongNetConfig, tokens: int, batch: int = 1) -> int:
    """The same step for real on CPU (float32, torch's AdamW, no ZeRO): the tracker's peak over
    forward, backward and the optimizer step, after a first step made the optimizer's states
    (what the estimate with zero=0, dtype fp32 counts). offload_checkpoints runs as on an
    accelerator (_HostCopies): the offloaded inputs leave the tracked memory."""
    torch.manual_seed(0)
    model = LongNetLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), foreach=False)  # no per-list temporaries
    ids = torch.zeros(batch, tokens, dtype=torch.long)
    with host_offload(_HostCopies()):
        model(ids, labels=ids, return_logits=False).loss.backward()
        optimizer.step()
        tracker = _Tracker()
        tracker.track_external(model, optimizer)
        tracked_step(model, tokens, batch, tracker, optimizer)
    return _device_peak(tracker)[_TOTAL_KEY]


# -- exchange and FLOPs ---------------------------------------------------------------------------


def exchange(step: Step) -> dict:
    """The all-to-all of one attention call, worst rank: entries (position, kv head) of K and V
    sent and received, from the planner (longnet.plan.make_plan) as
    distributed.sequence_parallel.communication computes them for a process group's rank."""
    c = step.config
    patterns = tuple(zip(c.segment_lengths, c.dilation_rates, strict=True))
    # shift_heads_by_layer moves each layer's offsets: the same counts within an entry per slot.
    # Causal: the last rank receives from every earlier one, the first sends the most.
    ranks = sorted({0, step.sp // 2 - 1, step.sp - 1} - {-1}) if step.sp > 1 else []
    plans = [
        make_plan(step.shard, c.num_heads, c.num_kv_heads, patterns, True, 0, r, step.sp)
        for r in ranks
    ]
    sent = max((sum(p.send_counts) for p in plans if p.exchanges), default=0)
    received = max((sum(p.recv_counts) for p in plans if p.exchanges), default=0)
    entry = 2 * step.micro_batch * c.head_dim  # K and V of one entry, elements
    return dict(sent=sent * entry, received=received * entry)


def exchange_bytes(step: Step, checkpointing: bool) -> tuple[int, int]:
    """(buffer bytes at the peak, bytes sent + received per optimizer step) of a rank.

    Forward in the training dtype, backward in the accumulation dtype (float32 for 16-bit), as
    distributed.sequence_parallel.Communication; a checkpointed layer exchanges again when it is
    recomputed. Held: the received K/V saved for backward by every layer whose activations are
    kept (one with checkpointing), plus the larger of the forward's send buffers (the sparse
    copy and its contiguous permutation) and the backward's gradient buffers.
    """
    c, dtype = step.config, DTYPES[step.dtype]
    elements = exchange(step)
    width, acc = dtype.itemsize, accumulation_dtype(dtype).itemsize
    held = 1 if checkpointing else c.num_layers
    buffers = held * elements["received"] * width + max(
        2 * elements["sent"] * width, (elements["sent"] + elements["received"]) * acc
    )
    calls = c.num_layers * step.grad_accum
    forward = (2 if checkpointing else 1) * (elements["sent"] + elements["received"]) * width
    backward = (elements["sent"] + elements["received"]) * acc
    return buffers, calls * (forward + backward)


def flops(step: Step, checkpointing: bool) -> dict:
    """FLOPs of a rank per optimizer step.

    model: 6 x (non-embedding parameters + the output projection's D x V) per token (2 forward,
    4 backward; Kaplan et al. 2020 without the head) plus attention: 4 x d_model x pairs per
    token (longnet.cost.pairs_per_token; QK^T and PV, 2 d each per pair and head) per layer,
    x 3 with backward. hardware: plus what is recomputed, the checkpointed blocks' forward and
    the chunked loss's head.
    """
    c = step.config
    lengths, rates = c.segment_lengths, c.dilation_rates
    n = step.seq_len
    period = math.lcm(*lengths)
    if n > 4 * period and n % period == 0:  # periodic: the same pairs per token (and fast)
        n = period
    pairs = pairs_per_token(
        n, c.num_heads, lengths, rates, causal=True,
        head_shift=0, select_top_k=c.select_top_k, select_block_size=c.select_block_size,
        select_within_segment=c.select_within_segment,
    )  # fmt: skip
    tokens = step.shard * step.micro_batch * step.grad_accum  # this rank's
    blocks = _counts(c)[2]
    head = c.d_model * c.vocab_size
    attention = 4 * c.d_model * pairs * c.num_layers
    model = tokens * (6 * (blocks + head) + 3 * attention)
    recomputed = tokens * (2 * head + (2 * blocks + attention if checkpointing else 0))
    return dict(model=int(model), hardware=int(model + recomputed))


_param_counts: dict = {}


def _counts(c: LongNetConfig) -> tuple[int, int, int]:
    """(parameters, the largest module's own parameters as DeepSpeed's model_to_params counts
    them, non-embedding parameters), from a model on the meta device (no memory)."""
    if repr(c) not in _param_counts:
        with torch.device("meta"):
            model = LongNetLM(c)
        own = (sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
        _param_counts[repr(c)] = (
            model.num_parameters(),
            max(own),
            model.num_parameters(exclude_embeddings=True),
        )
    return _param_counts[repr(c)]


# -- the estimate ---------------------------------------------------------------------------------


def estimate(step: Step, checkpointing: bool) -> dict:
    """The JSON of one step: per rank, bytes by category at the peak, and whether it fits."""
    check(step)
    c = replace(step.config, activation_checkpointing=checkpointing)
    params, largest, _ = _counts(c)
    states = model_states(params, largest, step.zero, step.dp * step.sp, step.dtype)
    run = step_memory(c, step.shard, step.micro_batch, step.dtype)
    buffers, exchanged = exchange_bytes(step, checkpointing)
    memory = states | {k: run[k] for k in ("activations", "temporaries", "attention_workspace")}
    memory["exchange_buffers"] = buffers
    peak = sum(memory.values())  # device memory; the host's is apart
    fits = None if step.device_memory is None else peak <= step.device_memory
    layout = {k: v for k, v in asdict(step).items() if k != "config"}
    return dict(
        model=dict(parameters=params, d_model=c.d_model, layers=c.num_layers),
        step=layout
        | dict(
            shard_len=step.shard,
            activation_checkpointing=checkpointing,
            ffn_tile_tokens=c.ffn_tile_tokens,
            offload_checkpoints=c.offload_checkpoints,
        ),
        per_rank=dict(
            memory=memory,
            peak=peak,
            fits=fits,
            host_memory=dict(offloaded_checkpoints=run["host_offload"]),
            exchange_bytes_per_step=exchanged,
            flops_per_step=flops(step, checkpointing),
        ),
        activations_from=run["method"],
        host_reads_answered=run["host_reads"],
    )


def _fits(step: Step, checkpointing: bool, seq_len: int, sp: int) -> bool:
    trial = replace(step, seq_len=seq_len, sp=sp)
    return estimate(trial, checkpointing)["per_rank"]["fits"]


def max_seq_len(step: Step, checkpointing: bool) -> int | None:
    """The longest allowed sequence at step.sp that fits (memory grows with it), or None."""
    shards = shard_lengths(step.config.segment_lengths)

    def fits(i):
        return _fits(step, checkpointing, step.sp * shards.nth(i), step.sp)

    if not fits(0):
        return None
    low, high = 0, 1
    while fits(high):  # doubling, then bisection: O(log) estimates
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return step.sp * shards.nth(low)


def first_allowed(lengths, seq_len: int, sp: int) -> int:
    """The shortest sequence >= seq_len whose sp shards the patterns allow."""
    shards = shard_lengths(lengths)
    shard = -(-seq_len // sp)
    fitting = [s for s in shards.below if s >= shard]
    return sp * (fitting[0] if fitting else -(-shard // shards.period) * shards.period)


def target_sp(step: Step, checkpointing: bool, target: int, limit: int = 1 << 20):
    """(sp, seq_len): the smallest degree whose ranks fit `target` tokens (rounded up to the
    first length the patterns allow at that degree), or None up to `limit` ranks."""
    lengths = step.config.segment_lengths

    def fits(sp):
        return _fits(step, checkpointing, first_allowed(lengths, target, sp), sp)

    high = 1
    while not fits(high):
        if high >= limit:
            return None
        high *= 2
    low = high // 2  # does not fit (or 0); memory per rank falls with sp
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if not fits(middle) else (low, middle)
    return high, first_allowed(lengths, target, high)


# -- the program ----------------------------------------------------------------------------------


def gib(value: int) -> str:
    return f"{value / GIB:10.2f} GiB"


def table(result: dict) -> str:
    s, r = result["step"], result["per_rank"]
    lines = [
        f"LongNet {result['model']['parameters'] / 1e6:.0f}M, seq_len {s['seq_len']:,} = sp "
        f"{s['sp']} x {s['shard_len']:,} tokens, dp {s['dp']}, ZeRO-{s['zero']}, {s['dtype']}, "
        f"micro-batch {s['micro_batch']}, checkpointing {s['activation_checkpointing']}, FFN "
        f"tiles {s['ffn_tile_tokens'] or 'off'}, offload {s['offload_checkpoints']}",
        "per rank:",
    ]
    lines += [f"  {k.replace('_', ' '):22s}{gib(v)}" for k, v in r["memory"].items()]
    lines.append(f"  {'peak':22s}{gib(r['peak'])}")
    host = r["host_memory"]["offloaded_checkpoints"]
    if host:
        lines.append(f"  {'host (offloaded)':22s}{gib(host)}  (not in the peak)")
    if s["device_memory"]:
        verdict = "fits" if r["fits"] else "does NOT fit"
        lines.append(f"  {verdict} in {s['device_memory'] / GIB:.1f} GiB")
    lines.append(f"  exchange per step    {r['exchange_bytes_per_step'] / GIB:10.2f} GiB")
    f = r["flops_per_step"]
    lines.append(f"  FLOPs per step       {f['model']:.3e} (recomputed too: {f['hardware']:.3e})")
    lines.append(f"  activations: {result['activations_from']}")
    return "\n".join(lines)


def _step_from_args(args) -> tuple[Step, bool]:
    if args.config:
        from longnet.launch.config import load_config

        cfg = load_config(args.config)
        ds = cfg.deepspeed
        dtype = "bf16" if ds.get("bf16", {}).get("enabled") else "fp32"
        dtype = "fp16" if ds.get("fp16", {}).get("enabled") else dtype
        step = Step(
            config=cfg.model.build(),
            seq_len=cfg.data.seq_len,
            sp=cfg.parallel.sequence_parallel_size,
            zero=ds.get("zero_optimization", {}).get("stage", 0),
            dtype=dtype,
            micro_batch=ds.get("train_micro_batch_size_per_gpu", 1),
            grad_accum=ds.get("gradient_accumulation_steps", 1),
        )
        checkpointing = step.config.activation_checkpointing
    else:
        try:
            config = LongNetConfig.preset(args.preset)
        except (KeyError, ValueError) as error:
            raise ValueError(f"--preset {args.preset!r}: {error}") from None
        step, checkpointing = Step(config=config, seq_len=0), False
    for name in ("sp", "dp", "zero", "dtype", "micro_batch", "grad_accum"):
        if getattr(args, name) is not None:
            setattr(step, name, getattr(args, name))
    if args.seq_len is not None:
        step.seq_len = parse_tokens(args.seq_len)
    if not step.seq_len and not (args.max_seq_len or args.target_seq_len):
        raise ValueError("give --seq-len, or --max-seq-len or --target-seq-len")
    step.seq_len = step.seq_len or 1
    if args.ffn_tile_tokens is not None:
        step.config = replace(step.config, ffn_tile_tokens=args.ffn_tile_tokens)
    if args.offload_checkpoints:
        checkpointing = checkpointing or args.activation_checkpointing
        if not checkpointing:
            raise ValueError("--offload-checkpoints needs --activation-checkpointing")
        step.config = replace(step.config, activation_checkpointing=True, offload_checkpoints=True)
    if args.device_memory is not None:
        step.device_memory = parse_bytes(args.device_memory)
    return step, checkpointing or args.activation_checkpointing


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--preset", help="a LongNetConfig preset, e.g. longnet-125m")
    model.add_argument("--config", help="a training config (YAML file or shipped name)")
    parser.add_argument("--seq-len", help="tokens per sequence, e.g. 1048576 or 1e6")
    parser.add_argument("--sp", type=int, help="sequence-parallel degree (default 1)")
    parser.add_argument("--dp", type=int, help="data-parallel degree (default 1)")
    parser.add_argument("--zero", type=int, help="ZeRO stage 0-3 (default 1)")
    parser.add_argument("--dtype", help="fp32, bf16 or fp16 (default bf16)")
    parser.add_argument("--micro-batch", type=int, help="sequences per rank per micro-batch")
    parser.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument(
        "--ffn-tile-tokens", type=int, help="run each FFN over tiles of N tokens (0: off)"
    )
    parser.add_argument(
        "--offload-checkpoints",
        action="store_true",
        help="keep the checkpointed blocks' inputs in host memory",
    )
    parser.add_argument("--device-memory", help="bytes per device, e.g. 80GiB, 141GB")
    parser.add_argument("--max-seq-len", action="store_true", help="find the longest that fits")
    parser.add_argument("--target-seq-len", help="find the fewest sp ranks that fit it (1e9)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    try:
        step, checkpointing = _step_from_args(args)
        if args.json:
            check_output_file(args.json, "--json")
        if (args.max_seq_len or args.target_seq_len) and step.device_memory is None:
            raise ValueError("--max-seq-len and --target-seq-len need --device-memory")
        if args.target_seq_len:
            found = target_sp(step, checkpointing, parse_tokens(args.target_seq_len))
            if found is None:
                raise ValueError(f"--target-seq-len {args.target_seq_len}: no sp up to 2^20 fits")
            step.sp, step.seq_len = found
        elif args.max_seq_len:
            check(replace(step, seq_len=step.sp))
            longest = max_seq_len(step, checkpointing)
            if longest is None:
                raise ValueError("nothing fits: the shortest allowed sequence is too long")
            step.seq_len = longest
        result = estimate(step, checkpointing)
    except ValueError as error:
        fail(error)
    if args.max_seq_len:
        result["max_seq_len"] = step.seq_len
    if args.target_seq_len:
        result["target_sp"] = step.sp
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
