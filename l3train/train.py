"""Pretrain a Llama-style model with L³ layers under DeepSpeed.

    python -m l3train.train --config configs/tiny_l3.yaml [key.sub=value ...] [--resume]
    torchrun --nproc_per_node 2 -m l3train.train --config ... (data parallel)
    torchrun --nproc_per_node 4 -m l3train.train --config ... parallel.tensor_parallel=2 (TP=2 × DP=2)
    python -m l3train.train --config ... --init-from runs/imported (weights of a consolidated checkpoint)

Overrides and flags may come in any order. The training itself is l3train.trainer.Trainer.
"""

from __future__ import annotations

import argparse
import sys

from l3train.config import load_config
from l3train.errors import CliArgumentParser, L3TrainError, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CliArgumentParser(
        prog="python -m l3train.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from <run_dir>/checkpoints/latest if it exists (else start fresh)")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="with --resume: accept changed keys that alter the training trajectory (seed, "
                             "batch sizes, data, learning-rate schedule, ...); each change is logged")
    parser.add_argument("--init-from", metavar="DIR",
                        help="start from the weights of a consolidated checkpoint (tools/convert_checkpoint.py: "
                             "consolidate, or import from Hugging Face) instead of a random initialisation; "
                             "ignored when --resume finds a checkpoint")
    parser.add_argument("--exit-after-steps", type=int, default=0, metavar="N",
                        help="save a checkpoint and exit after N optimizer steps of this invocation "
                             "(e.g. to fit a job's time slot; continue with --resume)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides, e.g. training.steps=50 l3.after_blocks=[1]")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.exit_after_steps < 0:
        raise L3TrainError(f"--exit-after-steps must be >= 0, got {args.exit_after_steps}")
    if args.allow_config_change and not args.resume:
        raise L3TrainError("--allow-config-change only applies with --resume")
    if cfg.logging.wandb:  # an optional package: its absence is one line now, not after the start-up
        from l3train.trainer.wandb_logger import import_wandb

        import_wandb()
    # torch, DeepSpeed and megatron-core load only now (seconds): a mistyped key or flag above
    # is reported at once.
    import torch

    from l3train.distributed import EXIT_RANK_LOST, is_collective_failure, is_collective_timeout, lost_ranks
    from l3train.trainer.trainer import Trainer

    trainer = Trainer(cfg, resume=args.resume, exit_after_steps=args.exit_after_steps,
                      allow_config_change=args.allow_config_change, init_from=args.init_from)
    try:
        trainer.build()
        return trainer.train()
    except RuntimeError as err:
        if not is_collective_failure(err):
            raise
        # One line instead of a traceback per surviving rank; the launcher (torchrun's failure
        # report, srun's task list) names the rank that died first.
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else "?"
        lost = lost_ranks() if torch.distributed.is_initialized() else None
        who = f"rank(s) {', '.join(map(str, lost))}" if lost else "another rank"
        cause = str(err).splitlines()[0][:160]
        if is_collective_timeout(err):  # a peer that hangs (stopped, deadlocked) keeps its connections open
            print(f"error: rank {rank}: {who} did not answer within the collective timeout "
                  f"({cfg.parallel.collective_timeout_minutes:g} min) ({cause}); it hung, died or lost its node; "
                  f"restart the job with --resume", file=sys.stderr, flush=True)
        else:
            print(f"error: rank {rank}: lost contact with {who} during a collective ({cause}); it died, was killed "
                  f"or lost its node; restart the job with --resume", file=sys.stderr, flush=True)
        return EXIT_RANK_LOST
    finally:
        trainer.close()  # explicitly: the process ends without finalizers (exit_process)


if __name__ == "__main__":
    run_cli(main)
