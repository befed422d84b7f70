"""Every place l3train reaches into DeepSpeed beyond its public API, in one module.

DeepSpeed owns the dense parameters: ZeRO partitioning, gradient reduction, loss scaling,
clipping and the checkpoint files (which l3train.checkpoint.deepspeed_files writes and
reads: this module keeps only what touches a live engine). Sharded L³ rows and expert-parallel experts live outside
it (l3train.parallel.sharded_optim), and clipping all of them by one global norm needs the
dense norm *before* `engine.step()` and a way to set the clip threshold of that step; for
both DeepSpeed has no public API, so this adapter uses its internals:

- ZeRO 1/2 (`DeepSpeedZeroOptimizer`): `scaled_global_norm()` and `loss_scale`;
- ZeRO 3 (`DeepSpeedZeroOptimizer_Stage3`): `_get_norm_groups()` combined by
  `deepspeed.runtime.utils.combine_grad_norm_groups`, and `loss_scale`;
- the threshold: the ZeRO optimizers' `clip_grad`, and at ZeRO-0 the engine's
  `_config.gradient_clipping`;
- setting AdamW's moments of a fresh engine (resharding a checkpoint, `set_adam_state`):
  DeepSpeed's tensor-fragment API (`safe_set_full_optimizer_state`) writes a parameter's
  share into the ZeRO partitions, but only once the base optimizer has state, which it
  creates lazily at the first step; the state of the flat fp32 partitions
  (`single_partition_of_fp32_groups` at ZeRO 1/2, `fp32_partitioned_groups_flat` at ZeRO 3)
  is therefore created here, and at ZeRO 1/2 linked with `_lazy_init_hp_params_optimizer_state`.

`engine_config` also chooses DeepSpeed's gradient data types under bf16 (see there).

`tests/integration/test_deepspeed_adapter.py` pins these names on the installed version
(`PINNED_VERSION`, the one requirements.txt installs): upgrading DeepSpeed fails that test
first, not a training run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from l3train.config import GRADIENT_BUCKET_ELEMENTS, Config, WorldLayout
from l3train.errors import L3TrainError

PINNED_VERSION = "0.19.8"
def engine_config(cfg: Config, layout: WorldLayout) -> dict:
    """The DeepSpeed config of a run: batch layout, ZeRO stage, precision and clipping, and
    under bf16 the gradients' data types (`gradient_data_types`)."""
    bf16 = cfg.training.precision == "bf16"
    return {
        "train_batch_size": cfg.training.global_batch_size,
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.gradient_accumulation_steps,
        # Explicit: DeepSpeed's default would silently clip at 1.0. Off where l3train clips.
        "gradient_clipping": 0.0 if clipped_by_l3train(layout.zero_stage, cfg.training.precision)
        else cfg.optimizer.grad_clip,
        "zero_optimization": {"stage": layout.zero_stage, "reduce_bucket_size": GRADIENT_BUCKET_ELEMENTS},
        "bf16": {"enabled": bf16},
        **(gradient_data_types(layout.zero_stage) if bf16 else {}),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def clipped_by_l3train(zero_stage: int, precision: str) -> bool:
    """Whether l3train clips the engine's gradients itself (DeepSpeed's clipping off): at
    ZeRO-0 in fp32, where the engine steps the client optimizer on the module's own
    gradients. l3train computes their norm before the step anyway (the skip check, and the
    global norm with rank-local tensors); DeepSpeed would compute it a second time inside
    its step, a pass over every gradient, the L³ tables' included."""
    return zero_stage == 0 and precision == "fp32"


def hands_gradients_over(layout: WorldLayout, precision: str) -> bool:
    """Whether the engine gives the client optimizer the parameters' gradients as autograd
    left them, so that the L³ tables' may be row-sparse (l3train.optim.SkippableAdamW steps
    them): alone in the world (`initialize_engine` switches the all-reduce off) at ZeRO-0 in
    fp32 (no flat fp32 master copies, and l3train clips: `clipped_by_l3train`)."""
    return layout.world_size == 1 and clipped_by_l3train(layout.zero_stage, precision)


def gradient_data_types(zero_stage: int) -> dict:
    """DeepSpeed config entries that accumulate a bf16 run's gradients over micro-batches, and
    reduce them over data parallelism, in fp32.

    By default DeepSpeed keeps both in the model's dtype: every micro-batch's gradient is
    added into a bf16 sum, and the sum is averaged over DP in bf16 (measured by
    tests/integration/test_bf16_accumulation.py: ~3e-3 relative error over 8 micro-batches,
    against ~1e-6 with these entries). DeepSpeed 0.19.8 does it in fp32 only where its ZeRO
    optimizer keeps an fp32 gradient partition, ZeRO 2 and 3. At ZeRO-0 bf16 with fp32
    accumulation is refused by DeepSpeed ("unsupported mix"), and at ZeRO-1 it would swap
    DeepSpeed's ZeRO optimizer for its BF16_Optimizer, whose checkpoint files and hidden
    pre-step norm this adapter and l3train's checkpoint conversion do not handle: bf16 at
    ZeRO 0/1 keeps DeepSpeed's bf16 accumulation (docs/gpu.md).
    """
    if zero_stage < 2:
        return {}
    return {"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"}


def initialize_engine(model: nn.Module, optimizer: torch.optim.Optimizer,
                      scheduler: torch.optim.lr_scheduler.LRScheduler, config: dict, mpu: object | None):
    """`deepspeed.initialize` → (engine, scheduler). Without an mpu DeepSpeed treats every
    rank as data parallel, which is exact at TP=1.

    Alone in the world at ZeRO-0, the engine's gradient all-reduce is switched off: DeepSpeed
    would still flatten every gradient into buckets (a `cat` over the L³ tables' gradients
    too), all-reduce each bucket with itself and copy it back, three passes over all
    gradients that change nothing (about 8% of a 1-rank tiny_l3 step)."""
    import deepspeed
    import torch.distributed as dist

    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=config, mpu=mpu)
    if dist.get_world_size() == 1 and engine.zero_optimization_stage() == 0:
        engine.enable_backward_allreduce = False
    return engine, scheduler


