"""Training: the `Trainer` (build, step, loop), its loss, monitoring, clipping, and the one
adapter to DeepSpeed's internals. Imported lazily: `from l3train.trainer import Trainer`."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # Lazy, so that l3train.checkpoint can use the DeepSpeed adapter without importing the trainer.
    if name in ("Trainer", "StepStats"):
        from l3train.trainer import monitor, trainer

        return getattr(trainer if name == "Trainer" else monitor, name)
    raise AttributeError(name)
