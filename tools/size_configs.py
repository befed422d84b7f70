#!/usr/bin/env python
"""Size the baselines of an L³ config: the iso-FLOP dense model and the iso-sparse MoE.

The paper compares an L³ model with a dense model of the same forward FLOPs per token
(iso-FLOP) and with an MoE of the same FLOPs and sparsity (iso-sparse). This tool finds
- the dense backbone: same head size and grouped-query ratio, a search over n_layers and
  n_heads with the SwiGLU size solved for the FLOPs;
- the MoE: every block an MoE block with top_k experts (--moe-top-k), a search over the
  number of experts E and over backbones around the dense one, with the expert size solved
  for the FLOPs (see `iso_sparse_moe`); --moe-experts-multiple N restricts E to multiples
  of N, so that moe.expert_parallel can be N (it must divide E): 8 for nodes of 8 GPUs;
and prints total/active parameters, FLOPs/token and sparsity of all three from
`l3train.model.accounting` (MoE FLOPs assume dropless dispatch).

    python tools/size_configs.py --config configs/tiny_l3.yaml --output-dense configs/tiny_dense.yaml
    python tools/size_configs.py --config configs/paper_800m_l3.yaml --rows 710000 --mean-rows 300 \\
        --moe-experts-multiple 8 --output-moe configs/paper_800m_moe.yaml

The MoE config's header records the command line that wrote it (`# command:`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from l3train.config import Config, ModelConfig, MoEConfig, config_from_dict, load_config
from l3train.errors import CliArgumentParser, L3TrainError, run_cli
from l3train.model.accounting import ModelStats, add_l3_figure_arguments, l3_figures, model_stats
from l3train.utils.atomic import atomic_write_text

# The iso-sparse MoE search aims at both FLOPs and sparsity within this relative distance.
MOE_GOAL = 0.01
MAX_EXPERTS = 128
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


def ffn_multiple(d_model: int) -> int:
    """SwiGLU size granularity: 8 for toy widths, 256 (tensor-core and TP friendly) from d_model 1024."""
    return 256 if d_model >= 1024 else 8


def dense_stats(m: ModelConfig, seq_length: int) -> ModelStats:
    return model_stats(m, dataclasses.replace(Config().l3, after_blocks=[]), seq_length)


def iso_flop_dense(m: ModelConfig, seq_length: int, target_flops: float) -> ModelConfig:
    """The dense backbone closest in shape to `m` whose forward FLOPs/token match `target_flops`.

    Head size and the query/KV head ratio are kept; every n_layers in [L, 2L] and
    n_heads in [H, 2H] (a multiple of the group size) is tried with the SwiGLU size solved
    for the FLOPs (they are linear in it) and rounded to `ffn_multiple`. Candidates
    within 1% of the target are ranked by how far the ffn/d_model ratio moves from the
    original's; if none is within 1%, the closest in FLOPs wins.
    """
    head_dim = m.d_model // m.n_heads
    group = m.n_heads // m.n_kv_heads
    base_ratio = m.ffn_hidden_size / m.d_model
    best: tuple[float, float, ModelConfig] | None = None
    for n_layers in range(m.n_layers, 2 * m.n_layers + 1):
        for n_heads in range(m.n_heads, 2 * m.n_heads + 1, group):
            shape = dataclasses.replace(m, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads // group,
                                        d_model=n_heads * head_dim)
            fixed = dense_stats(dataclasses.replace(shape, ffn_hidden_size=0), seq_length).flops_per_token
            per_unit = dense_stats(dataclasses.replace(shape, ffn_hidden_size=1), seq_length).flops_per_token - fixed
            step = ffn_multiple(shape.d_model)
            ffn = round((target_flops - fixed) / per_unit / step) * step
            if ffn < step:
                continue
            candidate = dataclasses.replace(shape, ffn_hidden_size=ffn)
            miss = abs(dense_stats(candidate, seq_length).flops_per_token / target_flops - 1)
            key = (0.0 if miss <= 0.01 else miss, abs(math.log(ffn / shape.d_model / base_ratio)))
            if best is None or key < best[:2]:
                best = (*key, candidate)
    if best is None:
        raise L3TrainError(f"no dense backbone up to {2 * m.n_layers} layers and {2 * m.n_heads} heads "
                           f"reaches {target_flops:,.0f} FLOPs/token")
    return best[2]


def moe_stats(m: ModelConfig, moe: MoEConfig, seq_length: int) -> ModelStats:
    return model_stats(m, dataclasses.replace(Config().l3, after_blocks=[]), seq_length, moe=moe)


def iso_sparse_moe(dense: ModelConfig, seq_length: int, target_flops: float, target_sparsity: float,
                   top_k: int = 2, experts_multiple: int = 1) -> tuple[ModelConfig, MoEConfig]:
    """An all-MoE model with the forward FLOPs/token and the sparsity (total/active) of the L³ model.

    Every block is an MoE block of E experts, top_k active. For a backbone, FLOPs are linear
    in the expert size h, so h is solved for `target_flops` and rounded to `ffn_multiple`;
    the sparsity then follows from E. E runs over the multiples of `experts_multiple` in
    [top_k, MAX_EXPERTS] (a multiple of 8 lets moe.expert_parallel be 8). Integer E and the
    rounding of h make the iso-FLOP dense backbone alone miss the goals by a few percent
    (FLOPs by up to 3% at paper sizes, where h moves in steps of 256), so backbones around
    it are tried too: same head size and grouped-query ratio, n_layers within ±50% and
    n_heads within ±25% of the dense backbone's. Candidates with FLOPs and sparsity both
    within MOE_GOAL of the targets are ranked by how far the backbone moves from the dense
    one (|log| of the layer and head ratios, summed), then by sparsity and FLOPs miss; if none
    meets the goals, the ones missing them least win (FLOPs first, then sparsity).
    `ffn_hidden_size` is kept from `dense` (unused: no block keeps a dense SwiGLU).
    """
    if experts_multiple < 1:
        raise L3TrainError(f"--moe-experts-multiple must be >= 1, got {experts_multiple}")
    first_experts = -(-top_k // experts_multiple) * experts_multiple  # top_k rounded up to the multiple
    head_dim = dense.d_model // dense.n_heads
    group = dense.n_heads // dense.n_kv_heads
    layers0, heads0 = dense.n_layers, dense.n_heads
    min_heads = max(group, -(-(heads0 - heads0 // 4) // group) * group)  # rounded up to the group size
    best: tuple | None = None
    for n_layers in range(max(1, layers0 - layers0 // 2), layers0 + layers0 // 2 + 1):
        for n_heads in range(min_heads, heads0 + heads0 // 4 + 1, group):
            shape = dataclasses.replace(dense, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads // group,
                                        d_model=n_heads * head_dim)
            step = ffn_multiple(shape.d_model)
            distance = abs(math.log(n_layers / layers0)) + abs(math.log(n_heads / heads0))
            for num_experts in range(first_experts, MAX_EXPERTS + 1, experts_multiple):
                moe = MoEConfig(blocks=list(range(n_layers)), num_experts=num_experts, top_k=top_k,
                                expert_hidden_size=0)
                fixed = moe_stats(shape, moe, seq_length).flops_per_token
                per_unit = moe_stats(shape, dataclasses.replace(moe, expert_hidden_size=1),
                                     seq_length).flops_per_token - fixed
                hidden = round((target_flops - fixed) / per_unit / step) * step
                if hidden < step:
                    continue
                moe = dataclasses.replace(moe, expert_hidden_size=hidden)
                stats = moe_stats(shape, moe, seq_length)
                flops_miss = abs(stats.flops_per_token / target_flops - 1)
                sparsity_miss = abs(stats.sparsity / target_sparsity - 1)
                key = (max(flops_miss - MOE_GOAL, 0.0), max(sparsity_miss - MOE_GOAL, 0.0), distance,
                       sparsity_miss, flops_miss)
                if best is None or key < best[0]:
                    best = (key, shape, moe)
    if best is None:
        multiple = f" (a multiple of {experts_multiple})" if experts_multiple > 1 else ""
        raise L3TrainError(f"no MoE with top_k {top_k} and up to {MAX_EXPERTS} experts{multiple} "
                           f"reaches {target_flops:,.0f} FLOPs/token")
    return best[1], best[2]


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


def moe_yaml(config_path: Path, backbone: ModelConfig, moe: MoEConfig, stats: ModelStats, l3_stats: ModelStats,
             dense: ModelConfig, rows: int, mean_rows: float, output: Path, experts_multiple: int,
             command: str) -> str:
    """The MoE config: the L³ file's settings with the MoE backbone, MoE blocks and no L³ layers."""
    tree = baseline_tree(config_path, backbone, output)
    tree["moe"] = {"blocks": list(moe.blocks), "num_experts": moe.num_experts, "top_k": moe.top_k,
                   "expert_hidden_size": moe.expert_hidden_size, "aux_loss_weight": moe.aux_loss_weight,
                   "z_loss_weight": moe.z_loss_weight, "capacity_factor": moe.capacity_factor}
    # Keep the section order of the L³ file, with moe: right after l3:.
    order = [key for key in tree if key != "moe"]
    at = order.index("l3") + 1
    tree = {key: tree[key] for key in order[:at] + ["moe"] + order[at:]}
    config_from_dict(tree)  # the file must load
    flops_miss = abs(stats.flops_per_token / l3_stats.flops_per_token - 1)
    sparsity_miss = abs(stats.sparsity / l3_stats.sparsity - 1)
    misses = [f"{name} by {miss:.2%}" for name, miss in (("FLOPs", flops_miss), ("sparsity", sparsity_miss))
              if miss > MOE_GOAL]
    header = (f"# Iso-sparse MoE baseline of {config_path.name}, written by tools/size_configs.py:\n"
              f"# command: python tools/size_configs.py {command}\n"
              f"#   {backbone.n_layers} blocks, d_model {backbone.d_model}, {backbone.n_heads} heads "
              f"({backbone.n_kv_heads} KV); every block an MoE of {moe.num_experts} SwiGLU experts of "
              f"{moe.expert_hidden_size},\n"
              f"#   top-{moe.top_k}, dropless (model.ffn_hidden_size is unused); no L³ layers.\n"
              f"#   Forward FLOPs/token {stats.flops_per_token / l3_stats.flops_per_token:.4f}x and sparsity "
              f"{stats.sparsity / l3_stats.sparsity:.4f}x the L³ model's\n"
              f"#   (at its v = {rows:,}, mean d_t = {mean_rows:.2f}: sparsity {l3_stats.sparsity:.2f}x).\n"
              + (f"#   MISSES the {MOE_GOAL:.0%} goal: {' and '.join(misses)} (the closest the search found"
                 + (f" with E a multiple of {experts_multiple}" if experts_multiple > 1 else "") + ").\n"
                 if misses else "")
              + (f"#   E is a multiple of {experts_multiple} (--moe-experts-multiple), so moe.expert_parallel "
                 f"can be {experts_multiple}\n#   (left at 1 here, which runs on any number of ranks).\n" if experts_multiple > 1 else "")
              + (f"#   Backbone searched around the iso-FLOP dense one ({dense.n_layers} blocks, d_model "
                 f"{dense.d_model}): integer E and h in steps of\n"
                 f"#   {ffn_multiple(dense.d_model)} miss FLOPs or sparsity by over "
                 f"{MOE_GOAL:.0%} on that one.\n"
                 if (backbone.n_layers, backbone.d_model) != (dense.n_layers, dense.d_model) else "") +
              f"# Whole model: {stats.total_params / 1e6:,.3f}M total / {stats.active_params / 1e6:,.3f}M active "
              f"parameters (sparsity {stats.sparsity:.2f}x), {stats.flops_per_token / 1e6:,.3f}M FLOPs/token.\n"
              f"{sizes_line(stats, 0, 0.0)}\n")
    return header + yaml.dump(tree, Dumper=_FlowListDumper, sort_keys=False, default_flow_style=False)


