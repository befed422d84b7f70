"""Generation from a training checkpoint (a run_dir) equals generation from its consolidation."""

from __future__ import annotations

import subprocess
import sys

import torch

from l3train.checkpoint.convert import consolidate
from l3train.data.tokenizer import Tokenizer
from l3train.inference.config import InferenceConfig
from l3train.inference.engine import Generator
from l3train.inference.loading import load_for_generation, open_checkpoint
from training_harness import REPO


def test_a_run_dir_generates_what_its_consolidated_checkpoint_generates(tiny_corpus, shared_runs, tmp_path):
    run_dir = shared_runs.get("tiny_l3").run_dir
    consolidated = consolidate(run_dir, tmp_path / "consolidated", progress=False)
    tokenizer = Tokenizer.load(tiny_corpus.tokenizer_path)
    prompt = tokenizer.encode("Return the value")
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
