"""What the user sees: a tqdm bar, <output_dir>/metrics.jsonl and wandb (all on rank 0 only)."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"


def read_metrics(output_dir: str | Path) -> list[dict]:
    """The records of metrics.jsonl; a line cut short by a crash is skipped."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricsLogger:
    """Appends one JSON object per logged step; on resume keeps only records up to that step,
    so an interrupted and resumed run has the log of an uninterrupted one."""

    def __init__(self, config, resumed_step: int, total_steps: int, active: bool):
        self.active = active
        self.path = Path(config.run.output_dir) / METRICS_FILE
        self.bar = None
        self.wandb_run = None
        if not active:
            return
        kept = [r for r in read_metrics(config.run.output_dir) if r["step"] <= resumed_step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.path)
        self.file = self.path.open("a")
        self.bar = tqdm(total=total_steps, initial=resumed_step, desc="train", dynamic_ncols=True)
        if config.run.wandb_mode != "disabled":
            self.wandb_run = _start_wandb(config)

    def log(self, record: dict) -> None:
        if not self.active:
            return
        # The wall-clock time it was logged, in the file only: it orders the run's events.
        self.file.write(json.dumps({**record, "time": time.time()}) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            prefix = f"eval_{record['seq_len']}/" if record.get("eval") else "train/"
            values = {prefix + k: v for k, v in record.items() if isinstance(v, (int, float))}
            self.wandb_run.log(values, step=record["step"])
        if record.get("eval"):
            self.bar.write(
                f"step {record['step']}: eval @ {record['seq_len']} tokens: loss "
                f"{record['loss']:.4f}, ppl {record['perplexity']:.2f}, "
                f"bits/byte {record['bits_per_byte']:.4f}"
            )
        else:
            self.bar.set_postfix(
                loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}"
            )

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if not self.active:
            return
        self.bar.close()
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _start_wandb(config):
    import wandb  # imported only when used: it is slow to import

    output_dir = Path(config.run.output_dir)
    id_file = output_dir / "wandb_id"
    if not id_file.is_file():  # one wandb run per training run, continued on resume
        id_file.write_text(uuid.uuid4().hex[:12])
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(
        project=config.run.wandb_project,
        entity=config.run.wandb_entity,
        name=config.run.name or output_dir.resolve().name,
        id=id_file.read_text().strip(),
        resume="allow",
        dir=str(output_dir),
        mode=config.run.wandb_mode,
        config=config.to_dict(),
    )
