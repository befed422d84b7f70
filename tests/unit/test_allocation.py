"""Row allocations (LZW, uniform, frequency), the allocation file, building one from a corpus
(l3train/allocation/build.py) and its CLI tools/lzw_allocate.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from l3train.allocation import (
    Allocation,
    CorpusOptions,
    TextFile,
    build_allocation,
    fast_lzw_counts,
    frequency_allocation,
    lzw_allocation,
    reference_lzw,
    reference_lzw_counts,
    uniform_allocation,
)
from l3train.allocation.build import dataset_batches, limit_tokens
from l3train.errors import L3TrainError
from training_harness import REPO

TOOL = REPO / "tools" / "lzw_allocate.py"

# Worked example 1 of the spec, sorted by count (ties in insertion order):
# (0,1):2 -> 1, (0,):1 -> 0, (1,):1 -> 1, (0,1,0):1 -> 0, (1,0):1 -> 0, (2,):0 -> 2.
LZW = reference_lzw_counts([[0, 1, 0, 1, 0, 1, 0, 1]], vocab_size=3)


def walk_allocation(counts: list[int], last_token: list[int], vocab_size: int, budget: int, cap: int) -> list[int]:
    """Steps 3-4 as a plain loop, repeating the sorted list when it runs out (quirk e)."""
    order = sorted(range(len(counts)), key=lambda i: -counts[i])
    rows, total = [1] * vocab_size, vocab_size
    while total < budget:
        for i in order:
            if total == budget:
                break
            if rows[last_token[i]] < cap:
                rows[last_token[i]] += 1
                total += 1
    return rows


@pytest.mark.parametrize(
    "budget, cap, expected",
    [
        (3, 512, [1, 1, 1]),  # v = vocab size: nothing to hand out
        (4, 512, [1, 2, 1]),  # the top codeword (0,1) ends in token 1
        (5, 512, [2, 2, 1]),
        (8, 512, [4, 3, 1]),  # stops at v before (2,) is reached
        (9, 512, [4, 3, 2]),  # exactly one pass over the codewords
        (5, 2, [2, 2, 1]),  # cap k=2: later codewords ending in 0 or 1 are skipped
        (6, 2, [2, 2, 2]),
    ],
)
def test_lzw_allocation_hand_checked(budget, cap, expected):
    assert lzw_allocation(LZW.counts, LZW.last_token, 3, budget, cap).tolist() == expected


def test_lzw_allocation_repeats_the_list_when_codewords_run_out():
    # Pass 1 ends at [4, 3, 2] (9 rows); pass 2 starts again from the top: 1, 0, 1, ...
    assert lzw_allocation(LZW.counts, LZW.last_token, 3, 12, 10).tolist() == [5, 5, 2]
    assert lzw_allocation(LZW.counts, LZW.last_token, 3, 30, 10).tolist() == [10, 10, 10]


def test_lzw_allocation_ties_keep_insertion_order():
    counts = np.array([0, 0, 0, 5, 5])
    assert lzw_allocation(counts, np.array([0, 1, 2, 2, 1]), 3, 4, 512).tolist() == [1, 1, 2]
    assert lzw_allocation(counts, np.array([0, 1, 2, 1, 2]), 3, 4, 512).tolist() == [1, 2, 1]


def test_lzw_allocation_with_an_effectively_infinite_cap():
    rows = lzw_allocation(LZW.counts, LZW.last_token, 3, 9, 2**62)
    assert rows.tolist() == [4, 3, 2]


@pytest.mark.parametrize("seed", range(30))
def test_lzw_allocation_equals_the_plain_walk(seed):
    rng = np.random.default_rng(seed)
    vocab_size = int(rng.integers(1, 9))
    documents = [rng.integers(vocab_size, size=int(rng.integers(0, 60))).tolist() for _ in range(5)]
    words = fast_lzw_counts(documents, vocab_size)
    cap = int(rng.integers(1, 20))
    budget = int(rng.integers(vocab_size, vocab_size * cap + 1))
    rows = lzw_allocation(words.counts, words.last_token, vocab_size, budget, cap)
    assert rows.tolist() == walk_allocation(words.counts.tolist(), words.last_token.tolist(), vocab_size, budget, cap)
    assert rows.sum() == budget and rows.min() >= 1 and rows.max() <= cap


def test_lzw_allocation_refuses_a_budget_its_codewords_cannot_reach():
    # Token 1 ends no codeword, so it stays at 1 row: at most 3 + 1 = 4 rows with k=3.
    assert lzw_allocation(np.array([3]), np.array([0]), 2, 4, 3).tolist() == [3, 1]
    with pytest.raises(L3TrainError, match="only 1 tokens end a codeword"):
        lzw_allocation(np.array([3]), np.array([0]), 2, 5, 3)

@pytest.mark.parametrize(
    "budget, cap, message",
    [
        (9, 0, "cap k must be at least 1"),
        (2, 512, "smaller than the vocab size 3"),
        (7, 2, "exceeds vocab size x cap = 3 x 2 = 6"),
    ],
)
def test_impossible_budgets_are_refused(budget, cap, message):
    for allocate in (
        lambda: lzw_allocation(LZW.counts, LZW.last_token, 3, budget, cap),
        lambda: uniform_allocation(3, budget, cap),
        lambda: frequency_allocation(np.array([5, 1, 0]), budget, cap),
    ):
        with pytest.raises(L3TrainError, match=message):
            allocate()


def test_uniform_allocation_spreads_the_remainder_over_the_lowest_ids():
    assert uniform_allocation(5, 12, 3).tolist() == [3, 3, 2, 2, 2]
    assert uniform_allocation(5, 15, 3).tolist() == [3] * 5


def test_frequency_allocation_hand_checked():
    frequencies = np.array([100, 0, 5, 1, 0, 50])
    assert frequency_allocation(frequencies, 13, 10).tolist() == [6, 1, 1, 1, 1, 3]
    assert frequency_allocation(frequencies, 12, 3).tolist() == [3, 1, 3, 1, 1, 3]
    # Equal frequencies, one leftover row: the lower token id gets it.
    assert frequency_allocation(np.array([1, 1, 1]), 4, 5).tolist() == [2, 1, 1]


@pytest.mark.parametrize("seed", range(10))
def test_frequency_allocation_sums_caps_and_order(seed):
    rng = np.random.default_rng(seed)
    frequencies = rng.zipf(1.5, size=300) * (rng.random(300) < 0.8)
    cap = int(rng.integers(2, 64))
    budget = int(rng.integers(300, 300 + (frequencies > 0).sum() * (cap - 1) + 1))
    rows = frequency_allocation(frequencies, budget, cap)
    assert rows.sum() == budget and rows.min() >= 1 and rows.max() <= cap
    assert np.all(rows[frequencies == 0] == 1)
    by_frequency = np.argsort(frequencies, kind="stable")
    assert np.all(np.diff(rows[by_frequency]) >= -1)  # monotone up to rounding
    np.testing.assert_array_equal(rows, frequency_allocation(frequencies, budget, cap))


def test_frequency_allocation_refuses_a_budget_unseen_tokens_cannot_fill():
    with pytest.raises(L3TrainError, match="only 1 tokens occur"):
        frequency_allocation(np.array([5, 0, 0]), 8, 4)


def make_allocation(**changes) -> Allocation:
    fields = dict(
        rows_per_token=np.array([4, 3, 2]),
        token_frequencies=np.array([4, 4, 0]),
        vocab_size=3,
        budget_v=9,
        cap_k=512,
        mode="lzw",
        tokenizer_id="0123456789abcdef",
        corpus="worked example 1",
        tokens_scanned=8,
    )
    fields.update(changes)
    return Allocation(**fields)


def test_bounds_and_mean_rows_per_token_occurrence():
    allocation = make_allocation()
    assert allocation.mean_rows_per_token_occurrence() == pytest.approx((4 * 4 + 4 * 3) / 8)
    unknown = make_allocation(token_frequencies=np.zeros(3, dtype=np.int64))
    assert unknown.mean_rows_per_token_occurrence() == pytest.approx(3.0)


def test_save_load_round_trip(tmp_path):
    path = tmp_path / "allocation"  # no suffix is added
    make_allocation().save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["allocation"]  # no temp files left
    loaded = Allocation.load(path, expect_vocab_size=3, expect_tokenizer_id="0123456789abcdef")
    assert loaded.rows_per_token.tolist() == [4, 3, 2] and loaded.rows_per_token.dtype == np.int64
    assert loaded.token_frequencies.tolist() == [4, 4, 0]
    assert loaded.metadata() == make_allocation().metadata()


def write_npz(path: Path, rows, frequencies, **metadata_changes) -> None:
    metadata = {**make_allocation().metadata(), **metadata_changes}
    with open(path, "wb") as handle:
        np.savez(handle, rows_per_token=np.asarray(rows), token_frequencies=np.asarray(frequencies),
                 metadata=np.array(json.dumps(metadata)))


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.write_text("hello"), "not an l3train allocation file or is corrupt"),
        (lambda p: np.save(open(p, "wb"), np.arange(3)), "a bare .npy array"),
        (lambda p: np.savez(open(p, "wb"), rows_per_token=np.arange(3)), "missing arrays"),
        (lambda p: write_npz(p, [4, 3, 2], [0, 0, 0], format="something-else"), "no allocation metadata"),
        (lambda p: write_npz(p, [4, 3, 2], [0, 0, 0], format_version=99), "format version 99"),
        (lambda p: write_npz(p, [4, 3, 3], [0, 0, 0]), "rows sum to 10, not the budget v=9"),
        (lambda p: write_npz(p, [7, 2, 0], [0, 0, 0]), "outside [1, k=512]"),
        (lambda p: write_npz(p, [7, 1, 1], [0, 0, 0], cap_k=5), "outside [1, k=5]"),
        (lambda p: write_npz(p, [4, 3, 2], [0, 0]), "token_frequencies has shape (2,)"),
        (lambda p: write_npz(p, [4.0, 3.0, 2.0], [0, 0, 0]), "must hold integers"),
        (lambda p: write_npz(p, [4, 3, 2], [0, 0, 0], vocab_size="3"), "vocab_size must be an integer"),
    ],
)
def test_load_rejects_bad_files(tmp_path, tamper, message):
    path = tmp_path / "allocation.npz"
    tamper(path)
    with pytest.raises(L3TrainError) as error:
        Allocation.load(path)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_load_rejects_corrupt_json_metadata(tmp_path):
    path = tmp_path / "allocation.npz"
    with open(path, "wb") as handle:
        np.savez(handle, rows_per_token=np.array([4, 3, 2]), token_frequencies=np.zeros(3, dtype=np.int64),
                 metadata=np.array("{not json"))
    with pytest.raises(L3TrainError, match="JSONDecodeError"):
        Allocation.load(path)


def test_load_rejects_truncated_file(tmp_path):
    path = tmp_path / "allocation.npz"
    make_allocation().save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(L3TrainError, match="not an l3train allocation file or is corrupt"):
        Allocation.load(path)


def test_load_checks_vocab_size_and_tokenizer(tmp_path):
    path = tmp_path / "allocation.npz"
    make_allocation().save(path)
    with pytest.raises(L3TrainError, match="vocabulary of 3 tokens, but the config's vocab size is 4"):
        Allocation.load(path, expect_vocab_size=4)
    with pytest.raises(L3TrainError) as error:
        Allocation.load(path, expect_tokenizer_id="fedcba9876543210")
    assert str(error.value).startswith(
        f"allocation {path} was built for tokenizer 0123456789abcdef, but the config uses "
        "tokenizer fedcba9876543210; rebuild it with tools/lzw_allocate.py"
    )


def test_invalid_allocations_cannot_be_built():
    with pytest.raises(L3TrainError, match="rows sum to 8"):
        make_allocation(rows_per_token=np.array([4, 2, 2]))
    with pytest.raises(L3TrainError, match="unknown mode"):
        make_allocation(mode="magic")
    with pytest.raises(L3TrainError, match="names no tokenizer"):
        make_allocation(tokenizer_id="")


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TOOL), *args, "--quiet"], capture_output=True, text=True, cwd=REPO, timeout=300
    )


def test_cli_text_lzw_equals_reference_mode_and_in_process(tiny_corpus, tmp_path):
    from l3train.data.tokenizer import Tokenizer

    outputs = {}
    for mode in ("lzw", "lzw-reference"):
        outputs[mode] = tmp_path / f"{mode}.npz"
        result = run_tool("--text", str(tiny_corpus.text_path), "--tokenizer", str(tiny_corpus.tokenizer_path),
                          "--mode", mode, "-v", "6000", "-k", "64", "--output", str(outputs[mode]))
        assert result.returncode == 0, result.stderr
        assert "mean d_t over token occurrences" in result.stdout
    fast = Allocation.load(outputs["lzw"], expect_vocab_size=tiny_corpus.vocab_size,
                           expect_tokenizer_id=tiny_corpus.tokenizer_id)
    reference = Allocation.load(outputs["lzw-reference"])
    np.testing.assert_array_equal(fast.rows_per_token, reference.rows_per_token)
    np.testing.assert_array_equal(fast.token_frequencies, reference.token_frequencies)

    tokenizer = Tokenizer.load(tiny_corpus.tokenizer_path)
    lines = tiny_corpus.text_path.read_text().splitlines()
    counts = reference_lzw([tokenizer.encode(line) for line in lines], tokenizer.vocab_size)
    expected = lzw_allocation(np.array(list(counts.values())), np.array([w[-1] for w in counts]),
                              tokenizer.vocab_size, 6000, 64)
    np.testing.assert_array_equal(fast.rows_per_token, expected)
    assert fast.tokens_scanned == fast.token_frequencies.sum() == sum(len(tokenizer.encode(x)) for x in lines)


def test_cli_data_prefix_strips_eod_and_matches_the_documents(tiny_corpus, tmp_path):
    from l3train.data.tokenizer import Tokenizer

    output = tmp_path / "allocation.npz"
    # Tokenizer id, vocab size and EOD id all come from <prefix>.meta.json.
    result = run_tool("--data-prefix", tiny_corpus.data_prefix, "-v", "6000", "-k", "64", "--output", str(output))
    assert result.returncode == 0, result.stderr
    allocation = Allocation.load(output, expect_tokenizer_id=tiny_corpus.tokenizer_id)
    tokenizer = Tokenizer.load(tiny_corpus.tokenizer_path)
    documents = [tokenizer.encode(text) for text in tiny_corpus.documents if text.strip()]
    words = fast_lzw_counts(documents, tokenizer.vocab_size)
    expected = lzw_allocation(words.counts, words.last_token, tokenizer.vocab_size, 6000, 64)
    np.testing.assert_array_equal(allocation.rows_per_token, expected)
    assert allocation.token_frequencies[tokenizer.eod_id] == 0


def test_build_allocation_in_process_equals_the_cli(tiny_corpus, tmp_path):
    from l3train.data.tokenizer import Tokenizer

    output = tmp_path / "allocation.npz"
    result = run_tool("--data-prefix", tiny_corpus.data_prefix, "-v", "6000", "-k", "64", "--output", str(output))
    assert result.returncode == 0, result.stderr
    from_cli = Allocation.load(output)
    from_prefix = build_allocation(tiny_corpus.data_prefix, "lzw", 6000, 64)
    assert from_prefix.metadata() == from_cli.metadata()
    np.testing.assert_array_equal(from_prefix.rows_per_token, from_cli.rows_per_token)

    # The same documents as text lines (the paper's loop) and as token sequences (the C trie).
    tokenizer = Tokenizer.load(tiny_corpus.tokenizer_path)
    lines = tiny_corpus.text_path.read_text().splitlines()
    from_text = build_allocation(TextFile(tiny_corpus.text_path), "lzw-reference", 6000, 64,
                                 CorpusOptions(tokenizer=tiny_corpus.tokenizer_path, max_tokens=20000))
    from_sequences = build_allocation([tokenizer.encode(line) for line in lines], "lzw", 6000, 64,
                                      CorpusOptions(tokenizer_id=tokenizer.tokenizer_id,
                                                    vocab_size=tokenizer.vocab_size, max_tokens=20000))
    np.testing.assert_array_equal(from_sequences.rows_per_token, from_text.rows_per_token)
    np.testing.assert_array_equal(from_sequences.token_frequencies, from_text.token_frequencies)
    assert from_sequences.tokens_scanned == 20000
    with pytest.raises(L3TrainError, match="needs a corpus"):
        build_allocation(None, "lzw", 6000, 64, CorpusOptions(tokenizer_id="abc", vocab_size=600))


def test_dataset_batches_stream_in_pieces(tiny_corpus):
    whole_tokens, whole_offsets = next(dataset_batches(tiny_corpus.data_prefix, eod_id=2)[0])
    batches, total = dataset_batches(tiny_corpus.data_prefix, eod_id=2, batch_tokens=1000)
    pieces = list(batches)
    assert len(pieces) > 10 and total == len(whole_tokens) + len(whole_offsets) - 1
    assert np.array_equal(np.concatenate([tokens for tokens, _ in pieces]), whole_tokens)
    lengths = np.concatenate([np.diff(offsets) for _, offsets in pieces])
    assert np.array_equal(lengths, np.diff(whole_offsets))


def test_limit_tokens_cuts_the_crossing_document():
    batches = iter([(np.arange(10), np.array([0, 4, 4, 10])), (np.arange(5), np.array([0, 5]))])
    limited = list(limit_tokens(batches, 6))
    assert len(limited) == 1
    tokens, offsets = limited[0]
    assert tokens.tolist() == [0, 1, 2, 3, 4, 5] and offsets.tolist() == [0, 4, 4, 6]


def test_cli_max_tokens_and_uniform_without_a_corpus(tiny_corpus, tmp_path):
    output = tmp_path / "frequency.npz"
    result = run_tool("--text", str(tiny_corpus.text_path), "--tokenizer", str(tiny_corpus.tokenizer_path),
                      "--mode", "frequency", "--max-tokens", "5000", "-v", "2000", "-k", "16", "--output", str(output))
    assert result.returncode == 0, result.stderr
    allocation = Allocation.load(output)
    assert allocation.tokens_scanned == allocation.token_frequencies.sum() == 5000
    assert allocation.mode == "frequency" and allocation.rows_per_token.sum() == 2000

    output = tmp_path / "uniform.npz"
    result = run_tool("--mode", "uniform", "--tokenizer-id", "abc", "--vocab-size", "10", "-v", "25",
                      "--output", str(output))
    assert result.returncode == 0, result.stderr
    assert Allocation.load(output).rows_per_token.tolist() == [3] * 5 + [2] * 5


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--text", "missing.txt", "--tokenizer", "{tokenizer}"], "--text missing.txt does not exist"),
        (["--text", "{text}"], "--text needs --tokenizer"),
        (["--text", "{text}", "--tokenizer", "{tokenizer}", "-v", "10"], "smaller than the vocab size"),
        (["--text", "{text}", "--tokenizer", "{tokenizer}", "-k", "0"], "cap k must be at least 1"),
        (["--text", "{text}", "--tokenizer", "missing.model"], "tokenizer model not found"),
        (["--data-prefix", "missing/prefix", "--tokenizer-id", "abc", "--vocab-size", "600"], "missing/prefix"),
        (["--text", "{text}", "--tokenizer", "{tokenizer}", "--vocab-size", "7"], "conflicting vocab sizes: "),
        (["--data-prefix", "{prefix}", "--tokenizer-id", "abc"], "conflicting tokenizer ids: abc from --tokenizer-id"),
        (["--data-prefix", "{prefix}", "--max-memory", "1M"], "would need about 0.0 GB for its dictionary"),
        (["--text", "{text}", "--tokenizer", "{tokenizer}", "--max-memory", "2M"], "more than --max-memory 0.0 GB"),
    ],
)
def test_cli_errors_are_one_line_and_leave_no_output(tiny_corpus, tmp_path, args, message):
    output = tmp_path / "allocation.npz"
    args = [
        a.format(text=tiny_corpus.text_path, tokenizer=tiny_corpus.tokenizer_path, prefix=tiny_corpus.data_prefix)
        for a in args
    ]
    if not any(a in ("-v", "--budget") for a in args):
        args += ["-v", "6000"]
    result = run_tool(*args, "--output", str(output))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert message in result.stderr
    assert list(tmp_path.iterdir()) == []



def test_the_scan_memory_prediction_bounds_the_dictionary_and_refuses_in_one_line(tiny_corpus):
    from l3train.allocation.build import check_scan_memory, open_corpus
    from l3train.allocation.lzw import LZWScanner, predicted_scan_bytes

    batches, total = dataset_batches(tiny_corpus.data_prefix, eod_id=2)
    with LZWScanner(tiny_corpus.vocab_size) as scanner:
        for tokens, offsets in batches:
            scanner.add_documents(tokens, offsets)
        nodes = scanner.num_codewords
    # The C trie's own arrays for these nodes (20 bytes a node, 17 a slot at 3/4 load) are below the prediction.
    assert 20 * nodes + 17 * nodes * 4 // 3 < predicted_scan_bytes(total, tiny_corpus.vocab_size)
    corpus = open_corpus(tiny_corpus.data_prefix, 6000, 64)
    check_scan_memory(corpus, predicted_scan_bytes(total, tiny_corpus.vocab_size))  # just enough: no error
    with pytest.raises(L3TrainError, match=rf"an LZW scan of {total:,} tokens would need about .* GB for its "
                                           rf"dictionary .*; scan a sample with --max-tokens \(about [\d,]+ fit"):
        check_scan_memory(corpus, predicted_scan_bytes(total, tiny_corpus.vocab_size) - 1)


def test_convergence_snapshots_are_the_allocations_of_those_samples(tiny_corpus):
    """Each snapshot is exactly what --max-tokens would build; the last is the whole corpus's."""
    from l3train.allocation.build import CorpusOptions, open_corpus
    from l3train.allocation.convergence import convergence_table, snapshots

    taken = list(snapshots(open_corpus(tiny_corpus.data_prefix, 6000, 64), 6000, 64, start_tokens=5000))
    total = next(dataset_batches(tiny_corpus.data_prefix, eod_id=2)[0])[0].size
    # At the first document boundary from 5000, 10000, 20000, ... tokens; the last is the whole corpus.
    assert all(5000 * 2 ** i <= snap.tokens < 5000 * 2 ** (i + 1) for i, snap in enumerate(taken[:-1]))
    assert taken[-1].tokens == total
    for snap in (taken[0], taken[2], taken[-1]):
        built = build_allocation(tiny_corpus.data_prefix, "lzw", 6000, 64, CorpusOptions(max_tokens=snap.tokens))
        np.testing.assert_array_equal(snap.rows_per_token, built.rows_per_token)
    lines = []
    rows = convergence_table(open_corpus(tiny_corpus.data_prefix, 6000, 64), 6000, 64, 5000, log=lines.append)
    assert rows[-1]["share_vs_largest"] == 0.0 and rows[0]["rows_moved"] is None
    moved = np.abs(taken[1].rows_per_token - taken[0].rows_per_token).sum() // 2
    assert rows[1]["rows_moved"] == moved and len(lines) == len(rows) + 1
