#!/usr/bin/env python
"""Generate text from a checkpoint, streaming it as the tokens arrive.

CHECKPOINT is a consolidated checkpoint, a training checkpoint (checkpoints/step_*) or a
run_dir (its latest checkpoint); its config names the tokenizer. With one prompt the text
is streamed; with several, they run as one batch and each completion is printed when it
ends. Greedy with --temperature 0; otherwise sampled, reproducibly from --seed (prompt i
of a batch draws with seed + i, so it gives the same text alone with that seed).

The L³ tables can stay off the compute device (docs/inference.md): --placement host keeps
them in host memory (a step's rows go to a CUDA device through a pinned staging buffer),
--placement disk in .npy files written once into
--table-dir (reused when they match the checkpoint). On a CUDA device the rows of each
step's tokens are prefetched into a staging buffer of --staging-rows rows while the blocks
before the L³ layer run (--no-prefetch: fetched by the layer itself). A CPU model computes
on host tables, and on a memory map of disk tables, in place (--staged: stage the rows
as for a GPU, which keeps a disk table's pages out of the process's resident set).

    python tools/generate.py exports/tiny_consolidated --prompt "Return the"
    python tools/generate.py runs/tiny_l3 --prompt "Return the" --temperature 0.8 --top-p 0.95 --seed 1
    python tools/generate.py runs/tiny_l3 --prompt "Open a" --prompt "The value" --temperature 0
    python tools/generate.py exports/tiny_consolidated --prompt "" --placement disk --table-dir /tmp/l3_tables --stats
    python tools/generate.py runs/tiny_l3 data.tokenizer=data/tokenizer/spm_bpe_2048.model --prompt "If"

Every prompt starts after an end-of-document token, as every document does in training
and evaluation (an empty prompt is that token alone). Generation stops at --stop-token ids
(default: the end-of-document token) or after --max-new-tokens. A prompt too long for the
model is refused before anything is printed.
"""

from __future__ import annotations

import argparse
import sys

import torch

from l3train.checkpoint.reader import open_checkpoint
from l3train.data.tokenizer import Tokenizer
from l3train.errors import CliArgumentParser, L3TrainError, run_cli
from l3train.inference.config import PLACEMENTS, InferenceConfig
from l3train.inference.engine import Generator
from l3train.inference.loading import load_for_generation
from l3train.inference.text import print_batch, stream_one


def parse_args() -> argparse.Namespace:
    parser = CliArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="consolidated checkpoint, training checkpoint or run_dir")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides of a training checkpoint (e.g. data.tokenizer=PATH)")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default 1.0)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="keep the smallest set of tokens of this mass (1: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop-token", type=int, action="append", metavar="ID",
                        help="token id that ends a sequence (repeatable; default: end of document)")
    parser.add_argument("--placement", choices=PLACEMENTS, default="resident", help="where the L³ tables live")
    parser.add_argument("--no-prefetch", action="store_true", help="fetch each step's rows in the L³ layer itself")
    parser.add_argument("--staged", action="store_true",
                        help="CPU model: stage each step's rows instead of computing on the tables in place")
    parser.add_argument("--staging-rows", type=int, default=InferenceConfig.staging_rows,
                        help="rows per table in the staging buffer (default %(default)s)")
    parser.add_argument("--table-dir", help="disk placement: directory of the table files "
                                            "(default ~/.cache/l3train/l3_tables)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="compute device (default: cuda when available)")
    parser.add_argument("--no-verify", action="store_true", help="skip the checkpoint's checksums")
    parser.add_argument("--stats", action="store_true", help="print the staging counters to stderr at the end")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise L3TrainError(f"--device {args.device} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise L3TrainError(f"--device {args.device}: CUDA is not available on this machine")
    checkpoint = open_checkpoint(args.checkpoint, args.overrides, verify=not args.no_verify)
    tokenizer = Tokenizer.load(checkpoint.config.data.tokenizer)
    config = InferenceConfig(placement=args.placement, in_place=not args.staged, prefetch=not args.no_prefetch,
                             staging_rows=args.staging_rows,
                             table_dir=args.table_dir, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                             stop_tokens=tuple(args.stop_token or [tokenizer.eod_id]))
    prompts = [tokenizer.encode_prompt(text) for text in args.prompt]
    model, placement = load_for_generation(checkpoint, config, device)
    generator = Generator(model, placement, pad_id=tokenizer.eod_id)
    try:
        if len(prompts) == 1:
            stream_one(generator, prompts[0], config, tokenizer)
        else:
            print_batch(generator, prompts, args.prompt, config, tokenizer)
    finally:
        placement.close()
    if args.stats:
        print(" ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                       for key, value in placement.counters.summary().items()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
