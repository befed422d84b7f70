"""Reshard: turn a consolidated checkpoint into a training checkpoint for another layout.

    python tools/convert_checkpoint.py reshard runs/a --output runs/b --nproc 4 parallel.tensor_parallel=2

The target layout is built for real: `reshard` starts `nproc` ranks (torchrun, gloo on the
host, so it runs anywhere), each builds the trainer of the target config exactly as a
training run does, starting from the consolidated weights (`Trainer(init_from=...)`: the
plain model is loaded, then `parallelize` cuts every rank's slice and DeepSpeed partitions
it). Each rank then gives every optimizer the AdamW moments of its slice, cut the same
way (TP split by `tensor_parallel_dim`, rows by the target shard plan, experts by EP
rank), sets the step count and LR schedule to the checkpoint's step, and the trainer
saves an ordinary checkpoint. So the checkpoint is written by the same code that writes
every checkpoint, and `--resume` in the target layout continues the run.

The run is built in a staging directory beside `--output` and renamed into place when its
checkpoint is complete.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import yaml

from l3train.checkpoint.consolidated import Consolidated, check_tensors, plain_state_dict
from l3train.config import Config, config_from_dict, load_config, validate_for_world
from l3train.distributed import free_port
from l3train.errors import CliArgumentParser, L3TrainError, run_cli
from l3train.model.build import load_allocation, meta_model, names_by_role
from l3train.model.roles import ParamRole
from l3train.utils.atomic import atomic_write_text
from l3train.utils.outputs import refuse_existing


def target_config(consolidated: Consolidated, run_dir: Path, overrides: list[str]) -> Config:
    """The consolidated checkpoint's config with `run_dir` and the target layout's overrides."""
    return config_from_dict(consolidated.config.to_dict(), [*overrides, f"run_dir={run_dir}"])


def reshard(consolidated_dir: Path, output: Path, nproc: int, overrides: list[str] = (),
            weights_only: bool = False, overwrite: bool = False, timeout: float = 3600) -> Path:
    """Write the run directory `output` holding a training checkpoint of the consolidated
    checkpoint for the layout of its config plus `overrides` over `nproc` ranks."""
    consolidated = Consolidated(consolidated_dir)
    if not weights_only and not consolidated.has_moments:
        raise L3TrainError(f"{consolidated.directory} has no optimizer state; consolidate with --with-optimizer, "
                           f"or pass --weights-only to start the optimizer afresh")
    output = Path(output)
    refuse_existing([output], "a run directory", overwrite)
    # Every check that can fail, before any rank starts: one clear line.
    target = target_config(consolidated, output, list(overrides))
    validate_for_world(target, nproc)
    model = meta_model(target, load_allocation(target).rows_per_token if target.l3.after_blocks else None)
    check_tensors({name: tuple(t.shape) for name, t in plain_state_dict(model, target.model.tie_embeddings).items()},
                  consolidated.shapes(), str(consolidated.directory))
    staging = output.with_name(f".{output.name}.resharding")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with tempfile.TemporaryDirectory(prefix="l3train-reshard-") as scratch:
            config_path = Path(scratch) / "target.yaml"
            config_path.write_text(target_config(consolidated, staging, list(overrides)).to_yaml())
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                       "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                       "-m", "l3train.conversion.reshard", "--config", str(config_path),
                       "--consolidated", str(consolidated.directory), *(["--weights-only"] if weights_only else [])]
            # On the host (gloo): the slices are cut and saved, no accelerator is needed.
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
            if result.returncode != 0:
                raise L3TrainError(f"resharding into {nproc} ranks failed: {_first_error(result.stderr)}")
        # The run's own config names its final place (run_dir is free to change on resume).
        final_config = config_from_dict(yaml.safe_load((staging / "config.yaml").read_text()), [f"run_dir={output}"])
        atomic_write_text(staging / "config.yaml", final_config.to_yaml())
        if output.exists():
            shutil.rmtree(output)
        os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def _first_error(stderr: str) -> str:
    """The ranks' one-line error, else the last exception line of a traceback."""
    lines = [re.sub(r"^\[rank\d+\]:\s*", "", line) for line in stderr.splitlines()]
    errors = [line[len("error: "):] for line in lines if line.startswith("error: ")]
    exceptions = [line for line in lines if re.match(r"^[\w.]+(Error|Exception): ", line)]
    return (errors or exceptions[-1:] or ["see the ranks' output (rerun the command it names)"])[0]