def dense_yaml(config_path: Path, dense: ModelConfig, stats: ModelStats, l3_flops: float,
               rows: int, mean_rows: float, output: Path) -> str:
    """The dense config: the L³ file's settings with the new backbone and no L³ layers."""
    tree = baseline_tree(config_path, dense, output)
    config_from_dict(tree)  # the file must load
    header = (f"# Iso-FLOP dense baseline of {config_path.name}, written by tools/size_configs.py:\n"
              f"#   {dense.n_layers} blocks, d_model {dense.d_model}, {dense.n_heads} heads ({dense.n_kv_heads} KV), "
              f"SwiGLU {dense.ffn_hidden_size}; no L³ layers.\n"
              f"#   Forward FLOPs/token {stats.flops_per_token / l3_flops:.4f}x the L³ model's "
              f"(at its v = {rows:,}, mean d_t = {mean_rows:.2f}).\n"
              f"{sizes_line(stats, 0, 0.0)}\n")
    return header + yaml.safe_dump(tree, sort_keys=False, default_flow_style=False)


def table_row(name: str, stats: ModelStats) -> str:
    return (f"{name:<16} {stats.total_params:>15,} {round(stats.active_params):>15,} "
            f"{round(stats.flops_per_token):>17,} {stats.sparsity:>8.2f}x")


