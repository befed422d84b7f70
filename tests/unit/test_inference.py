"""Generation: KV cache, sampling, batching, and L³ tables resident, in host memory or on disk."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from l3train.checkpoint.consolidated import (Consolidated, ConsolidatedContents, load_model, plain_state_dict,
                                             write_consolidated)
from l3train.checkpoint.reader import open_checkpoint
from l3train.config import config_from_dict
from l3train.errors import L3TrainError
from l3train.inference.config import InferenceConfig
from l3train.inference.engine import Generator
from l3train.inference.loading import load_for_generation
from l3train.inference.placement import InPlaceRowTable, MappedPages
from l3train.inference.row_sources import DiskRows
from l3train.inference.sampling import filter_logits
from l3train.model.build import build_model
from training_harness import REPO, tiny_l3_config

CPU = torch.device("cpu")
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [100, 200], [3, 3, 3, 40, 41]]
# KV-cache decoding against a full forward of the same tokens, fp32: both compute the same sums
# in a different order (one query against the cache vs. causal attention over the sequence, and
# the L³ row attention over other batches of tokens). Bound on max |Δ logit| relative to the
# step's largest |logit| (~5 here); measured up to 6e-6, i.e. a few dozen fp32 roundings.
CACHE_TOLERANCE = 2e-5


def write_checkpoint(tmp_path: Path, corpus, allocation: Path, **l3: object) -> Path:
    """A consolidated checkpoint of a tiny L³ model with weights large enough that the L³ layer
    matters (random weights: equality tests need no training)."""
    tree = tiny_l3_config(tmp_path / "run", corpus, allocation)
    tree["l3"].update(l3)
    tree["model"]["tie_embeddings"] = bool(l3)  # the variant also covers tied embeddings
    cfg = config_from_dict(tree)
    model, _ = build_model(cfg)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * (1.0 if ".rows." in name else 0.15))
    output = tmp_path / "consolidated"
    write_consolidated(output, ConsolidatedContents(cfg, 0, {}), plain_state_dict(model, cfg.model.tie_embeddings).items())
    return output


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_corpus, tiny_allocation) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("inference"), tiny_corpus, tiny_allocation)


@pytest.fixture(scope="module")
def untied_checkpoint(tmp_path_factory, tiny_corpus, tiny_allocation) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("inference_untied"), tiny_corpus, tiny_allocation,
                            tied_kv=False, d_emb=32)


def generator_for(checkpoint: Path, **placement: object) -> Generator:
    config = InferenceConfig(**placement)
    model, tables = load_for_generation(open_checkpoint(checkpoint), config, CPU)
    return Generator(model, tables)


def step_logits(generator: Generator, config: InferenceConfig, prompts=PROMPTS) -> torch.Tensor:
    return torch.stack([step.logits for step in generator.stream(prompts, config)])


# A CPU model computes on host tables and mapped disk tables in place; with in_place=False it
# stages their rows as a GPU model does (the staging path, exercised here on the CPU).
PLACEMENTS = [dict(placement="host"), dict(placement="disk"),
              *(dict(placement=where, prefetch=prefetch, in_place=False)
                for where in ("host", "disk") for prefetch in (True, False))]


@pytest.mark.parametrize("variant", ["checkpoint", "untied_checkpoint"])
def test_logits_are_bit_identical_across_placements_and_prefetch(variant, request, tmp_path):
    checkpoint = request.getfixturevalue(variant)
    sampling = InferenceConfig(max_new_tokens=12, temperature=0.9, top_k=40, seed=5)
    resident = generator_for(checkpoint)
    expected = step_logits(resident, sampling)
    for placement in PLACEMENTS:
        generator = generator_for(checkpoint, table_dir=str(tmp_path), **placement)
        assert torch.equal(step_logits(generator, sampling), expected), placement
        counters = generator.placement.counters
        if placement.get("in_place", True):
            assert all(isinstance(layer.rows, InPlaceRowTable) for layer in generator.model.l3_layers())
            assert (counters.lookups, counters.bytes_moved) == (0, 0)
        else:
            assert (counters.lookups, counters.unannounced, counters.extra_chunks) == (12, 0, 0)
            if not placement["prefetch"]:
                assert counters.stalls == 12  # the layer stages its rows itself every step
        generator.placement.close()
    # The resident model loaded for generation is the model load_model builds.
    tokens = torch.tensor(PROMPTS[:1])
    with torch.no_grad():
        plain = load_model(Consolidated(checkpoint))(tokens).logits
        assert torch.equal(resident.model(tokens).logits, plain)
        # ... and its L³ rows matter, so equal logits mean equal rows were read.
        for table in resident.model.l3_layers()[0].rows.parameters():
            table.zero_()
        assert (resident.model(tokens).logits - plain).abs().max() > 0.1


def test_host_tables_are_pageable_memory_also_for_a_cuda_model(checkpoint):
    """Only the staging buffer is pinned: a host table for a CUDA model is an ordinary CPU tensor
    (on this CPU machine, asking for pinned memory would raise)."""
    from l3train.inference.loading import _row_source

    source = _row_source(open_checkpoint(checkpoint), "lookups.0.lookup.rows.key_table",
                         tuple(Consolidated(checkpoint).state_dict()["lookups.0.lookup.rows.key_table"].shape),
                         InferenceConfig(placement="host"))
    assert source.table.device.type == "cpu" and not source.table.is_pinned()
    assert torch.equal(source.table, Consolidated(checkpoint).state_dict()["lookups.0.lookup.rows.key_table"])


def test_a_step_larger_than_the_staging_buffer_runs_in_chunks(checkpoint, tmp_path):
    sampling = InferenceConfig(max_new_tokens=4, temperature=0)
    rows = np.diff(open_checkpoint(checkpoint).tensor("lookups.0.lookup.bounds").numpy())
    prompts = [np.argsort(rows)[-6:].tolist(), [1, 2]]  # the tokens with the most rows
    expected = step_logits(generator_for(checkpoint), sampling, prompts)
    largest = int(rows.max())
    chunked = generator_for(checkpoint, placement="disk", table_dir=str(tmp_path), staging_rows=largest,
                            in_place=False)
    # Equal up to rounding: the row attention batches the tokens' blocks differently per chunk.
    torch.testing.assert_close(step_logits(chunked, sampling, prompts), expected, atol=1e-6, rtol=1e-6)
    assert chunked.placement.counters.extra_chunks > 0
    with pytest.raises(L3TrainError, match="staging rows"):
        generator_for(checkpoint, placement="host", staging_rows=largest - 1)  # checked for every placement


def test_kv_cache_decoding_equals_a_full_forward_at_every_step(checkpoint):
    generator = generator_for(checkpoint, placement="host")
    result = generator.generate(PROMPTS, InferenceConfig(max_new_tokens=20, temperature=0))
    with torch.no_grad():
        for index, prompt in enumerate(PROMPTS):
            sequence = prompt + result.tokens[index]
            full = generator.model(torch.tensor([sequence])).logits[0].float()
            for step, decoded in enumerate(result.steps):
                # Step s predicts the token after the prompt and s new tokens (left padding is invisible).
                expected = full[len(prompt) - 1 + step]
                error = (decoded.logits[index] - expected).abs().max() / expected.abs().max()
                assert error <= CACHE_TOLERANCE, (index, step, error)


def test_batched_generation_equals_one_prompt_at_a_time(checkpoint):
    generator = generator_for(checkpoint, placement="host")
    for sampling in (InferenceConfig(max_new_tokens=16, temperature=0),
                     InferenceConfig(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=11)):
        batched = generator.generate(PROMPTS, sampling)
        for index, prompt in enumerate(PROMPTS):
            alone = generator.generate([prompt], replace(sampling, seed=sampling.seed + index))
            assert alone.tokens[0] == batched.tokens[index], (sampling, index)


def test_sampling_is_reproducible_from_the_seed(checkpoint):
    generator = generator_for(checkpoint)
    sampling = InferenceConfig(max_new_tokens=16, temperature=1.2, top_k=100, top_p=0.95, seed=3)
    first = generator.generate(PROMPTS, sampling).tokens
    assert generator.generate(PROMPTS, sampling).tokens == first
    assert generator.generate(PROMPTS, replace(sampling, seed=4)).tokens != first


def test_stop_tokens_and_max_new_tokens(checkpoint):
    generator = generator_for(checkpoint)
    greedy = generator.generate(PROMPTS, InferenceConfig(max_new_tokens=10, temperature=0))
    assert [len(tokens) for tokens in greedy.tokens] == [10, 10, 10]
    assert greedy.finish_reasons == ["length"] * 3
    stop = greedy.tokens[0][3]
    stopped = generator.generate(PROMPTS, InferenceConfig(max_new_tokens=10, temperature=0, stop_tokens=(stop,)))
    assert stopped.tokens[0] == greedy.tokens[0][:greedy.tokens[0].index(stop)]
    assert stopped.finish_reasons[0] == "stop"
    for index in (1, 2):  # the other sequences are unaffected (unless they also drew the stop token)
        expected = greedy.tokens[index]
        assert stopped.tokens[index] == (expected[:expected.index(stop)] if stop in expected else expected)
    with pytest.raises(L3TrainError, match="max_seq_len"):
        generator.generate([[1] * 60], InferenceConfig(max_new_tokens=10))


def test_a_forward_nobody_announced_never_reads_staged_rows(checkpoint, tmp_path):
    resident = generator_for(checkpoint)
    staged = generator_for(checkpoint, placement="disk", table_dir=str(tmp_path), prefetch=True, in_place=False)
    announced = staged.placement.start_step(torch.tensor([PROMPTS[0]]))  # rows of other ids are being staged
    other = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        assert torch.equal(staged.model(other).logits, resident.model(other).logits)
        assert staged.placement.counters.unannounced == 1
        assert torch.equal(staged.model(announced).logits, resident.model(announced).logits)  # ticket was dropped
    assert staged.placement.counters.unannounced == 2


class GatedRows:
    """A row source whose reads wait for `gate`: a prefetch that is late."""

    def __init__(self, rows, gate: threading.Event) -> None:
        self.rows, self.gate = rows, gate

    def read(self, starts, counts, out) -> None:
        self.gate.wait()
        self.rows.read(starts, counts, out)


def test_a_late_prefetch_is_waited_for_or_done_by_the_layer(checkpoint, tmp_path):
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        expected = generator_for(checkpoint).model(ids).logits
        staged = generator_for(checkpoint, placement="disk", table_dir=str(tmp_path), prefetch=True, in_place=False)
        (backend,) = staged.placement.backends
        # Running late: the rows arrive half a second after the L³ block starts; the layer waits.
        gate = threading.Event()
        backend.stager.tables = [GatedRows(table, gate) for table in backend.stager.tables]
        hook = staged.model.lookups["0"].register_forward_pre_hook(lambda *_: threading.Timer(0.5, gate.set).start())
        announced = staged.placement.start_step(ids)
        while not backend.ticket.prefetched.running():
            time.sleep(0.001)
        assert torch.equal(staged.model(announced).logits, expected)
        assert staged.placement.counters.stalls == 1 and staged.placement.counters.wait_s > 0
        hook.remove()
        # Not started yet (the worker is busy): the layer cancels it and stages the rows itself.
        busy = threading.Event()
        staged.placement.prefetcher.submit(busy.wait)
        announced = staged.placement.start_step(ids)
        prefetch = backend.ticket.prefetched
        assert torch.equal(staged.model(announced).logits, expected)
        assert prefetch.cancelled() and staged.placement.counters.stalls == 2
        busy.set()
    assert staged.placement.counters.unannounced == 0


def test_prefetch_counts_the_bytes_of_each_steps_unique_tokens(checkpoint, tmp_path):
    generator = generator_for(checkpoint, placement="disk", table_dir=str(tmp_path), prefetch=True, in_place=False)
    result = generator.generate(PROMPTS, InferenceConfig(max_new_tokens=3, temperature=0))
    rows = np.diff(open_checkpoint(checkpoint).tensor("lookups.0.lookup.bounds").numpy())
    fed = [sum(PROMPTS, [0])] + [step.tokens for step in result.steps[:-1]]  # the prefill has padding: id 0
    row_bytes = 64 * 4  # tied: one table of d_model = 64 fp32 columns
    assert generator.placement.counters.bytes_moved == sum(int(rows[np.unique(ids)].sum()) for ids in fed) * row_bytes
    assert generator.placement.counters.tokens == 3 * 7 + 2 * 3


def test_disk_tables_are_written_once_and_rewritten_when_stale(checkpoint, tmp_path):
    generator_for(checkpoint, placement="disk", table_dir=str(tmp_path)).placement.close()
    (npy,) = tmp_path.glob("*.npy")
    table = open_checkpoint(checkpoint).tensor("lookups.0.lookup.rows.key_table").numpy()
    assert np.array_equal(np.load(npy), table)
    written = npy.stat().st_mtime_ns
    generator_for(checkpoint, placement="disk", table_dir=str(tmp_path)).placement.close()
    assert npy.stat().st_mtime_ns == written  # reused
    with open(npy, "r+b") as handle:  # truncated by a crash of something else: rewritten
        handle.truncate(npy.stat().st_size - 4)
    generator_for(checkpoint, placement="disk", table_dir=str(tmp_path)).placement.close()
    assert np.array_equal(np.load(npy), table)


def mapped_resident_kb(path: Path) -> int:
    """kB of `path`'s memory maps in this process's resident set (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1] in "0123456789abcdef" and "-" in line.split()[0]:  # a mapping's header line
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_mapped_pages_keep_a_hot_set_and_release_past_the_budget(tmp_path, monkeypatch):
    monkeypatch.setattr("l3train.inference.placement.MAPPED_BYTES_BUDGET", 2 << 20)
    npy = tmp_path / "table.npy"  # 256 tokens × 64 rows of 1 KiB: 16 MiB
    np.save(npy, np.random.default_rng(0).standard_normal((256 * 64, 256), dtype=np.float32))
    rows = DiskRows(npy)
    table, pages = rows.in_place(), MappedPages([rows], np.arange(257) * 64)

    def forward(tokens: list[int]) -> None:  # what the kernel reads: every row of each token
        pages.record(torch.tensor(tokens))
        for token in tokens:
            float(table[token * 64:(token + 1) * 64].sum())

    for _ in range(40):  # a hot set of 8 tokens (512 KiB) stays mapped: never released
        forward(list(range(8)))
    assert pages.releases == 0 and mapped_resident_kb(npy) >= 512
    for first in range(8, 256, 8):  # a sweep over all 16 MiB
        forward(list(range(first, first + 8)))
    # Without releases the sweep would leave all 16 MiB mapped; with them, at most the budget
    # plus the pages the kernel's fault-around maps beside the touched ones.
    assert pages.releases >= 6 and mapped_resident_kb(npy) <= 4 << 10
    rows.close()


