"""Baseline config files written from an L³ config (tools/size_configs.py), and their summary.

A baseline file is the L³ file's settings with the sized backbone, no L³ layers and its own
run_dir; its header explains how it was sized and ends in a machine-readable `# sizes:`
line that tests/test_configs.py recomputes. The MoE file also records the command line
that wrote it (`# command:`), so the shipped files can be regenerated and compared.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from l3train.config import ModelConfig, config_from_dict
from l3train.sizing.accounting import ModelStats
from l3train.sizing.search import MOE_GOAL, Baselines, ffn_multiple

# The MoE config's header line with the command that wrote it; tests/test_configs.py reruns it.
COMMAND_LINE = re.compile(r"^# command: python tools/size_configs\.py (.+)$", re.MULTILINE)
# One machine-readable comment line per sized config; tests/test_configs.py recomputes it.
SIZES_LINE = re.compile(r"^# sizes: v=([\d,]+) mean_d_t=([\d.]+) \| total ([\d,]+) \| active ([\d,]+) "
                        r"\| flops/token ([\d,]+) \| sparsity ([\d.]+)x$", re.MULTILINE)


def sizes_line(stats: ModelStats, rows: int, mean_rows: float) -> str:
    """The `# sizes:` comment line for a config (rounded to whole parameters and FLOPs)."""
    return (f"# sizes: v={rows:,} mean_d_t={mean_rows:.2f} | total {stats.total_params:,} "
            f"| active {round(stats.active_params):,} | flops/token {round(stats.flops_per_token):,} "
            f"| sparsity {stats.sparsity:.2f}x")


class _FlowListDumper(yaml.SafeDumper):
    """Lists in flow style ([0, 1, 2]), mappings in block style."""


_FlowListDumper.add_representer(
    list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True))


def baseline_tree(config_path: Path, backbone: ModelConfig, output: Path) -> dict[str, Any]:
    """The L³ config's settings with `backbone`'s shape, no L³ layers and run_dir runs/<output stem>."""
    tree: dict[str, Any] = yaml.safe_load(config_path.read_text())
    tree["l3"] = {"after_blocks": []}
    tree["run_dir"] = f"runs/{output.stem}"
    tree["model"] = {**tree.get("model", {}), "d_model": backbone.d_model, "n_layers": backbone.n_layers,
                     "n_heads": backbone.n_heads, "n_kv_heads": backbone.n_kv_heads,
                     "ffn_hidden_size": backbone.ffn_hidden_size}
    return tree


def _moe_header(config_path: Path, sized: Baselines, command: str) -> str:
    """How the MoE was sized, what it misses, and its whole-model figures."""
    backbone, moe, stats, l3_stats, dense = sized.moe_backbone, sized.moe, sized.moe_stats, sized.l3_stats, sized.dense
    multiple = sized.experts_multiple
    misses = [f"{name} by {miss:.2%}" for name, miss in (
        ("FLOPs", abs(stats.flops_per_token / l3_stats.flops_per_token - 1)),
        ("sparsity", abs(stats.sparsity / l3_stats.sparsity - 1))) if miss > MOE_GOAL]
    return (f"# Iso-sparse MoE baseline of {config_path.name}, written by tools/size_configs.py:\n"
            f"# command: python tools/size_configs.py {command}\n"
            f"#   {backbone.n_layers} blocks, d_model {backbone.d_model}, {backbone.n_heads} heads "
            f"({backbone.n_kv_heads} KV); every block an MoE of {moe.num_experts} SwiGLU experts of "
            f"{moe.expert_hidden_size},\n"
            f"#   top-{moe.top_k}, dropless (model.ffn_hidden_size is unused); no L³ layers.\n"
            f"#   Forward FLOPs/token {stats.flops_per_token / l3_stats.flops_per_token:.4f}x and sparsity "
            f"{stats.sparsity / l3_stats.sparsity:.4f}x the L³ model's\n"
            f"#   (at its v = {sized.rows:,}, mean d_t = {sized.mean_rows:.2f}: sparsity {l3_stats.sparsity:.2f}x).\n"
            + (f"#   MISSES the {MOE_GOAL:.0%} goal: {' and '.join(misses)} (the closest the search found"
               + (f" with E a multiple of {multiple}" if multiple > 1 else "") + ").\n"
               if misses else "")
            + (f"#   E is a multiple of {multiple} (--moe-experts-multiple), so moe.expert_parallel "
               f"can be {multiple}\n#   (left at 1 here, which runs on any number of ranks).\n" if multiple > 1 else "")
            + (f"#   Backbone searched around the iso-FLOP dense one ({dense.n_layers} blocks, d_model "
               f"{dense.d_model}): integer E and h in steps of\n"
               f"#   {ffn_multiple(dense.d_model)} miss FLOPs or sparsity by over "
               f"{MOE_GOAL:.0%} on that one.\n"
               if (backbone.n_layers, backbone.d_model) != (dense.n_layers, dense.d_model) else "") +
            f"# Whole model: {stats.total_params / 1e6:,.3f}M total / {stats.active_params / 1e6:,.3f}M active "
            f"parameters (sparsity {stats.sparsity:.2f}x), {stats.flops_per_token / 1e6:,.3f}M FLOPs/token.\n"
            f"{sizes_line(stats, 0, 0.0)}\n")


def moe_yaml(config_path: Path, sized: Baselines, output: Path, command: str) -> str:
    """The MoE config: the L³ file's settings with the MoE backbone, MoE blocks and no L³ layers;
    `command` is the size_configs.py arguments recorded in its header."""
    moe = sized.moe
    tree = baseline_tree(config_path, sized.moe_backbone, output)
    tree["moe"] = {"blocks": list(moe.blocks), "num_experts": moe.num_experts, "top_k": moe.top_k,
                   "expert_hidden_size": moe.expert_hidden_size, "aux_loss_weight": moe.aux_loss_weight,
                   "z_loss_weight": moe.z_loss_weight, "capacity_factor": moe.capacity_factor}
    # Keep the section order of the L³ file, with moe: right after l3:.
    order = [key for key in tree if key != "moe"]
    at = order.index("l3") + 1
    tree = {key: tree[key] for key in order[:at] + ["moe"] + order[at:]}
    config_from_dict(tree)  # the file must load
    return _moe_header(config_path, sized, command) + yaml.dump(tree, Dumper=_FlowListDumper, sort_keys=False,
                                                                default_flow_style=False)


def dense_yaml(config_path: Path, sized: Baselines, output: Path) -> str:
    """The dense config: the L³ file's settings with the new backbone and no L³ layers."""
    dense, stats = sized.dense, sized.dense_stats
    tree = baseline_tree(config_path, dense, output)
    config_from_dict(tree)  # the file must load
    header = (f"# Iso-FLOP dense baseline of {config_path.name}, written by tools/size_configs.py:\n"
              f"#   {dense.n_layers} blocks, d_model {dense.d_model}, {dense.n_heads} heads ({dense.n_kv_heads} KV), "
              f"SwiGLU {dense.ffn_hidden_size}; no L³ layers.\n"
              f"#   Forward FLOPs/token {stats.flops_per_token / sized.l3_stats.flops_per_token:.4f}x the L³ model's "
              f"(at its v = {sized.rows:,}, mean d_t = {sized.mean_rows:.2f}).\n"
              f"{sizes_line(stats, 0, 0.0)}\n")
    return header + yaml.safe_dump(tree, sort_keys=False, default_flow_style=False)


