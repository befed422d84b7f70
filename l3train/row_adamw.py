"""AdamW for tables whose gradient is row-sparse (the L³ tables on CPUs: sharded rows, and one
process's tables at ZeRO-0 in fp32; l3train.optim.SkippableAdamW calls it).

Why: a step's positions reach only some of an L³ table's rows (about 64% of them at a step
of 16 × 128 tokens of the quick start's corpus, fewer at larger vocabularies and smaller
batches per rank), yet a table-shaped gradient holds every row. The CPU kernel can give the
gradient as only the rows the batch's tokens own (`l3train.model.l3_cpu.row_sparse_gradient`,
a sparse COO tensor that autograd accumulates like a dense one). torch's AdamW steps dense
gradients only, and `torch.optim.SparseAdam` ("lazy" Adam) updates only the listed rows: a
different optimizer, whose absent rows' moments do not decay and whose weights stay still.
`row_sparse_adamw_step` applies AdamW's own update to every row, with a zero gradient for
the rows not listed, in one pass over the table (C, OpenMP, `_row_adamw.c`) that reads a
gradient row only where there is one. So no table-shaped gradient is ever made, and the
gradient's norm and scaling (clipping) touch only its rows.

The moments stay in the `torch.optim.AdamW`'s state (`step`, `exp_avg`, `exp_avg_sq`, kept as
its fused implementation keeps them), so checkpoints, resumes and conversions see an
ordinary AdamW, and a dense gradient (the torch and Triton paths) is stepped by that AdamW.
The arithmetic per element is fused AdamW's (decoupled weight decay, bias-corrected moments,
fp32); it agrees with `torch.optim.AdamW` on a zero-filled dense gradient to fp32 rounding
(not bitwise: a few elements in ten thousand differ by an ulp after a few steps, where
torch's vectorised lerp rounds differently).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor, nn

from l3train.errors import L3TrainError
from l3train.utils.c_library import load_c_library

_SOURCE = Path(__file__).with_name("_row_adamw.c")
# -fno-math-errno lets sqrtf vectorise (errno is never read; the values are IEEE's either way):
# 5.8x faster on one core at 16,384 × 128.
_COMPILE_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC", "-std=c99")


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL:
    library = load_c_library(_SOURCE, _COMPILE_FLAGS, "the row-sparse AdamW step")
    pointer, size, real = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    library.row_adamw_step.restype = None
    library.row_adamw_step.argtypes = [size, size, pointer, pointer, pointer, pointer, pointer, size, real, real,
                                       real, real, real, real, ctypes.c_int]
    return library


@functools.lru_cache(maxsize=None)
def row_sparse_adamw_available() -> bool:
    """Whether the row-sparse AdamW step can be built here (compiled on the first call). Where
    it cannot (no C compiler), the tables keep table-shaped gradients, which torch's AdamW steps."""
    try:
        _library()
    except (L3TrainError, OSError):
        return False
    return True


def _float_table(tensor: Tensor, shape: tuple[int, ...], what: str) -> None:
    if tensor.is_cuda or tensor.dtype != torch.float32 or not tensor.is_contiguous() or tuple(tensor.shape) != shape:
        raise L3TrainError(f"the row-sparse AdamW step takes contiguous fp32 CPU tensors; {what} is a "
                           f"{tensor.dtype} tensor of shape {tuple(tensor.shape)} on {tensor.device}, expected "
                           f"{shape}")


def row_sparse_adamw_step(optimizer: torch.optim.AdamW, gradients: dict[nn.Parameter, Tensor]) -> None:
    """One AdamW step of the parameters in `gradients` (2-D tables of `optimizer`), each with a
    row-sparse gradient (`row_sparse_gradient`: a sparse COO tensor of the table's shape with
    one dense row per index; coalesced here if it is not), with `optimizer`'s hyperparameters
    and state."""
    for group in optimizer.param_groups:
        if group.get("amsgrad") or group.get("maximize"):
            raise L3TrainError("the row-sparse AdamW step supports neither amsgrad nor maximize")
        beta1, beta2 = group["betas"]
        for param in group["params"]:
            if param not in gradients:
                continue
            grad = gradients[param]
            if not grad.is_sparse or grad.sparse_dim() != 1 or grad.shape != param.shape or param.dim() != 2:
                raise L3TrainError(f"the row-sparse AdamW step takes a 2-D table's gradient with sparse rows and "
                                   f"dense columns; got a {grad.layout} gradient of shape {tuple(grad.shape)} "
                                   f"(sparse dims {grad.sparse_dim() if grad.is_sparse else 0}) for a table of "
                                   f"shape {tuple(param.shape)}")
            grad = grad if grad.is_coalesced() else grad.coalesce()  # increasing, distinct rows
            rows, values = grad._indices()[0].contiguous(), grad._values().contiguous()
            _float_table(param, tuple(param.shape), "the table")
            _float_table(values, (len(rows), param.shape[1]), "the gradient's rows")
            state = optimizer.state[param]
            if not state:  # as torch's fused AdamW initialises it
                state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            for key in ("exp_avg", "exp_avg_sq"):
                _float_table(state[key], tuple(param.shape), f"the optimizer's {key}")
            state["step"] += 1
            _library().row_adamw_step(
                param.shape[0], param.shape[1], param.data_ptr(), state["exp_avg"].data_ptr(),
                state["exp_avg_sq"].data_ptr(), rows.data_ptr(), values.data_ptr(), len(rows), float(group["lr"]),
                beta1, beta2, group["eps"], group["weight_decay"], float(state["step"]), torch.get_num_threads())
