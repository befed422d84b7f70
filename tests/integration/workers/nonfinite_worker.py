"""torchrun worker: non-finite losses injected on one rank, through the real Trainer.

A forward hook on rank 1's first decoder block turns its output into NaN at chosen steps
(a stand-in for an overflow on one node). Modes:
- `skip`: NaN at step index 3 only, and a stop signal on rank 1 only before step index 4.
  Reports per step whether it was skipped, whether the ranks agreed to stop, whether any
  weight changed on this rank (dense weights as DeepSpeed holds them, this rank's sharded
  L³ rows and its experts) and how many all-reduces l3train's trainer issued (its step
  agreement is one); then has the monitor log the last step (counting its all-reduces)
  and reports this rank's own loss, entropies and peak memory; then poisons one of this rank's
  rows and reports that saving is refused.
- `diverge`: NaN from step index 2 on; reports the error that stops the run.

Usage: nonfinite_worker.py CONFIG REPORT_DIR skip|diverge [key=value ...]
"""

import json
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

from l3train.config import load_config
from l3train.errors import L3TrainError
from l3train.trainer import Trainer
from l3train.trainer.throughput import peak_memory_gib
from training_harness import finish_worker


def weights(trainer: Trainer) -> list[torch.Tensor]:
    """This rank's weights: dense ones as DeepSpeed holds them (ZeRO-3: this rank's partition),
    then the rank-local rows and experts."""
    dense = [getattr(p, "ds_tensor", p) for p in trainer.parts.model.parameters()]
    return dense + [p for part in trainer.parts.rank_local for p in part.params]


def snapshot(trainer: Trainer) -> list[torch.Tensor]:
    return [t.detach().clone() for t in weights(trainer)]


def count_trainer_all_reduces() -> Counter:
    """Count the all-reduces called from l3train.trainer's modules (DeepSpeed's own, inside
    the engine, are not the trainer's)."""
    calls, all_reduce = Counter(), dist.all_reduce

    def counted(*args, **kwargs):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("l3train.trainer"):
            calls["all_reduce"] += 1
        return all_reduce(*args, **kwargs)

    dist.all_reduce = counted
    return calls


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
        calls = count_trainer_all_reduces()
        for _ in range(trainer.cfg.training.steps):
            if rank == 1 and trainer.step == 4:
                trainer.stop.signal_name = "SIGUSR1"  # what the handler sets
            before, calls["all_reduce"] = snapshot(trainer), 0
            stats = trainer.train_step(trainer.batch(trainer.step))
            changed = any(not torch.equal(a, b) for a, b in zip(before, snapshot(trainer)))
            report["steps"].append({"step": stats.step, "skipped": stats.skipped, "changed": changed,
                                    "loss_finite": bool(torch.isfinite(stats.loss)),
                                    "skipped_steps": stats.skipped_steps, "stop": stats.stop,
                                    "all_reduces": calls["all_reduce"]})
        calls["all_reduce"] = 0
        trainer.monitor.record(stats, elapsed=1.0)  # the run's last step: logged (by rank 0, into metrics.jsonl)
        report["monitor"] = {"all_reduces": calls["all_reduce"], "own_loss": stats.loss.item(),
                             "own_entropy": {b: e.item() for b, e in stats.l3_entropy.items()},
                             "own_peak": peak_memory_gib(stats.loss.device)}
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
