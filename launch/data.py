"""Training data: documents -> tokens -> packed rows, cached, with an exactly resumable sampler.

    documents   the Python standard library's source files (default, offline), local .txt /
                .jsonl / .json / .parquet files or a folder of them, or a Hugging Face hub dataset
    split       a document goes to validation when a hash of its key (file path for the stdlib,
                text otherwise) falls below validation_fraction: adding files moves no others
    tokens      each document tokenised and followed by the tokenizer's EOS (the separator)
    stream      all documents of a split concatenated: t_0 t_1 ... t_{T-1}
    rows        row i = t[i*L : i*L + L + 1] for L = seq_len: input_ids = row[:-1], labels =
                row[1:]; rows overlap by one token, so every token but t_0 is a label once
    sampler     the rows of step s are positions [s*B, (s+1)*B) of an endless sequence of
                per-epoch permutations, B = dp_size * grad_accum * micro_batch_size

The tokenised documents (not the rows: one cache serves every seq_len) are cached with `datasets`
under cache_dir, keyed by the source files with their sizes and mtimes, the tokenizer, the split
and the shuffle seed. In a distributed run rank 0 calls prepare(config), the trainer holds a
barrier, then every rank calls load(config), which reads the cache memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import sysconfig
import uuid
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from longnet.config import choice, positive_int

log = logging.getLogger(__name__)

SOURCES = ("stdlib", "files", "hub")
# File suffix -> the `datasets` packaged builder that reads it.
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# Test suites are mostly fixtures and generated cases, not representative source code.
STDLIB_EXCLUDED_DIRS = {
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idle_test",
    "__pycache__",
}
# Candidate names of the end-of-text token in HF tokenizer files, most common first.
EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[SEP]")
CACHE_FORMAT = 1  # bump when the cached layout or the document pipeline changes


@dataclass
class DataConfig:
    """The `data:` section of the training config.

    seq_len: tokens per training row (the model sees seq_len inputs and seq_len labels).
    source: "stdlib" (the Python standard library's .py files, offline), "files" (path) or "hub".
    path: a .txt / .jsonl / .json / .parquet file or a folder of them (searched recursively,
        hidden files ignored). A .txt file is one document; a JSON / Parquet record is one.
    hub_name, hub_config, hub_split: a Hugging Face hub dataset (needs a network the first time).
    text_field: the column holding the text in JSON, Parquet and hub data.
    tokenizer: "byte" (UTF-8 bytes, no download), a local HF tokenizer.json file, or
        "tiktoken:<encoding>" (e.g. tiktoken:gpt2) when tiktoken has the encoding cached.
    validation_fraction: share of documents held out for validation (0: none).
    shuffle_seed: seeds the document order and the per-epoch row order.
    max_documents: keep only this many documents (the stdlib: in a fixed pseudo-random order).
    cache_dir: where tokenised corpora are cached; None: $XDG_CACHE_HOME or ~/.cache, /longnet/data.
    num_proc: processes for reading and tokenising.
    """

    seq_len: int = 256
    source: str = "stdlib"
    path: str | None = None
    hub_name: str | None = None
    hub_config: str | None = None
    hub_split: str = "train"
    text_field: str = "text"
    tokenizer: str = "byte"
    validation_fraction: float = 0.05
    shuffle_seed: int = 0
    max_documents: int | None = None
    cache_dir: str | None = None
    num_proc: int = 1

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """ValueError naming the field for values that are wrong whatever is on disk."""
        self.seq_len = positive_int("data.seq_len", self.seq_len)
        self.num_proc = positive_int("data.num_proc", self.num_proc)
        if self.max_documents is not None:
            self.max_documents = positive_int("data.max_documents", self.max_documents)
        choice("data.source", self.source, SOURCES)
        if self.source == "files" and not self.path:
            raise ValueError("data.path is required with data.source='files'")
        if self.source == "hub" and not self.hub_name:
            raise ValueError("data.hub_name is required with data.source='hub'")
        for name in ("text_field", "tokenizer", "hub_split"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(
                    f"data.{name} must be a non-empty string, got {getattr(self, name)!r}"
                )
        if self.tokenizer.startswith("tiktoken:") and not self.tokenizer.removeprefix("tiktoken:"):
            raise ValueError(
                "data.tokenizer 'tiktoken:' needs an encoding name, e.g. tiktoken:gpt2"
            )
        fraction = self.validation_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise ValueError(f"data.validation_fraction must be a number, got {fraction!r}")
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"data.validation_fraction must be in [0, 1), got {fraction!r}")
        if isinstance(self.shuffle_seed, bool) or not isinstance(self.shuffle_seed, int):
            raise ValueError(f"data.shuffle_seed must be an integer, got {self.shuffle_seed!r}")
        if self.shuffle_seed < 0:
            raise ValueError(f"data.shuffle_seed must be >= 0, got {self.shuffle_seed}")


# ---------------------------------------------------------------------------------- tokenizers


class ByteTokenizer:
    """UTF-8 bytes are tokens 0..255; 256 is EOS (the document separator).

    vocab_size is 264: ids 257..263 are reserved for special tokens so that adding one later keeps
    checkpoints compatible (and 264 is a multiple of 8, which tensor cores like).
    """

    name = "byte"
    identity = "byte"
    eos_id = 256
    vocab_size = 264

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="replace"))

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8", errors="replace"), dtype=np.uint8) for t in texts]

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A local tokenizer.json (the `tokenizers` library). Its EOS is the first of EOS_NAMES it
    knows; a file with none of them gets <|endoftext|> added as a special token."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        self.name = path
        self.identity = "hf:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()
        try:
            self.tokenizer = Tokenizer.from_file(path)
        except Exception as error:  # the Rust library raises a bare Exception on bad files
            raise ValueError(
                f"data.tokenizer {path!r} is not a valid tokenizer.json: {error}"
            ) from None
        known = [self.tokenizer.token_to_id(name) for name in EOS_NAMES]
        known = [i for i in known if i is not None]
        if not known:
            self.tokenizer.add_special_tokens([EOS_NAMES[0]])
            known = [self.tokenizer.token_to_id(EOS_NAMES[0])]
        self.eos_id = known[0]
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


class TiktokenTokenizer:
    """An OpenAI tiktoken encoding; special-token text inside documents is encoded as text."""

    def __init__(self, encoding: str):
        try:
            import tiktoken
        except ImportError:
            raise ValueError(
                f"data.tokenizer 'tiktoken:{encoding}' needs `pip install tiktoken`"
            ) from None
        if encoding not in tiktoken.list_encoding_names():
            raise ValueError(
                f"data.tokenizer: unknown tiktoken encoding {encoding!r}; "
                f"known: {tiktoken.list_encoding_names()}"
            )
        try:
            self.encoding = tiktoken.get_encoding(encoding)
        except Exception as error:  # offline without a cached file: requests' errors
            raise ValueError(
                f"data.tokenizer: tiktoken encoding {encoding!r} is not available (it is "
                f"downloaded once, then cached in TIKTOKEN_CACHE_DIR): {error}"
            ) from None
        self.name = self.identity = "tiktoken:" + encoding
        self.eos_id = self.encoding.eot_token
        self.vocab_size = self.encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [
            np.asarray(ids, dtype=np.int64) for ids in self.encoding.encode_ordinary_batch(texts)
        ]

    def decode(self, ids) -> str:
        return self.encoding.decode(list(ids), errors="replace")


Tokenizer = ByteTokenizer | HFTokenizer | TiktokenTokenizer


def make_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer data.tokenizer names: "byte", "tiktoken:<encoding>" or a tokenizer.json."""
    if spec == "byte":
        return ByteTokenizer()
    if spec.startswith("tiktoken:"):
        return TiktokenTokenizer(spec.removeprefix("tiktoken:"))
    if Path(spec).is_file():
        return HFTokenizer(spec)
    raise ValueError(
        f"unknown data.tokenizer {spec!r}: expected 'byte', 'tiktoken:<encoding>' or the path of "
        f"an existing tokenizer.json file"
    )


# ---------------------------------------------------------------------------------- documents


def _unit_hash(key: str, salt: str) -> float:
    """A deterministic pseudo-random number in [0, 1) (Python's hash() changes per process)."""
    digest = hashlib.blake2b(
        key.encode("utf-8", errors="replace"), digest_size=8, person=salt.encode()
    )
    return int.from_bytes(digest.digest(), "little") / 2**64


def _stdlib_files(max_documents: int | None) -> tuple[Path, list[str]]:
    """The stdlib root and its .py files (relative posix paths) in a fixed pseudo-random order
    (a hash of the path, so a cap draws from every package), test suites and site-packages out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [s for s in subfolders if s not in STDLIB_EXCLUDED_DIRS]
        files += [
            (Path(folder) / n).relative_to(root).as_posix() for n in names if n.endswith(".py")
        ]
    files.sort(key=lambda rel: (_unit_hash(rel, "order"), rel))
    return root, files[:max_documents]


def _data_files(path: str) -> list[Path]:
    """The files under data.path, sorted; ValueError for a missing path or unsupported files."""
    root = Path(path).expanduser()
    if not root.exists():
        raise ValueError(f"data.path {path!r} does not exist")
    if root.is_dir():
        files = sorted(
            p
            for p in root.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        if not files:
            raise ValueError(f"data.path {path!r} is an empty folder")
    else:
        files = [root]
    unsupported = [str(p) for p in files if p.suffix.lower() not in BUILDERS]
    if unsupported:
        raise ValueError(
            f"data.path {path!r}: unsupported file type: {', '.join(unsupported[:5])}"
            f"{' ...' if len(unsupported) > 5 else ''} (supported: {', '.join(BUILDERS)})"
        )
    unreadable = [str(p) for p in files if not os.access(p, os.R_OK)]
    if unreadable:
        raise ValueError(f"data.path {path!r}: unreadable files: {', '.join(unreadable[:5])}")
    return files


def _read_stdlib(root: str, files: list[str]):
    for rel in files:
        yield {"key": rel, "text": (Path(root) / rel).read_text(encoding="utf-8", errors="replace")}


def _text_column(dataset: datasets.Dataset, field: str, where: str) -> datasets.Dataset:
    """The dataset reduced to one string column, "text"."""
    if field not in dataset.column_names:
        raise ValueError(
            f"data.text_field {field!r} is not a column of {where}: {dataset.column_names}"
        )
    feature = dataset.features[field]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise ValueError(f"data.text_field {field!r} of {where} holds {feature}, not text")
    dataset = dataset.select_columns([field])
    if field != "text":
        dataset = dataset.rename_column(field, "text")
    return dataset.cast(datasets.Features({"text": datasets.Value("string")}))


def _load_documents(config: DataConfig, plan: dict, hf_cache: Path) -> datasets.Dataset:
    """One row per document: "text", and for the stdlib "key" (the file path the split hashes;
    elsewhere the text is the key, so duplicates land in the same split)."""
    num_proc = config.num_proc if config.num_proc > 1 else None
    if config.source == "stdlib":
        return datasets.Dataset.from_generator(
            _read_stdlib,
            gen_kwargs={"root": plan["root"], "files": [f for f, *_ in plan["files"]]},
            features=datasets.Features(
                {"key": datasets.Value("string"), "text": datasets.Value("string")}
            ),
            cache_dir=str(hf_cache),
            num_proc=num_proc,
            # the file list with sizes and mtimes: a changed file is re-read
            fingerprint=_digest(["stdlib", plan]),
        )
    if config.source == "hub":
        try:
            dataset = datasets.load_dataset(
                config.hub_name,
                config.hub_config,
                split=config.hub_split,
                cache_dir=str(hf_cache),
                num_proc=num_proc,
            )
        except (datasets.exceptions.DatasetsError, OSError, ValueError) as error:
            raise ValueError(
                f"data.hub_name {config.hub_name!r} (config {config.hub_config!r}, split "
                f"{config.hub_split!r}) cannot be loaded: {error}"
            ) from None
        parts = [_text_column(dataset, config.text_field, f"hub dataset {config.hub_name!r}")]
    else:
        by_builder: dict[str, list[str]] = {}
        for name, *_ in plan["files"]:
            by_builder.setdefault(BUILDERS[Path(name).suffix.lower()], []).append(name)
        parts = []
        for builder, names in by_builder.items():
            # A .txt file is one document (source files, books), not one per line.
            options = (
                {"sample_by": "document", "encoding_errors": "replace"} if builder == "text" else {}
            )
            try:
                dataset = datasets.load_dataset(
                    builder,
                    data_files=names,
                    split="train",
                    cache_dir=str(hf_cache),
                    num_proc=num_proc,
                    **options,
                )
            except (
                datasets.exceptions.DatasetsError,
                pa.ArrowException,
                OSError,
                UnicodeError,
            ) as error:
                cause = f" ({error.__cause__})" if error.__cause__ else ""
                raise ValueError(
                    f"data.path {config.path!r}: cannot read the {builder} files "
                    f"{', '.join(names[:5])}: {error}{cause}"
                ) from None
            field = "text" if builder == "text" else config.text_field
            parts.append(_text_column(dataset, field, f"{builder} files in {config.path!r}"))
    dataset = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if config.max_documents is not None:
        dataset = dataset.select(range(min(config.max_documents, len(dataset))))
    return dataset


def _non_empty(texts: list[str | None]) -> list[bool]:
    return [bool(t) for t in texts]


def _in_split(keys: list[str], fraction: float, validation: bool) -> list[bool]:
    return [(_unit_hash(k, "split") < fraction) == validation for k in keys]


def _tokenize(texts: list[str], tokenizer: Tokenizer, dtype: str) -> dict:
    ids = [np.append(t, tokenizer.eos_id).astype(dtype) for t in tokenizer.encode_batch(texts)]
    return {"ids": ids, "bytes": [len(t.encode("utf-8", errors="replace")) for t in texts]}


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------- the cache


def cache_root(config: DataConfig) -> Path:
    if config.cache_dir:
        return Path(config.cache_dir).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "longnet" / "data"


def _plan(config: DataConfig) -> tuple[Tokenizer, dict, str]:
    """Every check that needs no reading of the corpus, then the tokenizer, what to read and the
    cache key. Cheap: the trainer runs it (via check) before any heavy work."""
    config.validate()
    if config.source == "stdlib":
        root, names = _stdlib_files(config.max_documents)
        if not names:
            raise ValueError(f"data.source='stdlib': no .py files under {root}")
        stats = [(root / n).stat() for n in names]
        plan = {
            "root": str(root),
            "python": sys.version,
            "files": [[n, s.st_size, s.st_mtime_ns] for n, s in zip(names, stats, strict=True)],
        }
    elif config.source == "files":
        files = _data_files(config.path)
        plan = {
            "files": [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
        }
    else:
        plan = {"hub": [config.hub_name, config.hub_config, config.hub_split]}
    tokenizer = make_tokenizer(config.tokenizer)
    key = _digest(
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
    docs = _load_documents(config, plan, cache_root(config) / "hf")
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


def _prepare(config: DataConfig) -> tuple[Path, Tokenizer, bool]:
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
    return _prepare(config)[0]


# ---------------------------------------------------------------------------------- rows


class _TokenStream:
    """The concatenated token ids of one split, as memory-mapped numpy chunks."""

    def __init__(self, dataset: datasets.Dataset):
        self.dataset = dataset  # keeps the memory map alive
        chunks = [
            pc.list_flatten(c).to_numpy(zero_copy_only=True)
            for c in dataset.data.column("ids").chunks
        ]
        self.chunks = [c for c in chunks if len(c)]
        self.starts = np.cumsum([0] + [len(c) for c in self.chunks])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def slice(self, start: int, stop: int) -> np.ndarray:
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces = []
        while start < stop:
            offset = start - self.starts[i]
            piece = self.chunks[i][offset : stop - self.starts[i]]
            pieces.append(piece)
            start += len(piece)
            i += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


class PackedDataset(torch.utils.data.Dataset):
    """Rows of seq_len + 1 tokens cut from a split's stream with stride seq_len (see the top)."""

    def __init__(self, stream: _TokenStream, seq_len: int, seed: int, split: str):
        self.stream, self.seq_len, self.seed, self.split = stream, seq_len, seed, split
        self.num_rows = (len(stream) - 1) // seq_len
        if self.num_rows < 1:
            raise ValueError(
                f"empty corpus: the {split} split has {len(stream)} tokens, fewer than seq_len + "
                f"1 = {seq_len + 1}; use more data or a smaller seq_len"
                + (" or a larger data.validation_fraction" if split == "validation" else "")
            )
        self._permutations: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_rows:
            raise IndexError(f"row {index} out of range for {self.num_rows} rows")
        return {k: v[0] for k, v in self.rows([index]).items()}

    def rows(self, indices) -> dict[str, torch.Tensor]:
        """input_ids and labels, (len(indices), seq_len) int64 each."""
        block = np.stack(
            [self.stream.slice(i * self.seq_len, (i + 1) * self.seq_len + 1) for i in indices]
        ).astype(np.int64)
        block = torch.from_numpy(block)  # (rows, seq_len + 1)
        return {"input_ids": block[:, :-1].contiguous(), "labels": block[:, 1:].contiguous()}

    def permutation(self, epoch: int) -> np.ndarray:
        """The row order of an epoch: a pure function of (seed, epoch)."""
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:
                self._permutations.pop(min(self._permutations))
            rng = np.random.default_rng([self.seed, epoch])
            self._permutations[epoch] = rng.permutation(self.num_rows)
        return self._permutations[epoch]

    def indices_for(
        self,
        step: int,
        micro_step: int,
        dp_rank: int,
        dp_size: int,
        micro_batch_size: int,
        grad_accum: int,
    ) -> np.ndarray:
        """The rows of one micro-batch of one data-parallel rank.

        Optimizer step s consumes positions [s*B, (s+1)*B) of the endless sequence permutation(0),
        permutation(1), ... with B = dp_size * grad_accum * micro_batch_size, micro-step k of rank
        r taking ((s*grad_accum + k)*dp_size + r)*micro_batch_size onwards. So one step reads
        the same rows however B is split into ranks, micro-batches and accumulation steps, and
        resuming needs only the step.
        """
        for name, value, low in (
            ("dp_size", dp_size, 1),
            ("micro_batch_size", micro_batch_size, 1),
            ("grad_accum", grad_accum, 1),
            ("step", step, 0),
        ):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
        if not 0 <= micro_step < grad_accum:
            raise ValueError(f"micro_step must be in [0, {grad_accum}), got {micro_step}")
        first = ((step * grad_accum + micro_step) * dp_size + dp_rank) * micro_batch_size
        epochs, offsets = np.divmod(first + np.arange(micro_batch_size), self.num_rows)
        return np.array([self.permutation(int(e))[o] for e, o in zip(epochs, offsets, strict=True)])

    def batch_for(
        self,
        step: int,
        micro_step: int,
        dp_rank: int,
        dp_size: int,
        micro_batch_size: int,
        grad_accum: int,
    ) -> dict[str, torch.Tensor]:
        """input_ids and labels, (micro_batch_size, seq_len) int64; see indices_for. Every rank
        of a sequence-parallel group passes the same dp_rank and gets the same rows."""
        return self.rows(
            self.indices_for(step, micro_step, dp_rank, dp_size, micro_batch_size, grad_accum)
        )


@dataclass
class Corpus:
    """What load() returns: the packed splits, the tokenizer and the corpus statistics."""

    tokenizer: Tokenizer
    train: PackedDataset
    validation: PackedDataset | None  # None when data.validation_fraction is 0
    path: Path  # the cache folder
    from_cache: bool  # False when this call tokenised the corpus
    stats: dict  # per split: documents, tokens (EOS included), bytes (UTF-8 of the text)

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 bytes per token on the validation split (train without one)."""
        split = self.stats["validation" if self.validation is not None else "train"]
        return split["bytes"] / split["tokens"]

    def bits_per_byte(self, nats_per_token: float) -> float:
        """A mean cross-entropy (nats per token) in bits per byte of text, comparable across
        tokenizers. EOS tokens count as tokens and carry no bytes."""
        return nats_per_token / math.log(2) / self.bytes_per_token

    def validation_rows(self, seq_len: int, max_rows: int | None = None) -> dict[str, torch.Tensor]:
        """The first rows (at most max_rows) of the validation split packed at seq_len: input_ids
        and labels (rows, seq_len) int64, for the loss at several context lengths. Documents are
        shuffled before packing, so the first rows are a random sample; the same for every call."""
        if self.validation is None:
            raise ValueError("no validation split: data.validation_fraction is 0")
        seq_len = positive_int("seq_len", seq_len)
        rows = PackedDataset(self.validation.stream, seq_len, self.validation.seed, "validation")
        count = (
            len(rows) if max_rows is None else min(positive_int("max_rows", max_rows), len(rows))
        )
        return rows.rows(range(count))


def load(config: DataConfig) -> Corpus:
    """The corpus packed at config.seq_len, from the cache (built first if missing)."""
    path, tokenizer, from_cache = _prepare(config)
    stats = json.loads((path / "meta.json").read_text())["splits"]
    splits = {
        name: PackedDataset(
            _TokenStream(datasets.load_from_disk(str(path / name))),
            config.seq_len,
            config.shuffle_seed,
            name,
        )
        for name in stats
    }
    return Corpus(tokenizer, splits["train"], splits.get("validation"), path, from_cache, stats)
