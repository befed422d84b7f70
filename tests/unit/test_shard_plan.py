"""Shard plan of the L³ rows (l3train/parallel/shard_plan.py) and tools/shard_plan.py."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from l3train.allocation import Allocation
from l3train.errors import L3TrainError
from l3train.model.l3_attention import row_attention
from l3train.model.l3_layer import bounds_from_rows
from l3train.parallel.shard_plan import ShardPlan, allocation_hash, max_over_mean, plan_shards
from training_harness import REPO

TOOL = REPO / "tools" / "shard_plan.py"


def zipf_allocation(vocab_size: int = 1000, exponent: float = 0.9, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(rows, frequencies) shaped like a BPE + LZW allocation: low ids are the frequent
    tokens (merge order) and frequent tokens get the most rows."""
    rng = np.random.default_rng(seed)
    frequencies = (1e6 / np.arange(1, vocab_size + 1) ** exponent * rng.uniform(0.5, 1.5, vocab_size)).astype(np.int64)
    frequencies[-50:] = 0  # tokens never seen in the sample
    rows = np.clip(np.sqrt(frequencies) / 8, 1, 64).astype(np.int64)
    return rows, frequencies


@pytest.mark.parametrize("method", ["lpt", "contiguous"])
def test_every_token_is_assigned_once_and_rows_are_conserved(method):
    rows, frequencies = zipf_allocation()
    plan = plan_shards(rows, frequencies, 4, method)
    again = plan_shards(rows, frequencies, 4, method)
    np.testing.assert_array_equal(plan.owner, again.owner)  # deterministic
    assert plan.owner.shape == rows.shape and plan.owner.min() >= 0 and plan.owner.max() < 4
    assert plan.tokens_per_shard().sum() == len(rows)
    assert plan.rows_per_shard().sum() == rows.sum()
    assert plan.work_per_shard(frequencies).sum() == pytest.approx(float((rows * frequencies).sum()))


def test_local_allocations_partition_the_full_one():
    rows, frequencies = zipf_allocation()
    plan = plan_shards(rows, frequencies, 3)
    locals_ = [plan.local_rows_per_token(shard) for shard in range(3)]
    for shard, local in enumerate(locals_):
        assert local.sum() == plan.rows_per_shard()[shard]
        assert len(plan.global_row_indices(shard)) == local.sum()
    np.testing.assert_array_equal(sum(locals_), rows)
    every_row = np.concatenate([plan.global_row_indices(shard) for shard in range(3)])
    np.testing.assert_array_equal(np.sort(every_row), np.arange(rows.sum()))
    with pytest.raises(L3TrainError, match="outside"):
        plan.local_rows_per_token(3)


def test_row_attention_on_a_shard_equals_the_full_table():
    """The documented layout: local table = full[global_row_indices], local bounds from
    local_rows_per_token; the unchanged row attention then gives the full layer's output."""
    torch.manual_seed(0)
    rows = np.array([3, 1, 5, 2, 4, 1, 2, 6])
    plan = plan_shards(rows, np.array([9, 1, 7, 3, 5, 0, 2, 8]), 3)
    table = torch.randn(int(rows.sum()), 8, dtype=torch.float64)
    token_ids = torch.tensor([0, 2, 2, 7, 3, 1, 4, 5, 6, 0, 7])
    x = torch.randn(len(token_ids), 8, dtype=torch.float64)
    full = row_attention(x, token_ids, bounds_from_rows(rows), table, table)
    for shard in range(3):
        mine = torch.from_numpy(plan.owner[token_ids.numpy()] == shard)
        local_table = table[torch.from_numpy(plan.global_row_indices(shard))]
        local = row_attention(x[mine], token_ids[mine], bounds_from_rows(plan.local_rows_per_token(shard)),
                              local_table, local_table)
        torch.testing.assert_close(local, full[mine])


def test_lpt_balances_work_and_rows_where_contiguous_does_not():
    rows, frequencies = zipf_allocation()
    lpt = plan_shards(rows, frequencies, 4).imbalance(frequencies)
    contiguous = plan_shards(rows, frequencies, 4, "contiguous").imbalance(frequencies)
    assert lpt.work < 1.03 and lpt.rows < 1.03
    assert contiguous.rows < 1.05  # what it is built for
    assert contiguous.work > 2.0  # the frequent low ids all land on shard 0


