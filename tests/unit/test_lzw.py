"""LZW codeword counting: the paper's loop (reference) and the C scanner that must match it.

The reference is checked against the spec's worked examples and quirks by hand; the C
scanner is then checked against the reference codeword for codeword (tuples, counts and
insertion order, which breaks ties in the allocation) on random and real documents.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from l3train.allocation import (
    LZWCodewords,
    LZWScanner,
    fast_lzw_counts,
    lzw_allocation,
    reference_lzw,
    reference_lzw_counts,
)
from l3train.errors import L3TrainError
from training_harness import REPO



def test_reference_reproduces_worked_example_one():
    counts = reference_lzw([[0, 1, 0, 1, 0, 1, 0, 1]], vocab_size=3)
    expected = {(0,): 1, (1,): 1, (2,): 0, (0, 1): 2, (0, 1, 0): 1, (1, 0): 1}
    assert list(counts.items()) == list(expected.items())


def test_reference_reproduces_worked_example_two():
    counts = reference_lzw([[0, 1], [0, 1], [0, 1]], vocab_size=3)
    assert list(counts.items()) == [((0,), 3), ((1,), 0), ((2,), 0), ((0, 1), 1)]


def test_reference_quirk_a_breaking_token_never_starts_a_phrase():
    # (0,1) is new, so the phrase is (0,) and the scan resumes at 2, not at 1 (classic LZW).
    counts = reference_lzw([[0, 1, 2, 1]], vocab_size=3)
    assert list(counts.items()) == [((0,), 1), ((1,), 0), ((2,), 1), ((0, 1), 1), ((2, 1), 1)]


def test_reference_quirk_b_match_to_the_end_resets_the_full_match():
    # Doc 2 matches (0,1) up to its end: (0,) is credited and (0,1) is reset to 1, not 3.
    counts = reference_lzw([[0, 1, 0, 1, 0, 1, 2], [0, 1]], vocab_size=3)
    assert counts[(0, 1)] == 1
    assert counts[(0,)] == 2


def test_reference_quirk_c_last_lone_token_is_never_counted():
    assert reference_lzw([[2]], vocab_size=3) == {(0,): 0, (1,): 0, (2,): 0}
    counts = reference_lzw([[0, 1, 2]], vocab_size=3)
    assert counts[(2,)] == 0 and (1, 2) not in counts


def test_streaming_the_reference_equals_one_call():
    documents = [[0, 1, 0, 1], [1, 1, 0], [0, 1, 0, 1, 0]]
    once = reference_lzw(documents, vocab_size=2)
    streamed = reference_lzw(documents[2:], 2, reference_lzw(documents[:2], 2))
    assert list(streamed.items()) == list(once.items())


def test_codewords_round_trip_through_the_reference_dict():
    counts = reference_lzw([[0, 1, 0, 1, 0, 1, 0, 1]], vocab_size=3)
    words = LZWCodewords.from_dict(counts)
    assert words.parent.tolist() == [-1, -1, -1, 0, 3, 1]
    assert list(words.to_dict().items()) == list(counts.items())


def _random_documents(rng: np.random.Generator, vocab_size: int) -> list[list[int]]:
    kinds = [
        lambda: [],
        lambda: [int(rng.integers(vocab_size))],
        lambda: rng.integers(vocab_size, size=2).tolist(),
        lambda: rng.integers(vocab_size, size=int(rng.integers(3, 40))).tolist(),
        # Long repetitive documents grow long matches and hit the end-of-document quirks.
        lambda: (rng.integers(vocab_size, size=int(rng.integers(1, 4))).tolist() * 60)[: int(rng.integers(2, 150))],
    ]
    return [kinds[int(rng.integers(len(kinds)))]() for _ in range(int(rng.integers(0, 25)))]


@pytest.mark.parametrize("seed", range(40))
def test_fast_equals_reference_on_random_documents(seed: int):
    rng = np.random.default_rng(seed)
    vocab_size = int(rng.integers(1, 7))  # small, so n-grams repeat and matches grow
    documents = _random_documents(rng, vocab_size)
    reference = reference_lzw_counts(documents, vocab_size)
    fast = fast_lzw_counts(documents, vocab_size)
    assert fast == reference
    assert list(fast.to_dict().items()) == list(reference_lzw(documents, vocab_size).items())
    budget = vocab_size * 3 + int(rng.integers(0, vocab_size * 5))
    np.testing.assert_array_equal(
        lzw_allocation(fast.counts, fast.last_token, vocab_size, budget, 8),
        lzw_allocation(reference.counts, reference.last_token, vocab_size, budget, 8),
    )


@pytest.mark.parametrize("seed", range(5))
def test_streamed_batches_equal_one_batch(seed: int):
    rng = np.random.default_rng(100 + seed)
    documents = _random_documents(rng, 4) + _random_documents(rng, 4)
    with LZWScanner(4) as scanner:
        for start in range(0, len(documents), 3):
            batch = documents[start : start + 3]
            lengths = [len(doc) for doc in batch]
            tokens = np.array([t for doc in batch for t in doc], dtype=np.int64)
            scanner.add_documents(tokens, np.concatenate([[0], np.cumsum(lengths)]))
        assert scanner.codewords() == reference_lzw_counts(documents, 4)
        assert scanner.documents_scanned == len(documents)
        assert scanner.tokens_scanned == sum(len(doc) for doc in documents)


def test_fast_equals_reference_on_a_larger_skewed_corpus():
    # Big enough to grow the C hash table several times.
    rng = np.random.default_rng(7)
    tokens = np.minimum(rng.zipf(1.3, size=200_000) - 1, 499)
    offsets = np.concatenate([[0], np.sort(rng.choice(len(tokens), 500, replace=False)), [len(tokens)]])
    assert fast_lzw_counts(tokens, 500, offsets) == reference_lzw_counts(tokens, 500, offsets)


def test_fast_equals_reference_on_real_tokenized_text(tiny_corpus):
    from l3train.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tiny_corpus.tokenizer_path)
    documents = [tokenizer.encode(text) for text in tiny_corpus.documents]
    vocab_size = tokenizer.vocab_size
    fast = fast_lzw_counts(documents, vocab_size)
    reference = reference_lzw(documents, vocab_size)
    assert list(fast.to_dict().items()) == list(reference.items())
    assert len(fast) > 10 * vocab_size  # real text: many n-grams, long matches


def test_scanner_reports_arrays_frequencies_and_totals():
    with LZWScanner(3) as scanner:
        scanner.add_documents(np.array([0, 1, 0, 1, 0, 1, 0, 1, 2]), np.array([0, 8, 8, 9]))
        assert scanner.counts.tolist() == [1, 1, 0, 2, 1, 1]
        assert scanner.last_token.tolist() == [0, 1, 2, 1, 0, 0]
        assert scanner.parent.tolist() == [-1, -1, -1, 0, 3, 1]
        assert scanner.token_frequencies.tolist() == [4, 4, 1]
        assert (scanner.tokens_scanned, scanner.documents_scanned) == (9, 3)
        assert scanner.num_codewords == 6


@pytest.mark.parametrize(
    "tokens, offsets, message",
    [
        (np.array([0, 3]), np.array([0, 2]), "token id 3 at position 1"),
        (np.array([0, -1]), np.array([0, 2]), "token id -1"),
        (np.array([0, 2**40]), np.array([0, 2]), f"token id {2**40}"),  # would wrap to 0 in int32
        (np.array([0, 1]), np.array([0, 1]), "end at len(tokens)"),
        (np.array([0, 1]), np.array([1, 2]), "start at 0"),
        (np.array([0, 1, 1]), np.array([0, 2, 1, 3]), "never decrease"),
        (np.array([[0, 1]]), np.array([0, 2]), "1-D integer"),
        (np.array([0.0, 1.0]), np.array([0, 2]), "1-D integer"),
    ],
)
def test_scanner_rejects_bad_input(tokens, offsets, message):
    with LZWScanner(3) as scanner:
        with pytest.raises(L3TrainError, match=re.escape(message)):
            scanner.add_documents(tokens, offsets)
        assert scanner.tokens_scanned == 0 and scanner.token_frequencies.sum() == 0


def _run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, cwd=REPO
    )


def test_helper_compiles_into_a_fresh_cache_concurrently(tmp_path):
    code = "from l3train.allocation import fast_lzw_counts; print(fast_lzw_counts([[0, 1, 0, 1]], 2).counts.tolist())"
    env = {"L3TRAIN_CACHE": str(tmp_path / "cache")}
    # Several processes racing to build the same library must all load a complete one.
    processes = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env={**os.environ, **env}, cwd=REPO)
        for _ in range(3)
    ]
    for process in processes:
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
        assert stdout.strip() == "[2, 0, 1]"
    built = list((tmp_path / "cache").iterdir())
    assert len(built) == 1 and built[0].name.startswith("lzw-") and built[0].suffix == ".so"


def test_missing_compiler_is_a_clear_error(tmp_path):
    code = (
        "from l3train.allocation import LZWScanner\n"
        "from l3train.errors import L3TrainError\n"
        "try:\n    LZWScanner(4)\nexcept L3TrainError as err:\n    print(err)\n"
    )
    result = _run_python(code, {"L3TRAIN_CACHE": str(tmp_path), "CC": str(tmp_path / "no-such-cc")})
    assert result.returncode == 0, result.stderr
    assert "no C compiler found" in result.stdout and "install gcc" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_closed_scanner_refuses_use():
    scanner = LZWScanner(2)
    scanner.close()
    for use in (lambda: scanner.num_codewords, scanner.codewords,
                lambda: scanner.add_documents(np.array([0]), np.array([0, 1]))):
        with pytest.raises(ValueError, match="closed"):
            use()
