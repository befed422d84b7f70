#!/usr/bin/env python
"""Size the baselines of an L³ config: the iso-FLOP dense model, sizes table for both.

The paper compares an L³ model with a dense model of the same forward FLOPs per token
(iso-FLOP) and with an MoE of the same sparsity and FLOPs (iso-sparse). This tool finds
the dense backbone — same head size and grouped-query ratio, a search over n_layers and
n_heads with the SwiGLU size solved for the FLOPs — and prints total/active parameters,
FLOPs/token and sparsity from `l3train.model.accounting`. The MoE baseline does not exist
in l3train yet, so its column says so instead of inventing numbers.

    python tools/size_configs.py --config configs/tiny_l3.yaml --output-dense configs/tiny_dense.yaml
    python tools/size_configs.py --config configs/paper_800m_l3.yaml --rows 710000 --mean-rows 300
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import yaml

from l3train.config import Config, ModelConfig, config_from_dict, load_config
from l3train.errors import CliArgumentParser, L3TrainError, run_cli
from l3train.model.accounting import ModelStats, l3_figures, model_stats
from l3train.utils.atomic import atomic_write_text

MOE_UNAVAILABLE = "not available: MoE baseline not implemented yet"
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


def dense_yaml(config_path: Path, dense: ModelConfig, stats: ModelStats, l3_flops: float,
               rows: int, mean_rows: float, output: Path) -> str:
    """The dense config: the L³ file's settings with the new backbone and no L³ layers."""
    tree: dict[str, Any] = yaml.safe_load(config_path.read_text())
    tree["l3"] = {"after_blocks": []}
    tree["run_dir"] = f"runs/{output.stem}"
    tree["model"] = {**tree.get("model", {}), "d_model": dense.d_model, "n_layers": dense.n_layers,
                     "n_heads": dense.n_heads, "n_kv_heads": dense.n_kv_heads,
                     "ffn_hidden_size": dense.ffn_hidden_size}
    config_from_dict(tree)  # the file must load
    header = (f"# Iso-FLOP dense baseline of {config_path.name}, written by tools/size_configs.py:\n"
              f"#   {dense.n_layers} blocks, d_model {dense.d_model}, {dense.n_heads} heads ({dense.n_kv_heads} KV), "
              f"SwiGLU {dense.ffn_hidden_size}; no L³ layers.\n"
              f"#   Forward FLOPs/token {stats.flops_per_token / l3_flops:.4f}x the L³ model's "
              f"(at its v = {rows:,}, mean d_t = {mean_rows:.2f}).\n"
              f"{sizes_line(stats, 0, 0.0)}\n")
    return header + yaml.safe_dump(tree, sort_keys=False, default_flow_style=False)


def main() -> int:
    parser = CliArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="L³ config (see configs/)")
    parser.add_argument("--rows", type=int, help="L³ rows v per layer (instead of reading the allocation)")
    parser.add_argument("--mean-rows", type=float, help="corpus mean d_t (instead of reading the allocation)")
    parser.add_argument("--output-dense", metavar="FILE", help="write the iso-FLOP dense config here")
    args = parser.parse_args()
    cfg = load_config(args.config)
    if not cfg.l3.after_blocks:
        raise L3TrainError(f"{args.config} has no L³ layers (l3.after_blocks is empty); pass an L³ config")
    rows, mean_rows = l3_figures(cfg, args.rows, args.mean_rows)
    seq = cfg.data.seq_length
    l3_stats = model_stats(cfg.model, cfg.l3, seq, rows, mean_rows)
    dense = iso_flop_dense(cfg.model, seq, l3_stats.flops_per_token)
    d_stats = dense_stats(dense, seq)
    print(f"config {args.config}: v={rows:,} rows per L³ layer, corpus mean d_t={mean_rows:.2f}, "
          f"sequence length {seq}")
    print(f"iso-FLOP dense: {dense.n_layers} blocks, d_model {dense.d_model}, {dense.n_heads} heads "
          f"({dense.n_kv_heads} KV), SwiGLU {dense.ffn_hidden_size}; FLOPs ratio dense/L³ "
          f"{d_stats.flops_per_token / l3_stats.flops_per_token:.4f}")
    print(f"{'model':<16} {'total params':>15} {'active params':>15} {'fwd FLOPs/token':>17} {'sparsity':>9}")
    for name, stats in (("L³", l3_stats), ("iso-FLOP dense", d_stats)):
        print(f"{name:<16} {stats.total_params:>15,} {round(stats.active_params):>15,} "
              f"{round(stats.flops_per_token):>17,} {stats.sparsity:>8.2f}x")
    print(f"{'iso-sparse MoE':<16} {MOE_UNAVAILABLE}")
    if args.output_dense:
        output = Path(args.output_dense)
        atomic_write_text(output, dense_yaml(Path(args.config), dense, d_stats, l3_stats.flops_per_token,
                                             rows, mean_rows, output))
        print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    run_cli(main)
