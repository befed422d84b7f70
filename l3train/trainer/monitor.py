"""What a run reports: one console line per log interval, TensorBoard events and metrics.jsonl
(and a Weights & Biases run with `logging.wandb`).

The trainer hands every step's `StepStats` to the `Monitor`; the step's figures stay on the
device (no host sync per step for monitoring) and are reduced over the ranks only on the
steps that are logged. Only rank 0 writes. `metrics.jsonl` holds the same scalars as
TensorBoard, one JSON object per logged step, for scripts (the report tool, tests) that
should not parse event files. Throughput is logged in the units peers report: tokens/s per
device, model TFLOP/s per device, MFU and peak memory (l3train/trainer/throughput.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from l3train.config import Config
from l3train.model.moe import RouterStats
from l3train.sizing.accounting import training_flops
from l3train.trainer.throughput import device_peak_tflops, peak_memory_gib, throughput_scalars
from l3train.utils.atomic import atomic_write_text


@dataclass
class StepStats:
    """One optimizer step as this rank saw it (tensors stay on the device until logged)."""

    step: int  # optimizer steps completed
    loss: Tensor  # this rank's mean LM loss over its micro-batches
    grad_norm: float | None  # global norm before clipping (None where DeepSpeed reports none)
    lr: float
    seconds: float  # wall time of the step
    l3_entropy: dict[int, Tensor]  # by block: summed mean entropy of the step's micro-batches
    router: Tensor | None  # summed `router_vector`s of the step's micro-batches
    micro_batches: int
    skipped: bool = False  # not applied: its loss or gradient was not finite
    skipped_steps: int = 0  # skipped steps of this run so far
    stop: bool = False  # a rank had received a stop signal by this step's accumulation boundary


def router_vector(router: dict[int, RouterStats]) -> Tensor | None:
    """Per MoE block, in block order: [aux loss, z-loss, dropped fraction, load per expert]."""
    if not router:
        return None
    return torch.cat([torch.cat([torch.stack([stats.aux_loss.detach(), stats.z_loss.detach(),
                                              stats.dropped_fraction]), stats.load])
                      for _, stats in sorted(router.items())])


def format_line(step: int, cfg: Config, scalars: dict[str, float], elapsed: float) -> str:
    parts = [f"step {step:>6}/{cfg.training.steps}", f"loss {scalars['train/loss']:.4f}",
             f"lr {scalars['train/lr']:.2e}"]
    if "train/grad_norm" in scalars:
        parts.append(f"grad_norm {scalars['train/grad_norm']:.3f}")
    parts.append(f"{scalars['train/tokens_per_s']:,.0f} tok/s")
    if "train/tflops_per_device" in scalars:
        parts.append(f"{scalars['train/tokens_per_s_per_device']:,.0f} tok/s/device "
                     f"{scalars['train/tflops_per_device']:.3g} TFLOP/s/device"
                     + (f" MFU {scalars['train/mfu']:.1%}" if "train/mfu" in scalars else ""))
    if "train/peak_memory_gib" in scalars:
        parts.append(f"peak_mem {scalars['train/peak_memory_gib']:.2f} GiB")
    entropies = [v for k, v in scalars.items() if k.startswith("l3/entropy")]
    if entropies:
        parts.append("l3_entropy " + "/".join(f"{e:.2f}" for e in entropies))
    if "train/moe_aux_loss" in scalars:
        imbalance = max(v for k, v in scalars.items() if k.endswith("load_max_over_mean"))
        parts.append(f"moe_aux {scalars['train/moe_aux_loss']:.3f} z {scalars['train/moe_z_loss']:.3f} "
                     f"max_load {imbalance:.2f}x")
    parts.append(f"elapsed {elapsed:.0f}s")
    return " | ".join(parts)


class Monitor:
    """Accumulates `StepStats` between log steps; reduces and writes them on log steps."""

    def __init__(self, cfg: Config, is_main: bool, start_step: int,
                 mean_rows_per_token: float | None = None) -> None:
        """`mean_rows_per_token`: the allocation's corpus mean d_t, for the model FLOPs (None:
        read from `l3.allocation` when the model has L³ layers)."""
        self.cfg, self.is_main = cfg, is_main
        self.pending: list[StepStats] = []
        self.tokens_per_step = cfg.training.global_batch_size * cfg.data.seq_length
        self.wandb = None
        self.peak_tflops: float | None = None
        self.device: torch.device | None = None  # the steps' device, known at the first one
        if is_main:
            self.flops = training_flops(cfg.model, cfg.l3, cfg.data.seq_length,
                                        self._mean_rows(mean_rows_per_token), cfg.moe)
            # A start from scratch drops everything an earlier attempt logged (one that crashed
            # before its first checkpoint); a resume drops what was logged past its checkpoint.
            self._open(Path(cfg.run_dir), purge_step=start_step + 1 if start_step else 0)
            if cfg.logging.wandb:
                from l3train.trainer.wandb_logger import WandbLogger

                self.wandb = WandbLogger(cfg)

    def _mean_rows(self, given: float | None) -> float:
        if given is not None or not self.cfg.l3.after_blocks:
            return given or 0.0
        from l3train.allocation.allocation import Allocation

        return Allocation.load(self.cfg.l3.allocation).mean_rows_per_token_occurrence()

    def _open(self, run_dir: Path, purge_step: int) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)
        jsonl_path = run_dir / "metrics.jsonl"
        if jsonl_path.exists():
            kept = [line for line in jsonl_path.read_text().splitlines() if _step_of(line) < purge_step]
            atomic_write_text(jsonl_path, "".join(line + "\n" for line in kept))
        self.jsonl = open(jsonl_path, "a")

    def info(self, message: str) -> None:
        if self.is_main:
            print(f"[l3train] {message}", flush=True)

    def record(self, stats: StepStats, elapsed: float) -> None:
        """Keep `stats`; on a log step (every `training.log_interval` and the last) reduce
        the interval over the ranks and write it."""
        if self.device is None:
            self._first_step(stats.loss.device)
        self.pending.append(stats)
        if stats.step % self.cfg.training.log_interval == 0 or stats.step == self.cfg.training.steps:
            scalars = self._reduce(self.pending)
            self.pending = []
            self.write(stats.step, scalars, format_line(stats.step, self.cfg, scalars, elapsed))

    def _first_step(self, device: torch.device) -> None:
        """The device's peak, and one line saying how throughput is counted."""
        self.device = device
        if not self.is_main:
            return
        self.peak_tflops, source = device_peak_tflops(self.cfg.training.peak_tflops, self.cfg.training.precision,
                                                      device)
        flops = self.flops
        peak = f"MFU against {self.peak_tflops:g} TFLOP/s per device ({source})" if self.peak_tflops else source
        self.info(f"model FLOPs per token (forward + backward): {flops.per_token / 1e6:.4g}M = 6 × "
                  f"{flops.dense_params / 1e6:.4g}M parameters + {flops.attention / 1e6:.4g}M attention + "
                  f"{flops.l3_rows / 1e6:.4g}M L³ rows (l3train.sizing.accounting.TrainingFlops); {peak}")

    def _reduce(self, steps: list[StepStats]) -> dict[str, float]:
        """The interval's scalars over all ranks, in one all-reduce (a sum over the world):
        each collective is a point where every rank waits for the slowest.

        - losses: each step's averaged over the DP replicas; the TP ranks of a replica hold
          the same loss, so the world's sum over the world size is the DP mean;
        - each L³ layer's mean softmax entropy over the interval's micro-batches and all ranks
          (TP ranks agree, except under sequence parallelism where each holds a slice);
        - the MoE routers' statistics, averaged like the entropies;
        - the largest peak memory of the ranks: a max, carried by the sum as every rank's own
          value in its slot of a world-sized part (-1: it cannot tell).
        """
        world, blocks, micro_batches = dist.get_world_size(), sorted(steps[-1].l3_entropy), \
            sum(s.micro_batches for s in steps)
        losses = torch.stack([s.loss.double() for s in steps])
        means = []  # summed over the interval's micro-batches: entropies per L³ layer, then router statistics
        if blocks:
            means.append(torch.stack([torch.stack([s.l3_entropy[b] for b in blocks]) for s in steps]).double().sum(0))
        if steps[-1].router is not None:
            means.append(torch.stack([s.router for s in steps]).double().sum(0))
        own_peak = peak_memory_gib(self.device)
        peaks = torch.zeros(world, dtype=torch.float64, device=self.device)
        peaks[dist.get_rank()] = -1.0 if own_peak is None else own_peak
        packed = torch.cat([losses, *means, peaks])
        dist.all_reduce(packed)
        values = packed.tolist()
        per_step = [value / world for value in values[:len(steps)]]
        averaged = [value / (world * micro_batches) for value in values[len(steps):len(values) - world]]
        peak = max(values[len(values) - world:])
        seconds = sum(s.seconds for s in steps)
        scalars = {"train/loss": sum(per_step) / len(per_step), "train/lr": steps[-1].lr,
                   "train/tokens_per_s": self.tokens_per_step * len(steps) / max(seconds, 1e-9),
                   **{f"l3/entropy_after_block_{b}": value for b, value in zip(blocks, averaged)}}
        if steps[-1].router is not None:
            scalars.update(self._router_scalars(averaged[len(blocks):]))
        if steps[-1].grad_norm is not None:
            scalars["train/grad_norm"] = steps[-1].grad_norm
        if steps[-1].skipped_steps:
            scalars["train/skipped_steps"] = steps[-1].skipped_steps
        if self.is_main:
            scalars.update(throughput_scalars(scalars["train/tokens_per_s"], world, self.flops.per_token,
                                              self.peak_tflops))
        if peak >= 0:
            scalars["train/peak_memory_gib"] = peak
        return scalars

    def _router_scalars(self, values: list[float]) -> dict[str, float]:
        """Per MoE block the two router losses, the dropped fraction (with a capacity factor),
        each expert's share of the assignments and the busiest expert's share over the mean
        (1 = balanced), from `values` (the `router_vector`s averaged over the micro-batches and
        ranks); and the router losses averaged over blocks."""
        moe, scalars, aux, z = self.cfg.moe, {}, [], []
        width = 3 + moe.num_experts
        for position, index in enumerate(sorted(moe.blocks)):
            prefix, block = f"moe/block_{index}", values[position * width:(position + 1) * width]
            aux.append(block[0])
            z.append(block[1])
            scalars[f"{prefix}/aux_loss"], scalars[f"{prefix}/z_loss"] = block[0], block[1]
            if moe.capacity_factor is not None:
                scalars[f"{prefix}/dropped_fraction"] = block[2]
            load = block[3:]
            scalars.update({f"{prefix}/load_expert_{e:03d}": share for e, share in enumerate(load)})
            scalars[f"{prefix}/load_max_over_mean"] = max(load) * moe.num_experts
        return {"train/moe_aux_loss": sum(aux) / len(aux), "train/moe_z_loss": sum(z) / len(z), **scalars}

    def write(self, step: int, scalars: dict[str, float], console: str | None = None) -> None:
        if not self.is_main:
            return
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()
        if self.wandb is not None:
            self.wandb.log(step, scalars)
        if console:
            print(console, flush=True)

    def close(self) -> None:
        if self.is_main:
            self.writer.close()
            self.jsonl.close()
            if self.wandb is not None:
                self.wandb.close()


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl line; a line cut short by a crash sorts last (dropped)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")
