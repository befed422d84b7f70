"""Optional Weights & Biases logging (`logging.wandb: true`), beside TensorBoard.

Rank 0 logs the same scalars as TensorBoard and metrics.jsonl, at the same steps, into a
W&B run named after the run directory (`logging.wandb_name` to choose), with the resolved
config; `logging.wandb_mode: offline` writes it under `<run_dir>/wandb/` (or `$WANDB_DIR`)
for `wandb sync` later. wandb is not a dependency of training: `import_wandb` is called at
start-up, so a run that asks for it without the package stops at once with one line.

Each invocation is its own W&B run (a `--resume` starts a new one of the same name): W&B
steps only increase, and a resumed run logs again the steps after its checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from l3train.config import Config
from l3train.errors import L3TrainError


def import_wandb() -> Any:
    """The wandb module, or an L3TrainError saying how to get it."""
    try:
        import wandb
    except ImportError:
        raise L3TrainError("logging.wandb=true needs the wandb package, which is not installed: "
                           "pip install wandb (or set logging.wandb=false)") from None
    return wandb


class WandbLogger:
    """One W&B run of rank 0: `log` each logged step's scalars, `close` at the end."""

    def __init__(self, cfg: Config) -> None:
        wandb, options = import_wandb(), cfg.logging
        run_dir = Path(cfg.run_dir)
        directory = Path(os.environ.get("WANDB_DIR") or run_dir)
        directory.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(project=options.wandb_project, entity=options.wandb_entity or None,
                                  name=options.wandb_name or run_dir.resolve().name, mode=options.wandb_mode,
                                  dir=str(directory), config=cfg.to_dict(),
                                  # Leave stdout/stderr alone: the console lines stay the trainer's.
                                  settings=wandb.Settings(console="off"))
        except wandb.errors.Error as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise L3TrainError(f"Weights & Biases did not start ({first}); run `wandb login`, or set "
                               f"logging.wandb_mode=offline (sync later) or logging.wandb=false") from None

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()