def main() -> int:
    parser = CliArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="L³ config (see configs/)")
    add_l3_figure_arguments(parser)
    parser.add_argument("--moe-top-k", type=int, default=2, help="experts per token of the iso-sparse MoE (default 2)")
    parser.add_argument("--moe-experts-multiple", type=int, default=1, metavar="N",
                        help="the iso-sparse MoE's number of experts E is a multiple of N (default 1: any E), "
                             "so that moe.expert_parallel can be N (it must divide E and the data-parallel "
                             "ranks); 8 for nodes of 8 GPUs")
    parser.add_argument("--output-dense", metavar="FILE", help="write the iso-FLOP dense config here")
    parser.add_argument("--output-moe", metavar="FILE", help="write the iso-sparse MoE config here")
    args = parser.parse_args()
    if args.moe_top_k < 1:
        raise L3TrainError(f"--moe-top-k must be >= 1, got {args.moe_top_k}")
    if not 1 <= args.moe_experts_multiple <= MAX_EXPERTS:
        raise L3TrainError(f"--moe-experts-multiple must be in [1, {MAX_EXPERTS}], got {args.moe_experts_multiple}")
    cfg = load_config(args.config)
    if not cfg.l3.after_blocks:
        raise L3TrainError(f"{args.config} has no L³ layers (l3.after_blocks is empty); pass an L³ config")
    if cfg.moe.blocks:
        raise L3TrainError(f"{args.config} already has MoE blocks (moe.blocks={cfg.moe.blocks}); "
                           f"pass an L³ config without them")
    rows, mean_rows = l3_figures(cfg, args.rows, args.mean_rows)
    seq = cfg.data.seq_length
    l3_stats = model_stats(cfg.model, cfg.l3, seq, rows, mean_rows)
    dense = iso_flop_dense(cfg.model, seq, l3_stats.flops_per_token)
    d_stats = dense_stats(dense, seq)
    backbone, moe = iso_sparse_moe(dense, seq, l3_stats.flops_per_token, l3_stats.sparsity, args.moe_top_k,
                                   args.moe_experts_multiple)
    m_stats = moe_stats(backbone, moe, seq)
    print(f"config {args.config}: v={rows:,} rows per L³ layer, corpus mean d_t={mean_rows:.2f}, "
          f"sequence length {seq}")
    print(f"iso-FLOP dense: {dense.n_layers} blocks, d_model {dense.d_model}, {dense.n_heads} heads "
          f"({dense.n_kv_heads} KV), SwiGLU {dense.ffn_hidden_size}; FLOPs ratio dense/L³ "
          f"{d_stats.flops_per_token / l3_stats.flops_per_token:.4f}")
    print(f"iso-sparse MoE: {backbone.n_layers} blocks, d_model {backbone.d_model}, {backbone.n_heads} heads "
          f"({backbone.n_kv_heads} KV), {moe.num_experts} experts of {moe.expert_hidden_size} (top-{moe.top_k}, "
          f"dropless) in every block; FLOPs ratio MoE/L³ {m_stats.flops_per_token / l3_stats.flops_per_token:.4f}, "
          f"sparsity ratio MoE/L³ {m_stats.sparsity / l3_stats.sparsity:.4f}")
    print(f"{'model':<16} {'total params':>15} {'active params':>15} {'fwd FLOPs/token':>17} {'sparsity':>9}")
    for name, stats in (("L³", l3_stats), ("iso-FLOP dense", d_stats), ("iso-sparse MoE", m_stats)):
        print(table_row(name, stats))
    if args.output_dense:
        output = Path(args.output_dense)
        atomic_write_text(output, dense_yaml(Path(args.config), dense, d_stats, l3_stats.flops_per_token,
                                             rows, mean_rows, output))
        print(f"wrote {output}")
    if args.output_moe:
        output = Path(args.output_moe)
        atomic_write_text(output, moe_yaml(Path(args.config), backbone, moe, m_stats, l3_stats, dense,
                                           rows, mean_rows, output, args.moe_experts_multiple,
                                           shlex.join(sys.argv[1:])))
        print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    run_cli(main)
