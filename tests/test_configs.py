"""The shipped configs: they load, their stated sizes are what the accounting computes,
the accounting matches the instantiated model, and dense baselines are iso-FLOP.

Paper-size models are built on the meta device (no memory), with a rows array of the
stated v; their sizes rest on the assumed corpus mean d_t written in the `# sizes:` line.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from l3train.config import Config, load_config
from l3train.model.accounting import ModelStats, model_stats
from l3train.model.llama import DecoderLM

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
TOOL = REPO / "tools" / "size_configs.py"
_SPEC = importlib.util.spec_from_file_location("size_configs", TOOL)
size_configs = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(size_configs)
SIZES_LINE, MOE_UNAVAILABLE = size_configs.SIZES_LINE, size_configs.MOE_UNAVAILABLE

# tiny_l3.yaml states its sizes in prose (measured on the quickstart allocation); all others carry a `# sizes:` line.
PROSE_SIZED = {"tiny_l3.yaml"}
TINY_L3_ROWS = 32768
# Every dense config is the iso-FLOP baseline of one L³ config.
ISO_FLOP_PAIRS = {"tiny_dense.yaml": "tiny_l3.yaml", "paper_800m_dense.yaml": "paper_800m_l3.yaml",
                  "paper_1p5b_dense.yaml": "paper_1p5b_l3.yaml", "paper_2p6b_dense.yaml": "paper_2p6b_l3.yaml"}


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
    return cfg, model_stats(cfg.model, cfg.l3, cfg.data.seq_length, rows, mean_rows)


def rows_array(vocab_size: int, total_rows: int) -> np.ndarray:
    """Rows per token summing exactly to `total_rows` (the total parameter count ignores their spread)."""
    rows = np.full(vocab_size, total_rows // vocab_size, dtype=np.int64)
    rows[: total_rows % vocab_size] += 1
    return rows


def test_the_expected_configs_ship():
    names = {path.name for path in CONFIGS}
    assert names >= {"tiny_l3.yaml", "tiny_l3_uniform.yaml", *ISO_FLOP_PAIRS, *ISO_FLOP_PAIRS.values()}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_accounting_counts_the_instantiated_model(path):
    cfg, stats = stats_of(path)
    rows, _ = stated_figures(path)
    with torch.device("meta"):
        model = DecoderLM(cfg.model, cfg.l3, rows_array(cfg.model.vocab_size, rows) if cfg.l3.after_blocks else None)
    assert stats.total_params == sum(p.numel() for p in model.parameters())


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


def test_paper_configs_land_near_the_papers_active_sizes():
    for name, active in (("paper_800m", 809e6), ("paper_1p5b", 1.5e9), ("paper_2p6b", 2.6e9)):
        for kind in ("l3", "dense"):
            _, stats = stats_of(REPO / "configs" / f"{name}_{kind}.yaml")
            assert stats.active_params == pytest.approx(active, rel=0.03), (name, kind)


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_size_configs_writes_a_loadable_iso_flop_dense_config(tmp_path):
    output = tmp_path / "dense.yaml"
    result = run_tool("--config", "configs/tiny_l3.yaml", "--rows", str(TINY_L3_ROWS),
                      "--mean-rows", str(tiny_l3_mean_rows()), "--output-dense", str(output))
    assert result.returncode == 0, result.stderr
    assert f"iso-sparse MoE   {MOE_UNAVAILABLE}" in result.stdout
    dense_cfg = load_config(output)
    assert not dense_cfg.l3.after_blocks
    _, l3 = stats_of(REPO / "configs" / "tiny_l3.yaml")
    dense = model_stats(dense_cfg.model, dense_cfg.l3, dense_cfg.data.seq_length)
    assert dense.flops_per_token == pytest.approx(l3.flops_per_token, rel=0.02)
    assert dense_cfg.model.d_model // dense_cfg.model.n_heads == 32  # head size kept
    stated = SIZES_LINE.search(output.read_text())
    assert int(stated.group(5).replace(",", "")) == round(dense.flops_per_token)
    assert yaml.safe_load(output.read_text())["run_dir"] == "runs/dense"


@pytest.mark.parametrize("args, message", [
    (["--config", "configs/tiny_dense.yaml", "--rows", "10", "--mean-rows", "2"], "has no L³ layers"),
    (["--config", "configs/tiny_l3.yaml", "--rows", "32768"], "--rows and --mean-rows go together"),
    (["--config", "configs/tiny_l3.yaml", "--rows", "100", "--mean-rows", "0"], "--mean-rows must be in"),
    (["--config", "configs/missing.yaml"], "not found"),
    (["--config", "configs/tiny_l3.yaml", "--rows", "many", "--mean-rows", "2"], "invalid int value"),
])
def test_size_configs_bad_input_is_one_line_exit_2(args, message):
    result = run_tool(*args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr
    assert result.stdout == ""
