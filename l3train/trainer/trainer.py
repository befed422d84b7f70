"""The Trainer: build a run from its config, take optimizer steps, validate, checkpoint.

    trainer = Trainer(cfg, resume=True)
    trainer.build()       # ranks, model, parallelization, data, DeepSpeed engine, resume
    trainer.train()       # the loop; returns the exit status (75 when stopped by a signal)

One code path for 1 process, data parallel over gloo (CPU) or NCCL (GPU), and SLURM. The
plain model is built identically on every rank, then `l3train.parallel.parallelize` makes
it this rank's part (tensor parallelism, sharded L³ rows, expert parallelism) before
DeepSpeed wraps the dense parameters; the rank-local rows and experts are stepped,
clipped and checkpointed beside the engine.

Data order is a pure function of (seed, step), and per-step randomness is reseeded from
(seed, step, data-parallel rank), so the same config gives the same losses and `--resume`
continues the exact trajectory of an uninterrupted run. A step whose loss or gradient is not
finite is skipped on every rank (no update to the dense weights, the rows or the experts).
"""

from __future__ import annotations

import errno
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from l3train.checkpoint import (clear_abandoned_staging, load_latest_checkpoint, no_space_message,
                                refuse_existing_checkpoints, run_identity, save_checkpoint)
from l3train.checkpoint.consolidated import Consolidated, load_weights
from l3train.config import Config, validate_for_world
from l3train.data.dataset import batch_for_step, build_datasets
from l3train.distributed import expected_world_size, init_distributed, launcher_rank
from l3train.errors import L3TrainError
from l3train.preemption import EXIT_REQUEUE, StopRequest
from l3train.run_lock import RunDirLock
from l3train.trainer import deepspeed_adapter
from l3train.trainer.loss import lm_loss, training_loss
from l3train.trainer.monitor import Monitor, StepStats, router_vector
from l3train.trainer.profiler import StepProfiler
from l3train.utils.allocator import keep_freed_memory
from l3train.utils.atomic import atomic_write_text


def micro_batches(batch: dict[str, torch.Tensor], size: int, device: torch.device):
    for start in range(0, batch["tokens"].shape[0], size):
        yield {k: v[start:start + size].to(device) for k, v in batch.items()}


