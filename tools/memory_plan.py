#!/usr/bin/env python
"""Plan the memory of a training run per GPU, and say whether it fits the device.

For each config and node count: the bytes one GPU holds for the parameters, gradients and
optimizer state DeepSpeed manages (ZeRO stage and precision from the config, or --zero),
the sharded L³ rows with their gradients and AdamW state (the fullest shard), DeepSpeed's
gradient bucket, and the activations of one micro-batch (`training.recompute` counted,
with the kernels of --device); then whether the total fits --device-memory with a 10% margin. The arithmetic and what
each figure covers are in l3train/sizing/memory.py; tests/integration/test_memory_plan_against_training.py
checks it against what tiny runs hold at 1, 2 and 4 ranks.

The L³ row count comes from the config's allocation (and its shard plan); to plan before
the allocation exists, pass --rows (rows per layer, spread evenly over the shards).
Repeat --config and --nodes for a table of every combination. Overrides (key=value) apply
to every config.

    python tools/memory_plan.py --config configs/tiny_l3.yaml --nodes 1 --gpus-per-node 4
    python tools/memory_plan.py --config configs/paper_2p6b_l3.yaml --nodes 1 --nodes 4 \\
        --gpus-per-node 8 --rows 710000 training.recompute=blocks
"""

from __future__ import annotations

import argparse
from pathlib import Path

from l3train.config import load_config
from l3train.errors import CliArgumentParser, run_cli
from l3train.sizing.memory import DEVICES, markdown_table, parse_size, plan_json, plan_memory, plan_notes


def main() -> int:
    parser = CliArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", required=True, help="YAML config (see configs/); repeatable")
    parser.add_argument("--nodes", type=int, action="append", required=True, help="number of nodes; repeatable")
    parser.add_argument("--gpus-per-node", type=int, required=True, help="GPUs (ranks) per node")
    parser.add_argument("--tp", type=int, help="tensor-parallel ranks (default: parallel.tensor_parallel)")
    parser.add_argument("--zero", type=int, choices=(0, 1, 2, 3), help="ZeRO stage (default: parallel.zero_stage)")
    parser.add_argument("--rows", type=int, help="L³ rows v per layer (instead of reading the allocation)")
    parser.add_argument("--device-memory", default="80GB", help="memory of one GPU, e.g. 80GB or 141GiB (default 80GB)")
    parser.add_argument("--device", choices=DEVICES, default="cuda",
                        help="whose kernels' saved activations to count (default cuda; cpu for CPU runs)")
    parser.add_argument("--json", action="store_true", help="print the plans as JSON, every figure in bytes")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_intermixed_args()
    device_bytes = parse_size(args.device_memory)
    flags = {"parallel.tensor_parallel": args.tp, "parallel.zero_stage": args.zero}
    overrides = [*args.overrides, *(f"{key}={value}" for key, value in flags.items() if value is not None)]
    plans = [plan_memory(load_config(path, overrides), Path(path).stem, nodes, args.gpus_per_node, args.rows,
                         args.device) for path in args.config for nodes in args.nodes]
    if args.json:
        print(plan_json(plans, device_bytes))
        return 0
    print(markdown_table(plans, device_bytes))
    print("\n".join(plan_notes(plans, device_bytes)))
    return 0


if __name__ == "__main__":
    run_cli(main)