def _local_slice(full: torch.Tensor, dim: int | None, rank: int, size: int) -> torch.Tensor:
    return full if dim is None or size == 1 else full.chunk(size, dim=dim)[rank]


def restore_optimizer_state(trainer, consolidated: Consolidated) -> None:
    """Give every optimizer of `trainer` (built for the target layout from the consolidated
    weights) this rank's slice of the AdamW moments and the step count."""
    from l3train.parallel.tp_dims import tensor_parallel_dim
    from l3train.trainer import deepspeed_adapter

    moments, parallel, parts = consolidated.moments(), trainer.parallel, trainer.parts
    step = consolidated.optimizer_step

    def of(name: str, cut) -> dict[str, torch.Tensor]:
        return {key: cut(values[name]) for key, values in moments.items()}

    dense = [(param, of(name, lambda full, name=name: _local_slice(full, tensor_parallel_dim(name),
                                                                  parallel.tp_rank, parallel.tp_size)))
             for name, param in parts.model.named_parameters()]
    deepspeed_adapter.set_adam_state(trainer.engine, trainer.optimizer, dense, step)
    # The rank-local tensors are in the plain model's order of their names.
    allocation = load_allocation(trainer.cfg)
    roles = names_by_role(meta_model(trainer.cfg, allocation.rows_per_token if allocation else None))
    if parts.rows is not None:
        rows = torch.as_tensor(parts.rows.plan.global_row_indices(parts.rows.shard), dtype=torch.long)
        _set_rank_local(parts.rows, [of(name, lambda full: full[rows]) for name in roles[ParamRole.L3_ROWS]], step)
    if parts.experts is not None:
        local = parts.experts.backends[0].num_experts // parallel.ep_size
        start = parallel.ep_rank * local
        _set_rank_local(parts.experts, [of(name, lambda full: full[start:start + local])
                                        for name in roles[ParamRole.EXPERT]], step)


def _set_rank_local(part, moments: list[dict[str, torch.Tensor]], step: float) -> None:
    if len(moments) != len(part.params):
        raise L3TrainError(f"the consolidated optimizer state has {len(moments)} {part.kind} tensors, "
                           f"the model has {len(part.params)}")
    for param, values in zip(part.params, moments):
        part.optimizer.state[param] = {"step": torch.tensor(float(step), dtype=torch.float32, device=param.device),
                                       **{key: value.to(param.device).clone() for key, value in values.items()}}


def advance_to_step(trainer, step: int) -> None:
    """Put the trainer's LR schedules and step counters at `step` (optimizer steps completed)."""
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore")
        for scheduler in [trainer.scheduler, *(part.scheduler for part in trainer.parts.rank_local)]:
            for _ in range(step):
                scheduler.step()
    trainer.engine.global_steps = step
    trainer.engine.global_samples = step * trainer.cfg.training.global_batch_size
    trainer.step = step


def main(argv: list[str] | None = None) -> int:
    """One rank of `reshard` (run under torchrun)."""
    parser = CliArgumentParser(prog="python -m l3train.conversion.reshard", description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--consolidated", required=True)
    parser.add_argument("--weights-only", action="store_true")
    args = parser.parse_args(argv)
    from l3train.trainer.trainer import Trainer

    trainer = Trainer(load_config(args.config), init_from=args.consolidated)
    try:
        trainer.build()
        if not args.weights_only:
            restore_optimizer_state(trainer, trainer.init_from)
        advance_to_step(trainer, trainer.init_from.step)
        trainer.save()
        trainer.monitor.close()
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    run_cli(main)
