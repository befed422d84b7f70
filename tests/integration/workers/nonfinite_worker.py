"""torchrun worker: non-finite losses injected on one rank, through the real Trainer.

A forward hook on rank 1's first decoder block turns its output into NaN at chosen steps
(a stand-in for an overflow on one node). Modes:
- `skip`: NaN at step index 3 only. Reports per step whether it was skipped and whether any
  weight changed on this rank (dense weights as DeepSpeed holds them, this rank's sharded
  L³ rows and its experts); then poisons one of this rank's rows and reports that saving is
  refused.
- `diverge`: NaN from step index 2 on; reports the error that stops the run.

Usage: nonfinite_worker.py CONFIG REPORT_DIR skip|diverge [key=value ...]
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from l3train.config import load_config
from l3train.errors import L3TrainError
from l3train.trainer import Trainer
from training_harness import finish_worker


def weights(trainer: Trainer) -> list[torch.Tensor]:
    """This rank's weights: dense ones as DeepSpeed holds them (ZeRO-3: this rank's partition),
    then the rank-local rows and experts."""
    dense = [getattr(p, "ds_tensor", p) for p in trainer.parts.model.parameters()]
    return dense + [p for part in trainer.parts.rank_local for p in part.params]


def snapshot(trainer: Trainer) -> list[torch.Tensor]:
    return [t.detach().clone() for t in weights(trainer)]


def main() -> None:
    config, report_dir, mode, *overrides = sys.argv[1:]
    trainer = Trainer(load_config(config, overrides))
    trainer.build()
    rank = dist.get_rank()
    poisoned = {3} if mode == "skip" else set(range(2, 1000))

    def poison(_module, _inputs, output):  # a block returns (hidden states, router stats)
        if rank == 1 and trainer.step in poisoned:
            return output[0] * float("nan"), output[1]
        return output

    trainer.parts.model.blocks[0].register_forward_hook(poison)
    report = {"rank": rank, "steps": []}
    if mode == "diverge":
        try:
            trainer.train()
        except L3TrainError as err:
            report["error"] = str(err)
    else:
        for _ in range(trainer.cfg.training.steps):
            before = snapshot(trainer)
            stats = trainer.train_step(trainer.batch(trainer.step))
            changed = any(not torch.equal(a, b) for a, b in zip(before, snapshot(trainer)))
            report["steps"].append({"step": stats.step, "skipped": stats.skipped, "changed": changed,
                                    "loss_finite": bool(torch.isfinite(stats.loss)),
                                    "skipped_steps": stats.skipped_steps})
        report["finite_weights"] = all(bool(torch.isfinite(t).all()) for t in snapshot(trainer))
        if rank == 1:
            with torch.no_grad():
                weights(trainer)[-1].view(-1)[0] = float("nan")
        try:
            trainer.save()
        except L3TrainError as err:
            report["save_error"] = str(err)
    Path(report_dir, f"rank{rank}.json").write_text(json.dumps(report))
    finish_worker()


if __name__ == "__main__":
    main()
