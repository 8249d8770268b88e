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

from .cache import cache_root, check, prepare
from .config import SOURCES, DataConfig
from .corpus import Corpus, load
from .packing import PackedDataset, document_offsets
from .tokenizer import ByteTokenizer, HFTokenizer, TiktokenTokenizer, Tokenizer, make_tokenizer

__all__ = [
    "SOURCES",
    "ByteTokenizer",
    "Corpus",
    "DataConfig",
    "HFTokenizer",
    "PackedDataset",
    "TiktokenTokenizer",
    "Tokenizer",
    "cache_root",
    "check",
    "document_offsets",
    "load",
    "make_tokenizer",
    "prepare",
]
