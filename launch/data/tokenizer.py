"""Tokenizers: UTF-8 bytes, a local tokenizer.json, or a tiktoken encoding; each with an EOS id,
the separator appended to every document.

`save_pretrained(folder)` writes the byte and tokenizer.json tokenizers as Hugging Face tokenizer
files (tokenizer.json for the `tokenizers` library, tokenizer_config.json naming
PreTrainedTokenizerFast and the EOS), which `transformers.AutoTokenizer.from_pretrained(folder)`
and lm-eval's HFLM load; they encode every text to the same ids.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

# Candidate names of the end-of-text token in HF tokenizer files, most common first.
EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[SEP]")


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

    def save_pretrained(self, folder: Path) -> list[str]:
        """Byte-level BPE without merges: each byte is one token whose id is its value (the
        characters stand for bytes as in GPT-2's byte-level vocabulary); EOS and the reserved
        ids are special tokens."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        vocab = {char: byte for byte, char in enumerate(_byte_characters())}
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tokenizer.decoder = decoders.ByteLevel()
        reserved = [f"<|reserved_{i}|>" for i in range(self.eos_id + 1, self.vocab_size)]
        tokenizer.add_special_tokens([EOS_NAMES[0], *reserved])
        # encode() reads "<|endoftext|>" in a text as its bytes; so must transformers.
        return _save_hf(tokenizer, EOS_NAMES[0], folder, self.name, split_special_tokens=True)


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

    def save_pretrained(self, folder: Path) -> list[str]:
        """The tokenizer.json as loaded (with the EOS added where it had none)."""
        eos = self.tokenizer.id_to_token(self.eos_id)
        return _save_hf(self.tokenizer, eos, folder, HF_TOKENIZER_FILES[0])


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

    def save_pretrained(self, folder: Path) -> list[str]:
        """Nothing: a tiktoken encoding has no tokenizer.json; transformers loads it from its
        own files (AutoTokenizer with `from_slow` and the encoding's .tiktoken file)."""
        return []


Tokenizer = ByteTokenizer | HFTokenizer | TiktokenTokenizer

# The Hugging Face tokenizer files save_pretrained writes.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _byte_characters() -> list[str]:
    """The printable character that stands for each byte 0..255 in a byte-level vocabulary
    (GPT-2's table: printable Latin-1 bytes stand for themselves, the others for 256 + i)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    others = (byte for byte in range(256) if byte not in printable)
    table = {byte: chr(byte) for byte in printable}
    table |= {byte: chr(256 + i) for i, byte in enumerate(others)}
    return [table[byte] for byte in range(256)]


def _save_hf(
    tokenizer, eos: str, folder: Path, spec: str, split_special_tokens: bool = False
) -> list[str]:
    """tokenizer.json and a tokenizer_config.json for transformers' PreTrainedTokenizerFast;
    `longnet_tokenizer` records the data.tokenizer spec that reads the folder back
    (exported_tokenizer)."""
    tokenizer.save(str(folder / HF_TOKENIZER_FILES[0]))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos,
        "pad_token": eos,
        "split_special_tokens": split_special_tokens,
        "longnet_tokenizer": spec,
    }
    (folder / HF_TOKENIZER_FILES[1]).write_text(json.dumps(config, indent=2) + "\n")
    return list(HF_TOKENIZER_FILES)


def exported_tokenizer(folder: Path) -> Tokenizer:
    """The tokenizer an exported model folder holds (save_pretrained's files); byte for a folder
    without them (an export from before tokenizers were written)."""
    config = folder / HF_TOKENIZER_FILES[1]
    if not config.is_file():
        return ByteTokenizer()
    try:
        spec = json.loads(config.read_text()).get("longnet_tokenizer", HF_TOKENIZER_FILES[0])
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise ValueError(f"{str(config)!r} is not a tokenizer config: {error}") from None
    return make_tokenizer(spec if spec == "byte" else str(folder / HF_TOKENIZER_FILES[0]))


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