def summary_lines(config_name: str, sized: Baselines, seq_length: int) -> list[str]:
    """The two baselines' shapes and their ratios to the L³ model, then a table of all three."""
    dense, backbone, moe = sized.dense, sized.moe_backbone, sized.moe
    l3_flops, l3_sparsity = sized.l3_stats.flops_per_token, sized.l3_stats.sparsity
    lines = [
        f"config {config_name}: v={sized.rows:,} rows per L³ layer, corpus mean d_t={sized.mean_rows:.2f}, "
        f"sequence length {seq_length}",
        f"iso-FLOP dense: {dense.n_layers} blocks, d_model {dense.d_model}, {dense.n_heads} heads "
        f"({dense.n_kv_heads} KV), SwiGLU {dense.ffn_hidden_size}; FLOPs ratio dense/L³ "
        f"{sized.dense_stats.flops_per_token / l3_flops:.4f}",
        f"iso-sparse MoE: {backbone.n_layers} blocks, d_model {backbone.d_model}, {backbone.n_heads} heads "
        f"({backbone.n_kv_heads} KV), {moe.num_experts} experts of {moe.expert_hidden_size} (top-{moe.top_k}, "
        f"dropless) in every block; FLOPs ratio MoE/L³ {sized.moe_stats.flops_per_token / l3_flops:.4f}, "
        f"sparsity ratio MoE/L³ {sized.moe_stats.sparsity / l3_sparsity:.4f}",
        f"{'model':<16} {'total params':>15} {'active params':>15} {'fwd FLOPs/token':>17} {'sparsity':>9}",
    ]
    for name, stats in (("L³", sized.l3_stats), ("iso-FLOP dense", sized.dense_stats),
                        ("iso-sparse MoE", sized.moe_stats)):
        lines.append(f"{name:<16} {stats.total_params:>15,} {round(stats.active_params):>15,} "
                     f"{round(stats.flops_per_token):>17,} {stats.sparsity:>8.2f}x")
    return lines
