#!/usr/bin/env python
"""Convert l3train checkpoints: consolidate, reshard, export to / import from Hugging Face.

    consolidate  a training checkpoint of any layout (TP, DP, ZeRO 0-3, sharded L³ rows,
                 expert-parallel experts) -> one parallelism-free checkpoint:
                 model.safetensors, config.yaml, allocation.npz, tokenizer.model, manifest
    reshard      a training or consolidated checkpoint -> a run directory whose training
                 checkpoint has another layout (TP, DP and so the shard plan, EP, ZeRO
                 stage), AdamW moments and step included; continue it with --resume
    export       a training or consolidated checkpoint -> a Hugging Face folder: a dense
                 model as a standard Llama, an L³ model with its own modeling code
                 (trust_remote_code=True)
    import       a Hugging Face Llama folder -> a consolidated checkpoint of the l3train
                 model a config describes (optionally with L³ layers added, whose output
                 starts at zero); train from it with `python -m l3train.train --init-from`

Examples:

    python tools/convert_checkpoint.py consolidate runs/tiny_l3 --output ckpt/tiny_l3
    python tools/convert_checkpoint.py reshard runs/tiny_l3 --output runs/tiny_l3_tp2 --nproc 2 \\
        parallel.tensor_parallel=2
    torchrun --nproc_per_node 2 -m l3train.train --config runs/tiny_l3_tp2/config.yaml --resume
    python tools/convert_checkpoint.py export ckpt/tiny_l3 --output hf/tiny_l3
    python tools/convert_checkpoint.py import hf/llama --config configs/tiny_dense.yaml --output ckpt/imported
    python tools/convert_checkpoint.py import hf/llama --print-model-section

A checkpoint that does not verify against its manifest, a config that does not describe
it, or an existing output (without --overwrite) is refused in one line, exit status 2;
outputs appear only when complete. `tools/inspect_checkpoint.py` shows what a checkpoint holds.
"""

from __future__ import annotations

from l3train.conversion.commands import main
from l3train.errors import run_cli

if __name__ == "__main__":
    run_cli(lambda: main(usage_text=__doc__))
