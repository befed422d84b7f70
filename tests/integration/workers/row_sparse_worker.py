"""Worker (one process, the real Trainer): what the L³ tables' gradients look like when the
optimizer steps them, and the run's losses and final tables.

At each optimizer step it records, per table, whether the gradient is row-sparse and how
many rows it holds. With `table-shaped`, the layers are first switched back to the kernel's
table-shaped gradients (the reference: torch's fused AdamW steps those).

Usage: row_sparse_worker.py CONFIG OUT.pt row-sparse|table-shaped [key=value ...]
"""

import sys

import torch

from l3train.config import load_config
from l3train.trainer import Trainer
from training_harness import finish_worker


def main() -> None:
    config, out, mode, *overrides = sys.argv[1:]
    trainer = Trainer(load_config(config, overrides))
    trainer.build()
    layers = list(trainer.parts.model.l3_layers())
    if mode == "table-shaped":
        for layer in layers:
            layer.rows.row_sparse_gradients = False
    tables = [layer.rows.key_table for layer in layers]
    seen, step = [], trainer.optimizer.step

    def recording_step(*args, **kwargs):
        seen.append([(t.grad.is_sparse, t.grad._nnz() if t.grad.is_sparse else t.shape[0]) for t in tables])
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    losses = [trainer.train_step(trainer.batch(s)).loss.item() for s in range(trainer.cfg.training.steps)]
    torch.save({"seen": seen, "losses": losses, "rows": [t.shape[0] for t in tables],
                "tables": [t.detach().clone() for t in tables],
                "micro_batches": trainer.engine.gradient_accumulation_steps()}, out)
    trainer.close()
    finish_worker()


if __name__ == "__main__":
    main()