def _zero_optimizer_classes() -> tuple[type, type]:
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3


def exposes_grad_norm(engine) -> bool:
    """Whether `dense_grad_norm` can tell the norm before `engine.step()`: not for DeepSpeed's
    bf16 optimizer at ZeRO 0/1, which computes it inside its step."""
    optimizer = engine.optimizer
    return isinstance(optimizer, _zero_optimizer_classes()) or (
        isinstance(optimizer, torch.optim.Optimizer) and engine.zero_optimization_stage() == 0)


def dense_grad_norm(engine, whole_gradient_norm: Callable[[], float]) -> float:
    """Global norm of the DeepSpeed-managed gradients after the boundary backward, before
    `engine.step()`: from the ZeRO optimizer's reduced partitions at stages 1-3; at ZeRO-0
    the gradients are whole and already averaged, and `whole_gradient_norm` computes it."""
    from deepspeed.runtime.utils import combine_grad_norm_groups

    DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3 = _zero_optimizer_classes()
    optimizer = engine.optimizer
    if isinstance(optimizer, DeepSpeedZeroOptimizer):
        return float(optimizer.scaled_global_norm()) / optimizer.loss_scale
    if isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
        return float(combine_grad_norm_groups(optimizer._get_norm_groups())) / optimizer.loss_scale
    if isinstance(optimizer, torch.optim.Optimizer) and engine.zero_optimization_stage() == 0:
        return whole_gradient_norm()
    raise L3TrainError(f"sharded L³ rows cannot clip jointly with DeepSpeed's {type(optimizer).__name__}; "
                       f"use parallel.zero_stage=2 or 3, or parallel.shard_l3_rows=false")


def set_clip_threshold(engine, threshold: float) -> None:
    """The gradient-norm threshold DeepSpeed applies at the next `engine.step()`."""
    if hasattr(engine.optimizer, "clip_grad"):
        engine.optimizer.clip_grad = threshold
    else:
        engine._config.gradient_clipping = threshold


def reported_grad_norm(engine) -> float | None:
    """The norm DeepSpeed computed in its last step (None where it does not report one)."""
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def set_adam_state(engine, optimizer: torch.optim.Optimizer, params: list[tuple[nn.Parameter, dict[str, torch.Tensor]]],
                   step: float) -> None:
    """Give the AdamW that DeepSpeed steps (`optimizer`, the client optimizer) the moments
    `{"exp_avg", "exp_avg_sq"}` of each DeepSpeed-managed parameter (this rank's TP slice,
    whole over DP) and the step count `step`, before the engine has taken a step."""
    from deepspeed.utils import safe_set_full_optimizer_state

    DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3 = _zero_optimizer_classes()
    zero = engine.optimizer

    def step_tensor(device: torch.device) -> torch.Tensor:
        # torch's AdamW keeps its step as a tensor; the fused one on the parameters' device.
        return torch.tensor(float(step), dtype=torch.float32, device=device)

    if isinstance(zero, torch.optim.Optimizer) and engine.zero_optimization_stage() == 0 and zero is optimizer:
        for param, moments in params:
            optimizer.state[param] = {"step": step_tensor(param.device), **{key: value.to(param.device, param.dtype).clone()
                                                                for key, value in moments.items()}}
        return
    if isinstance(zero, DeepSpeedZeroOptimizer):
        flats = zero.single_partition_of_fp32_groups
    elif isinstance(zero, DeepSpeedZeroOptimizer_Stage3):
        flats = zero.fp32_partitioned_groups_flat
    else:
        raise L3TrainError(f"cannot restore AdamW moments into DeepSpeed's {type(zero).__name__} (bf16 at ZeRO 0/1); "
                           f"reshard with --weights-only, or to parallel.zero_stage 2 or 3")
    for flat in flats:
        zero.optimizer.state[flat] = {"step": step_tensor(flat.device), "exp_avg": torch.zeros_like(flat),
                                      "exp_avg_sq": torch.zeros_like(flat)}
    if isinstance(zero, DeepSpeedZeroOptimizer):
        zero._lazy_init_hp_params_optimizer_state()
    for param, moments in params:
        for key, value in moments.items():
            safe_set_full_optimizer_state(param, value.to(flats[0].device, torch.float32), key)
