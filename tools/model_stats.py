#!/usr/bin/env python
"""Print exact parameter counts, FLOPs per token and sparsity for a config.

FLOPs per token: forward (the sizing convention: mean causal context, norms ignored), and
for training as the logged TFLOP/s and MFU count them (torchtitan's and Megatron-LM's
convention: 6 × the active parameters without the input embedding and the L³ rows, plus
12·layers·d_model·seq for full-matrix attention, plus 3 × the L³ row attention; see
l3train.sizing.accounting.TrainingFlops).

The L³ figures need the allocation: its row count v and the corpus mean d_t (rows per
token occurrence). They are read from `l3.allocation`; to plan a model before its
allocation exists, pass `--rows` and `--mean-rows` instead. MoE blocks (`moe.blocks`) are
counted with their router and experts: all experts in the total, the router and top_k
experts in the active parameters and FLOPs (dropless dispatch).

    python tools/model_stats.py --config configs/tiny_l3.yaml
    python tools/model_stats.py --config configs/tiny_l3.yaml --rows 710000 --mean-rows 300 model.n_layers=8
    python tools/model_stats.py --config configs/tiny_moe.yaml
"""

from __future__ import annotations

import argparse
import dataclasses

from l3train.config import load_config
from l3train.errors import CliArgumentParser, run_cli
from l3train.sizing.accounting import (ModelStats, TrainingFlops, add_l3_figure_arguments, l3_figures, model_stats,
                                       training_flops)


def format_row(name: str, stats: ModelStats, train: TrainingFlops) -> str:
    return (f"{name:<18} {stats.total_params / 1e6:>12.3f}M {stats.active_params / 1e6:>12.3f}M "
            f"{stats.flops_per_token / 1e6:>14.3f}M {train.per_token / 1e6:>16.3f}M {stats.sparsity:>9.2f}x")


def main() -> int:
    parser = CliArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    add_l3_figure_arguments(parser)
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    rows, mean_rows = l3_figures(cfg, args.rows, args.mean_rows) if cfg.l3.after_blocks else (0, 0.0)
    seq = cfg.data.seq_length
    moe = cfg.moe
    print(f"config {args.config}: {len(cfg.l3.after_blocks)} L³ layer(s) after blocks {cfg.l3.after_blocks}, "
          f"v={rows:,} rows per layer, corpus mean d_t={mean_rows:.2f}, sequence length {seq}")
    if moe.blocks:
        print(f"MoE in {len(moe.blocks)} block(s) {moe.blocks}: {moe.num_experts} experts of "
              f"{moe.expert_hidden_size}, top-{moe.top_k}, "
              + ("dropless" if moe.capacity_factor is None else
                 f"capacity factor {moe.capacity_factor} (FLOPs counted dropless)"))
    print(f"{'model':<18} {'total params':>13} {'active params':>13} {'fwd FLOPs/token':>15} "
          f"{'train FLOPs/token':>17} {'sparsity':>10}")
    print(format_row("this config", model_stats(cfg.model, cfg.l3, seq, rows, mean_rows, moe),
                     training_flops(cfg.model, cfg.l3, seq, mean_rows, moe)))
    if cfg.l3.after_blocks:
        backbone = dataclasses.replace(cfg.l3, after_blocks=[])
        print(format_row("backbone (no L³)", model_stats(cfg.model, backbone, seq, moe=moe),
                         training_flops(cfg.model, backbone, seq, moe=moe)))
    if moe.blocks:
        print(format_row("dense FFN instead", model_stats(cfg.model, cfg.l3, seq, rows, mean_rows),
                         training_flops(cfg.model, cfg.l3, seq, mean_rows)))
    return 0


if __name__ == "__main__":
    run_cli(main)
