"""Tensor- and data-parallel process groups (megatron-core's `parallel_state`), seeding, and
the `mpu` adapter DeepSpeed needs to see them.

Layout: megatron's order "tp-cp-ep-dp-pp" puts the TP ranks of one model replica on
consecutive global ranks (on a GPU node: the fast NVLink neighbours). With 4 ranks and
TP=2 the TP groups are {0,1} and {2,3}, the DP groups {0,2} and {1,3}. Every rank of one
TP group sees the same batch; the DP groups split the global batch and average gradients.

Why megatron's groups (and not DeepSpeed's own): megatron-core's tensor-parallel layers
and `vocab_parallel_cross_entropy` look their groups up in `parallel_state`, and the same
call leaves room for expert parallelism later (`expert_model_parallel_size`).

DeepSpeed learns about the groups through an `mpu` object passed to `deepspeed.initialize`:
ZeRO partitions and gradient all-reduces run over `get_data_parallel_group()`, gradient
clipping sums squared norms over `get_model_parallel_group()` counting TP-sharded
parameters (tagged `tensor_model_parallel=True` by megatron) on every rank and replicated
ones on model-parallel rank 0 only, and checkpoints are written per model-parallel rank
(`mp_rank_XX_model_states.pt`). megatron's `parallel_state` lacks the
`get_model_parallel_rank/world_size` that DeepSpeed calls, hence `DeepSpeedMPU`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from l3train.parallel.cpu_shims import apply_cpu_shims


@dataclass(frozen=True)
class ParallelState:
    """This rank's place in the tensor-parallel × data-parallel grid."""

    tp_rank: int
    tp_size: int
    tp_group: dist.ProcessGroup
    dp_rank: int
    dp_size: int
    dp_group: dist.ProcessGroup
    # Expert parallelism: groups of `ep_size` consecutive DP ranks share out the experts;
    # the ranks holding the same experts (one per EP group) form the expert-data-parallel group.
    ep_rank: int = 0
    ep_size: int = 1
    ep_group: dist.ProcessGroup | None = None
    expert_dp_group: dist.ProcessGroup | None = None


def initialize_parallel(tensor_parallel: int, expert_parallel: int = 1) -> ParallelState:
    """Create the TP, DP and expert groups over the already initialised default process group
    (`validate_for_world` has checked that they fit).

    Applies the CPU shims first when there is no CUDA device (megatron's layers need them)."""
    if not dist.is_initialized():
        raise RuntimeError("initialize_parallel needs torch.distributed to be initialised first")
    world = dist.get_world_size()
    if tensor_parallel < 1 or world % tensor_parallel or (world // tensor_parallel) % expert_parallel:
        # Users get these as config errors from l3train.config.validate_for_world first.
        raise ValueError(f"TP={tensor_parallel} and EP={expert_parallel} do not fit {world} ranks")
    apply_cpu_shims()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    # No gloo copies of the groups: megatron only uses them for its distributed optimizer's
    # checkpoints, which l3train does not use (DeepSpeed owns optimizer and checkpoints).
    # megatron-core gives its groups its own timeout (30 minutes by default): the run's instead,
    # which l3train.distributed.init_distributed made torch's default for new groups.
    timeout = torch.distributed.distributed_c10d.default_pg_timeout
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel,
                                             expert_model_parallel_size=expert_parallel,
                                             create_gloo_process_groups=False,
                                             distributed_timeout_minutes=timeout.total_seconds() / 60)
    return ParallelState(
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        dp_group=parallel_state.get_data_parallel_group(),
        ep_rank=parallel_state.get_expert_model_parallel_rank(),
        ep_size=parallel_state.get_expert_model_parallel_world_size(),
        ep_group=parallel_state.get_expert_model_parallel_group(),
        expert_dp_group=parallel_state.get_expert_data_parallel_group(),
    )


def seed_parallel(seed: int) -> None:
    """Seed like megatron's `model_parallel_cuda_manual_seed`: the default generators with
    `seed` (the same on all TP ranks of a replica, so replicated computation stays
    replicated), and the tracker's tensor-parallel state with seed + 2718 + tp_rank (different
    per TP rank, for randomness on sharded activations). Callers pass a seed that already
    differs per DP rank when replicas should draw differently.

    On CUDA this is megatron's function unchanged; on CPU its tracker is the CPU-forking one
    installed by `apply_cpu_shims` (its `torch.cuda.manual_seed` call is then a queued no-op)."""
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


class DeepSpeedMPU:
    """The `mpu` interface DeepSpeed queries, answered from megatron's parallel_state.

    "Model parallel" is tensor parallel here (no pipeline stages), which is what DeepSpeed
    uses to name checkpoint files and to reduce gradient norms."""

    get_tensor_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_data_parallel_rank = staticmethod(parallel_state.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(parallel_state.get_data_parallel_world_size)
    get_data_parallel_group = staticmethod(parallel_state.get_data_parallel_group)
