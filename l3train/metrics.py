"""Training metrics: one readable console line per interval, TensorBoard events, metrics.jsonl.

Only rank 0 writes. `metrics.jsonl` holds the same scalars as TensorBoard, one JSON object
per logged step, for scripts (the report tool, tests) that should not parse event files.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from l3train.utils.atomic import atomic_write_text


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, purge_step: int | None = None) -> None:
        self.enabled = enabled
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        # purge_step drops events a crashed run logged past its last checkpoint.
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)
        jsonl_path = run_dir / "metrics.jsonl"
        if purge_step is not None and jsonl_path.exists():
            kept = [line for line in jsonl_path.read_text().splitlines() if _step_of(line) < purge_step]
            atomic_write_text(jsonl_path, "".join(line + "\n" for line in kept))
        self.jsonl = open(jsonl_path, "a")

    def log(self, step: int, scalars: dict[str, float], console: str | None = None) -> None:
        if not self.enabled:
            return
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()
        if console:
            print(console, flush=True)

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl line; a line cut short by a crash sorts last (dropped)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")