def test_generation_records_each_forward_for_the_mapped_pages(checkpoint, tmp_path, monkeypatch):
    sampling = InferenceConfig(max_new_tokens=4, temperature=0)
    generator = generator_for(checkpoint, placement="disk", table_dir=str(tmp_path))
    (pages,) = {id(layer.rows.pages): layer.rows.pages for layer in generator.model.l3_layers()}.values()
    (npy,) = tmp_path.glob("*.npy")
    step_logits(generator, sampling)
    assert pages.releases == 0 and mapped_resident_kb(npy) > 0  # the test model's tables are far below the budget
    monkeypatch.setattr("l3train.inference.placement.MAPPED_BYTES_BUDGET", 0)  # release before every forward
    assert torch.equal(step_logits(generator, sampling), step_logits(generator_for(checkpoint), sampling))
    assert pages.releases == 4  # the prefill and 3 decode steps, once for both layers
    generator.placement.close()


def test_a_truncated_table_file_is_refused_before_it_is_mapped(tmp_path):
    npy = tmp_path / "table.npy"
    np.save(npy, np.ones((64, 8), dtype=np.float32))
    with open(npy, "r+b") as handle:
        handle.truncate(npy.stat().st_size - 4)
    with pytest.raises(L3TrainError, match="truncated"):
        DiskRows(npy).in_place()


