"""Let megatron-core's tensor-parallel layers run on a machine without CUDA (gloo, CPU tensors).

megatron-core's layers, collectives and cross entropy are device-agnostic except for
three CUDA-only calls (docs/cpu.md, "megatron-core on CPU: three shims"):

- `torch.cuda.current_device()`: used as the `device=` of buffers (gathers, sequence
  parallel); here it returns the CPU device;
- `torch.cuda.synchronize()`: called by dist_checkpointing's writer; here a no-op;
- the CUDA RNG tracker (`megatron.core.tensor_parallel.random`): it stores and swaps
  CUDA generator states so tensor-parallel regions (e.g. dropout on sharded activations)
  draw different numbers on each TP rank while replicated regions draw the same. Here it
  is replaced by a tracker with the same interface that forks the CPU generator.

`apply_cpu_shims()` patches these only when no CUDA device exists. On a GPU machine it
changes nothing, so NCCL, CUDA streams and CUDA generators stay the real ones; the shims
exist only to make the same code path testable on CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from megatron.core.tensor_parallel import random as megatron_random

_applied = False


class CpuRNGStatesTracker(megatron_random.CudaRNGStatesTracker):
    """megatron's RNG tracker with CPU generator states in place of CUDA ones.

    `add` records the state of a CPU generator seeded with `seed`; `fork(name)` swaps that
    state into the default CPU generator for the duration of the block and stores the
    advanced state back, exactly like the CUDA tracker does with the CUDA generator.
    """

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:  # same refusals as megatron's tracker
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = megatron_random._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def apply_cpu_shims() -> bool:
    """Patch the three CUDA-only calls when there is no CUDA device; returns whether it patched.

    Idempotent. Must run before megatron's RNG tracker is first used (layer construction
    with initialization, `model_parallel_cuda_manual_seed`)."""
    global _applied
    if torch.cuda.is_available():
        return False
    if not _applied:
        torch.cuda.current_device = lambda: torch.device("cpu")
        torch.cuda.synchronize = lambda device=None: None
        # megatron reads the tracker through this module global (`get_cuda_rng_tracker`); marking
        # it initialised keeps `initialize_rng_tracker` from replacing it with the CUDA one.
        megatron_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
        megatron_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
        _applied = True
    return True
