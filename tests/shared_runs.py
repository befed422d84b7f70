"""Training runs made once per test session and shared by every test that reads them.

Conversion, inspection, inference, evaluation, reporting, resume and parallel-equivalence
tests all need checkpoints of a few layouts; each module used to train its own copy of the
same run. `SharedRuns.get(base, *overrides, nproc=N)` trains a run of the real trainer the
first time it is asked for and returns the same directory ever after, so a layout is
trained once per session however many tests read it. A test that changes a run's files
works on a copy (shutil.copytree), never on the shared directory: tests/conftest.py's
`shared_runs` fixture checks at the end of the session that no shared run was changed.

BASES are the config trees runs start from:
- `tiny_l3`: the harness's tiny L³ model, 12 steps, checkpoints at 6 and 12, validation at
  0, 6 and 12 (the reference of single-process tests and the run most tools read);
- `tiny_dense`: the same without L³ layers; `tiny_l3_moe`: with an MoE block as well;
- `equivalence`: 20 steps with clipping active (grad_clip 0.5) and one checkpoint at the
  end: every parallel layout (TP, DP with ZeRO 0-3, sharded rows, bf16) trains this and is
  compared with its single-process run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from session_cache import build_once
from training_harness import run_trainer, tiny_l3_config, write_config

EQUIVALENCE_STEPS = 20
EQUIVALENCE_GRAD_CLIP = 0.5  # below the reference's gradient norms on most steps: clipping is active


def _tiny_dense(tree: dict) -> None:
    tree["l3"] = {"after_blocks": []}


def _tiny_l3_moe(tree: dict) -> None:
    tree["moe"] = {"blocks": [1], "num_experts": 4, "top_k": 2, "expert_hidden_size": 64}


def _equivalence(tree: dict) -> None:
    tree["training"]["steps"] = EQUIVALENCE_STEPS
    tree["optimizer"]["grad_clip"] = EQUIVALENCE_GRAD_CLIP
    tree["checkpoint"]["save_interval"] = 100


def zero_stage(stage: int) -> tuple[str, ...]:
    """The override for a ZeRO stage (none for the bases' stage 0), spelled one way so that
    every test asking for a layout gets the same shared run."""
    return (f"parallel.zero_stage={stage}",) if stage else ()


def parallel_layout(tp: int = 1, stage: int = 0, sequence_parallel: bool = False) -> tuple[str, ...]:
    """Overrides of a TP × ZeRO × SP layout, in the one spelling of `zero_stage`."""
    return ((f"parallel.tensor_parallel={tp}",) if tp > 1 else ()) + zero_stage(stage) + (
        ("parallel.sequence_parallel=true",) if sequence_parallel else ())


BF16_ZERO2 = ("training.precision=bf16", "parallel.zero_stage=2")

BASES: dict[str, Callable[[dict], None]] = {
    "tiny_l3": lambda tree: None,
    "tiny_dense": _tiny_dense,
    "tiny_l3_moe": _tiny_l3_moe,
    "equivalence": _equivalence,
}


@dataclass(frozen=True)
class TrainedRun:
    run_dir: Path
    config: Path  # the base config it was trained from (its run_dir is another directory)
    stdout: str

    def checkpoint(self, step: int) -> Path:
        return self.run_dir / "checkpoints" / f"step_{step:08d}"


class SharedRuns:
    """The runs under `root`, which every pytest-xdist worker of the session shares: the first
    worker to ask for a run trains it, a second one waits for it (`build_once`)."""

    def __init__(self, root: Path, corpus, allocation: Path) -> None:
        self.root, self._corpus, self._allocation = root, corpus, allocation
        self._used: set[Path] = set()

    def config(self, base: str) -> Path:
        """The config file of `base` (its run_dir is `<root>/<base>/run`, which no shared run uses)."""
        def write(folder: Path) -> None:
            tree = tiny_l3_config(folder / "run", self._corpus, self._allocation)
            BASES[base](tree)
            write_config(folder / "config.yaml", tree)

        return build_once(self.root / base, write) / "config.yaml"

    def get(self, base: str, *overrides: str, nproc: int = 0) -> TrainedRun:
        """The run of `base` with `overrides` on `nproc` ranks (0: one plain process), trained on first use."""
        config = self.config(base)
        key = json.dumps([base, nproc, sorted(overrides)])
        folder = self.root / f"{base}-n{nproc}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"

        def train(folder: Path) -> None:
            result = run_trainer(config, f"run_dir={folder / 'run'}", *overrides, nproc=nproc)
            (folder / "key.json").write_text(key)
            (folder / "stdout.txt").write_text(result.stdout)
            (folder / "digest.txt").write_text(tree_digest(folder / "run"))

        build_once(folder, train)
        self._used.add(folder)
        return TrainedRun(folder / "run", config, (folder / "stdout.txt").read_text())

    def changed(self) -> list[Path]:
        """Shared run directories this worker read whose files differ from what their training left."""
        return [folder / "run" for folder in sorted(self._used)
                if tree_digest(folder / "run") != (folder / "digest.txt").read_text()]


def tree_digest(root: Path) -> str:
    """sha256 over every file's relative path and contents under `root`."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()
