"""The shipped configs: they load, their stated sizes are what the accounting computes,
the accounting matches the instantiated model, dense baselines are iso-FLOP and MoE
baselines iso-sparse (same FLOPs and total/active ratio as their L³ model).

Paper-size models are built on the meta device (no memory), with a rows array of the
stated v; their sizes rest on the assumed corpus mean d_t written in the `# sizes:` line.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from l3train.config import Config, L3Config, ModelConfig, MoEConfig, config_from_dict, load_config
from l3train.model.llama import DecoderLM
from l3train.sizing import search
from l3train.sizing.accounting import ModelStats, model_stats
from l3train.sizing.baseline_configs import COMMAND_LINE, SIZES_LINE
from training_harness import REPO

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
TOOL = REPO / "tools" / "size_configs.py"

# tiny_l3.yaml states its sizes in prose (measured on the quickstart allocation); all others carry a `# sizes:` line.
PROSE_SIZED = {"tiny_l3.yaml"}
TINY_L3_ROWS = 32768
# Every dense config is the iso-FLOP baseline of one L³ config.
ISO_FLOP_PAIRS = {"tiny_dense.yaml": "tiny_l3.yaml", "paper_800m_dense.yaml": "paper_800m_l3.yaml",
                  "paper_1p5b_dense.yaml": "paper_1p5b_l3.yaml", "paper_2p6b_dense.yaml": "paper_2p6b_l3.yaml"}
# Every all-MoE config is the iso-sparse baseline of one L³ config.
ISO_SPARSE_PAIRS = {"tiny_moe.yaml": "tiny_l3.yaml", "paper_800m_moe.yaml": "paper_800m_l3.yaml",
                    "paper_1p5b_moe.yaml": "paper_1p5b_l3.yaml", "paper_2p6b_moe.yaml": "paper_2p6b_l3.yaml"}
# The paper MoEs have a number of experts that is a multiple of 8 (--moe-experts-multiple 8 in
# their `# command:` line), so moe.expert_parallel can split them over a node of 8 GPUs.
EXPERTS_MULTIPLE = {"tiny_moe.yaml": 1, "paper_800m_moe.yaml": 8, "paper_1p5b_moe.yaml": 8,
                    "paper_2p6b_moe.yaml": 8}
# The tool aims at both within search.MOE_GOAL (1%) and reaches it for every shipped
# config, the paper ones with E a multiple of 8 included (worst: FLOPs 0.65% for tiny, 0.36%
# for 2p6b; sparsity 0.69% for 2p6b), so the tests hold it to the same 1%: FLOPs must be
# within 1%, sparsity within 1%.
ISO_SPARSE_FLOPS_TOL = 0.01
ISO_SPARSE_SPARSITY_TOL = 0.01


def tiny_l3_mean_rows() -> float:
    """The corpus mean d_t that tiny_l3.yaml's comment states (from the quickstart allocation)."""
    match = re.search(r"corpus mean d_t = ([\d.]+)", (REPO / "configs" / "tiny_l3.yaml").read_text())
    assert match, "tiny_l3.yaml no longer states its corpus mean d_t"
    return float(match.group(1))


def stated_figures(path: Path) -> tuple[int, float]:
    """(v, mean d_t) a config's sizes were computed at."""
    if path.name in PROSE_SIZED:
        return TINY_L3_ROWS, tiny_l3_mean_rows()
    match = SIZES_LINE.search(path.read_text())
    assert match, f"{path.name} has no '# sizes:' comment line"
    return int(match.group(1).replace(",", "")), float(match.group(2))


def stats_of(path: Path) -> tuple[Config, ModelStats]:
    cfg = load_config(path)
    rows, mean_rows = stated_figures(path)
    return cfg, model_stats(cfg.model, cfg.l3, cfg.data.seq_length, rows, mean_rows, cfg.moe)


