"""The LongNet trainer: DeepSpeed (ZeRO, mixed precision) over a data x sequence parallel grid.

    world = data_parallel x sequence_parallel. The ranks of one sequence-parallel group read the
    same rows and each keeps its slice of the sequence (positions offset accordingly); their
    attention layers exchange sparse keys and values (longnet.distributed). Parameters are
    replicated: DeepSpeed all-reduces gradients and shards ZeRO states over the whole world and,
    told the SP groups through `mpu`, divides by the data-parallel degree only, so each rank's
    loss is its slice's loss SUM over the token count of its whole sequence group. The loss is
    then the token-weighted mean of the global batch, whatever the split into DP and SP.

Runs the same under `deepspeed`, `torchrun` and plain `python` (one process).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import math
import sys
import time
from pathlib import Path

import torch

from longnet import LongNetLM
from longnet.distributed import check_layout
from longnet.distributed.grid import single_rank_group
from longnet.launch import checkpoint, cli, data, runtime
from longnet.launch.config import Config, load_config, save_config
from longnet.launch.metrics import MetricsLogger
from longnet.model import IGNORE_INDEX


class SequenceDataParallelMPU:
    """The `mpu` DeepSpeed asks for sequence parallelism (the Ulysses interface): gradients are
    reduced over the whole world and divided by the data-parallel degree, ZeRO shards over the
    world, and batch sizes count data-parallel ranks only.

    What DeepSpeed 0.19 calls on it: the sequence-parallel and sequence-data-parallel getters
    (groups.py, engine.py); get_model_parallel_rank (checkpoint file names); and, because
    initialize_sequence_parallel exists, ZeRO 1-3 and groups._get_data_parallel_group treat the
    model-parallel group as absent. Only the paths without ZeRO (clip_grad_norm_, the bf16 and
    fp16 optimizers' norm and overflow checks) ask for get_model_parallel_group: there is no
    tensor parallelism, so it is this rank alone, made on first use without the other ranks.
    """

    def __init__(self, grid):
        self.grid = grid

    def get_model_parallel_group(self):
        return single_rank_group()

    def get_model_parallel_world_size(self):
        return 1

    def get_model_parallel_rank(self):
        return 0

    def initialize_sequence_parallel(self, *args):  # marks this as a sequence-parallel mpu
        raise RuntimeError("the process grid is built by longnet.distributed.ParallelDims")

    def get_sequence_parallel_group(self):
        return self.grid.sp_group

    def get_sequence_parallel_world_size(self):
        return self.grid.dims.sequence_parallel

    def get_sequence_parallel_rank(self):
        return self.grid.sp_rank

    def get_sequence_data_parallel_group(self):
        return torch.distributed.group.WORLD

    def get_sequence_data_parallel_world_size(self):
        return self.grid.dims.world_size

    def get_sequence_data_parallel_rank(self):
        return self.grid.rank


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters, also of a model partitioned by ZeRO-3 (which empties .data)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of one rank's step: the same on every Python (hash() of a tuple is not promised
    to be), so a resumed run replays an uninterrupted one's dropout."""
    digest = hashlib.blake2b(f"{seed},{step},{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 2**63


def zero_stage(ds_config: dict) -> int:
    return ds_config.get("zero_optimization", {}).get("stage", 0)


def validate(config: Config, world_size: int) -> None:
    """Everything that can be checked before processes talk: ValueError naming the bad key."""
    sp = config.parallel.sequence_parallel_size
    if world_size % sp:
        raise ValueError(
            f"parallel.sequence_parallel_size={sp} does not divide the world size {world_size}"
        )
    model = config.model.build()
    stages = config.data.seq_len_schedule or []
    for key, seq_len in (
        [("data.seq_len", config.data.seq_len)]
        + [("data.seq_len_schedule", n) for _, n in stages]
        + [("train.eval_seq_lens", n) for n in config.train.eval_seq_lens]
    ):
        try:
            check_layout(model.segment_lengths, model.dilation_rates, seq_len, sp)
        except ValueError as error:
            raise ValueError(f"{key}={seq_len} cannot be split: {error}") from None
    ds = config.deepspeed
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        value = ds.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"deepspeed.{key} must be a positive integer, got {value!r}")
    fp16 = ds.get("fp16", {}).get("enabled", False)
    if fp16 and not torch.cuda.is_available():
        raise ValueError("deepspeed.fp16.enabled=true needs CUDA; on CPU use deepspeed.bf16")
    if fp16 and ds.get("bf16", {}).get("enabled", False):
        raise ValueError("deepspeed.fp16.enabled and deepspeed.bf16.enabled are both true")
    data.check(config.data)
    tokenizer = data.make_tokenizer(config.data.tokenizer)
    if tokenizer.vocab_size > model.vocab_size:
        raise ValueError(
            f"model.vocab_size={model.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} ({config.data.tokenizer})"
        )
    output_dir = Path(config.run.output_dir)
    cli.check_output_dir(output_dir, "run.output_dir")
    steps = checkpoint.complete_steps(checkpoint.checkpoint_dir(output_dir))
    if steps and config.checkpoint.resume == "none":
        raise ValueError(
            f"run.output_dir={str(output_dir)!r} already holds checkpoints (up to step "
            f"{steps[-1]}); resume it with checkpoint.resume=auto or choose another output_dir"
        )
    resume = checkpoint.resolve_resume(config.checkpoint.resume, output_dir)
    saved = output_dir / "config.yaml"
    if resume is not None and saved.is_file():
        previous = load_config(saved)
        if (
            previous.model != config.model
            or previous.data.seq_len != config.data.seq_len
            or previous.data.seq_len_schedule != config.data.seq_len_schedule
            or previous.data.passkey_distance_schedule != config.data.passkey_distance_schedule
        ):
            raise ValueError(
                f"run.output_dir={str(output_dir)!r} was trained with model "
                f"{previous.model}, data.seq_len={previous.data.seq_len}, seq_len_schedule="
                f"{previous.data.seq_len_schedule} and passkey_distance_schedule="
                f"{previous.data.passkey_distance_schedule}; this config has {config.model}, "
                f"{config.data.seq_len}, {config.data.seq_len_schedule} and "
                f"{config.data.passkey_distance_schedule}: choose another output_dir"
            )
    if resume is not None:
        # A damaged marker is left to the Trainer's plan_resume, which may resume an older one.
        with contextlib.suppress(checkpoint.DamagedCheckpoint):
            current = checkpoint.layout(world_size, world_size // sp, sp)
            checkpoint.check_saved_layout(resume, current)


def check_evaluation_lengths(config: Config, corpus: data.Corpus) -> None:
    """Every evaluation length fits the validation split: found at start, not at the first
    evaluation, after hours of training."""
    if corpus.validation is None:
        return
    for seq_len in config.train.eval_seq_lens:
        try:
            corpus.validation_rows(seq_len, max_rows=1)
        except ValueError as error:
            raise ValueError(f"train.eval_seq_lens={seq_len}: {error}") from None


def deepspeed_config(config: Config, data_parallel: int) -> dict:
    """The deepspeed section, completed: batch size and the schedule's length."""
    ds = copy.deepcopy(config.deepspeed)
    micro = ds.setdefault("train_micro_batch_size_per_gpu", 1)
    accumulation = ds.setdefault("gradient_accumulation_steps", 1)
    expected = micro * accumulation * data_parallel
    if ds.setdefault("train_batch_size", expected) != expected:
        raise ValueError(
            f"deepspeed.train_batch_size={ds['train_batch_size']} must equal "
            f"train_micro_batch_size_per_gpu x gradient_accumulation_steps x data-parallel ranks "
            f"= {micro} x {accumulation} x {data_parallel} = {expected}"
        )
    scheduler = ds.get("scheduler", {})
    if scheduler.get("type") == "WarmupDecayLR":
        scheduler.setdefault("params", {}).setdefault("total_num_steps", config.train.steps)
    ds.setdefault("steps_per_print", 10**9)  # the trainer logs; DeepSpeed stays quiet
    return ds


def build_model(config: Config, grid, ds_config: dict, mpu) -> LongNetLM:
    """The model, with the same initial weights on every rank, its attention sequence-parallel
    over grid.sp_group. ZeRO-3: built inside DeepSpeed's public `zero.Init`, which partitions
    each module's parameters as soon as the module is built, so no rank ever holds the whole
    model. Every longnet module initialises its parameters in its own reset_parameters, which
    its constructor calls while they are still whole: the same values as an unpartitioned
    build, with no gathering."""
    import deepspeed

    torch.manual_seed(config.train.seed)
    stage3 = zero_stage(ds_config) == 3
    with deepspeed.zero.Init(config_dict_or_path=ds_config, mpu=mpu, enabled=stage3):
        return LongNetLM(config.model.build(), attention_fn=runtime.attention(grid))


class Trainer:
    def __init__(self, config: Config):
        import deepspeed

        self.config = config
        sp = config.parallel.sequence_parallel_size
        self.grid = runtime.start(sequence_parallel=sp)
        deepspeed.init_distributed(verbose=False)  # adopts the process group
        dist = torch.distributed
        self.rank0 = self.grid.rank == 0
        self.device = runtime.device()
        dims = self.grid.dims
        self.layout = checkpoint.layout(dims.world_size, dims.data_parallel, sp)
        # Before anything is written or loaded: a refused resume leaves the run as it was.
        resume = runtime.agree_on_resume(
            config.checkpoint.resume,
            config.run.output_dir,
            self.layout,
            config.checkpoint.verify_hashes,
        )

        # The tokenised corpus: built once per node (caches are usually node-local), then read.
        # A corpus found bad while reading stops every rank, before the run folder is touched.
        error = None
        if runtime.local_rank() == 0:
            try:
                data.prepare(config.data)
            except ValueError as exception:
                error = exception
        failed = torch.tensor([float(error is not None)], device=self.device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed.item():
            raise error or ValueError("the corpus failed to build on another node (see there)")
        self.corpus = data.load(config.data)
        check_evaluation_lengths(config, self.corpus)
        self.output_dir = Path(config.run.output_dir)
        if self.rank0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.output_dir / "config.yaml")

        self.ds_config = deepspeed_config(config, self.grid.dims.data_parallel)
        mpu = SequenceDataParallelMPU(self.grid) if sp > 1 else None
        model = build_model(config, self.grid, self.ds_config, mpu)
        self.engine, *_ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=self.ds_config, mpu=mpu
        )

        self.step = 0
        if resume is not None:
            self.step = self._load(*resume)
        self.metrics = MetricsLogger(config, self.step, config.train.steps, self.rank0)
        longest = max(model.config.segment_lengths)
        beyond = sorted(
            n for n in {config.data.seq_len, *config.train.eval_seq_lens} if n > longest
        )
        if beyond and self.rank0:
            print(
                f"warning: evaluating at {beyond} tokens, beyond the model's largest segment "
                f"({longest}): no token sees more than {longest - 1} tokens back, so more "
                f"context cannot lower the loss there",
                file=sys.stderr,
            )
        self._train_sets = {config.data.seq_len: self.corpus.train}  # curriculum stages
        if self.rank0:
            print(
                f"LongNet {count_parameters(model) / 1e6:.2f}M parameters, world "
                f"{dims.world_size} = dp {dims.data_parallel} x sp {sp}, device {self.device}, "
                f"{f'resuming after step {self.step}' if self.step else 'starting'}",
                file=sys.stderr,
            )

    def _load(self, directory: Path, tag: str) -> int:
        """Resume from a checkpoint plan_resume chose; the step it holds. A file that fails to
        load all the same (a checkpoint without a manifest) is named, not a DeepSpeed trace."""
        try:
            _, client = self.engine.load_checkpoint(str(directory), tag=tag)
            return client["step"]
        except checkpoint.READ_ERRORS as error:
            raise checkpoint.unreadable(directory / tag, error) from None

    # -- one micro-batch ------------------------------------------------------------------------

    def _loss(self, rows: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss to backpropagate, this slice's loss sum, its token count or, with loss weights,
        its weight), see module notes. rows: input_ids, labels and, with pass keys, loss_weights
        (longnet.launch.data.passkey); this rank runs its slice of each."""
        mine, offset = runtime.shard(rows, self.grid, self.device)
        documents = {}
        if self.config.data.document_boundaries:  # one sequence per document, of the global rows
            eos = self.corpus.tokenizer.eos_id
            documents["cu_seqlens"] = data.document_offsets(rows["input_ids"], eos)
        out = self.engine(
            mine["input_ids"],
            labels=mine["labels"],
            position_offset=offset,
            return_logits=False,
            loss_weights=mine.get("loss_weights"),
            **documents,
        )
        group_tokens = out.num_tokens.detach().clone()
        torch.distributed.all_reduce(group_tokens, group=self.grid.sp_group)
        loss = out.loss_sum / group_tokens.clamp(min=1)
        return loss, out.loss_sum.detach(), out.num_tokens.detach()

    def _global_mean(self, loss_sum: torch.Tensor, tokens: torch.Tensor) -> tuple[float, int]:
        """(mean loss per token, tokens) over the whole world's slices."""
        totals = torch.stack([loss_sum.double(), tokens.double()])
        torch.distributed.all_reduce(totals)
        return (totals[0] / totals[1].clamp(min=1)).item(), int(totals[1].item())

    # -- training -------------------------------------------------------------------------------

    def train_step(self) -> float:
        """One optimizer step (gradient_accumulation_steps micro-batches); the global loss."""
        ds, grid = self.ds_config, self.grid
        # Dropout's randomness is a function of (seed, step, rank): resuming replays it exactly.
        torch.manual_seed(step_seed(self.config.train.seed, self.step, grid.rank))
        # A curriculum stage of seq_len / k tokens reads k times the rows: the same tokens.
        seq_len = self.config.data.seq_len_at(self.step)
        if seq_len not in self._train_sets:
            self._train_sets[seq_len] = self.corpus.train.at_seq_len(seq_len)
        rows_per_micro = ds["train_micro_batch_size_per_gpu"] * self.config.data.seq_len // seq_len
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        tokens = torch.zeros((), dtype=torch.float64, device=self.device)
        for micro_step in range(ds["gradient_accumulation_steps"]):
            rows = self._train_sets[seq_len].batch_for(
                self.step,
                micro_step,
                grid.dp_rank,
                grid.dims.data_parallel,
                rows_per_micro,
                ds["gradient_accumulation_steps"],
            )
            loss, part_sum, part_tokens = self._loss(rows)
            self.engine.backward(loss)
            self.engine.step()
            loss_sum += part_sum
            tokens += part_tokens
        return self._global_mean(loss_sum, tokens)[0]

    @torch.no_grad()
    def evaluate(self) -> None:
        """Validation loss, perplexity and bits per byte at data.seq_len and train.eval_seq_lens,
        each over the same token budget."""
        if self.corpus.validation is None:
            return
        self.engine.eval()
        grid, micro = self.grid, self.ds_config["train_micro_batch_size_per_gpu"]
        budget = self.config.train.eval_batches * micro * grid.dims.data_parallel
        budget *= self.config.data.seq_len
        for seq_len in sorted({self.config.data.seq_len, *self.config.train.eval_seq_lens}):
            rows = self.corpus.validation_rows(seq_len, max_rows=max(1, budget // seq_len))
            mine = {k: v[grid.dp_rank :: grid.dims.data_parallel] for k, v in rows.items()}
            # Every rank runs the same number of forwards (ZeRO-3 gathers parameters in them):
            # ranks short of rows pad with rows whose labels are all ignored.
            batches = math.ceil(math.ceil(len(rows["labels"]) / grid.dims.data_parallel) / micro)
            loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
            tokens = torch.zeros((), dtype=torch.float64, device=self.device)
            for index in range(batches):
                batch = {k: v[index * micro : (index + 1) * micro] for k, v in mine.items()}
                missing = micro - len(batch["labels"])
                if missing:
                    pad = torch.zeros(missing, seq_len, dtype=torch.long)
                    batch = {
                        "input_ids": torch.cat([batch["input_ids"], pad]),
                        "labels": torch.cat([batch["labels"], pad.fill_(IGNORE_INDEX)]),
                    }
                _, part_sum, part_tokens = self._loss(batch)
                loss_sum += part_sum
                tokens += part_tokens
            loss, total_tokens = self._global_mean(loss_sum, tokens)
            self.metrics.log(
                {
                    "step": self.step,
                    "eval": True,
                    "seq_len": seq_len,
                    "loss": loss,
                    "perplexity": math.exp(min(loss, 700.0)),
                    "bits_per_byte": self.corpus.bits_per_byte(loss),
                    "tokens": total_tokens,
                }
            )
        self.engine.train()

    def save(self) -> None:
        directory = checkpoint.checkpoint_dir(self.output_dir)
        if self.rank0:
            checkpoint.begin_save(directory, self.step)
        torch.distributed.barrier()  # no rank overwrites a folder that still looks complete
        self.engine.save_checkpoint(
            str(directory),
            tag=checkpoint.tag(self.step),
            client_state={"step": self.step, "layout": self.layout},
            save_latest=False,
        )
        torch.distributed.barrier()  # every rank's files are on disk
        if self.rank0:
            keep, hashes = self.config.checkpoint.keep, self.config.checkpoint.verify_hashes
            checkpoint.mark_complete(directory, self.step, keep, self.layout, hashes)
        torch.distributed.barrier()

    def fit(self) -> None:
        train, ds = self.config.train, self.ds_config
        tokens_per_step = (
            self.grid.dims.data_parallel
            * ds["train_micro_batch_size_per_gpu"]
            * ds["gradient_accumulation_steps"]
            * self.config.data.seq_len
        )
        interval = self.config.checkpoint.interval
        last_log, last_time = self.step, time.perf_counter()
        while self.step < train.steps:
            loss = self.train_step()
            self.step += 1
            self.metrics.advance()
            if self.step % train.log_interval == 0 or self.step == train.steps:
                now = time.perf_counter()
                grad_norm = self.engine.get_global_grad_norm()
                self.metrics.log(
                    {
                        "step": self.step,
                        "loss": loss,
                        "lr": self.engine.get_lr()[0],
                        "grad_norm": None if grad_norm is None else float(grad_norm),
                        "tokens_per_s": tokens_per_step
                        * (self.step - last_log)
                        / (now - last_time),
                        "tokens": tokens_per_step * self.step,
                        "seq_len": self.config.data.seq_len_at(self.step - 1),
                        "dp": self.grid.dims.data_parallel,
                        "sp": self.grid.dims.sequence_parallel,
                    }
                )
                last_log, last_time = self.step, now
            # The checkpoint first: an evaluation that fails loses no training.
            if interval and self.step % interval == 0:
                self.save()
                last_time = time.perf_counter()
            if train.eval_interval and self.step % train.eval_interval == 0:
                self.evaluate()
                last_time = time.perf_counter()
        if not interval or self.step % interval:
            self.save()
        if not train.eval_interval or self.step % train.eval_interval:
            self.evaluate()
        self.metrics.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train a LongNet model: defaults < --config YAML < key=value overrides."
    )
    parser.add_argument("--config", help="a YAML file, e.g. configs/tiny-cpu.yaml")
    parser.add_argument("--local_rank", type=int, help="set by the deepspeed launcher (unused)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=20")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        validate(config, runtime.world_size())
    except ValueError as error:
        cli.fail(error, show=runtime.rank() == 0)
    try:
        trainer = Trainer(config)
    except ValueError as error:
        # Trainer raises ValueError only after the group exists; fail() destroys it.
        cli.fail(error, show=torch.distributed.get_rank() == 0)
    trainer.fit()
    runtime.finish()
