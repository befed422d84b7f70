"""The memory planner's arithmetic (l3train.sizing.memory) and tools/memory_plan.py's command
line. What the figures are checked against on real training runs is
tests/integration/test_memory_plan.py; here the activation estimate is checked against what
autograd saves for small plain models, which pins every term of its formula."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from l3train.config import config_from_dict, load_config, validate_for_world
from l3train.errors import L3TrainError
from l3train.model.llama import DecoderLM
from l3train.sizing.accounting import model_stats
from l3train.sizing.memory import (activation_estimate, deepspeed_holding, gradient_bucket_bytes, markdown_table,
                                   parse_size, plan_memory, rank_elements)
from l3train.config import GRADIENT_BUCKET_ELEMENTS
from l3train.trainer.loss import lm_loss
from training_harness import REPO

TOOL = REPO / "tools" / "memory_plan.py"
TINY_ROWS = 32768  # configs/tiny_l3.yaml's v, so no test needs its allocation file


@pytest.mark.parametrize("stage, precision, expected", [
    # bytes per element of Ψ = 1000 on DP = 4: (parameters, gradients, optimizer)
    (0, "fp32", (4000, 4000, 8000)),
    (0, "bf16", (2000, 2000, 12000)),
    (1, "fp32", (4000, 4000, 3000)),
    (1, "bf16", (2000, 2000, 3000)),
    (2, "fp32", (4000, 1000, 3000)),
    (2, "bf16", (2000, 1000, 3000)),
    (3, "bf16", (500, 1000, 3000)),
])
def test_deepspeed_holds_what_each_zero_stage_keeps(stage, precision, expected):
    held = deepspeed_holding(1000, stage, precision, data_parallel=4)
    assert (held.parameters, held.gradients, held.optimizer) == expected


def test_gradient_bucket_by_stage():
    assert gradient_bucket_bytes(10**6, 2, "bf16", 8) == 2 * GRADIENT_BUCKET_ELEMENTS
    assert gradient_bucket_bytes(10**6, 1, "fp32", 8) == 4 * GRADIENT_BUCKET_ELEMENTS
    assert gradient_bucket_bytes(10**6, 3, "bf16", 8) == 4 * GRADIENT_BUCKET_ELEMENTS  # fp32, kept
    assert gradient_bucket_bytes(10**6, 0, "fp32", 8) == 4 * 10**6  # all-reduced in one flat copy
    assert gradient_bucket_bytes(10**10, 0, "bf16", 8) == 2 * GRADIENT_BUCKET_ELEMENTS
    assert gradient_bucket_bytes(10**6, 0, "fp32", 1) == 0  # alone: no all-reduce, no copy


def test_rank_elements_add_up_to_the_accounted_model():
    cfg = load_config(REPO / "configs/tiny_l3.yaml")
    total = model_stats(cfg.model, cfg.l3, cfg.data.seq_length, TINY_ROWS).total_params
    one = rank_elements(cfg, validate_for_world(cfg, 1), TINY_ROWS)
    assert (one.deepspeed, one.rows, one.experts) == (total, 0, 0)  # one rank: the tables are DeepSpeed's
    four = rank_elements(cfg, validate_for_world(cfg, 4), TINY_ROWS)
    tables = model_stats(cfg.model, cfg.l3, cfg.data.seq_length, TINY_ROWS).l3_table_params
    assert (four.deepspeed, four.rows) == (total - tables, tables // 4)


def test_tensor_parallelism_splits_all_but_the_norms():
    cfg = load_config(REPO / "configs/tiny_dense.yaml", ["parallel.tensor_parallel=2"])
    m = cfg.model
    total = model_stats(m, cfg.l3, cfg.data.seq_length).total_params
    norms = (2 * m.n_layers + 1) * m.d_model
    assert rank_elements(cfg, validate_for_world(cfg, 2)).deepspeed == (total - norms) // 2 + norms


def test_expert_parallel_experts_are_rank_local():
    cfg = load_config(REPO / "configs/tiny_moe.yaml", ["moe.expert_parallel=2", "moe.num_experts=24"])
    moe, d = cfg.moe, cfg.model.d_model
    experts = len(moe.blocks) * moe.num_experts * 3 * d * moe.expert_hidden_size
    split = rank_elements(cfg, validate_for_world(cfg, 2))
    assert split.experts == experts // 2
    total = model_stats(cfg.model, cfg.l3, cfg.data.seq_length, moe=moe).total_params
    assert split.deepspeed == total - experts


def test_the_allocation_or_rows_are_required_and_checked(tmp_path):
    cfg = load_config(REPO / "configs/tiny_l3.yaml", [f"l3.allocation={tmp_path / 'missing.npz'}"])
    with pytest.raises(L3TrainError, match="not found.*pass --rows"):
        plan_memory(cfg, "tiny", 1, 2)
    with pytest.raises(L3TrainError, match="--rows must be >= 1"):
        plan_memory(cfg, "tiny", 1, 2, rows=0)
    with pytest.raises(L3TrainError, match="--nodes and --gpus-per-node"):
        plan_memory(cfg, "tiny", 0, 2, rows=TINY_ROWS)


def _model_and_batch(cfg, rows_per_token):
    torch.manual_seed(0)
    model = DecoderLM(cfg.model, cfg.l3, rows_per_token, cfg.moe)
    if cfg.training.precision == "bf16":
        model = model.bfloat16()
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.training.micro_batch_size, cfg.data.seq_length))
    return model, tokens


def _saved_bytes(cfg, rows_per_token) -> int:
    """Bytes autograd saves for backward in a forward pass and loss of one micro-batch (by
    storage, parameters excluded), plus the logits the trainer holds."""
    model, tokens = _model_and_batch(cfg, rows_per_token)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = model(tokens)
        lm_loss(output.logits, tokens, torch.ones(tokens.shape))
    logits = output.logits.untyped_storage()
    return sum(saved.values()) + (0 if logits.data_ptr() in saved else logits.nbytes())


SMALL = {"model": {"vocab_size": 256, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                   "ffn_hidden_size": 96, "max_seq_len": 32},
         "data": {"seq_length": 32}, "training": {"micro_batch_size": 4, "global_batch_size": 4},
         "l3": {"allocation": "unused.npz", "d_emb": 64, "d_up": 160}}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["dense", "l3", "moe"])
def test_activation_estimate_is_what_autograd_saves(kind, precision):
    extra = {"dense": [], "l3": ["l3.after_blocks=[1]"], "moe": ["moe.blocks=[0]", "moe.num_experts=6",
                                                                "moe.expert_hidden_size=48"]}[kind]
    cfg = config_from_dict(SMALL, [f"training.precision={precision}", *extra])
    rows = np.full(cfg.model.vocab_size, 4) if cfg.l3.after_blocks else None
    planned = activation_estimate(cfg, validate_for_world(cfg, 1), device="cpu")
    assert planned.recomputed == 0
    assert planned.stored == pytest.approx(_saved_bytes(cfg, rows), rel=0.01)


def test_cuda_norms_keep_their_input_instead_of_two_fp32_copies():
    cfg = config_from_dict(SMALL, ["training.precision=bf16"])
    layout = validate_for_world(cfg, 1)
    norms = 2 * cfg.model.n_layers + 1
    positions, d = layout.micro_batch_size * cfg.data.seq_length, cfg.model.d_model
    saved = activation_estimate(cfg, layout, "cpu").stored - activation_estimate(cfg, layout, "cuda").stored
    assert saved == norms * positions * (4 * (2 * d + 1) - (2 * d + 4))
    with pytest.raises(L3TrainError, match="unknown device 'tpu'"):
        activation_estimate(cfg, layout, "tpu")


def test_recomputation_keeps_block_inputs_and_rebuilds_one_block():
    config = REPO / "configs/tiny_l3.yaml"
    cfg = load_config(config)
    layout = validate_for_world(cfg, 1)
    plans = {mode: activation_estimate(load_config(config, [f"training.recompute={mode}"]), layout, "cpu")
             for mode in ("none", "l3", "blocks")}
    assert plans["none"].stored > plans["l3"].stored > plans["blocks"].stored
    assert plans["none"].recomputed == 0 < plans["l3"].recomputed <= plans["blocks"].recomputed
    # "l3" trades each L³ block's activations (what backward rebuilds) for its input (fp32, d wide).
    block_input = 4 * cfg.model.d_model * layout.micro_batch_size * cfg.data.seq_length
    lookups = len(cfg.l3.after_blocks)
    assert plans["none"].stored - plans["l3"].stored == pytest.approx(
        lookups * (plans["l3"].recomputed - block_input), abs=2)


def test_paper_model_needs_recomputation_on_one_node():
    config = REPO / "configs/paper_2p6b_l3.yaml"
    stored = plan_memory(load_config(config), "2p6b", 1, 8, rows=710_000)
    recomputed = plan_memory(load_config(config, ["training.recompute=blocks"]), "2p6b", 1, 8, rows=710_000)
    assert not stored.fits(80 * 10**9) and recomputed.fits(80 * 10**9)
    assert recomputed.total < stored.total / 2
    table = markdown_table([stored, recomputed], 80 * 10**9)
    assert table.count("\n") == 3 and table.splitlines()[-1].endswith("| yes |")


@pytest.mark.parametrize("text, size", [("80GB", 80 * 10**9), ("141GiB", 141 * 2**30), ("1.5 TB", 15 * 10**11),
                                        ("512", 512), ("64mib", 64 * 2**20)])
def test_parse_size(text, size):
    assert parse_size(text) == size


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, cwd=REPO, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["--nodes", "1", "--gpus-per-node", "8", "--device-memory", "lots"], "--device-memory: expected a size"),
    (["--nodes", "0", "--gpus-per-node", "8", "--rows", "32768"], "--nodes and --gpus-per-node must be >= 1"),
    (["--nodes", "1", "--gpus-per-node", "8", "--zero", "4"], "argument --zero: invalid choice"),
    (["--nodes", "1", "--gpus-per-node", "8", "--tp", "3"], "is not divisible by parallel.tensor_parallel=3"),
    (["--nodes", "1", "--gpus-per-node", "3", "--tp", "2"], "parallel.tensor_parallel=2 must divide the number of ranks"),
    (["--nodes", "1", "--gpus-per-node", "2", "training.precision=bf16"], "need parallel.zero_stage 2 or 3"),
    (["--nodes", "1", "--gpus-per-node", "2", "l3.allocation=missing.npz"], "pass --rows to plan without it"),
    (["--gpus-per-node", "2"], "the following arguments are required: --nodes"),
])
def test_bad_input_is_one_line_and_status_2(args, message):
    result = run_tool("--config", "configs/tiny_l3.yaml", *args)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr


def test_the_tool_prints_a_table_and_json():
    common = ["--config", "configs/tiny_l3.yaml", "--config", "configs/tiny_dense.yaml", "--nodes", "1",
              "--nodes", "2", "--gpus-per-node", "2", "--rows", str(TINY_ROWS), "training.recompute=l3"]
    table = run_tool(*common)
    assert table.returncode == 0, table.stderr
    rows = [line for line in table.stdout.splitlines() if line.startswith("| tiny_")]
    assert [row.split(" | ")[1] for row in rows] == ["1×2", "2×2", "1×2", "2×2"]
    assert all("| l3 |" in row and row.endswith("| yes |") for row in rows)
    plans = json.loads(run_tool(*common, "--json", "--device-memory", "1GB").stdout)
    assert [plan["fits"] for plan in plans] == [False] * 4  # DeepSpeed's 2 GB bucket alone
    assert plans[1]["rows"]["parameters"] == TINY_ROWS // 4 * 128 * 4 * 2  # fp32, 2 layers, a quarter each


def test_help():
    result = run_tool("--help")
    assert result.returncode == 0 and "--device-memory" in result.stdout