def rows_array(vocab_size: int, total_rows: int) -> np.ndarray:
    """Rows per token summing exactly to `total_rows` (the total parameter count ignores their spread)."""
    rows = np.full(vocab_size, total_rows // vocab_size, dtype=np.int64)
    rows[: total_rows % vocab_size] += 1
    return rows


def test_the_expected_configs_ship():
    names = {path.name for path in CONFIGS}
    assert names >= {"tiny_l3.yaml", "tiny_l3_uniform.yaml", "tiny_l3_moe.yaml", *ISO_FLOP_PAIRS,
                     *ISO_FLOP_PAIRS.values(), *ISO_SPARSE_PAIRS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_accounting_counts_the_instantiated_model(path):
    cfg, stats = stats_of(path)
    rows, _ = stated_figures(path)
    with torch.device("meta"):
        model = DecoderLM(cfg.model, cfg.l3, rows_array(cfg.model.vocab_size, rows) if cfg.l3.after_blocks else None,
                          cfg.moe)
    assert stats.total_params == sum(p.numel() for p in model.parameters())
    assert sorted(model.moe_layers()) == sorted(cfg.moe.blocks)


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name not in PROSE_SIZED], ids=lambda p: p.name)
def test_stated_sizes_are_the_accountings(path):
    match = SIZES_LINE.search(path.read_text())
    assert match, f"{path.name} has no '# sizes:' comment line"
    _, stats = stats_of(path)
    total, active, flops = (int(match.group(i).replace(",", "")) for i in (3, 4, 5))
    assert (total, active, flops) == (stats.total_params, round(stats.active_params), round(stats.flops_per_token))
    assert float(match.group(6)) == pytest.approx(stats.sparsity, abs=0.005)
    # The prose above the sizes line repeats the whole-model figures; keep them in step.
    header = path.read_text().split("run_dir:")[0]
    assert f"sparsity {stats.sparsity:.2f}x" in header


@pytest.mark.parametrize("dense_name", sorted(ISO_FLOP_PAIRS))
def test_dense_configs_are_iso_flop_with_their_l3_config(dense_name):
    dense_cfg, dense = stats_of(REPO / "configs" / dense_name)
    _, l3 = stats_of(REPO / "configs" / ISO_FLOP_PAIRS[dense_name])
    assert not dense_cfg.l3.after_blocks
    assert dense.flops_per_token == pytest.approx(l3.flops_per_token, rel=0.02)


@pytest.mark.parametrize("moe_name", sorted(ISO_SPARSE_PAIRS))
def test_moe_configs_are_iso_sparse_with_their_l3_config(moe_name):
    moe_cfg, moe = stats_of(REPO / "configs" / moe_name)
    _, l3 = stats_of(REPO / "configs" / ISO_SPARSE_PAIRS[moe_name])
    assert not moe_cfg.l3.after_blocks
    assert moe_cfg.moe.blocks == list(range(moe_cfg.model.n_layers))
    assert moe_cfg.moe.capacity_factor is None  # dropless: the FLOPs count assumes it
    flops_miss = abs(moe.flops_per_token / l3.flops_per_token - 1)
    sparsity_miss = abs(moe.sparsity / l3.sparsity - 1)
    print(f"{moe_name}: FLOPs miss {flops_miss:.4%} (tolerance {ISO_SPARSE_FLOPS_TOL:.0%}), "
          f"sparsity {moe.sparsity:.3f}x vs {l3.sparsity:.3f}x, miss {sparsity_miss:.4%} "
          f"(tolerance {ISO_SPARSE_SPARSITY_TOL:.0%})")
    assert flops_miss <= ISO_SPARSE_FLOPS_TOL
    assert sparsity_miss <= ISO_SPARSE_SPARSITY_TOL


def test_tiny_moe_is_trainable_on_cpu():
    cfg = load_config(REPO / "configs" / "tiny_moe.yaml")
    assert cfg.moe.num_experts <= 64 and cfg.moe.expert_hidden_size >= 32


def test_paper_configs_land_near_the_papers_active_sizes():
    for name, active in (("paper_800m", 809e6), ("paper_1p5b", 1.5e9), ("paper_2p6b", 2.6e9)):
        for kind in ("l3", "dense", "moe"):
            _, stats = stats_of(REPO / "configs" / f"{name}_{kind}.yaml")
            assert stats.active_params == pytest.approx(active, rel=0.03), (name, kind)


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, cwd=REPO, timeout=120)


