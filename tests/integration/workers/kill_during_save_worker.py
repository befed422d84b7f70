"""SIGKILL a training process at random moments while it writes checkpoints, again and again.

The parent imports everything once, then forks a trainer per round (`--resume` semantics, a
checkpoint after every step, so most of its time is spent saving). Each round waits until
that trainer has completed one save of its own, which proves it loaded `latest`, times the
save after it, and SIGKILLs it at a random moment of the next one; then checks that `latest` names a checkpoint that verifies
against its manifest. Writes a JSON report.

Usage: kill_during_save_worker.py CONFIG RUN_DIR ROUNDS REPORT SEED
"""

import importlib
import json
import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path

from l3train.checkpoint import checkpoint_root, latest_tag, verify
from l3train.config import load_config
from l3train.errors import L3TrainError
from l3train.trainer.trainer import Trainer


def train_forever(config: str, run_dir: str, steps: int) -> None:
    """The forked child: resume and train with a checkpoint after every step; never returns."""
    status = 1
    try:
        trainer = Trainer(load_config(config, [f"run_dir={run_dir}", f"training.steps={steps}",
                                               "checkpoint.save_interval=1", "training.eval_interval=100000"]),
                          resume=True)
        trainer.build()
        status = trainer.train()
    except L3TrainError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        status = 2
    except BaseException:
        traceback.print_exc()
    os._exit(status)


def wait_for_new_save(root: Path, previous: str | None, pid: int, timeout: float = 120) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        tag = (root / "latest").read_text().strip() if (root / "latest").exists() else None
        if tag and tag != previous:
            return tag
        finished, status = os.waitpid(pid, os.WNOHANG)
        if finished:
            raise RuntimeError(f"the trainer exited by itself (status {status}) before saving")
        time.sleep(0.01)
    raise RuntimeError("the trainer saved nothing in time")


def wait_until(condition, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not condition() and time.time() < deadline:
        time.sleep(0.001)


def save_duration(root: Path) -> float:
    """How long one whole save takes (its staging directory exists for that long)."""
    wait_until(lambda: (root / ".staging").exists())
    start = time.time()
    wait_until(lambda: not (root / ".staging").exists())
    return time.time() - start


def main() -> None:
    config, run_dir, rounds, report_path, seed = sys.argv[1:]
    for slow_import in ("deepspeed", "megatron.core", "l3train.model.build"):  # once, not in every fork
        importlib.import_module(slow_import)
    rng, root = random.Random(int(seed)), checkpoint_root(run_dir)
    report = {"rounds": []}
    for _ in range(int(rounds)):
        previous = latest_tag(root) if (root / "latest").exists() else None
        pid = os.fork()
        if pid == 0:
            train_forever(config, run_dir, steps=100_000)
        saved = wait_for_new_save(root, previous, pid)
        duration = save_duration(root)
        wait_until(lambda: (root / ".staging").exists())
        time.sleep(rng.uniform(0.0, duration))  # a random moment of the next save
        mid_save = (root / ".staging").exists()
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        tag = latest_tag(root)
        report["rounds"].append({"killed": os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL,
                                 "resumed_from": previous, "first_save": saved, "latest": tag,
                                 "mid_save": mid_save, "problem": verify(root / tag)})
    Path(report_path).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