def test_filter_logits_keeps_the_top_k_and_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.15]]))
    kept = lambda scores: torch.isfinite(scores)[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, 1.0, 2, 1.0)) == [True, False, True, False]
    assert kept(filter_logits(logits, 1.0, 0, 0.8)) == [True, False, True, False]  # 0.5 + 0.3 reaches 0.8
    assert kept(filter_logits(logits, 1.0, 0, 0.81)) == [True, False, True, True]
    assert kept(filter_logits(logits, 1.0, 0, 0.1)) == [True, False, False, False]  # always the most likely


def run_generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "generate.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_generate_tool_streams_text_and_refuses_bad_input(checkpoint, tiny_corpus, tmp_path):
    from l3train.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tiny_corpus.tokenizer_path)
    prompt = tokenizer.encode_prompt("Return the")  # EOD first, as every document in training
    assert prompt[0] == tokenizer.eod_id and prompt[1:] == tokenizer.encode("Return the")
    expected = generator_for(checkpoint).generate([prompt], InferenceConfig(max_new_tokens=8, temperature=0,
                                                                            stop_tokens=(tokenizer.eod_id,)))
    for staged in ([], ["--staged"]):  # disk tables mapped and computed on in place, or staged
        result = run_generate(str(checkpoint), "--prompt", "Return the", "--max-new-tokens", "8", "--temperature",
                              "0", "--placement", "disk", "--table-dir", str(tmp_path), "--device", "cpu", "--stats",
                              *staged)
        assert result.returncode == 0, result.stderr
        assert result.stdout == tokenizer.decode(prompt + expected.tokens[0]) + "\n"
        assert ("bytes_moved=0 " in result.stderr) != bool(staged), result.stderr
    too_long = " ".join(["Return the value"] * 200)
    for args, message in [((str(tmp_path / "missing"), "--prompt", "x"), "not found"),
                          ((str(checkpoint), "--prompt", "x", "--top-p", "0"), "top-p"),
                          ((str(checkpoint), "--prompt", too_long), "exceeds the model's max_seq_len")]:
        failed = run_generate(*args)
        assert failed.returncode == 2 and failed.stderr.count("\n") == 1, failed.stderr
        assert failed.stderr.startswith("error: ") and message in failed.stderr
        assert failed.stdout == ""  # nothing streamed before the refusal