def table_rows(stdout: str) -> dict[str, tuple[int, int, int, float]]:
    """The tool's sizes table: model name → (total, active, FLOPs/token, sparsity)."""
    rows = {}
    for line in stdout.splitlines():
        match = re.match(r"^(L³|iso-FLOP dense|iso-sparse MoE) +([\d,]+) +([\d,]+) +([\d,]+) +([\d.]+)x$", line)
        if match:
            rows[match.group(1)] = (*(int(match.group(i).replace(",", "")) for i in (2, 3, 4)),
                                    float(match.group(5)))
    return rows


def figures(stats: ModelStats) -> tuple[int, int, int, float]:
    return stats.total_params, round(stats.active_params), round(stats.flops_per_token), round(stats.sparsity, 2)


def test_size_configs_writes_a_loadable_iso_flop_dense_config(tmp_path):
    output = tmp_path / "dense.yaml"
    result = run_tool("--config", "configs/tiny_l3.yaml", "--rows", str(TINY_L3_ROWS),
                      "--mean-rows", str(tiny_l3_mean_rows()), "--output-dense", str(output))
    assert result.returncode == 0, result.stderr
    assert list(table_rows(result.stdout)) == ["L³", "iso-FLOP dense", "iso-sparse MoE"]
    dense_cfg = load_config(output)
    assert not dense_cfg.l3.after_blocks
    _, l3 = stats_of(REPO / "configs" / "tiny_l3.yaml")
    dense = model_stats(dense_cfg.model, dense_cfg.l3, dense_cfg.data.seq_length)
    assert dense.flops_per_token == pytest.approx(l3.flops_per_token, rel=0.02)
    assert dense_cfg.model.d_model // dense_cfg.model.n_heads == 32  # head size kept
    stated = SIZES_LINE.search(output.read_text())
    assert int(stated.group(5).replace(",", "")) == round(dense.flops_per_token)
    assert yaml.safe_load(output.read_text())["run_dir"] == "runs/dense"
    assert table_rows(result.stdout)["iso-FLOP dense"] == figures(dense)


def shipped_command(moe_name: str) -> list[str]:
    """The size_configs.py arguments recorded in a shipped MoE config's `# command:` line."""
    match = COMMAND_LINE.search((REPO / "configs" / moe_name).read_text())
    assert match, f"{moe_name} has no '# command:' line"
    return shlex.split(match.group(1))


@pytest.mark.parametrize("moe_name", sorted(ISO_SPARSE_PAIRS))
def test_size_configs_writes_the_shipped_iso_sparse_moe_config(tmp_path, moe_name):
    """Rerun the command line a shipped MoE config records: it writes that file, header and all."""
    l3_name, shipped = ISO_SPARSE_PAIRS[moe_name], REPO / "configs" / moe_name
    args = shipped_command(moe_name)
    assert args[args.index("--config") + 1] == f"configs/{l3_name}"
    assert args[args.index("--output-moe") + 1] == f"configs/{moe_name}"
    multiple = EXPERTS_MULTIPLE[moe_name]
    assert int(args[args.index("--moe-experts-multiple") + 1]) == multiple if multiple > 1 \
        else "--moe-experts-multiple" not in args
    output = tmp_path / moe_name  # same file name: same run_dir
    args[args.index("--output-moe") + 1] = str(output)
    result = run_tool(*args)
    assert result.returncode == 0, result.stderr
    table = table_rows(result.stdout)
    assert list(table) == ["L³", "iso-FLOP dense", "iso-sparse MoE"]
    _, l3 = stats_of(REPO / "configs" / l3_name)
    moe_cfg = load_config(output)
    moe = model_stats(moe_cfg.model, moe_cfg.l3, moe_cfg.data.seq_length, moe=moe_cfg.moe)
    assert table["L³"] == figures(l3)
    assert table["iso-sparse MoE"] == figures(moe)
    assert not moe_cfg.l3.after_blocks and moe_cfg.moe.blocks == list(range(moe_cfg.model.n_layers))
    assert moe_cfg.moe.num_experts % multiple == 0
    assert moe.flops_per_token == pytest.approx(l3.flops_per_token, rel=ISO_SPARSE_FLOPS_TOL)
    assert moe.sparsity == pytest.approx(l3.sparsity, rel=ISO_SPARSE_SPARSITY_TOL)
    stated = SIZES_LINE.search(output.read_text())
    assert stated and (int(stated.group(1).replace(",", "")), float(stated.group(2))) == (0, 0.0)
    assert int(stated.group(3).replace(",", "")) == moe.total_params
    assert yaml.safe_load(output.read_text())["run_dir"] == f"runs/{shipped.stem}"
    # The shipped baseline is what the tool writes today (its header and all).
    assert output.read_text().replace(shlex.quote(str(output)), f"configs/{moe_name}") == shipped.read_text()