@pytest.mark.parametrize("exponent", [0.8, 1.0])
@pytest.mark.parametrize("num_shards", [4, 8, 16])
def test_lpt_is_near_the_whole_token_lower_bound(exponent, num_shards):
    # No plan of whole tokens can beat max(1, N x the largest token's share of the work).
    rows, frequencies = zipf_allocation(exponent=exponent)
    work = rows * frequencies
    bound = max(1.0, num_shards * work.max() / work.sum())
    imbalance = plan_shards(rows, frequencies, num_shards).imbalance(frequencies)
    assert max(imbalance) <= 1.03 * bound


def test_contiguous_split_is_ranges_of_equal_rows():
    rows = np.array([1, 1, 1, 1, 2, 2, 2, 2, 4, 4])  # 20 rows
    plan = plan_shards(rows, None, 2, "contiguous")
    assert plan.owner.tolist() == [0] * 7 + [1] * 3
    assert plan.rows_per_shard().tolist() == [10, 10]


def test_without_frequencies_lpt_balances_rows_only():
    rows, frequencies = zipf_allocation()
    for unknown in (None, np.zeros_like(frequencies)):
        plan = plan_shards(rows, unknown, 4)
        np.testing.assert_array_equal(plan.owner, plan_shards(rows, None, 4).owner)
        assert max_over_mean(plan.rows_per_shard()) < 1.01
        assert plan.imbalance(np.zeros_like(frequencies)).work == 1.0  # no work anywhere


def test_zero_frequency_tokens_fill_the_row_gaps():
    # Token 0 carries all the work; the idle tokens' rows go to the other shard.
    rows = np.array([4, 1, 1, 1, 1, 2, 2])
    plan = plan_shards(rows, np.array([10, 0, 0, 0, 0, 0, 0]), 2)
    # Idle tokens by rows descending, then id, each to the shard with the fewest rows.
    assert plan.owner.tolist() == [0, 0, 1, 0, 1, 1, 1]
    assert plan.rows_per_shard().tolist() == [6, 6]


def test_real_allocation_four_shards_is_balanced(tiny_allocation):
    allocation = Allocation.load(tiny_allocation)
    plan = plan_shards(allocation.rows_per_token, allocation.token_frequencies, 4)
    imbalance = plan.imbalance(allocation.token_frequencies)
    # Both come out at 1.000 (the heaviest token carries 7% of the work, under the 25%
    # mean); the margin allows for other Python versions' stdlib docstrings.
    assert imbalance.work <= 1.02
    assert imbalance.rows <= 1.02
    contiguous = plan_shards(allocation.rows_per_token, allocation.token_frequencies, 4, "contiguous")
    assert contiguous.imbalance(allocation.token_frequencies).work > imbalance.work


def test_measured_work_sums_rows_over_positions():
    rows = np.array([3, 1, 5, 2])
    plan = ShardPlan(owner=np.array([0, 1, 1, 0]), num_shards=2, rows_per_token=rows, method="lpt")
    assert plan.measured_work(np.array([[0, 2, 2], [3, 1, 0]])).tolist() == [3 + 2 + 3, 5 + 5 + 1]
    with pytest.raises(L3TrainError, match="another tokenizer"):
        plan.measured_work(np.array([0, 4]))


def test_bad_inputs_are_one_line_errors():
    rows, frequencies = zipf_allocation(vocab_size=10)
    for args, match in [((rows, frequencies, 0), "number of shards"), ((rows, frequencies, 11), "number of shards"),
                        ((rows, frequencies, 2, "random"), "unknown shard plan method"),
                        ((rows, frequencies[:5], 2), "shape"), ((rows, -frequencies - 1, 2), "non-negative"),
                        ((rows - 5, frequencies, 2), "non-negative integers")]:
        with pytest.raises(L3TrainError, match=match):
            plan_shards(*args)
    with pytest.raises(L3TrainError, match="outside"):
        ShardPlan(owner=np.full(10, 2), num_shards=2, rows_per_token=rows, method="lpt")


