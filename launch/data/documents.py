"""Documents: the stdlib's source files, local files or a hub dataset, as one "text" column."""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from pathlib import Path

import datasets
import pyarrow as pa

from .config import DataConfig

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


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def unit_hash(key: str, salt: str) -> float:
    """A deterministic pseudo-random number in [0, 1) (Python's hash() changes per process)."""
    hashed = hashlib.blake2b(
        key.encode("utf-8", errors="replace"), digest_size=8, person=salt.encode()
    )
    return int.from_bytes(hashed.digest(), "little") / 2**64


def stdlib_files(max_documents: int | None) -> tuple[Path, list[str]]:
    """The stdlib root and its .py files (relative posix paths) in a fixed pseudo-random order
    (a hash of the path, so a cap draws from every package), test suites and site-packages out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [s for s in subfolders if s not in STDLIB_EXCLUDED_DIRS]
        files += [
            (Path(folder) / n).relative_to(root).as_posix() for n in names if n.endswith(".py")
        ]
    files.sort(key=lambda rel: (unit_hash(rel, "order"), rel))
    return root, files[:max_documents]


def data_files(path: str) -> list[Path]:
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


def load_documents(config: DataConfig, plan: dict, hf_cache: Path) -> datasets.Dataset:
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
            fingerprint=digest(["stdlib", plan]),
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