@pytest.mark.parametrize("moe_name", [name for name, multiple in EXPERTS_MULTIPLE.items() if multiple > 1])
def test_paper_moe_experts_split_over_a_node_of_8(moe_name):
    text = (REPO / "configs" / moe_name).read_text()
    assert "E is a multiple of 8 (--moe-experts-multiple), so moe.expert_parallel can be 8" in text
    tree = yaml.safe_load(text)
    tree["moe"]["expert_parallel"] = 8  # what a user on nodes of 8 GPUs sets: the config still loads
    assert config_from_dict(tree).moe.num_experts % 8 == 0


@pytest.mark.parametrize("multiple", [1, 3, 8, 16])
def test_iso_sparse_moe_honours_the_experts_multiple(multiple):
    cfg = load_config(REPO / "configs" / "tiny_l3.yaml")
    seq = cfg.data.seq_length
    l3 = model_stats(cfg.model, cfg.l3, seq, TINY_L3_ROWS, tiny_l3_mean_rows())
    dense = search.iso_flop_dense(cfg.model, seq, l3.flops_per_token)
    _, moe = search.iso_sparse_moe(dense, seq, l3.flops_per_token, l3.sparsity, 2, multiple)
    assert moe.num_experts % multiple == 0 and moe.num_experts >= 2


def test_size_configs_honours_the_experts_multiple(tmp_path):
    """The CLI with a multiple under which tiny misses the sparsity goal: E still a multiple, the miss stated."""
    output = tmp_path / "moe.yaml"
    result = run_tool("--config", "configs/tiny_l3.yaml", "--rows", str(TINY_L3_ROWS), "--mean-rows", "67.40",
                      "--moe-experts-multiple", "8", "--output-moe", str(output))
    assert result.returncode == 0, result.stderr
    printed = re.search(r"^iso-sparse MoE: .* (\d+) experts of", result.stdout, re.MULTILINE)
    moe_cfg = load_config(output)
    assert int(printed.group(1)) == moe_cfg.moe.num_experts and moe_cfg.moe.num_experts % 8 == 0
    text = output.read_text()
    assert "--moe-experts-multiple 8" in COMMAND_LINE.search(text).group(1)
    _, l3 = stats_of(REPO / "configs" / "tiny_l3.yaml")
    moe = model_stats(moe_cfg.model, moe_cfg.l3, moe_cfg.data.seq_length, moe=moe_cfg.moe)
    sparsity_miss = abs(moe.sparsity / l3.sparsity - 1)
    assert sparsity_miss > search.MOE_GOAL  # so the header must own up to it
    assert "MISSES the 1% goal: " in text and f"sparsity by {sparsity_miss:.2%}" in text


def tiny_moe_model(l3_blocks: list[int]) -> tuple[DecoderLM, ModelConfig, L3Config, MoEConfig, np.ndarray]:
    torch.manual_seed(0)
    m = ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden_size=88,
                    max_seq_len=16)
    l3 = L3Config(after_blocks=l3_blocks, d_emb=32, d_up=48, allocation="unused.npz")
    moe = MoEConfig(blocks=[0, 2, 3], num_experts=5, top_k=2, expert_hidden_size=24)
    rows = rows_array(m.vocab_size, 3 * m.vocab_size)
    return DecoderLM(m, l3, rows if l3_blocks else None, moe), m, l3, moe, rows