class Trainer:
    def __init__(self, cfg: Config, resume: bool = False, exit_after_steps: int = 0,
                 allow_config_change: bool = False, init_from: str | None = None) -> None:
        """`init_from`: a consolidated checkpoint whose weights a run starting from scratch
        begins with (a converted or imported model); a resumed run ignores it."""
        self.cfg, self.resume, self.exit_after_steps = cfg, resume, exit_after_steps
        self.allow_config_change = allow_config_change
        self.init_from = Consolidated(init_from) if init_from else None  # verified before the slow start-up
        self.stop = StopRequest()  # before the slow start-up, so an early signal is not lost
        # Every world-dependent check, before the slow start-up.
        self.layout = validate_for_world(cfg, expected_world_size())
        self.step = 0  # optimizer steps completed (skipped ones included: they consumed their data)
        self.skipped_steps = self.skipped_in_a_row = 0
        # One trainer per run_dir; rank 0 holds the lock for the whole world.
        self.lock = RunDirLock(cfg.run_dir) if launcher_rank() == 0 else None

    def build(self) -> None:
        """Ranks and process groups, the parallel model, data, the DeepSpeed engine, and the
        checkpoint to resume from."""
        cfg = self.cfg
        cleared = None
        if self.lock is not None:
            try:
                self.lock.acquire()
                if self.resume:  # the lock is ours: no other trainer can be saving into it
                    cleared = clear_abandoned_staging(cfg.run_dir)
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
                raise L3TrainError(no_space_message(cfg.run_dir, err)) from None
        if not self.resume:
            refuse_existing_checkpoints(cfg)
        self.world = init_distributed(cfg.parallel.collective_timeout_minutes)
        if self.world.device.type == "cpu":
            keep_freed_memory()  # each step's gradients (and activations) reuse the last step's pages
        if self.world.size != self.layout.world_size:
            raise L3TrainError(f"{self.world.size} ranks joined, but the launcher announced {self.layout.world_size} "
                               f"(WORLD_SIZE or SLURM_NTASKS); start the trainers with torchrun or srun")
        # Imported here, after the checks: megatron-core takes seconds to import.
        from l3train.model.build import build_model
        from l3train.optim import apply_hyperparameters, build_optimizer, build_scheduler
        from l3train.parallel.parallelize import parallelize
        from l3train.parallel.state import DeepSpeedMPU, initialize_parallel
        from l3train.row_adamw import row_sparse_adamw_available

        self.parallel = initialize_parallel(self.layout.tensor_parallel, self.layout.expert_parallel)
        # Sharded rows are created by each rank for itself (never the whole tables), unless
        # they come from a consolidated checkpoint's whole tables.
        model, allocation = build_model(cfg, defer_rows=self.layout.rows_sharded and self.init_from is None)
        if self.init_from is not None:
            # Into the plain model: parallelize() then gives every rank its slice, as from an initialisation.
            load_weights(model, self.init_from.state_dict(), cfg.model.tie_embeddings, str(self.init_from.directory))
        self.parts = parallelize(model, allocation, cfg, self.layout, self.parallel, self.world.device)
        tr = cfg.training
        # One epoch of training samples, not steps × batch: see l3train.data.dataset.
        self.train_ds, self.valid_ds = build_datasets(cfg.data, tr.seed, tr.eval_batches * tr.global_batch_size)
        self.identity = run_identity(self.layout,
                                     allocation.rows_per_token if allocation else None,
                                     self.parts.rows.plan if self.parts.rows else None)
        self.optimizer = build_optimizer(self.parts.model, cfg)  # DeepSpeed steps this very object
        self.engine, self.scheduler = deepspeed_adapter.initialize_engine(
            self.parts.model, self.optimizer, build_scheduler(self.optimizer, cfg),
            deepspeed_adapter.engine_config(cfg, self.layout), DeepSpeedMPU() if self.parallel.tp_size > 1 else None)
        if deepspeed_adapter.hands_gradients_over(self.layout, tr.precision) and row_sparse_adamw_available():
            for layer in self.parts.model.l3_layers():  # no table-shaped gradient (on CPUs: the kernel's)
                layer.rows.give_row_sparse_gradients()
        resumed = load_latest_checkpoint(self.engine, cfg, self.identity, self.parts, self.world.rank,
                                         self.world.size, self.allow_config_change) if self.resume else None
        if resumed and resumed.config_changes:
            # Restored optimizer state carries the checkpoint's hyperparameters; the new ones apply.
            apply_hyperparameters(self.optimizer.param_groups, self.scheduler, cfg)
            for part in self.parts.rank_local:
                apply_hyperparameters(part.optimizer.param_groups, part.scheduler, cfg)
        self.step = self.start_step = resumed.step if resumed else 0
        self.monitor = Monitor(cfg, self.world.is_main, self.start_step)
        if self.world.is_main:
            atomic_write_text(Path(cfg.run_dir) / "config.yaml", cfg.to_yaml())
        if cleared:
            self.monitor.info(cleared)
        for change in resumed.config_changes if resumed else []:
            self.monitor.info(f"config changed on resume (--allow-config-change): {change}")
        self.monitor.info(self._describe())
        if self.valid_ds is None:
            self.monitor.info(f"data.split={cfg.data.split!r} has no validation part: validation is skipped")

    def close(self) -> None:
        """Release the run directory (also after a failure); the trainer is done."""
        if self.lock is not None:
            self.lock.release()

    def _describe(self) -> str:
        cfg, layout, parts = self.cfg, self.layout, self.parts
        params = (sum(p.numel() for p in parts.model.parameters())
                  + sum(p.numel() for part in parts.rank_local for p in part.params))
        sequence = ", sequence parallel" if cfg.parallel.sequence_parallel else ""
        where = f" (TP={layout.tensor_parallel}{sequence} × DP={layout.data_parallel})" if layout.tensor_parallel > 1 else ""
        if parts.rows is not None:
            where += (f", L³ rows sharded over {parts.rows.plan.num_shards} ranks "
                      f"(exchanged through {parts.rows.transport})")
        if parts.experts is not None:
            where += f", experts split over {layout.expert_parallel} ranks (EP)"
        per_rank = " per rank" if layout.tensor_parallel > 1 or parts.rank_local else ""
        start = (f"resuming at step {self.step}" if self.step else
                 f"starting from the weights of {self.init_from.directory}" if self.init_from else "starting from scratch")
        zero = f"ZeRO-{layout.zero_stage}" + (f" (parallel.zero_stage={cfg.parallel.zero_stage} partitions nothing "
                                               f"over one data-parallel rank)"
                                               if layout.zero_stage != cfg.parallel.zero_stage else "")
        return (f"{layout.world_size} rank(s){where} on {self.world.device.type}, {zero}, "
                f"{cfg.training.precision}, {params / 1e6:.2f}M parameters{per_rank}, {start}; "
                f"micro-batch {layout.micro_batch_size} × {layout.gradient_accumulation_steps} accumulation "
                f"step(s) per rank; run dir {cfg.run_dir}")

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """This rank's share of the global batch of `step` (on the host)."""
        tr = self.cfg.training
        return batch_for_step(self.train_ds, step, tr.global_batch_size, self.parallel.dp_rank,
                              self.parallel.dp_size, tr.seed)

    def train_step(self, batch: dict[str, torch.Tensor]) -> StepStats:
        """One optimizer step on this rank's share `batch` of the global batch of step `self.step`."""
        from l3train.parallel.state import seed_parallel  # loaded by build(); megatron-core

        start, cfg, engine = time.time(), self.cfg, self.engine
        phase = torch.profiler.record_function
        # By data-parallel rank: the TP ranks of one replica must draw alike for their replicated work.
        seed_parallel(cfg.training.seed * 1_000_003 + self.step * 1_009 + self.parallel.dp_rank)
        step_loss = torch.zeros((), device=self.world.device)
        entropy, router, grad_norm, count, skipped, stop = {}, None, None, 0, False, False
        for micro in micro_batches(batch, self.layout.micro_batch_size, self.world.device):
            with phase("forward"):
                output = engine(micro["tokens"])
                loss = lm_loss(output.logits, micro["labels"], micro["loss_mask"], self.parallel.tp_size > 1)
            with phase("backward"):
                engine.backward(training_loss(output, loss, cfg.moe))
            step_loss += loss.detach()  # the LM loss: comparable with dense and L³ runs
            boundary = engine.is_gradient_accumulation_boundary()
            with phase("optimizer"):
                if boundary:
                    grad_norm, skipped, stop = self._clip_and_agree(step_loss)
                    self.optimizer.skip_next_step = skipped
                engine.step()
                if boundary:
                    for part in self.parts.rank_local:
                        part.step(skip=skipped)
            entropy = {b: entropy.get(b, 0) + value for b, value in output.l3_entropy.items()}
            vector = router_vector(output.router)
            router = vector if router is None else router + vector
            count += 1
        self.step += 1
        self.skipped_steps += skipped
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
        return StepStats(step=self.step, loss=step_loss / engine.gradient_accumulation_steps(),
                         grad_norm=self._reported_norm(grad_norm), lr=self.scheduler.get_last_lr()[0],
                         seconds=time.time() - start, l3_entropy=entropy, router=router, micro_batches=count,
                         skipped=skipped, skipped_steps=self.skipped_steps, stop=stop)

    def _clip_and_agree(self, step_loss: torch.Tensor) -> tuple[float | None, bool, bool]:
        """At the accumulation boundary, before `engine.step()`: the global gradient norm (None
        where DeepSpeed tells it only in its step), clipping, and what every rank must agree
        on: whether to skip the step (a rank's loss or the global norm is not finite) and
        whether to stop after it (a rank received a stop signal).

        The agreement is one sum over the world of two flags, and with rank-local tensors it
        rides in the all-reduce of their squared norms (`clip_global_norm`). Each collective
        is a point where every rank waits for the slowest: one here instead of three (an
        all-reduce each for the rows' norm, the skip and the stop; two for the dense model)."""
        from l3train.trainer.clipping import clip_global_norm, clip_module_norm, module_grad_norm

        flags = torch.stack([(~torch.isfinite(step_loss)).float(),
                             torch.tensor(float(self.stop.requested), device=step_loss.device)])
        max_norm = self.cfg.optimizer.grad_clip
        clip_here = deepspeed_adapter.clipped_by_l3train(self.layout.zero_stage, self.cfg.training.precision)
        if self.parts.rank_local:
            norm = clip_global_norm(self.engine, self.parts.model, self.parallel, self.parts.rank_local, max_norm,
                                    clip_dense=clip_here, riders=flags)
        else:
            if clip_here:
                norm = clip_module_norm(self.parts.model, self.parallel, max_norm)
            elif deepspeed_adapter.exposes_grad_norm(self.engine):
                norm = deepspeed_adapter.dense_grad_norm(
                    self.engine, lambda: module_grad_norm(self.parts.model, self.parallel))
            else:
                norm = None
            dist.all_reduce(flags)
        not_finite, stop = (value > 0 for value in flags.tolist())
        return norm, not_finite or (norm is not None and not math.isfinite(norm)), stop

    def _reported_norm(self, norm: float | None) -> float | None:
        return deepspeed_adapter.reported_grad_norm(self.engine) if norm is None else norm

    def validate(self) -> float | None:
        """Mean validation loss over `training.eval_batches` fixed batches; None without a validation split."""
        if self.valid_ds is None:
            return None
        tr, parallel, engine = self.cfg.training, self.parallel, self.engine
        engine.eval()
        total = torch.zeros((), device=self.world.device)
        with torch.no_grad():
            for index in range(tr.eval_batches):
                batch = batch_for_step(self.valid_ds, index, tr.global_batch_size, parallel.dp_rank, parallel.dp_size)
                for micro in micro_batches(batch, self.layout.micro_batch_size, self.world.device):
                    total += lm_loss(engine(micro["tokens"]).logits, micro["labels"], micro["loss_mask"],
                                     parallel.tp_size > 1)
        engine.train()
        mean = (total / (tr.eval_batches * engine.gradient_accumulation_steps())).detach().float().clone()
        dist.all_reduce(mean, group=parallel.dp_group)  # the TP ranks of one replica hold the same value
        return mean.item() / parallel.dp_size

    def _report_skipped(self, stats: StepStats) -> None:
        limit = self.cfg.training.max_skipped_steps
        self.monitor.info(f"step {stats.step}: non-finite loss or gradient (grad_norm {stats.grad_norm}), update "
                          f"skipped ({self.skipped_in_a_row} in a row, {self.skipped_steps} in total)")
        if self.skipped_in_a_row >= limit:
            raise L3TrainError(f"{limit} steps in a row (to step {stats.step}) had a non-finite loss or gradient "
                               f"(training.max_skipped_steps={limit}); the run diverged: resume from the last "
                               f"checkpoint with a lower learning rate or more warmup")

    def _log_validation(self, step: int) -> None:
        loss = self.validate()
        if loss is not None:
            self.monitor.write(step, {"val/loss": loss}, f"step {step:>6}/{self.cfg.training.steps} | val_loss {loss:.4f}")

    def save(self) -> Path:
        """Checkpoint the current step (collective); refused if any weight is not finite."""
        self._check_finite_weights()
        path = save_checkpoint(self.engine, self.cfg, self.step, self.identity, self.parts, self.world.rank,
                               self.world.size)
        self.monitor.info(f"saved checkpoint {path}")
        return path

    def _check_finite_weights(self) -> None:
        named = [(name, getattr(p, "ds_tensor", p)) for name, p in self.parts.model.named_parameters()]
        named += [(f"{part.kind}[{i}]", p) for part in self.parts.rank_local for i, p in enumerate(part.params)]
        first = next((name for name, tensor in named if not torch.isfinite(tensor.detach()).all()), None)
        flag = torch.tensor(float(first is not None), device=self.world.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            where = f"{first} on rank {self.world.rank}" if first else "a weight on another rank"
            raise L3TrainError(f"refusing to save a checkpoint of step {self.step}: {where} is not finite; "
                               f"resume from the last checkpoint with a lower learning rate")

    def train(self) -> int:
        """The training loop; returns the process exit status (EXIT_REQUEUE when stopped by a signal)."""
        tr = self.cfg.training
        if self.step == 0:
            self._log_validation(0)
        run_start = time.time()
        profiler = StepProfiler(tr.profile_steps, self.cfg.run_dir, self.world.rank, self.world.device,
                                self.monitor.info)
        while self.step < tr.steps:
            profiler.step_begins(self.step)
            with torch.profiler.record_function("data"):
                batch = self.batch(self.step)
            stats = self.train_step(batch)
            profiler.step_ends(stats.step)
            self.monitor.record(stats, time.time() - run_start)
            done = stats.step
            if stats.skipped:
                self._report_skipped(stats)
            if done % tr.eval_interval == 0 or done == tr.steps:
                self._log_validation(done)
            preempted = done < tr.steps and stats.stop
            exiting = self.exit_after_steps > 0 and done - self.start_step >= self.exit_after_steps
            if done % self.cfg.checkpoint.save_interval == 0 or done == tr.steps or exiting or preempted:
                self.save()
            if preempted:
                self.monitor.info(f"stop signal ({self.stop.signal_name or 'on another rank'}) at step {done}: "
                                  f"checkpoint saved, exiting with status {EXIT_REQUEUE} for requeue")
                profiler.close()
                self.monitor.close()
                return EXIT_REQUEUE
            if exiting:
                self.monitor.info(f"exiting after {self.exit_after_steps} steps as asked; continue with --resume")
                break
        profiler.close()
        self.monitor.close()
        dist.barrier()
        return 0
