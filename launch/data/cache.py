"""The tokenised-document cache: keyed by the corpus files, tokenizer, split and seed; built by
one process aside and renamed into place, then read memory-mapped by every rank."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import uuid
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc

from .config import DataConfig
from .documents import data_files, digest, load_documents, stdlib_files, unit_hash
from .tokenizer import Tokenizer, make_tokenizer

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the cached layout or the document pipeline changes


def _non_empty(texts: list[str | None]) -> list[bool]:
    return [bool(t) for t in texts]


def _in_split(keys: list[str], fraction: float, validation: bool) -> list[bool]:
    return [(unit_hash(k, "split") < fraction) == validation for k in keys]


def _tokenize(texts: list[str], tokenizer: Tokenizer, dtype: str) -> dict:
    ids = [np.append(t, tokenizer.eos_id).astype(dtype) for t in tokenizer.encode_batch(texts)]
    return {"ids": ids, "bytes": [len(t.encode("utf-8", errors="replace")) for t in texts]}


def cache_root(config: DataConfig) -> Path:
    if config.cache_dir:
        return Path(config.cache_dir).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "longnet" / "data"


def _plan(config: DataConfig) -> tuple[Tokenizer, dict, str]:
    """Every check that needs no reading of the corpus, then the tokenizer, what to read and the
    cache key. Cheap: the trainer runs it (via check) before any heavy work. The fields were
    checked when the DataConfig was built (and on assignment)."""
    if config.source == "stdlib":
        root, names = stdlib_files(config.max_documents)
        if not names:
            raise ValueError(f"data.source='stdlib': no .py files under {root}")
        stats = [(root / n).stat() for n in names]
        plan = {
            "root": str(root),
            "python": sys.version,
            "files": [[n, s.st_size, s.st_mtime_ns] for n, s in zip(names, stats, strict=True)],
        }
    elif config.source == "files":
        files = data_files(config.path)
        plan = {
            "files": [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
        }
    else:
        plan = {"hub": [config.hub_name, config.hub_config, config.hub_split]}
    tokenizer = make_tokenizer(config.tokenizer)
    key = digest(
        [
            CACHE_FORMAT,
            config.source,
            plan,
            tokenizer.identity,
            config.text_field,
            config.validation_fraction,
            config.shuffle_seed,
            config.max_documents,
        ]
    )
    return tokenizer, plan, key


def check(config: DataConfig) -> None:
    """ValueError for a bad field, a missing or unsupported path, an unknown tokenizer."""
    _plan(config)


def _build(config: DataConfig, tokenizer: Tokenizer, plan: dict, key: str, stage: Path) -> None:
    """The tokenised train (and validation) documents saved under stage, with meta.json."""
    num_proc = config.num_proc if config.num_proc > 1 else None
    docs = load_documents(config, plan, cache_root(config) / "hf")
    docs = docs.filter(_non_empty, input_columns="text", batched=True, num_proc=num_proc)
    if len(docs) == 0:
        where = {"stdlib": "the standard library", "files": f"data.path {config.path!r}"}
        raise ValueError(
            f"empty corpus: no non-empty documents in "
            f"{where.get(config.source, f'data.hub_name {config.hub_name!r}')}"
        )
    key_column = "key" if "key" in docs.column_names else "text"
    splits = {"train": False} | ({"validation": True} if config.validation_fraction > 0 else {})
    dtype = "uint16" if tokenizer.vocab_size <= 2**16 else "uint32"
    features = datasets.Features(
        {"ids": datasets.List(datasets.Value(dtype)), "bytes": datasets.Value("int64")}
    )
    meta = {
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "source": config.source,
        "splits": {},
    }
    for name, validation in splits.items():
        split = docs.filter(
            _in_split,
            input_columns=key_column,
            batched=True,
            num_proc=num_proc,
            fn_kwargs={"fraction": config.validation_fraction, "validation": validation},
        )
        if len(split) == 0:
            raise ValueError(
                f"empty corpus: the {name} split of {len(docs)} documents is empty with "
                f"data.validation_fraction={config.validation_fraction}; add documents (a .txt "
                f"file is one document) or change data.validation_fraction"
            )
        tokens = split.shuffle(seed=config.shuffle_seed).map(
            _tokenize,
            input_columns="text",
            batched=True,
            remove_columns=split.column_names,
            fn_kwargs={"tokenizer": tokenizer, "dtype": dtype},
            features=features,
            cache_file_name=str(stage / "work" / f"{name}.arrow"),
            new_fingerprint=f"{key}-{name}",
            num_proc=num_proc,
            desc=f"Tokenising {name}",
        )
        tokens.save_to_disk(str(stage / name))
        meta["splits"][name] = {
            "documents": len(tokens),
            "tokens": pc.sum(pc.list_value_length(tokens.data.column("ids"))).as_py(),
            "bytes": pc.sum(tokens.data.column("bytes")).as_py(),
        }
        del tokens  # the map output in stage/work is memory-mapped until released
    shutil.rmtree(stage / "work")
    (stage / "meta.json").write_text(json.dumps(meta, indent=2))


def ensure_cache(config: DataConfig) -> tuple[Path, Tokenizer, bool]:
    tokenizer, plan, key = _plan(config)
    root = cache_root(config)
    final = root / f"{config.source}-{key}"
    if (final / "meta.json").is_file():
        log.info("data: tokenised corpus cached in %s", final)
        return final, tokenizer, True
    log.info("data: tokenising the corpus into %s", final)
    # Built aside and renamed into place: a crash or a concurrent builder never leaves a
    # half-written cache under the final name.
    stage = root / f".building-{key}-{uuid.uuid4().hex[:8]}"
    try:
        _build(config, tokenizer, plan, key, stage)
        try:
            os.rename(stage, final)
        except OSError:
            if not (final / "meta.json").is_file():
                raise  # not another process winning the race
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return final, tokenizer, False


def prepare(config: DataConfig) -> Path:
    """Builds the tokenised cache if missing (rank 0, before a barrier); returns its folder."""
    return ensure_cache(config)[0]
