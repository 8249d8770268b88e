"""The data pipeline on real files through the real `datasets` library: every reader, the packing
against the tokenised documents, the sampler's determinism and sharding, the cache, bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from longnet.launch.data import ByteTokenizer, DataConfig, check, load, make_tokenizer, prepare
from longnet.launch.data.passkey import lowest_depth, plant
from longnet.launch.data.tokenizer import HFTokenizer, exported_tokenizer

EOS = ByteTokenizer.eos_id
SMALL_STDLIB = dict(seq_len=32, max_documents=10, validation_fraction=0.3)


def stream_of(dataset) -> np.ndarray:
    """The whole token stream of a split, as the rows are cut from it."""
    return dataset.stream.slice(0, len(dataset.stream)).astype(np.int64)


def documents_of(stream: np.ndarray, eos: int) -> list[list[int]]:
    """The stream cut after each EOS; every document must end with one."""
    assert stream[-1] == eos
    ends = np.flatnonzero(stream == eos)
    return [stream[a + 1 : b].tolist() for a, b in zip(np.r_[-1, ends[:-1]], ends, strict=True)]


def texts_of(dataset) -> list[str]:
    return [bytes(doc).decode("utf-8") for doc in documents_of(stream_of(dataset), EOS)]


def files_config(tmp_path, path, **overrides) -> DataConfig:
    values = dict(
        source="files",
        path=str(path),
        cache_dir=str(tmp_path / "cache"),
        seq_len=16,
        validation_fraction=0.3,
    )
    return DataConfig(**(values | overrides))


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def corpus_folder(tmp_path) -> tuple[Path, list[str]]:
    """A folder of every supported type (one nested), text field "content"; the documents."""
    folder = tmp_path / "corpus"
    (folder / "nested").mkdir(parents=True)
    (folder / ".hidden").write_text("ignored")
    (folder / "a.txt").write_text("def f(x):\n    return x + 1\n\n\nprint(f(2))\n")
    (folder / "nested" / "b.txt").write_text("naïve café ✓ — one document per .txt file\n")
    write_jsonl(
        folder / "c.jsonl",
        [{"content": f"json line {i} " * (i + 1), "id": i} for i in range(5)] + [{"content": ""}],
    )
    (folder / "d.json").write_text(json.dumps([{"content": "a JSON array record"}] * 2))
    parquet_texts = [f"parquet row {i}: " + "xyz" * i for i in range(4)]
    pq.write_table(pa.table({"content": parquet_texts, "n": list(range(4))}), folder / "e.parquet")
    expected = (
        [(folder / "a.txt").read_text(), (folder / "nested" / "b.txt").read_text()]
        + [f"json line {i} " * (i + 1) for i in range(5)]  # the empty record is dropped
        + ["a JSON array record"] * 2
        + parquet_texts
    )
    return folder, expected


def test_byte_tokenizer():
    tokenizer = make_tokenizer("byte")
    text = "naïve ✓\n\tx"
    ids = tokenizer.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode([*ids[:3], tokenizer.eos_id, *ids[3:]]) == text  # specials dropped
    assert tokenizer.decode([0xC3]) == "\ufffd"  # a cut multi-byte character
    assert (tokenizer.vocab_size, tokenizer.eos_id) == (264, 256)


# Texts a tokenizer gets wrong first: multi-byte characters, control bytes, leading spaces,
# carriage returns, and the EOS token's own text (the data reads it as text, not as EOS).
HARD_TEXTS = [
    "def f(x):\n    return x  # é ü 中文 🙂\t\r\n",
    " leading space",
    "",
    "<|endoftext|> in a document <|reserved_257|>",
    "\x00\x01\x7f\u00ff\U0001f600",
]


def test_byte_tokenizer_saves_what_transformers_loads(tmp_path):
    """The files export writes: AutoTokenizer encodes every text to the byte tokenizer's ids and
    decodes them back; EOS is id 256 and the reserved ids are special."""
    import transformers

    tokenizer = make_tokenizer("byte")
    assert tokenizer.save_pretrained(tmp_path) == ["tokenizer.json", "tokenizer_config.json"]
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (len(loaded), loaded.eos_token_id) == (tokenizer.vocab_size, tokenizer.eos_id)
    for text in HARD_TEXTS:
        ids = tokenizer.encode(text)
        assert loaded(text)["input_ids"] == ids, text
        assert loaded.decode(ids) == text
    assert loaded.decode([65, 256, 263, 66], skip_special_tokens=True) == "AB"


def test_folder_of_every_type_packs_the_documents(tmp_path, corpus_folder):
    folder, expected = corpus_folder
    config = files_config(tmp_path, folder, text_field="content", validation_fraction=0.0)
    corpus = load(config)
    assert corpus.validation is None
    assert sorted(texts_of(corpus.train)) == sorted(expected)
    stream = stream_of(corpus.train)
    total = sum(len(t.encode()) + 1 for t in expected)
    assert len(stream) == total == corpus.stats["train"]["tokens"]
    assert corpus.stats["train"]["bytes"] == total - len(expected)

    # Rows: seq_len + 1 tokens with stride seq_len; the concatenated inputs are the stream.
    seq_len, rows = config.seq_len, len(corpus.train)
    assert rows == (total - 1) // seq_len
    batch = corpus.train.rows(range(rows))
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.int64
    assert batch["input_ids"].shape == batch["labels"].shape == (rows, seq_len)
    inputs = batch["input_ids"].flatten()
    labels = batch["labels"].flatten()
    assert torch.equal(inputs, torch.from_numpy(stream[: rows * seq_len]))
    assert torch.equal(labels, torch.from_numpy(stream[1 : rows * seq_len + 1]))
    item = corpus.train[rows - 1]
    assert torch.equal(item["input_ids"], batch["input_ids"][-1])
    with pytest.raises(IndexError):
        corpus.train[rows]


@pytest.mark.parametrize("name", ["one.txt", "one.jsonl", "one.parquet"])
def test_single_file(tmp_path, name):
    texts = [f"document {i}: " + "abc" * i for i in range(20)]
    path = tmp_path / name
    if name.endswith(".txt"):
        path.write_text(texts[0])
        texts = texts[:1]
    elif name.endswith(".jsonl"):
        write_jsonl(path, [{"text": t} for t in texts])
    else:
        pq.write_table(pa.table({"text": texts}), path)
    corpus = load(files_config(tmp_path, path, seq_len=4, validation_fraction=0.0))
    assert sorted(texts_of(corpus.train)) == sorted(texts)


def test_hf_tokenizer_file(tmp_path, corpus_folder):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder, expected = corpus_folder
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    hf.train_from_iterator(expected, trainer)
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))

    config = files_config(tmp_path, folder, text_field="content", tokenizer=str(path), seq_len=8)
    corpus = load(config.model_copy(update={"validation_fraction": 0.0}))
    tokenizer = corpus.tokenizer
    assert tokenizer.eos_id == hf.token_to_id("<|endoftext|>")
    assert tokenizer.vocab_size == hf.get_vocab_size()
    documents = documents_of(stream_of(corpus.train), tokenizer.eos_id)
    assert sorted(documents) == sorted(hf.encode(t).ids for t in expected)
    assert sorted(tokenizer.decode(d) for d in documents) == sorted(expected)
    # What export writes for it: transformers' AutoTokenizer encodes as the data did.
    import transformers

    (tmp_path / "exported").mkdir()
    tokenizer.save_pretrained(tmp_path / "exported")
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")
    assert loaded.eos_token_id == tokenizer.eos_id
    for text in [*HARD_TEXTS, *expected]:
        assert loaded(text)["input_ids"] == tokenizer.encode(text), text
    # generate's default for an exported folder: the tokenizer saved there.
    again = exported_tokenizer(tmp_path / "exported")
    assert isinstance(again, HFTokenizer) and again.eos_id == tokenizer.eos_id
    assert all(again.encode(t) == tokenizer.encode(t) for t in expected)

    # Bits per byte: the same cross-entropy in bits, over bytes instead of tokens.
    stats = corpus.stats["train"]
    assert stats["bytes"] == sum(len(t.encode()) for t in expected)
    assert corpus.bytes_per_token == stats["bytes"] / stats["tokens"] > 1.0  # BPE merges bytes
    nats = 2.0
    bits = nats * stats["tokens"] / math.log(2)
    assert corpus.bits_per_byte(nats) == pytest.approx(bits / stats["bytes"], rel=1e-12)

    # A tokenizer without any end-of-text token gets one added.
    plain = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    plain.save(str(tmp_path / "plain.json"))
    tokenizer = make_tokenizer(str(tmp_path / "plain.json"))
    assert (tokenizer.eos_id, tokenizer.vocab_size) == (3, 4)


def test_exported_tokenizer_reads_what_save_pretrained_wrote(tmp_path):
    """byte: the byte tokenizer; no tokenizer files: byte (older exports); a garbled config is
    refused naming the file."""
    assert isinstance(exported_tokenizer(tmp_path), ByteTokenizer)
    make_tokenizer("byte").save_pretrained(tmp_path)
    assert isinstance(exported_tokenizer(tmp_path), ByteTokenizer)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json' is not a tokenizer config"):
        exported_tokenizer(tmp_path)


def test_stdlib_default_is_python_source_and_split_is_stable(tmp_path):
    config = DataConfig(
        seq_len=64, max_documents=12, validation_fraction=0.3, cache_dir=str(tmp_path)
    )
    corpus = load(config)
    train, validation = texts_of(corpus.train), texts_of(corpus.validation)
    assert len(train) + len(validation) == 12 and train and validation
    for text in train + validation:
        compile(text, "<stdlib>", "exec")  # whole source files
    assert corpus.bytes_per_token == pytest.approx(1.0, abs=1e-3)  # bytes, plus one EOS per file
    # A file's split is a hash of its path: more files move none of the first twelve.
    bigger = load(config.model_copy(update={"max_documents": 20}))
    assert set(train) <= set(texts_of(bigger.train))
    assert set(validation) <= set(texts_of(bigger.validation))
    assert len(texts_of(bigger.train)) + len(texts_of(bigger.validation)) == 20


def test_num_proc_gives_the_same_stream(tmp_path, corpus_folder):
    folder, _ = corpus_folder
    streams = []
    for num_proc in (1, 2):
        config = files_config(
            tmp_path / str(num_proc), folder, text_field="content", num_proc=num_proc
        )
        corpus = load(config)
        streams.append((stream_of(corpus.train), stream_of(corpus.validation)))
    for a, b in zip(*streams, strict=True):
        assert np.array_equal(a, b)


@pytest.fixture(scope="module")
def stdlib_corpus(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return load(DataConfig(**SMALL_STDLIB, cache_dir=str(cache)))


def test_sampler_shards_data_parallel_ranks_within_an_epoch(stdlib_corpus):
    train = stdlib_corpus.train
    dp_size, grad_accum, micro = 4, 2, 3
    per_step = dp_size * grad_accum * micro
    steps = len(train) // per_step
    seen = []
    for step in range(steps):
        for micro_step in range(grad_accum):
            for rank in range(dp_size):
                seen.append(train.indices_for(step, micro_step, rank, dp_size, micro, grad_accum))
    seen = np.concatenate(seen)
    assert len(set(seen.tolist())) == len(seen) == steps * per_step  # disjoint rows
    # An epoch is a permutation of all rows; step s takes positions [s*B, (s+1)*B) of it.
    assert np.array_equal(np.sort(train.permutation(0)), np.arange(len(train)))
    batch = train.batch_for(1, 1, 2, dp_size, micro, grad_accum)
    position = ((1 * grad_accum + 1) * dp_size + 2) * micro
    expected = train.rows(train.permutation(0)[position : position + micro])
    assert all(torch.equal(batch[k], expected[k]) for k in ("input_ids", "labels"))


def test_sampler_step_reads_the_same_rows_however_it_is_split(stdlib_corpus):
    """DP x micro-batch x accumulation splits of one global batch read the same rows per step,
    which is what makes DP = 2 match one process with twice the micro-batch."""
    train = stdlib_corpus.train
    for step in (0, 5, len(train) // 8 + 3):  # the last crosses into the next epoch
        splits = [(1, 1, 8), (2, 1, 4), (1, 2, 4), (2, 2, 2), (4, 2, 1)]  # dp, accum, micro
        sets = [
            sorted(
                np.concatenate(
                    [
                        train.indices_for(step, k, r, dp, micro, accum)
                        for k in range(accum)
                        for r in range(dp)
                    ]
                ).tolist()
            )
            for dp, accum, micro in splits
        ]
        assert all(s == sets[0] for s in sets)


def test_sampler_wraps_epochs_with_a_fresh_shuffle(stdlib_corpus):
    train = stdlib_corpus.train
    rows = len(train)
    assert rows > 20
    micro = 7
    positions, indices = [], []
    for step in range(2 * rows // micro + 2):
        indices.append(train.indices_for(step, 0, 0, 1, micro, 1))
        positions.append(step * micro + np.arange(micro))
    positions, indices = np.concatenate(positions), np.concatenate(indices)
    for epoch in (0, 1, 2):
        in_epoch = positions // rows == epoch
        expected = train.permutation(epoch)[positions[in_epoch] % rows]
        assert np.array_equal(indices[in_epoch], expected)
    assert np.array_equal(np.sort(train.permutation(1)), np.arange(rows))
    assert not np.array_equal(train.permutation(0), train.permutation(1))


def test_same_seed_same_rows_other_seed_other_rows(tmp_path, stdlib_corpus):
    config = DataConfig(**SMALL_STDLIB, cache_dir=str(tmp_path / "again"))
    again = load(config)  # rebuilt from scratch in a fresh cache
    assert not again.from_cache
    assert np.array_equal(stream_of(again.train), stream_of(stdlib_corpus.train))
    for step in (0, 3, 40):
        a = again.train.batch_for(step, 1, 1, 2, 4, 2)
        b = stdlib_corpus.train.batch_for(step, 1, 1, 2, 4, 2)
        assert torch.equal(a["input_ids"], b["input_ids"])
    other = load(config.model_copy(update={"shuffle_seed": 1}))
    assert not np.array_equal(other.train.permutation(0), again.train.permutation(0))
    assert sorted(texts_of(other.train)) == sorted(texts_of(again.train))  # same documents


def test_validation_rows_at_several_context_lengths(stdlib_corpus):
    validation = stdlib_corpus.validation
    stream = torch.from_numpy(stream_of(validation))
    for seq_len, max_rows in ((16, 5), (64, 3), (len(stream) - 1, None)):
        rows = stdlib_corpus.validation_rows(seq_len, max_rows)
        count = rows["input_ids"].shape[0]
        available = (len(stream) - 1) // seq_len
        assert count == (available if max_rows is None else min(max_rows, available))
        assert rows["input_ids"].shape == rows["labels"].shape == (count, seq_len)
        assert torch.equal(rows["input_ids"].flatten(), stream[: count * seq_len])
        assert torch.equal(rows["labels"].flatten(), stream[1 : count * seq_len + 1])
    with pytest.raises(ValueError, match=f"seq_len \\+ 1 = {len(stream) + 1}"):
        stdlib_corpus.validation_rows(len(stream))


def cache_listing(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_cache_is_reused_and_keyed_by_the_files(tmp_path, corpus_folder):
    folder, _ = corpus_folder
    config = files_config(tmp_path, folder, text_field="content")
    first = load(config)
    assert not first.from_cache
    listing = cache_listing(tmp_path / "cache")
    second = load(config)
    assert second.from_cache and second.path == first.path
    assert cache_listing(tmp_path / "cache") == listing  # nothing read, tokenised or written
    assert np.array_equal(stream_of(second.train), stream_of(first.train))
    # seq_len is not part of the key: the cached tokens are packed at load time.
    longer = load(config.model_copy(update={"seq_len": 32}))
    assert longer.from_cache and len(longer.train) == (len(first.train.stream) - 1) // 32
    assert prepare(config) == first.path
    # A changed file (its mtime) is a new corpus.
    text = folder / "a.txt"
    os.utime(text, ns=(text.stat().st_atime_ns, text.stat().st_mtime_ns + 10**9))
    assert not load(config).from_cache
    assert not list((tmp_path / "cache").glob(".building-*"))


def test_default_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = prepare(DataConfig(seq_len=8, max_documents=4, validation_fraction=0.5))
    assert path.parent == tmp_path / "longnet" / "data"
    assert load(DataConfig(seq_len=8, max_documents=4, validation_fraction=0.5)).from_cache


def test_concurrent_prepare(tmp_path, corpus_folder):
    folder, _ = corpus_folder
    config = files_config(tmp_path, folder, text_field="content")
    script = (
        "import sys; from longnet.launch.data import DataConfig, prepare; "
        f"print(prepare(DataConfig(source='files', path={str(folder)!r}, text_field='content', "
        f"cache_dir={config.cache_dir!r}, seq_len=16, validation_fraction=0.3)))"
    )
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0].decode().strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outputs[0] == outputs[1]
    corpus = load(config)
    assert corpus.from_cache and str(corpus.path) == outputs[0]
    assert not list(Path(config.cache_dir).glob(".building-*"))


@pytest.mark.parametrize(
    "values, match",
    [
        (dict(source="web"), "data.source: .* 'web'"),
        (dict(source="files"), "data.path is required"),
        (dict(source="hub"), "data.hub_name is required"),
        (dict(seq_len=0), "data.seq_len: .* 0"),
        (dict(seq_len=True), "data.seq_len: .* True"),
        (dict(validation_fraction=1.0), "data.validation_fraction: .* 1.0"),
        (dict(validation_fraction="x"), "data.validation_fraction: .* 'x'"),
        (dict(num_proc=0), "data.num_proc: .* 0"),
        (dict(max_documents=-1), "data.max_documents: .* -1"),
        (dict(shuffle_seed=-2), "data.shuffle_seed: .* -2"),
        (dict(tokenizer=""), "data.tokenizer: String should have at least 1 character, got ''"),
        (dict(tokenizer="tiktoken:"), "needs an encoding name"),
        (dict(text_field=""), "data.text_field"),
        (dict(source="files", path=5), "data.path: Input should be a valid string, got 5"),
        (dict(cache_dir=["a"]), "data.cache_dir: .* valid string, got \\['a'\\]"),
        (dict(passkey_fraction=1.5), "data.passkey_fraction: .* less than or equal to 1, got 1.5"),
        (dict(seq_len_schedule=[[0, 100]]), "length 100 must divide data.seq_len=256"),
        (dict(seq_len_schedule=[[5, 128]]), "steps must start at 0 and rise, got \\[5\\]"),
        (dict(seq_len_schedule=[[0, 64], [0, 128]]), "start at 0 and rise, got \\[0, 0\\]"),
        (dict(seq_len_schedule=[[0, "64"]]), "data.seq_len_schedule\\[0\\]\\[1\\]: .* got '64'"),
    ],
)
def test_bad_config_values(values, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**values)


def assert_fails_before_any_work(config: DataConfig, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check(config)
    with pytest.raises(ValueError, match=match):
        load(config)
    assert not Path(config.cache_dir).exists()


def test_bad_paths_and_tokenizers_fail_before_any_work(tmp_path):
    missing = tmp_path / "missing"
    assert_fails_before_any_work(files_config(tmp_path, missing), f"data.path '{missing}' does not")
    (tmp_path / "empty").mkdir()
    assert_fails_before_any_work(files_config(tmp_path, tmp_path / "empty"), "empty folder")
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "ok.txt").write_text("fine")
    (tmp_path / "mixed" / "table.csv").write_text("a,b\n1,2\n")
    assert_fails_before_any_work(files_config(tmp_path, tmp_path / "mixed"), "table.csv")
    single = tmp_path / "mixed" / "table.csv"
    assert_fails_before_any_work(files_config(tmp_path, single), "unsupported file type")
    text = tmp_path / "mixed" / "ok.txt"
    for tokenizer in ("gpt2-does-not-exist", str(tmp_path / "nope.json")):
        config = files_config(tmp_path, text, tokenizer=tokenizer)
        assert_fails_before_any_work(config, f"unknown data.tokenizer '{tokenizer}'")
    config = files_config(tmp_path, text, tokenizer="tiktoken:no-such-encoding")
    assert_fails_before_any_work(config, "'no-such-encoding'")
    (tmp_path / "broken.json").write_text("{not a tokenizer")
    config = files_config(tmp_path, text, tokenizer=str(tmp_path / "broken.json"))
    assert_fails_before_any_work(config, "not a valid tokenizer.json")


def assert_fails_leaving_no_cache(config: DataConfig, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load(config)
    # Only the `datasets` reader cache (hf/) may exist: no corpus, no half-built folder.
    cache = Path(config.cache_dir)
    assert [p.name for p in cache.iterdir() if p.name != "hf"] == []


def test_unreadable_files_and_empty_corpora(tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "fine"}\n{not json\n')
    assert_fails_leaving_no_cache(files_config(tmp_path, bad_json), "cannot read the json files")
    bad_parquet = tmp_path / "bad.parquet"
    bad_parquet.write_bytes(b"not a parquet file")
    config = files_config(tmp_path, bad_parquet)
    assert_fails_leaving_no_cache(config, "cannot read the parquet files")
    records = tmp_path / "records.jsonl"
    write_jsonl(records, [{"body": "text under another name", "n": 1}])
    assert_fails_leaving_no_cache(files_config(tmp_path, records), "data.text_field 'text'")
    assert_fails_leaving_no_cache(
        files_config(tmp_path, records, text_field="n"), "data.text_field 'n' .* not text"
    )
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    write_jsonl(tmp_path / "blank" / "b.jsonl", [{"text": ""}, {"text": None}])
    assert_fails_leaving_no_cache(files_config(tmp_path, tmp_path / "blank"), "empty corpus")
    one = tmp_path / "one.txt"
    one.write_text("a single document cannot be split into train and validation")
    assert_fails_leaving_no_cache(files_config(tmp_path, one), "split of 1 documents is empty")
    config = files_config(tmp_path, one, validation_fraction=0.0, seq_len=1000)
    tokens = len(one.read_bytes()) + 1
    with pytest.raises(ValueError, match=f"train split has {tokens} tokens, fewer than seq_len"):
        load(config)
    # Many short documents: the validation share is shorter than one row.
    many = tmp_path / "many.jsonl"
    write_jsonl(many, [{"text": f"doc{i:03d}"} for i in range(200)])
    with pytest.raises(ValueError, match="validation split has .* fewer than seq_len \\+ 1 = 201"):
        load(files_config(tmp_path, many, seq_len=200, validation_fraction=0.05))


def test_passkey_rows_are_the_corpus_with_a_key_and_a_weighted_answer(tmp_path):
    config = DataConfig(
        **SMALL_STDLIB | dict(seq_len=128), cache_dir=str(tmp_path), passkey_fraction=0.5
    )
    corpus = load(config)
    plain = load(config.model_copy(update={"passkey_fraction": 0.0})).train
    train = corpus.train.at_seq_len(128)  # a curriculum stage: the same class and fraction
    plain = plain.at_seq_len(128)
    indices = list(range(40))
    rows, again = train.rows(indices), train.rows(indices[::-1])
    assert torch.equal(rows["input_ids"], again["input_ids"].flip(0))  # a function of the index
    reference = plain.rows(indices)
    planted = 0
    for i in indices:
        text = bytes(t for t in rows["input_ids"][i].tolist() + [rows["labels"][i, -1]] if t < 256)
        weights = rows["loss_weights"][i]
        if torch.equal(rows["labels"][i], reference["labels"][i]):
            assert torch.equal(weights, torch.ones(128))
            continue
        planted += 1
        key = text[-5:].decode()
        assert key.isdigit() and text.endswith(
            f"what is the pass key? the pass key is {key}".encode()
        )
        assert f"# the pass key is {key}.\n".encode() in text
        # The five answer labels weigh as much as the other 123 together.
        assert torch.allclose(weights[-5:], torch.full((5,), 123 / 5))
        assert torch.equal(weights[:-5], torch.ones(123))
        changed = (rows["input_ids"][i] != reference["input_ids"][i]).nonzero()
        assert len(changed) <= 26 + 46  # the key line and the question only
    assert 10 < planted < 30  # about half of 40


def test_passkey_depth_places_the_key():
    tokenizer = ByteTokenizer()
    row = np.full(201, ord("x"), np.int64)
    first, start = plant(row, tokenizer, "12345", 0.0)
    last, _ = plant(row, tokenizer, "12345", 1.0)
    key = b"\n# the pass key is 12345.\n"
    assert bytes(first[: len(key)].tolist()) == key
    question = b"\n# what is the pass key? the pass key is 12345"
    assert bytes(last[-len(question) - len(key) :].tolist()) == key + question
    assert bytes(first[start:].tolist()) == b"12345" and start == 196
    with pytest.raises(ValueError, match="a pass key needs 72 tokens, the row holds 60"):
        plant(row[:60], tokenizer, "12345", 0.5)
    with pytest.raises(ValueError, match="depth must be in \\[0, 1\\], got 2"):
        plant(row, tokenizer, "12345", 2)


def test_passkey_rows_too_short_for_a_key_fail_at_load(tmp_path):
    config = DataConfig(
        **SMALL_STDLIB | dict(seq_len=64),
        cache_dir=str(tmp_path),
        passkey_fraction=1.0,
        seq_len_schedule=[[0, 32], [10, 64]],
    )
    with pytest.raises(ValueError, match="passkey_fraction with rows of 32 tokens: a pass key"):
        load(config)


def key_distances(rows: dict[str, torch.Tensor]) -> list[int]:
    """Per row: tokens from the key line's first token to the question's first (byte ids)."""
    key, question = b"\n# the pass key is ", b"\n# what is the pass key?"
    distances = []
    for ids, last in zip(rows["input_ids"].tolist(), rows["labels"][:, -1].tolist(), strict=True):
        ids = ids + [last]
        starts = [
            [i for i in range(len(ids)) if ids[i : i + len(text)] == list(text)]
            for text in (key, question)
        ]
        assert len(starts[0]) == len(starts[1]) == 1, starts
        distances.append(starts[1][0] - starts[0][0])
    return distances


def test_passkey_distance_curriculum_caps_the_keys_distance(tmp_path):
    config = DataConfig(
        **SMALL_STDLIB | dict(seq_len=256),
        cache_dir=str(tmp_path),
        passkey_fraction=1.0,
        passkey_distance_schedule=[[0, 30], [4, 90], [8, 10_000]],
    )
    train = load(config).train
    anywhere = load(config.model_copy(update={"passkey_distance_schedule": None})).train
    batch = dict(micro_step=0, dp_rank=0, dp_size=1, micro_batch_size=64, grad_accum=1)
    near = key_distances(train.batch_for(0, **batch))
    farther = key_distances(train.batch_for(5, **batch))
    assert set(near) == set(range(26, 31))  # the key's line is 26 tokens long
    assert min(farther) < 40 and 80 < max(farther) <= 90
    assert max(key_distances(anywhere.batch_for(5, **batch))) > 150
    # A cap beyond the row is no cap: the same rows as without a curriculum.
    for name, values in train.batch_for(9, **batch).items():
        assert torch.equal(values, anywhere.batch_for(9, **batch)[name]), name
    # A function of (row, step): a fresh load (a resumed run) and a step split into two ranks
    # of two micro-batches each read the same rows.
    whole = train.batch_for(5, **batch)["input_ids"]
    fresh = load(config).train.batch_for(5, **batch)["input_ids"]
    split = [
        train.batch_for(5, micro, rank, 2, 16, 2)["input_ids"]
        for micro in (0, 1)
        for rank in (0, 1)
    ]
    assert torch.equal(fresh, whole) and torch.equal(torch.cat(split), whole)


def test_passkey_distance_cap_below_a_keys_line_plants_it_nearest():
    tokenizer = ByteTokenizer()
    assert lowest_depth(200, tokenizer, "12345", 10) == 1.0
    assert lowest_depth(200, tokenizer, "12345", 26) == 1.0
    assert lowest_depth(200, tokenizer, "12345", 10_000) == 0.0
    row, _ = plant(
        np.zeros(200, np.int64), tokenizer, "12345", lowest_depth(200, tokenizer, "12345", 50)
    )
    text = bytes(row.tolist())
    assert text.rfind(b"\n# what is the pass key?") - text.find(b"\n# the pass key is ") == 50


def test_passkey_distance_schedule_errors_name_the_value(tmp_path):
    with pytest.raises(ValueError, match="passkey_distance_schedule needs data.passkey_fraction"):
        DataConfig(passkey_distance_schedule=[[0, 100]])
    with pytest.raises(ValueError, match="passkey_distance_schedule steps must start at 0"):
        DataConfig(passkey_fraction=1.0, passkey_distance_schedule=[[3, 100]])
    with pytest.raises(ValueError, match="passkey_distance_schedule distance 0 must be a positive"):
        DataConfig(passkey_fraction=1.0, passkey_distance_schedule=[[0, 0]])
    config = DataConfig(
        **SMALL_STDLIB | dict(seq_len=128),
        cache_dir=str(tmp_path),
        passkey_fraction=1.0,
        passkey_distance_schedule=[[0, 20], [5, 100]],
    )
    with pytest.raises(
        ValueError,
        match="passkey_distance_schedule: a pass key distance of 20 tokens is shorter than the "
        "key's line \\(26 tokens\\)",
    ):
        load(config)


def test_seq_len_schedule_stages():
    config = DataConfig(seq_len=256, seq_len_schedule=[[0, 64], [10, 128], [20, 256]])
    assert [config.seq_len_at(s) for s in (0, 9, 10, 19, 20, 10**6)] == [64, 64, 128, 128, 256, 256]
    assert DataConfig(seq_len=256).seq_len_at(7) == 256


def test_loss_weights_weigh_each_label():
    from longnet import LongNetConfig, LongNetLM

    torch.manual_seed(0)
    model = LongNetLM(LongNetConfig.preset("longnet-tiny"))
    tokens = torch.randint(0, 256, (2, 32))
    labels = torch.randint(0, 256, (2, 32))
    labels[1, :4] = -100
    weights = torch.rand(2, 32) * 3
    losses = torch.nn.functional.cross_entropy(
        model(tokens).logits.transpose(1, 2), labels, reduction="none"
    )  # (2, 32), 0 where ignored
    kept = weights * (labels != -100)
    for return_logits in (True, False):
        out = model(tokens, labels, return_logits=return_logits, loss_weights=weights)
        assert torch.allclose(out.loss_sum, (losses * weights).sum(), rtol=1e-5)
        assert torch.allclose(out.num_tokens, kept.sum())
    plain = model(tokens, labels)
    ones = model(tokens, labels, loss_weights=torch.ones(2, 32))
    assert torch.allclose(plain.loss, ones.loss, rtol=1e-6)
    with pytest.raises(ValueError, match="loss_weights must have the shape of tokens"):
        model(tokens, labels, loss_weights=torch.ones(2, 31))


@pytest.mark.slow  # two training runs
def test_curriculum_resumes_across_a_stage_change_like_an_uninterrupted_run(tmp_path):
    """The trainer reads each stage's rows by step alone: a run stopped at step 3 and resumed
    (through the stages 128 -> 256 -> 512, pass keys in half the rows) logs the losses of a run
    that went through. Evaluating beyond the largest segment (512) warns once per process."""
    from distributed_utils import STEPS, assert_same_curve, overrides, run_command, train_records

    def train(output, steps):
        extra = [
            "data.seq_len_schedule=[[0, 128], [2, 256], [4, 512]]",
            "data.passkey_fraction=0.5",
            "deepspeed.scheduler.type=WarmupLR",  # the same rates however many steps are asked
            "train.eval_interval=3",
            "train.eval_seq_lens=[1024]",
            f"train.steps={steps}",
        ]
        command = [sys.executable, "launch/train.py", "--config", "configs/tiny-cpu.yaml"]
        return run_command(command + overrides(output, *extra)).stderr

    whole = train(tmp_path / "whole", STEPS)
    assert whole.count("warning: evaluating at [1024] tokens, beyond the model's largest") == 1
    records = train_records(tmp_path / "whole")
    assert [records[s]["seq_len"] for s in range(1, STEPS + 1)] == [128, 128, 256, 256, 512, 512]
    train(tmp_path / "parts", 3)
    assert "resuming after step 3" in train(tmp_path / "parts", STEPS)
    assert_same_curve(tmp_path / "parts", tmp_path / "whole")
