"""Generation from a training checkpoint (a run_dir) equals generation from its consolidation."""

from __future__ import annotations

import subprocess
import sys

import torch

from l3train.checkpoint.convert import TrainingCheckpoint, consolidate
from l3train.checkpoint.reader import open_checkpoint
from l3train.data.tokenizer import Tokenizer
from l3train.inference.config import InferenceConfig
from l3train.inference.engine import Generator
from l3train.inference.loading import load_for_generation
from shared_runs import BF16_ZERO2
from training_harness import REPO


def test_a_run_dir_generates_what_its_consolidated_checkpoint_generates(tiny_corpus, shared_runs, tmp_path):
    run_dir = shared_runs.get("tiny_l3").run_dir
    consolidated = consolidate(run_dir, tmp_path / "consolidated", progress=False)
    tokenizer = Tokenizer.load(tiny_corpus.tokenizer_path)
    prompt = tokenizer.encode_prompt("Return the value")
    sampling = InferenceConfig(max_new_tokens=8, temperature=0, stop_tokens=(tokenizer.eod_id,))
    steps = {}
    for name, path, placement in (("training", run_dir, "host"), ("consolidated", consolidated, "resident")):
        model, tables = load_for_generation(open_checkpoint(path), InferenceConfig(placement=placement),
                                            torch.device("cpu"))
        steps[name] = list(Generator(model, tables).stream([prompt], sampling))
    assert [step.tokens for step in steps["training"]] == [step.tokens for step in steps["consolidated"]]
    for trained, exported in zip(steps["training"], steps["consolidated"]):
        assert torch.equal(trained.logits, exported.logits)
    result = subprocess.run([sys.executable, str(REPO / "tools" / "generate.py"), str(run_dir),
                             "--prompt", "Return the value", "--max-new-tokens", "8", "--temperature", "0",
                             "--device", "cpu"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    new = [step.tokens[0] for step in steps["training"] if step.tokens[0] is not None]
    assert result.stdout == tokenizer.decode(prompt + new) + "\n"


def test_a_bf16_zero2_run_dir_generates_from_host_and_disk_tables(shared_runs, tmp_path):
    """Its fp32 master weights come from DeepSpeed's partitions, which are Parameters: read
    from the file, every tensor must come out detached, or the staged placements cannot copy
    rows out of it (tools/gpu_check.sh's inference part first found this)."""
    run_dir = shared_runs.get("equivalence", *BF16_ZERO2, nproc=2).run_dir
    assert not any(tensor.requires_grad for _, tensor in TrainingCheckpoint(run_dir, []).tensors())
    reader = open_checkpoint(run_dir)
    sampling = InferenceConfig(max_new_tokens=4, temperature=0)
    logits = {}
    for placement in ("resident", "host", "disk"):
        model, tables = load_for_generation(reader, InferenceConfig(placement=placement, table_dir=str(tmp_path)),
                                            torch.device("cpu"))
        logits[placement] = torch.stack([step.logits for step in Generator(model, tables).stream([[5, 6, 7]],
                                                                                                 sampling)])
        tables.close()
    assert torch.equal(logits["host"], logits["resident"]) and torch.equal(logits["disk"], logits["resident"])
