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
`l3train.sizing.accounting` (MoE FLOPs assume dropless dispatch).

    python tools/size_configs.py --config configs/tiny_l3.yaml --output-dense configs/tiny_dense.yaml
    python tools/size_configs.py --config configs/paper_800m_l3.yaml --rows 710000 --mean-rows 300 \\
        --moe-experts-multiple 8 --output-moe configs/paper_800m_moe.yaml

The MoE config's header records the command line that wrote it (`# command:`).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from l3train.config import load_config
from l3train.errors import CliArgumentParser, L3TrainError, run_cli
from l3train.sizing.accounting import add_l3_figure_arguments, l3_figures
from l3train.sizing.baseline_configs import dense_yaml, moe_yaml, summary_lines
from l3train.sizing.search import MAX_EXPERTS, size_baselines
from l3train.utils.atomic import atomic_write_text
from l3train.utils.outputs import add_overwrite_argument, refuse_existing


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
    add_overwrite_argument(parser)
    args = parser.parse_args()
    refuse_existing([path for path in (args.output_dense, args.output_moe) if path], "a config file",
                    args.overwrite)
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
    sized = size_baselines(cfg, rows, mean_rows, args.moe_top_k, args.moe_experts_multiple)
    print("\n".join(summary_lines(args.config, sized, cfg.data.seq_length)))
    if args.output_dense:
        output = Path(args.output_dense)
        atomic_write_text(output, dense_yaml(Path(args.config), sized, output))
        print(f"wrote {output}")
    if args.output_moe:
        output = Path(args.output_moe)
        atomic_write_text(output, moe_yaml(Path(args.config), sized, output, shlex.join(sys.argv[1:])))
        print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    run_cli(main)
