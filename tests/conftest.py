"""Shared test fixtures: a tiny real corpus, tokenizer and preprocessed dataset.

Tests train and load on real text (a slice of the default stdlib-docstring corpus), not
random tokens, so tokenizer, preprocessing and loss bugs show up. The whole fixture is
built once per session in a few seconds on 2 cores.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# The suite tests the CPU paths, also on a GPU machine: GPUs are hidden from this process and
# every subprocess before anything imports torch, so the trainers choose the CPU themselves
# (l3train.distributed.select_accelerator) and DeepSpeed, imported here by some tests, agrees.
# tools/gpu_check.sh exercises the GPU paths.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ["DS_ACCELERATOR"] = "cpu"
# Reuse JIT-built DeepSpeed ops (~40-60 s each to compile) across test sessions instead of
# rebuilding them.
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "l3train" / "torch_extensions")
)
Path(os.environ["TORCH_EXTENSIONS_DIR"]).mkdir(parents=True, exist_ok=True)

TINY_CORPUS_MB = 0.5
TINY_VOCAB = 512


@pytest.fixture(scope="session", autouse=True)
def _dataset_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep megatron's sample-index caches of test datasets out of ~/.cache."""
    os.environ["L3TRAIN_DATASET_CACHE"] = str(tmp_path_factory.mktemp("dataset_cache"))


@dataclass(frozen=True)
class TinyCorpus:
    jsonl_path: Path  # ~0.5 MB prefix of the default corpus: {"text", "source"} per line
    text_path: Path  # the same documents, one per line (paragraph breaks become spaces)
    documents: tuple[str, ...] = field(repr=False)  # the texts in jsonl_path, in order
    tokenizer_path: Path  # sentencepiece BPE, vocab 512, trained on jsonl_path
    tokenizer_id: str
    vocab_size: int
    data_prefix: str  # jsonl_path preprocessed: <data_prefix>.bin/.idx


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> TinyCorpus:
    from l3train.data.corpus import build_corpus
    from l3train.data.indexed import preprocess
    from l3train.data.tokenizer import iter_training_sentences, train_tokenizer

    root = tmp_path_factory.mktemp("tiny_corpus")
    jsonl_path = root / "corpus.jsonl"
    build_corpus(jsonl_path, max_mb=TINY_CORPUS_MB, progress=False)
    documents = tuple(json.loads(line)["text"] for line in jsonl_path.read_text().splitlines())
    text_path = root / "corpus.txt"
    text_path.write_text("".join(doc.replace("\n", " ") + "\n" for doc in documents))
    tokenizer = train_tokenizer(
        iter_training_sentences(documents), root / "tokenizer", vocab_size=TINY_VOCAB
    )
    data_prefix = str(root / "corpus")
    preprocess(jsonl_path, data_prefix, tokenizer.path, progress=False, log=lambda _: None)
    return TinyCorpus(
        jsonl_path=jsonl_path,
        text_path=text_path,
        documents=documents,
        tokenizer_path=tokenizer.path,
        tokenizer_id=tokenizer.tokenizer_id,
        vocab_size=tokenizer.vocab_size,
        data_prefix=data_prefix,
    )


@pytest.fixture(scope="session")
def tiny_allocation(tiny_corpus: TinyCorpus) -> Path:
    """An LZW allocation (v = 8 rows per token on average, k = 64) of the tiny corpus, made by the CLI."""
    import subprocess
    import sys

    output = Path(tiny_corpus.data_prefix).with_name("allocation_lzw.npz")
    subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "tools" / "lzw_allocate.py"),
                    "--data-prefix", tiny_corpus.data_prefix, "--tokenizer", str(tiny_corpus.tokenizer_path),
                    "--eod-id", str(_eod_id(tiny_corpus)), "--mode", "lzw", "--budget", str(8 * tiny_corpus.vocab_size),
                    "--cap", "64", "--output", str(output)], check=True, capture_output=True)
    return output


def _eod_id(corpus: TinyCorpus) -> int:
    from l3train.data.tokenizer import Tokenizer

    return Tokenizer.load(corpus.tokenizer_path).eod_id
