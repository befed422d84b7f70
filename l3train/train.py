"""Pretrain a Llama-style model with L³ layers under DeepSpeed.

    python -m l3train.train --config configs/tiny_l3.yaml [key.sub=value ...] [--resume]
    torchrun --nproc_per_node 2 -m l3train.train --config ... (data parallel)
    torchrun --nproc_per_node 4 -m l3train.train --config ... parallel.tensor_parallel=2 (TP=2 × DP=2)

One code path for 1 process, data parallel over gloo (CPU) or NCCL (GPU), and SLURM.
With `parallel.tensor_parallel` > 1 the backbone is sharded Megatron-style over groups of
that many consecutive ranks (l3train.parallel.tensor_parallel); the ranks of one group see
the same batch, and DeepSpeed reduces gradients and partitions ZeRO state over the
data-parallel groups only.
With more than one rank the L³ rows are partitioned over all TP×DP ranks by the static
router (`parallel.shard_l3_rows`, l3train.parallel.sharded_l3): they are not parameters of
the module DeepSpeed wraps, and have their own optimizer, global-norm clipping and per-rank
checkpoint files (l3train.parallel.sharded_optim).
MoE blocks (`moe.blocks`) add their weighted router losses (load balancing, z-loss) to the
LM loss; with `moe.expert_parallel` > 1 their experts are split over groups of that many
data-parallel ranks and dispatched by all-to-all (l3train.parallel.expert_parallel), and
are kept outside DeepSpeed like the sharded rows.

Data order is a pure function of (seed, step), and per-step randomness is reseeded
from (seed, step, data-parallel rank), so the same config gives the same losses and `--resume`
continues the exact trajectory of an uninterrupted run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F

from l3train.checkpoint import refuse_existing_checkpoints
from l3train.config import Config, load_config
from l3train.distributed import World, init_distributed
from l3train.errors import CliArgumentParser, L3TrainError, run_cli
from l3train.preemption import EXIT_REQUEUE, StopRequest
from l3train.utils.atomic import atomic_write_text

if TYPE_CHECKING:  # imported lazily at run time: megatron-core is slow to import
    from l3train.parallel.sharded_optim import ShardedExperts, ShardedRows
    from l3train.parallel.state import ParallelState


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CliArgumentParser(
        prog="python -m l3train.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from <run_dir>/checkpoints/latest if it exists (else start fresh)")
    parser.add_argument("--exit-after-steps", type=int, default=0, metavar="N",
                        help="save a checkpoint and exit after N optimizer steps of this invocation "
                             "(e.g. to fit a job's time slot; continue with --resume)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides, e.g. training.steps=50 l3.after_blocks=[1]")
    return parser.parse_args(argv)


def build_model(cfg: Config):
    """The DecoderLM of `cfg` and its L³ allocation (None for a dense model), loaded and
    checked against the tokenizer."""
    from l3train.allocation.allocation import Allocation
    from l3train.data.tokenizer import Tokenizer
    from l3train.model.llama import DecoderLM

    tokenizer = Tokenizer.load(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise L3TrainError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                           f"vocabulary ({tokenizer.vocab_size}, {cfg.data.tokenizer})")
    allocation = None
    if cfg.l3.after_blocks:
        allocation = Allocation.load(cfg.l3.allocation, expect_vocab_size=cfg.model.vocab_size,
                                     expect_tokenizer_id=tokenizer.tokenizer_id)
    torch.manual_seed(cfg.training.seed)  # identical initial weights on every rank
    rows_per_token = allocation.rows_per_token if allocation else None
    return DecoderLM(cfg.model, cfg.l3, rows_per_token, cfg.moe), allocation


def shard_rows(model, allocation, cfg: Config, parallel: ParallelState, device: torch.device) -> ShardedRows:
    """Partition every L³ layer's rows over the TP×DP ranks by the static router's shard plan."""
    from l3train.parallel.shard_plan import plan_shards
    from l3train.parallel.sharded_l3 import shard_lookup_layer
    from l3train.parallel.sharded_optim import ShardedRows

    plan = plan_shards(allocation.rows_per_token, allocation.token_frequencies, parallel.tp_size * parallel.dp_size)
    if cfg.parallel.sequence_parallel:  # each TP rank has its own positions: route over all ranks at once
        layout = (0, 1, None, dist.get_rank(), dist.get_world_size(), dist.group.WORLD)
    else:
        layout = (parallel.tp_rank, parallel.tp_size, parallel.tp_group, parallel.dp_rank, parallel.dp_size,
                  parallel.dp_group)
    attentions = [shard_lookup_layer(layer, plan, *layout, device, gradient_scale=1.0 / parallel.dp_size)
                  for layer in model.l3_layers()]
    return ShardedRows(attentions, plan, parallel.dp_rank * parallel.tp_size + parallel.tp_rank, cfg)


def shard_experts(model, cfg: Config, parallel: ParallelState, device: torch.device) -> ShardedExperts:
    """Split every MoE layer's experts over the expert-parallel group."""
    from l3train.parallel.expert_parallel import shard_experts as shard_layer
    from l3train.parallel.sharded_optim import ShardedExperts

    dispatches = [shard_layer(layer, parallel.ep_rank, parallel.ep_size, parallel.ep_group, parallel.dp_size, device)
                  for layer in model.moe_layers().values()]
    return ShardedExperts(dispatches, parallel.ep_rank, parallel.expert_dp_group,
                          parallel.dp_size // parallel.ep_size, cfg)


def check_rank_local_precision(cfg: Config) -> None:
    """Sharded L³ rows or expert-parallel experts in bf16 need ZeRO-2 or 3 (see
    l3train.parallel.sharded_optim); called when a multi-rank run has either."""
    if cfg.training.precision == "bf16" and cfg.parallel.zero_stage < 2:
        raise L3TrainError(f"sharded L³ rows or experts in bf16 need parallel.zero_stage 2 or 3 (got "
                           f"{cfg.parallel.zero_stage}), or parallel.shard_l3_rows=false and moe.expert_parallel=1")


def deepspeed_config(cfg: Config, dp_size: int) -> dict:
    tr = cfg.training
    per_step = tr.micro_batch_size * dp_size
    if tr.global_batch_size % per_step:
        raise L3TrainError(f"training.global_batch_size={tr.global_batch_size} must be a multiple of "
                           f"training.micro_batch_size × data-parallel ranks = {per_step}")
    return {
        "train_batch_size": tr.global_batch_size,
        "train_micro_batch_size_per_gpu": tr.micro_batch_size,
        "gradient_accumulation_steps": tr.global_batch_size // per_step,
        # Explicit: DeepSpeed's default would silently clip at 1.0.
        "gradient_clipping": cfg.optimizer.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": tr.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
            vocab_parallel: bool = False) -> torch.Tensor:
    """Mean next-token cross-entropy over unmasked positions, computed in fp32.

    `vocab_parallel`: the logits are this tensor-parallel rank's slice of the vocabulary; the
    loss is then megatron's vocab-parallel cross entropy, whole and equal on every TP rank."""
    if vocab_parallel:
        from l3train.parallel.tensor_parallel import vocab_parallel_token_losses

        losses = vocab_parallel_token_losses(logits, labels).flatten()
    else:
        losses = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
    mask = loss_mask.flatten().to(losses.dtype)
    return (losses * mask).sum() / mask.sum().clamp_min(1)


def mean_over_replicas(value: torch.Tensor, parallel: ParallelState) -> float:
    """Mean over the data-parallel ranks (the TP ranks of one replica hold the same value)."""
    value = value.detach().float().clone()
    dist.all_reduce(value, group=parallel.dp_group)
    return value.item() / parallel.dp_size


def micro_batches(batch: dict[str, torch.Tensor], size: int, device: torch.device):
    for start in range(0, batch["tokens"].shape[0], size):
        yield {k: v[start:start + size].to(device) for k, v in batch.items()}


def evaluate(engine, valid_ds, cfg: Config, world: World, parallel: ParallelState) -> float | None:
    """Mean validation loss over `training.eval_batches` fixed batches; None without a validation split."""
    from l3train.data.dataset import batch_for_step

    if valid_ds is None:
        return None
    engine.eval()
    total = torch.zeros((), device=world.device)
    with torch.no_grad():
        for index in range(cfg.training.eval_batches):
            batch = batch_for_step(valid_ds, index, cfg.training.global_batch_size, parallel.dp_rank,
                                   parallel.dp_size)
            for micro in micro_batches(batch, cfg.training.micro_batch_size, world.device):
                total += lm_loss(engine(micro["tokens"]), micro["labels"], micro["loss_mask"], parallel.tp_size > 1)
    engine.train()
    per_rank_batches = cfg.training.eval_batches * engine.gradient_accumulation_steps()
    return mean_over_replicas(total / per_rank_batches, parallel)


def l3_entropies(model, cfg: Config, parallel: ParallelState) -> dict[str, float]:
    """Mean softmax entropy of each L³ layer's last forward; under sequence parallelism the
    mean over the TP ranks' equal slices of the sequence."""
    entropies = {f"l3/entropy_after_block_{index}": block.lookup.last_entropy
                 for index, block in model.lookups.items() if block.lookup.last_entropy is not None}
    if not entropies:
        return {}
    values = torch.stack(list(entropies.values())).float()
    if cfg.parallel.sequence_parallel:
        dist.all_reduce(values, group=parallel.tp_group)
        values /= parallel.tp_size
    return dict(zip(entropies, values.tolist()))


def moe_monitor(model) -> torch.Tensor | None:
    """Per MoE layer, from its last forward: [aux loss, z-loss, dropped fraction, load per expert]."""
    layers = model.moe_layers().values()
    if not layers:
        return None
    return torch.cat([torch.cat([torch.stack([layer.aux_loss.detach(), layer.z_loss.detach(),
                                              torch.tensor(layer.last_dropped, device=layer.aux_loss.device)]),
                                 layer.last_load]) for layer in layers])


def moe_scalars(model, summed: torch.Tensor, count: int, parallel: ParallelState) -> dict[str, float]:
    """TensorBoard scalars from `count` summed `moe_monitor` vectors, averaged over the DP ranks:
    per layer the two router losses, the dropped fraction (with a capacity factor), each
    expert's share of the assignments and the busiest expert's share over the mean
    (1 = balanced); and the router losses averaged over layers."""
    summed = summed.clone()
    dist.all_reduce(summed, group=parallel.dp_group)
    values = (summed / (count * parallel.dp_size)).tolist()
    scalars, offset, aux, z = {}, 0, [], []
    for index, layer in model.moe_layers().items():
        prefix = f"moe/block_{index}"
        aux.append(values[offset])
        z.append(values[offset + 1])
        scalars[f"{prefix}/aux_loss"], scalars[f"{prefix}/z_loss"] = values[offset], values[offset + 1]
        if layer.capacity_factor is not None:
            scalars[f"{prefix}/dropped_fraction"] = values[offset + 2]
        load = values[offset + 3:offset + 3 + layer.num_experts]
        scalars.update({f"{prefix}/load_expert_{e:03d}": share for e, share in enumerate(load)})
        scalars[f"{prefix}/load_max_over_mean"] = max(load) * layer.num_experts
        offset += 3 + layer.num_experts
    return {"train/moe_aux_loss": sum(aux) / len(aux), "train/moe_z_loss": sum(z) / len(z), **scalars}


def format_line(step: int, cfg: Config, scalars: dict[str, float], elapsed: float) -> str:
    parts = [f"step {step:>6}/{cfg.training.steps}", f"loss {scalars['train/loss']:.4f}",
             f"lr {scalars['train/lr']:.2e}"]
    if "train/grad_norm" in scalars:
        parts.append(f"grad_norm {scalars['train/grad_norm']:.3f}")
    parts.append(f"{scalars['train/tokens_per_s']:,.0f} tok/s")
    entropies = [v for k, v in scalars.items() if k.startswith("l3/entropy")]
    if entropies:
        parts.append("l3_entropy " + "/".join(f"{e:.2f}" for e in entropies))
    if "train/moe_aux_loss" in scalars:
        imbalance = max(v for k, v in scalars.items() if k.endswith("load_max_over_mean"))
        parts.append(f"moe_aux {scalars['train/moe_aux_loss']:.3f} z {scalars['train/moe_z_loss']:.3f} "
                     f"max_load {imbalance:.2f}x")
    parts.append(f"elapsed {elapsed:.0f}s")
    return " | ".join(parts)


def train(cfg: Config, resume: bool, exit_after_steps: int = 0) -> int:
    """Run training; returns the process exit status (EXIT_REQUEUE when stopped by a signal)."""
    stop = StopRequest()  # before the slow start-up, so an early signal is not lost
    from l3train.parallel.state import DeepSpeedMPU, initialize_parallel, seed_parallel
    from l3train.parallel.tensor_parallel import check_tensor_parallel, parallelize_tensor

    tp = cfg.parallel.tensor_parallel
    check_tensor_parallel(cfg.model, tp)  # config errors should not wait for the start-up
    if not resume:
        refuse_existing_checkpoints(cfg)
    world = init_distributed()
    parallel = initialize_parallel(tp, cfg.moe.expert_parallel if cfg.moe.blocks else 1)
    import deepspeed

    from l3train.checkpoint import load_latest_checkpoint, save_checkpoint
    from l3train.data.dataset import batch_for_step, build_datasets
    from l3train.metrics import MetricsLogger
    from l3train.model.moe import router_loss
    from l3train.optim import build_optimizer, build_scheduler
    from l3train.parallel.sharded_optim import clip_global_norm, module_grad_norm

    tr = cfg.training
    ds_config = deepspeed_config(cfg, parallel.dp_size)
    model, allocation = build_model(cfg)
    if tp > 1:
        model = parallelize_tensor(model, parallel, cfg.parallel.sequence_parallel)
    rows = experts = None
    if cfg.parallel.shard_l3_rows and allocation is not None and world.size > 1:
        rows = shard_rows(model, allocation, cfg, parallel, world.device)
    if parallel.ep_size > 1:
        experts = shard_experts(model, cfg, parallel, world.device)
    rank_local = [part for part in (rows, experts) if part is not None]
    if rank_local:
        check_rank_local_precision(cfg)
    train_ds, valid_ds = build_datasets(cfg.data, tr.seed, tr.steps * tr.global_batch_size,
                                        tr.eval_batches * tr.global_batch_size)
    optimizer = build_optimizer(model, cfg)
    # Without an mpu DeepSpeed treats every rank as data parallel, which is exact at TP=1.
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                   lr_scheduler=build_scheduler(optimizer, cfg), config=ds_config,
                                                   mpu=DeepSpeedMPU() if tp > 1 else None)
    start_step = (load_latest_checkpoint(engine, cfg, rank_local, world.rank, world.size) if resume else None) or 0
    run_dir = Path(cfg.run_dir)
    if world.is_main:
        atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
        params = sum(p.numel() for p in model.parameters()) + sum(p.numel() for part in rank_local for p in part.params)
        sequence = ", sequence parallel" if cfg.parallel.sequence_parallel else ""
        layout = f" (TP={tp}{sequence} × DP={parallel.dp_size})" if tp > 1 else ""
        if rows is not None:
            layout += f", L³ rows sharded over {rows.plan.num_shards} ranks"
        if experts is not None:
            layout += f", experts split over {parallel.ep_size} ranks (EP)"
        print(f"[l3train] {world.size} rank(s){layout} on {world.device.type}, ZeRO-{cfg.parallel.zero_stage}, "
              f"{tr.precision}, {params / 1e6:.2f}M parameters{' per rank' if tp > 1 or rank_local else ''}, "
              f"{'resuming at step ' + str(start_step) if start_step else 'starting from scratch'}; "
              f"run dir {run_dir}", flush=True)
    metrics = MetricsLogger(run_dir, enabled=world.is_main, purge_step=start_step + 1 if start_step else None)
    tokens_per_step = tr.global_batch_size * cfg.data.seq_length
    if valid_ds is None and world.is_main:
        print(f"[l3train] data.split={cfg.data.split!r} has no validation part: validation is skipped", flush=True)

    def log_validation(step: int) -> None:
        val_loss = evaluate(engine, valid_ds, cfg, world, parallel)
        if val_loss is not None:
            metrics.log(step, {"val/loss": val_loss}, f"step {step:>6}/{tr.steps} | val_loss {val_loss:.4f}")

    if start_step == 0:
        log_validation(0)
    # tokens/s counts training steps only, not validation or checkpointing.
    interval_loss, interval_steps, interval_seconds, run_start = 0.0, 0, 0.0, time.time()
    interval_moe, interval_micro_batches = None, 0  # summed `moe_monitor` vectors
    for step in range(start_step, tr.steps):
        step_start = time.time()
        # By data-parallel rank: the TP ranks of one replica must draw alike for their replicated work.
        seed_parallel(tr.seed * 1_000_003 + step * 1_009 + parallel.dp_rank)
        batch = batch_for_step(train_ds, step, tr.global_batch_size, parallel.dp_rank, parallel.dp_size)
        step_loss = torch.zeros((), device=world.device)
        for micro in micro_batches(batch, tr.micro_batch_size, world.device):
            loss = lm_loss(engine(micro["tokens"]), micro["labels"], micro["loss_mask"], tp > 1)
            routing = router_loss(list(model.moe_layers().values()), cfg.moe)
            engine.backward(loss if routing is None else loss + routing)
            monitor = moe_monitor(model)
            if monitor is not None:
                interval_moe = monitor if interval_moe is None else interval_moe + monitor
                interval_micro_batches += 1
            boundary = engine.is_gradient_accumulation_boundary()
            if boundary and rank_local:
                unclipped_norm = clip_global_norm(engine, model, parallel, rank_local, cfg.optimizer.grad_clip)
            elif boundary:
                unclipped_norm = module_grad_norm(model, parallel) if cfg.parallel.zero_stage == 0 else None
            engine.step()
            if boundary:
                for part in rank_local:
                    part.step()
            step_loss += loss.detach()  # the LM loss: comparable with dense and L³ runs
        interval_loss += mean_over_replicas(step_loss / engine.gradient_accumulation_steps(), parallel)
        interval_steps += 1
        interval_seconds += time.time() - step_start
        done = step + 1
        if done % tr.log_interval == 0 or done == tr.steps:
            scalars = {"train/loss": interval_loss / interval_steps, "train/lr": scheduler.get_last_lr()[0],
                       "train/tokens_per_s": tokens_per_step * interval_steps / max(interval_seconds, 1e-9),
                       **l3_entropies(model, cfg, parallel)}
            if interval_moe is not None:
                scalars.update(moe_scalars(model, interval_moe, interval_micro_batches, parallel))
                interval_moe, interval_micro_batches = None, 0
            grad_norm = engine.get_global_grad_norm() if unclipped_norm is None else unclipped_norm
            if grad_norm is not None:
                scalars["train/grad_norm"] = float(grad_norm)
            metrics.log(done, scalars, format_line(done, cfg, scalars, time.time() - run_start))
            interval_loss, interval_steps, interval_seconds = 0.0, 0, 0.0
        if done % tr.eval_interval == 0 or done == tr.steps:
            log_validation(done)
        preempted = done < tr.steps and stop.agreed(world.device)
        exiting = exit_after_steps > 0 and done - start_step >= exit_after_steps
        if done % cfg.checkpoint.save_interval == 0 or done == tr.steps or exiting or preempted:
            path = save_checkpoint(engine, cfg, done, world.is_main,
                                   lambda directory: [part.save(directory, world.rank) for part in rank_local])
            if world.is_main:
                print(f"[l3train] saved checkpoint {path}", flush=True)
        if preempted:
            if world.is_main:
                print(f"[l3train] stop signal ({stop.signal_name or 'on another rank'}) at step {done}: "
                      f"checkpoint saved, exiting with status {EXIT_REQUEUE} for requeue", flush=True)
            metrics.close()
            return EXIT_REQUEUE
        if exiting:
            if world.is_main:
                print(f"[l3train] exiting after {exit_after_steps} steps as asked; continue with --resume", flush=True)
            break
    metrics.close()
    dist.barrier()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.exit_after_steps < 0:
        raise L3TrainError(f"--exit-after-steps must be >= 0, got {args.exit_after_steps}")
    return train(cfg, args.resume, args.exit_after_steps)


if __name__ == "__main__":
    run_cli(main)
