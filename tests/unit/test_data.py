"""Data pipeline tests: corpus, tokenizer, preprocessing, datasets and batches, CLIs.

All on the real `tiny_corpus` fixture (stdlib docstrings), so round trips are checked
on real text with exact token ids.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from l3train.data import indexed
from l3train.data.corpus import build_corpus, meta_path
from l3train.data.sources import iter_documents
from l3train.data.dataset import batch_for_step, build_datasets, dataset_cache_root, sample_index
from l3train.data.indexed import IndexedDocuments, check_indexed_dataset, preprocess, read_meta
from l3train.data.tokenizer import Tokenizer, iter_training_sentences, train_tokenizer
from l3train.errors import L3TrainError
from training_harness import REPO



def quiet(_: str) -> None:
    pass


def interrupt(*_args, **_kwargs):
    raise KeyboardInterrupt


def read_indexed(prefix: str) -> list[list[int]]:
    """Every document of a .bin/.idx pair."""
    return [document.tolist() for document in IndexedDocuments(prefix)]


def same_files(prefix_a: str, prefix_b: str) -> bool:
    return all(
        Path(f"{prefix_a}{s}").read_bytes() == Path(f"{prefix_b}{s}").read_bytes()
        for s in (".bin", ".idx")
    )


def data_settings(corpus, **overrides) -> SimpleNamespace:
    settings = dict(
        prefixes=[corpus.data_prefix],
        weights=None,
        split="98,2,0",
        seq_length=32,
        tokenizer=str(corpus.tokenizer_path),
    )
    settings.update(overrides)
    return SimpleNamespace(**settings)


def copy_prefix(prefix: str, directory: Path, name: str = "copy") -> str:
    directory.mkdir(parents=True, exist_ok=True)
    for suffix in (".bin", ".idx", ".meta.json"):
        shutil.copy(f"{prefix}{suffix}", directory / f"{name}{suffix}")
    return str(directory / name)


# --- corpus -------------------------------------------------------------------------


def test_corpus_documents_are_real_normalized_docstrings(tiny_corpus):
    records = [json.loads(line) for line in tiny_corpus.jsonl_path.read_text().splitlines()]
    assert 300_000 <= tiny_corpus.jsonl_path.stat().st_size <= 600_000
    assert len(records) > 500
    texts = [r["text"] for r in records]
    assert len(set(texts)) == len(texts)
    for record in records:
        assert len(record["text"]) >= 80
        assert record["source"].replace("_", "").replace(".", "").isalnum()
        for paragraph in record["text"].split("\n"):
            assert paragraph and paragraph == " ".join(paragraph.split())
    meta = json.loads(meta_path(tiny_corpus.jsonl_path).read_text())
    assert meta["python_version"] == ".".join(map(str, sys.version_info[:3]))
    assert meta["documents"] == len(records) and meta["truncated_by_max_mb"]


def test_corpus_is_deterministic_and_capped_prefix(tiny_corpus, tmp_path):
    a = build_corpus(tmp_path / "a.jsonl", max_mb=0.05, progress=False)
    b = build_corpus(tmp_path / "b.jsonl", max_mb=0.05, progress=False)
    small = (tmp_path / "a.jsonl").read_bytes()
    assert small == (tmp_path / "b.jsonl").read_bytes() and a.sha256 == b.sha256
    assert a.bytes == len(small) <= 50_000
    assert tiny_corpus.jsonl_path.read_bytes().startswith(small)


# --- tokenizer ----------------------------------------------------------------------


def test_tokenizer_identity_and_round_trip(tiny_corpus):
    tokenizer = Tokenizer.load(tiny_corpus.tokenizer_path)
    assert tokenizer.vocab_size == tiny_corpus.vocab_size == 512
    assert tokenizer.eod_id == 2
    digest = hashlib.sha256(tiny_corpus.tokenizer_path.read_bytes()).hexdigest()[:16]
    assert tokenizer.tokenizer_id == tiny_corpus.tokenizer_id == digest
    # Paragraph breaks, digits and non-ASCII (byte fallback) survive a round trip.
    text = "Return the value.\nSecond paragraph: 12345, naïve café, 日本語 😀"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.decode(tokenizer.encode(text) + [tokenizer.eod_id]) == text
    assert 0 not in tokenizer.encode(text)  # no <unk>
    for doc in tiny_corpus.documents[:200]:
        assert tokenizer.decode(tokenizer.encode(doc)) == unicodedata.normalize("NFKC", doc)


def test_tokenizer_missing_or_corrupt_is_a_clear_error(tmp_path):
    with pytest.raises(L3TrainError, match=r"not found: .*nope\.model.*train_tokenizer\.py"):
        Tokenizer.load(tmp_path / "nope.model")
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(L3TrainError, match=r"corrupt\.model is corrupt.*train_tokenizer\.py"):
        Tokenizer.load(corrupt)


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_train_tokenizer_is_deterministic(tiny_corpus, tmp_path, model_type):
    docs = tiny_corpus.documents[:300]
    first = train_tokenizer(iter_training_sentences(docs), tmp_path / "a", 400, model_type)
    second = train_tokenizer(iter_training_sentences(docs), tmp_path / "b", 400, model_type)
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert first.tokenizer_id == second.tokenizer_id
    assert len((tmp_path / "a.vocab").read_text().splitlines()) == 400
    assert first.eod_id == 2 and first.vocab_size == 400


def test_train_tokenizer_reports_input_and_size_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine document"}\n{"text": oops}\n')
    with pytest.raises(L3TrainError, match=r"bad\.jsonl:2: invalid JSON"):
        train_tokenizer(iter_training_sentences(iter_documents(bad)), tmp_path / "t", 300)
    with pytest.raises(L3TrainError, match="Vocabulary size too high"):
        train_tokenizer(iter(["tiny corpus"] * 5), tmp_path / "t", 5000)
    assert not list(tmp_path.glob("t.*"))


# --- preprocessing ------------------------------------------------------------------


def test_preprocess_round_trips_documents_exactly(tiny_corpus):
    tokenizer = Tokenizer.load(tiny_corpus.tokenizer_path)
    stored = read_indexed(tiny_corpus.data_prefix)
    assert len(stored) == len(tiny_corpus.documents)
    for ids, doc in zip(stored, tiny_corpus.documents):
        assert ids == tokenizer.encode(doc) + [tokenizer.eod_id]
    for ids, doc in zip(stored[:100], tiny_corpus.documents):
        assert tokenizer.decode(ids) == unicodedata.normalize("NFKC", doc)
    # uint16 tokens for a 512 vocabulary: 2 bytes each.
    tokens = sum(map(len, stored))
    assert Path(f"{tiny_corpus.data_prefix}.bin").stat().st_size == 2 * tokens
    meta = read_meta(tiny_corpus.data_prefix)
    assert meta["tokenizer_id"] == tiny_corpus.tokenizer_id and meta["tokens"] == tokens
    assert not Path(f"{tiny_corpus.data_prefix}.parts").exists()


def test_indexed_documents_read_what_megatron_reads(tiny_corpus):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    megatron = IndexedDataset(tiny_corpus.data_prefix)  # preprocessing writes one sequence per document
    expected = [megatron[i].tolist() for i in range(len(megatron))]
    documents = IndexedDocuments(tiny_corpus.data_prefix)
    assert read_indexed(tiny_corpus.data_prefix) == expected
    assert (documents.num_documents, documents.num_tokens) == (len(expected), sum(map(len, expected)))
    batches = list(documents.batches(batch_tokens=1000))
    assert len(batches) > 10
    assert [doc.tolist() for tokens, offsets in batches for doc in np.split(tokens, offsets[1:-1])] == expected
    stream = [token for doc in expected for token in doc]
    assert documents.read(10, 500).tolist() == stream[10:510]  # a window across document ends


def test_read_meta(tiny_corpus, tmp_path):
    assert read_meta(tiny_corpus.data_prefix)["tokenizer_id"] == tiny_corpus.tokenizer_id
    assert read_meta(tmp_path / "none") == {}  # data from other tools carries no meta
    (tmp_path / "broken.meta.json").write_text("{")
    with pytest.raises(L3TrainError, match=r"broken\.meta\.json is unreadable .*tools/preprocess_data\.py"):
        read_meta(tmp_path / "broken")


def test_preprocess_text_format(tiny_corpus, tmp_path):
    tokenizer = Tokenizer.load(tiny_corpus.tokenizer_path)
    prefix = str(tmp_path / "text")
    stats = preprocess(
        tiny_corpus.text_path, prefix, tiny_corpus.tokenizer_path, progress=False, log=quiet
    )
    lines = tiny_corpus.text_path.read_text().splitlines()
    assert stats.documents == len(lines)
    for ids, line in zip(read_indexed(prefix), lines):
        assert ids == tokenizer.encode(line) + [tokenizer.eod_id]


def test_output_is_identical_for_any_workers_and_chunk_size(tiny_corpus, tmp_path):
    prefix = str(tmp_path / "w2")
    preprocess(
        tiny_corpus.jsonl_path,
        prefix,
        tiny_corpus.tokenizer_path,
        workers=2,
        chunk_lines=300,
        progress=False,
        log=quiet,
    )
    assert same_files(prefix, tiny_corpus.data_prefix)  # built with workers=1, one chunk


def test_preprocess_resumes_after_interruption(tiny_corpus, tmp_path, monkeypatch):
    prefix = str(tmp_path / "resumed")
    parts = Path(f"{prefix}.parts")
    args = (tiny_corpus.jsonl_path, prefix, tiny_corpus.tokenizer_path)

    # Interrupted after tokenizing every chunk, before the merge: no final files.
    monkeypatch.setattr(indexed, "_merge_parts", interrupt)
    with pytest.raises(KeyboardInterrupt):
        preprocess(*args, chunk_lines=200, progress=False, log=quiet)
    monkeypatch.undo()
    n_chunks = -(-len(tiny_corpus.documents) // 200)
    assert len(list(parts.glob("input_00000_chunk_*.done"))) == n_chunks
    assert (parts / "input_00000.done").is_file()  # the file's chunks are all done
    assert not Path(f"{prefix}.bin").exists() and not Path(f"{prefix}.idx").exists()

    # Pretend chunks 1 and 4 never finished (so neither did the file), chunk 4 having left a
    # half-written file.
    for k in (1, 4):
        (parts / f"input_00000_chunk_{k:06d}.done").unlink()
    (parts / "input_00000.done").unlink()
    (parts / "input_00000_chunk_000004.bin").write_bytes(b"\x01\x02\x03")

    encoded = []
    original_call = indexed._Encoder.__call__

    def counting_call(self, item):
        encoded.append(item[2])  # (format, file, record number, payload)
        return original_call(self, item)

    monkeypatch.setattr(indexed._Encoder, "__call__", counting_call)
    stats = preprocess(*args, chunk_lines=200, progress=False, log=quiet)
    assert stats.chunks_reused == n_chunks - 2
    assert sorted(encoded) == [*range(201, 401), *range(801, 1001)]  # 1-based line numbers
    assert same_files(prefix, tiny_corpus.data_prefix)
    assert not parts.exists()


def test_preprocess_discards_parts_made_with_other_settings(tiny_corpus, tmp_path, monkeypatch):
    prefix = str(tmp_path / "changed")
    args = (tiny_corpus.jsonl_path, prefix, tiny_corpus.tokenizer_path)
    monkeypatch.setattr(indexed, "_merge_parts", interrupt)
    with pytest.raises(KeyboardInterrupt):
        preprocess(*args, chunk_lines=200, progress=False, log=quiet)
    monkeypatch.undo()
    messages = []
    preprocess(*args, chunk_lines=500, progress=False, log=messages.append)
    assert any("discarding partial results" in m for m in messages)
    assert same_files(prefix, tiny_corpus.data_prefix)


def test_preprocess_input_errors(tiny_corpus, tmp_path):
    tok = tiny_corpus.tokenizer_path
    out = str(tmp_path / "out")
    with pytest.raises(L3TrainError, match=r"input file not found: .*missing\.jsonl"):
        preprocess(tmp_path / "missing.jsonl", out, tok, progress=False, log=quiet)
    with pytest.raises(L3TrainError, match=r"tokenizer model not found: .*none\.model"):
        preprocess(tiny_corpus.jsonl_path, out, tmp_path / "none.model", progress=False, log=quiet)
    bad = tmp_path / "bad.jsonl"
    lines = tiny_corpus.jsonl_path.read_text().splitlines()[:5]
    bad.write_text("\n".join(lines[:2] + ['{"text": "unterminated'] + lines[2:]) + "\n")
    for workers in (1, 2):
        with pytest.raises(L3TrainError, match=rf"{bad}:3: invalid JSON"):
            preprocess(bad, out, tok, workers=workers, progress=False, log=quiet)
    bad.write_text('{"text": "ok document"}\n{"body": "wrong key"}\n')
    with pytest.raises(L3TrainError, match=rf"{bad}:2: no 'text' field .*--json-key"):
        preprocess(bad, out, tok, progress=False, log=quiet)
    bad.write_text('{"text": 42}\n')
    with pytest.raises(L3TrainError, match=rf"{bad}:1: field 'text' is int"):
        preprocess(bad, out, tok, progress=False, log=quiet)
    with pytest.raises(L3TrainError, match=r"should not end in \.bin"):
        preprocess(tiny_corpus.jsonl_path, out + ".bin", tok, progress=False, log=quiet)
    assert not Path(f"{out}.bin").exists()



def write_shard(path: Path, documents: list[str]) -> Path:
    """`documents` in the format and compression `path` names (.jsonl, .txt, .parquet; .gz, .zst)."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    if path.name.endswith(".parquet"):
        # Several row groups and an extra column: the reader must stream one column batch by batch.
        table = pa.table({"id": list(range(len(documents))), "text": documents})
        pq.write_table(table, path, row_group_size=max(1, len(documents) // 3))
        return path
    as_jsonl = ".jsonl" in path.name
    data = "".join((json.dumps({"text": doc}) if as_jsonl else doc) + "\n" for doc in documents).encode()
    if path.suffix == ".gz":
        data = gzip.compress(data)
    elif path.suffix == ".zst":
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


FORMAT_FILES = ["c.jsonl", "c.jsonl.gz", "c.jsonl.zst", "c.txt", "c.txt.gz", "c.txt.zst", "c.parquet"]


def test_every_input_format_gives_the_same_dataset(tiny_corpus, tmp_path):
    documents = [doc.replace("\n", " ") for doc in tiny_corpus.documents[:200]]  # text holds one per line
    prefixes = {}
    for name in FORMAT_FILES:
        prefixes[name] = str(tmp_path / f"out_{name}")
        stats = preprocess(write_shard(tmp_path / name, documents), prefixes[name], tiny_corpus.tokenizer_path,
                           chunk_lines=64, progress=False, log=quiet)
        assert stats.documents == len(documents)
    assert all(same_files(prefixes[name], prefixes["c.jsonl"]) for name in FORMAT_FILES), \
        [name for name in FORMAT_FILES if not same_files(prefixes[name], prefixes["c.jsonl"])]
    meta = read_meta(prefixes["c.parquet"])
    assert meta["format"] == "parquet" and meta["inputs"] == [str((tmp_path / "c.parquet").resolve())]


def test_many_shards_are_one_dataset_whatever_the_workers_and_how_they_are_named(tiny_corpus, tmp_path):
    """The same files give the same bytes: one worker or two, any chunk size, and named as a
    directory, a glob or a list; and the dataset equals the whole corpus tokenized as one file."""
    documents = list(tiny_corpus.documents[:400])
    whole = str(tmp_path / "whole")
    preprocess(write_shard(tmp_path / "whole.jsonl", documents), whole, tiny_corpus.tokenizer_path, progress=False,
               log=quiet)
    shards = tmp_path / "shards"
    shards.mkdir()
    names = ["s0.jsonl.gz", "s1.parquet", "s2.jsonl.zst", "s3.jsonl", "s4.parquet"]
    files = [write_shard(shards / name, documents[80 * i:80 * (i + 1)]) for i, name in enumerate(names)]
    runs = {"directory, 1 worker": ([shards], 1, 37), "glob, 2 workers": ([f"{shards}/s*"], 2, 1000),
            "list, 2 workers": (files, 2, 50)}
    for label, (inputs, workers, chunk_lines) in runs.items():
        prefix = str(tmp_path / label.replace(", ", "_").replace(" ", "_"))
        stats = preprocess(inputs, prefix, tiny_corpus.tokenizer_path, workers=workers, chunk_lines=chunk_lines,
                           progress=False, log=quiet)
        assert stats.documents == len(documents), label
        assert same_files(prefix, whole), label
    assert read_meta(prefix)["inputs"] == [str(path.resolve()) for path in files]


def test_bad_shards_are_one_line_naming_the_file_and_write_no_dataset(tiny_corpus, tmp_path):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    tok, out = tiny_corpus.tokenizer_path, str(tmp_path / "out")
    good = write_shard(tmp_path / "good.jsonl", list(tiny_corpus.documents[:20]))
    corrupt_gz = tmp_path / "corrupt.jsonl.gz"
    data = bytearray(gzip.compress(good.read_bytes()))
    data[len(data) // 2:len(data) // 2 + 8] = b"\xff" * 8
    corrupt_gz.write_bytes(bytes(data))
    truncated_zst = write_shard(tmp_path / "truncated.jsonl.zst", list(tiny_corpus.documents[:20]))
    truncated_zst.write_bytes(truncated_zst.read_bytes()[:-20])
    corrupt_parquet = tmp_path / "corrupt.parquet"
    corrupt_parquet.write_bytes(b"PAR1" + b"not parquet" * 10 + b"PAR1")
    no_column = tmp_path / "body.parquet"
    pq.write_table(pa.table({"body": ["a document"]}), no_column)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    cases = {corrupt_gz: rf"{corrupt_gz}: corrupt \.gz stream after line \d+",
             truncated_zst: rf"{truncated_zst}: corrupt \.zst stream after line \d+",
             corrupt_parquet: rf"{corrupt_parquet}: not a readable Parquet file after row 0",
             no_column: rf"{no_column}: no 'text' column \(found \['body'\]\); see --json-key",
             empty: rf"{empty} holds no non-empty document; remove it from the inputs"}
    for bad, message in cases.items():
        with pytest.raises(L3TrainError, match=message):
            preprocess([good, bad], out, tok, progress=False, log=quiet)
        assert "\n" not in message and not Path(f"{out}.bin").exists() and not Path(f"{out}.idx").exists()
    with pytest.raises(L3TrainError, match=rf"input glob '{tmp_path}/shards/\*\.parquet' matches no file"):
        preprocess(f"{tmp_path}/shards/*.parquet", out, tok, progress=False, log=quiet)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(L3TrainError, match=rf"input directory {tmp_path / 'nothing'} holds no corpus file"):
        preprocess(tmp_path / "nothing", out, tok, progress=False, log=quiet)


def test_a_tokenizer_sample_spans_every_shard_by_size_and_is_reproducible(tiny_corpus, tmp_path):
    from l3train.data.sources import expand_inputs, sample_documents

    documents = [doc.replace("\n", " ") for doc in tiny_corpus.documents[:500]]
    shards = tmp_path / "shards"
    shards.mkdir()
    bounds = [0, 50, 150, 300, 500]
    for index, name in enumerate(["a.jsonl.gz", "b.parquet", "c.txt.zst", "d.jsonl"]):
        write_shard(shards / name, documents[bounds[index]:bounds[index + 1]])
    paths = expand_inputs(shards)
    sample = sample_documents(paths, 100, seed=3)
    assert sample == sample_documents(expand_inputs(f"{shards}/*"), 100, seed=3)  # however the files are named
    assert sample != sample_documents(paths, 100, seed=4)
    assert 96 <= len(sample) <= 104 and len(set(sample)) == len(sample)
    per_shard = [sum(doc in documents[bounds[i]:bounds[i + 1]] for doc in sample) for i in range(4)]
    assert all(count >= 1 for count in per_shard) and per_shard[3] > per_shard[0]  # more from the larger files

    def train(name: str, *inputs: str) -> bytes:
        result = subprocess.run([sys.executable, str(REPO / "tools" / "train_tokenizer.py"), "--input", *inputs,
                                 "--output-prefix", str(tmp_path / name), "--vocab-size", "600",
                                 "--sample-documents", "200", "--seed", "1"], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert "4 files (a sample of about 200 documents, seed 1)" in result.stdout
        return (tmp_path / f"{name}.model").read_bytes()

    assert train("from_dir", str(shards)) == train("from_glob", f"{shards}/*")

# --- datasets and batches -----------------------------------------------------------


def test_batches_are_deterministic_per_step_and_split_over_dp_ranks(tiny_corpus):
    settings = data_settings(tiny_corpus)
    train, valid = build_datasets(settings, 1, 16, 200)
    again, _ = build_datasets(settings, 1, 16, 200)
    other, _ = build_datasets(settings, 2, 16, 200)
    assert len(train) >= 200 and len(valid) >= 16

    batch = batch_for_step(train, step=3, global_batch_size=8, dp_rank=0, dp_size=1)
    assert batch["tokens"].dtype == torch.long and batch["labels"].dtype == torch.long
    assert batch["loss_mask"].dtype == torch.float32
    assert batch["tokens"].shape == batch["labels"].shape == batch["loss_mask"].shape == (8, 32)
    assert torch.equal(batch["labels"][:, :-1], batch["tokens"][:, 1:])
    assert batch["tokens"].max() < tiny_corpus.vocab_size and batch["tokens"].min() >= 0
    assert torch.all(batch["loss_mask"] == 1)

    same = batch_for_step(again, 3, 8, 0, 1)
    assert all(torch.equal(batch[k], same[k]) for k in batch)
    assert not torch.equal(batch["tokens"], batch_for_step(other, 3, 8, 0, 1)["tokens"])
    assert not torch.equal(batch["tokens"], batch_for_step(train, 4, 8, 0, 1)["tokens"])

    shards = [batch_for_step(train, 3, 8, rank, 4) for rank in range(4)]
    for key in batch:
        assert torch.equal(torch.cat([s[key] for s in shards]), batch[key])

    # Positions step * global_batch_size + arange; past the dataset's end, later epochs read
    # every sample once more, each epoch in its own order seeded by (seed, epoch).
    size = len(train)
    second_epoch = [sample_index(position, size, seed=1) for position in range(size, 2 * size)]
    third_epoch = [sample_index(position, size, seed=1) for position in range(2 * size, 3 * size)]
    assert sorted(second_epoch) == sorted(third_epoch) == list(range(size))
    assert second_epoch != third_epoch != list(range(size))
    assert second_epoch != [sample_index(position, size, seed=2) for position in range(size, 2 * size)]
    step = size // 8 + 5
    wrapped = batch_for_step(train, step, 8, 0, 1, seed=1)
    expected = [train[sample_index(step * 8 + i, size, seed=1)]["tokens"] for i in range(8)]
    assert torch.equal(wrapped["tokens"], torch.stack(expected))


def test_training_dataset_is_one_epoch_whatever_the_run_length(tiny_corpus):
    """The trainer builds one epoch (no sample count): megatron's shuffle depends on the
    count, so a count from training.steps would reorder every step when a run is extended."""
    settings = data_settings(tiny_corpus)
    epoch, _ = build_datasets(settings, 1, 16)
    _, lengths = check_indexed_dataset(tiny_corpus.data_prefix)
    tokens = int(lengths[:round(0.98 * len(lengths))].sum())  # the training split's documents
    assert len(epoch) == (tokens - 1) // 32
    longer, _ = build_datasets(settings, 1, 16, train_samples=3 * len(epoch))
    assert not torch.equal(batch_for_step(epoch, 0, 8, 0, 1)["tokens"], batch_for_step(longer, 0, 8, 0, 1)["tokens"])


def test_samples_are_real_text_windows(tiny_corpus):
    tokenizer = Tokenizer.load(tiny_corpus.tokenizer_path)
    train, _ = build_datasets(data_settings(tiny_corpus, seq_length=64), 0, 1, 10)
    text = tokenizer.decode(train[0]["tokens"].tolist())
    corpus_text = " ".join(tiny_corpus.documents)
    # A window decodes to pieces of corpus text (documents joined at EOD).
    assert max(text.split(), key=len) in corpus_text


def test_blend_follows_weights(tiny_corpus, tmp_path):
    second = copy_prefix(tiny_corpus.data_prefix, tmp_path / "second")
    settings = data_settings(tiny_corpus, prefixes=[tiny_corpus.data_prefix, second])
    for weights, expected in (([1.0, 3.0], [100, 300]), (None, [200, 200])):
        train, valid = build_datasets(
            SimpleNamespace(**{**vars(settings), "weights": weights}), 0, 20, 400
        )
        assert len(train) == 400 and len(valid) == 20
        assert np.bincount(np.asarray(train.dataset_index)).tolist() == expected
        batch = batch_for_step(train, 0, 4, 0, 1)
        assert batch["tokens"].shape == (4, 32)


def test_split_without_validation_gives_none(tiny_corpus):
    train, valid = build_datasets(data_settings(tiny_corpus, split="100,0,0"), 0, 0, 50)
    assert valid is None and len(train) >= 50


def test_megatron_index_cache_stays_out_of_the_data_dir(tiny_corpus, tmp_path):
    prefix = copy_prefix(tiny_corpus.data_prefix, tmp_path / "data")
    before = sorted(p.name for p in (tmp_path / "data").iterdir())
    settings = data_settings(tiny_corpus, prefixes=[prefix])
    train, _ = build_datasets(settings, 5, 4, 100)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == before
    def cache_entries() -> list[Path]:
        target = Path(f"{prefix}.bin").resolve()
        return [p for p in dataset_cache_root().iterdir() if (p / "data0.bin").resolve() == target]

    entries = cache_entries()
    assert len(entries) == 1 and (entries[0] / "COMPLETE").exists()

    # An interrupted cache build (no COMPLETE marker, a truncated index) is redone.
    (entries[0] / "COMPLETE").unlink()
    for npy in entries[0].rglob("*.npy"):
        npy.write_bytes(npy.read_bytes()[:20])
    rebuilt, _ = build_datasets(settings, 5, 4, 100)
    assert torch.equal(
        batch_for_step(rebuilt, 2, 4, 0, 1)["tokens"], batch_for_step(train, 2, 4, 0, 1)["tokens"]
    )

    # Re-preprocessing the prefix changes the files' identity, so no stale indices.
    Path(f"{prefix}.idx").touch()
    build_datasets(settings, 5, 4, 100)
    assert len(cache_entries()) == 2


def test_single_rank_process_group_matches_no_process_group(tiny_corpus, tmp_path):
    import torch.distributed as dist

    settings = data_settings(tiny_corpus, seq_length=16)
    plain, _ = build_datasets(settings, 9, 4, 64)
    store = f"file://{tmp_path / 'store'}"
    dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    try:
        grouped, _ = build_datasets(settings, 9, 4, 64)
    finally:
        dist.destroy_process_group()
    a, b = batch_for_step(plain, 1, 8, 0, 1), batch_for_step(grouped, 1, 8, 0, 1)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _rank_batches(rank: int, world: int, store: str, settings: dict, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        train, _ = build_datasets(SimpleNamespace(**settings), 3, 4, 64)
        torch.save(batch_for_step(train, 2, 8, rank, world), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_rank_union_equals_single_process_batch(tiny_corpus, tmp_path):
    import torch.multiprocessing as mp

    settings = vars(data_settings(tiny_corpus, seq_length=16))
    out = str(tmp_path / "batch")
    mp.spawn(_rank_batches, args=(2, str(tmp_path / "store"), settings, out), nprocs=2)
    train, _ = build_datasets(SimpleNamespace(**settings), 3, 4, 64)
    single = batch_for_step(train, 2, 8, 0, 1)
    shards = [torch.load(f"{out}.{rank}") for rank in range(2)]
    for key in single:
        assert torch.equal(torch.cat([s[key] for s in shards]), single[key])


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing_bin", r"dataset file missing: .*copy\.bin"),
        ("missing_idx", r"dataset file missing: .*copy\.idx"),
        ("truncated_idx", r"copy\.idx is corrupt \(.*truncated"),
        ("wrong_magic", r"copy\.idx is corrupt \(wrong magic"),
        ("truncated_bin", r"copy\.bin has \d+ bytes but .*copy\.idx describes"),
        ("tiny_idx", r"copy\.idx is corrupt \(only 5 bytes"),
    ],
)
def test_damaged_data_is_a_clear_error(tiny_corpus, tmp_path, damage, message):
    prefix = copy_prefix(tiny_corpus.data_prefix, tmp_path)
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    if damage == "missing_bin":
        bin_.unlink()
    elif damage == "missing_idx":
        idx.unlink()
    elif damage == "truncated_idx":
        idx.write_bytes(idx.read_bytes()[:-100])
    elif damage == "wrong_magic":
        idx.write_bytes(b"NOTANIDX!" + idx.read_bytes()[9:])
    elif damage == "truncated_bin":
        bin_.write_bytes(bin_.read_bytes()[:-2])
    elif damage == "tiny_idx":
        idx.write_bytes(b"MMIDI")
    with pytest.raises(L3TrainError, match=message) as err:
        build_datasets(data_settings(tiny_corpus, prefixes=[prefix]), 0, 1, 10)
    assert "tools/preprocess_data.py" in str(err.value)


def test_dataset_config_errors(tiny_corpus, tmp_path):
    cases = [
        (dict(prefixes=[]), "data.prefixes is empty"),
        (dict(split="train"), "data.split 'train'"),
        (dict(split="0,1,0"), "train > 0"),
        (dict(weights=[1.0, 2.0]), r"data.weights \[1.0, 2.0\] must be 1 positive"),
        (dict(tokenizer=""), "data.tokenizer is not set"),
        (dict(tokenizer=str(tmp_path / "no.model")), r"tokenizer model not found"),
    ]
    for overrides, message in cases:
        with pytest.raises(L3TrainError, match=message):
            build_datasets(data_settings(tiny_corpus, **overrides), 0, 1, 10)
    # A 5-document dataset gives its 2% validation split nothing.
    docs = tmp_path / "five.jsonl"
    docs.write_text("".join(json.dumps({"text": d}) + "\n" for d in tiny_corpus.documents[:5]))
    prefix = str(tmp_path / "five")
    preprocess(docs, prefix, tiny_corpus.tokenizer_path, progress=False, log=quiet)
    with pytest.raises(L3TrainError, match=r"has 5 documents; its valid split \(2.0%\) gets none"):
        build_datasets(data_settings(tiny_corpus, prefixes=[prefix]), 0, 1, 10)
    train, _ = build_datasets(data_settings(tiny_corpus), 0, 1, 10)
    with pytest.raises(L3TrainError, match="not divisible"):
        batch_for_step(train, 0, 6, 0, 4)


def test_tokenizer_mismatch_with_data_is_caught(tiny_corpus, tmp_path):
    other = train_tokenizer(
        iter_training_sentences(tiny_corpus.documents[:300]), tmp_path / "other", 400
    )
    with pytest.raises(L3TrainError, match=rf"tokenized with tokenizer {tiny_corpus.tokenizer_id}"):
        build_datasets(data_settings(tiny_corpus, tokenizer=str(other.path)), 0, 1, 10)


# --- command lines ------------------------------------------------------------------


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "argv",
    [
        "tools/build_corpus.py --max-mb lots",
        "tools/build_corpus.py --max-mb -1",
        "tools/train_tokenizer.py --output-prefix x",
        "tools/train_tokenizer.py --input x --output-prefix y --model-type wordpiece",
        "tools/preprocess_data.py --input x --bogus",
        "tools/preprocess_data.py --input x --output-prefix y --tokenizer z --workers two",
    ],
)
def test_cli_bad_flags_exit_2_with_one_line(argv):
    result = run_tool(*argv.split())
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


def test_cli_pipeline_end_to_end(tmp_path):
    corpus, tok, data = tmp_path / "c.jsonl", tmp_path / "tok", tmp_path / "data"
    result = run_tool("tools/build_corpus.py", "--output", str(corpus), "--max-mb", "0.1")
    assert result.returncode == 0, result.stderr
    assert "documents" in result.stdout and meta_path(corpus).exists()

    result = run_tool(
        "tools/train_tokenizer.py", "--input", str(corpus), "--output-prefix", str(tok),
        "--vocab-size", "400",
    )
    assert result.returncode == 0, result.stderr
    assert "tokenizer_id" in result.stdout

    args = ["tools/preprocess_data.py", "--tokenizer", f"{tok}.model", "--output-prefix", str(data)]
    result = run_tool(*args, "--input", str(corpus), "--workers", "2", "--quiet")
    assert result.returncode == 0, result.stderr
    assert Path(f"{data}.bin").exists() and "documents" in result.stdout

    result = run_tool(*args, "--input", str(tmp_path / "nope.txt"), "--overwrite")  # data.bin exists now
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: input file not found: {tmp_path / 'nope.txt'} "
        "(build the default corpus with tools/build_corpus.py)"
    ]