@pytest.mark.parametrize("l3_blocks", [[], [1]], ids=["moe", "l3+moe"])
def test_moe_active_params_are_a_direct_count_of_the_model(l3_blocks):
    model, m, l3, moe, rows = tiny_moe_model(l3_blocks)
    moe_layers = model.moe_layers()
    expert_params = {id(p) for layer in moe_layers.values() for p in layer.experts.parameters()}
    l3_tables = {id(p) for name, p in model.named_parameters() if ".lookup." in name and "_table" in name}
    assert len(moe_layers) == len(moe.blocks) and len(l3_tables) == (len(l3_blocks) if l3_blocks else 0)
    # Everything but the experts and the L³ tables (routers included), plus top_k experts' slices per MoE block.
    direct = sum(p.numel() for p in model.parameters() if id(p) not in expert_params | l3_tables)
    direct += sum(moe.top_k * sum(p[0].numel() for p in layer.experts.parameters()) for layer in moe_layers.values())
    mean_rows = float(np.mean(rows))  # every token has the same rows, so the mean d_t is exact
    # A token's own L³ rows: d_t keys (tied: the values are the keys).
    direct += len(l3_blocks) * mean_rows * m.d_model
    stats = model_stats(m, l3, 16, int(rows.sum()), mean_rows, moe)
    assert stats.active_params == pytest.approx(direct, abs=1e-6)
    assert stats.total_params == sum(p.numel() for p in model.parameters())
    dense = model_stats(m, l3, 16, int(rows.sum()), mean_rows)
    assert stats.active_params != dense.active_params  # the MoE is counted, not ignored


def test_moe_flops_are_the_measured_matmul_flops():
    """The MoE's share of the forward FLOPs (router and the top_k experts' matmuls, dropless)
    against the SwiGLU it replaces, measured with torch's FLOP counter on a real forward pass."""
    model, m, l3, moe, _ = tiny_moe_model([])
    dense_model = DecoderLM(m, l3)
    tokens = torch.randint(0, m.vocab_size, (3, 16))

    def measured(net: DecoderLM) -> float:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            net(tokens)
        return counter.get_total_flops() / tokens.numel()

    accounted = model_stats(m, l3, 16, moe=moe).flops_per_token - model_stats(m, l3, 16).flops_per_token
    assert accounted != 0
    assert measured(model) - measured(dense_model) == pytest.approx(accounted, rel=1e-9)


@pytest.mark.parametrize("args, message", [
    (["--config", "configs/tiny_dense.yaml", "--rows", "10", "--mean-rows", "2"], "has no L³ layers"),
    (["--config", "configs/tiny_l3.yaml", "--rows", "32768"], "--rows and --mean-rows go together"),
    (["--config", "configs/tiny_l3.yaml", "--rows", "100", "--mean-rows", "0"], "--mean-rows must be in"),
    (["--config", "configs/missing.yaml"], "not found"),
    (["--config", "configs/tiny_l3.yaml", "--rows", "many", "--mean-rows", "2"], "invalid int value"),
    (["--config", "configs/tiny_l3.yaml", "--rows", "100", "--mean-rows", "2", "--moe-top-k", "0"],
     "--moe-top-k must be >= 1"),
    (["--config", "configs/tiny_l3.yaml", "--rows", "100", "--mean-rows", "2", "--moe-experts-multiple", "0"],
     "--moe-experts-multiple must be in [1, 128], got 0"),
    (["--config", "configs/tiny_l3.yaml", "--rows", "100", "--mean-rows", "2", "--moe-experts-multiple", "-8"],
     "--moe-experts-multiple must be in [1, 128], got -8"),
    (["--config", "configs/tiny_l3.yaml", "--rows", "100", "--mean-rows", "2", "--moe-experts-multiple", "eight"],
     "invalid int value"),
    (["--config", "configs/tiny_l3_moe.yaml", "--rows", "100", "--mean-rows", "2"], "already has MoE blocks"),
])
def test_size_configs_bad_input_is_one_line_exit_2(args, message):
    result = run_tool(*args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name.startswith("paper_")], ids=lambda p: p.name)
def test_paper_configs_can_shard_rows_and_experts_on_many_ranks(path):
    """Paper runs are multi-GPU: the trainer's precondition for sharded L³ rows and
    expert-parallel experts (bf16 needs ZeRO-2/3) must hold for the shipped files."""
    from l3train.config import validate_for_world

    cfg = load_config(path)
    ranks = 8 * cfg.parallel.tensor_parallel * cfg.moe.expert_parallel
    layout = validate_for_world(cfg, ranks)
    assert layout.rows_sharded == bool(cfg.l3.after_blocks)
    assert layout.experts_split == (bool(cfg.moe.blocks) and cfg.moe.expert_parallel > 1)