def test_state_dict_and_file_round_trip(tmp_path):
    rows, frequencies = zipf_allocation()
    plan = plan_shards(rows, frequencies, 4)
    state = plan.state_dict()
    assert state["allocation_hash"] == allocation_hash(rows) and state["method"] == "lpt"
    restored = ShardPlan.from_state_dict(state, expect_rows_per_token=rows, expect_num_shards=4)
    np.testing.assert_array_equal(restored.owner, plan.owner)
    path = tmp_path / "plan.npz"
    plan.save(path)
    loaded = ShardPlan.load(path, expect_rows_per_token=rows, expect_num_shards=4)
    np.testing.assert_array_equal(loaded.owner, plan.owner)
    np.testing.assert_array_equal(loaded.rows_per_token, rows)
    assert (loaded.num_shards, loaded.method) == (4, "lpt")


def test_load_refuses_other_allocations_and_corrupt_files(tmp_path):
    rows, frequencies = zipf_allocation()
    path = tmp_path / "plan.npz"
    plan_shards(rows, frequencies, 4).save(path)
    other = rows.copy()
    other[0] += 1
    cases = [(lambda: ShardPlan.load(path, expect_rows_per_token=other), "was made for allocation"),
             (lambda: ShardPlan.load(path, expect_num_shards=8), "has 4 shards, but 8"),
             (lambda: ShardPlan.load(tmp_path / "missing.npz"), "does not exist")]
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    cases.append((lambda: ShardPlan.load(garbage), "not an l3train shard plan file"))
    bare = tmp_path / "bare.npz"
    with open(bare, "wb") as handle:
        np.save(handle, rows)
    cases.append((lambda: ShardPlan.load(bare), "bare .npy"))
    state = plan_shards(rows, frequencies, 4).state_dict()
    tampered = tmp_path / "tampered.npz"
    ShardPlan(**{key: state[key] for key in ("owner", "num_shards", "method")}, rows_per_token=other).save(tampered)
    tampered_state = dict(np.load(tampered))
    np.savez(tampered, **{**tampered_state, "rows_per_token": rows})  # rows no longer match the hash
    cases.append((lambda: ShardPlan.load(tampered), "corrupt"))
    cases.append((lambda: ShardPlan.from_state_dict({**state, "format_version": 99}), "format version 99"))
    cases.append((lambda: ShardPlan.from_state_dict({**state, "owner": state["owner"] + 4}), "outside"))
    for load, match in cases:
        with pytest.raises(L3TrainError, match=match) as error:
            load()
        assert "\n" not in str(error.value)


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, cwd=REPO, timeout=300)


def test_cli_prints_both_methods_and_writes_the_plan(tiny_corpus, tiny_allocation, tmp_path):
    output = tmp_path / "plan.npz"
    result = run_tool("--allocation", str(tiny_allocation), "--shards", "4", "--data-prefix", tiny_corpus.data_prefix,
                      "--batches", "3", "--global-batch", "4", "--seq-length", "32", "--output", str(output))
    assert result.returncode == 0, result.stderr
    header = result.stdout.splitlines()[4]
    assert "lpt" in header and "contiguous" in header
    assert "measured work, per batch worst" in result.stdout
    allocation = Allocation.load(tiny_allocation)
    plan = ShardPlan.load(output, expect_rows_per_token=allocation.rows_per_token, expect_num_shards=4)
    assert plan.method == "lpt"


@pytest.mark.parametrize("args", [["--allocation", "a.npz", "--shards", "4", "--bogus"],
                                  ["--allocation", "a.npz", "--shards", "0"],
                                  ["--allocation", "a.npz", "--shards", "4", "--batches", "3"]])
def test_cli_bad_flags_are_one_line_errors(args):
    result = run_tool(*args)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1


def test_ownership_hash_tells_plans_with_equal_shard_counts_apart():
    """A checkpoint's rows are placed by token ownership: swapping the owners of two tokens with
    equal rows keeps every per-shard count (the old check) but must change the identity."""
    rows = np.array([4, 4, 2, 6])
    plan = ShardPlan(owner=np.array([0, 1, 0, 1]), num_shards=2, rows_per_token=rows, method="lpt")
    swapped = ShardPlan(owner=np.array([1, 0, 0, 1]), num_shards=2, rows_per_token=rows, method="lpt")
    assert plan.rows_per_shard().tolist() == swapped.rows_per_shard().tolist()
    assert plan.allocation_hash == swapped.allocation_hash
    assert plan.ownership_hash != swapped.ownership_hash
    same = ShardPlan.from_state_dict(plan.state_dict())
    assert same.ownership_hash == plan.ownership_hash
