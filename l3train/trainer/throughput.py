"""Throughput in the units peers report: tokens/s per device, model TFLOP/s per device, MFU
and peak memory.

A "device" is a rank: one GPU, or on CPU one process (however many cores it uses). The
model FLOPs per token are `l3train.sizing.accounting.TrainingFlops` (torchtitan's and
Megatron-LM's convention: 6·N plus full-matrix attention, plus the L³ row attention), so
TFLOP/s per device = tokens/s per device × FLOPs per token / 1e12 and MFU = that ÷ the
device's peak. The peak is `training.peak_tflops` when set, else NVIDIA's dense figure for a
GPU in `PEAK_TFLOPS`; a CPU or an unknown GPU has none, and then no MFU is logged.

Peak memory (`train/peak_memory_gib`), the maximum over the ranks: on CUDA the most memory
PyTorch's allocator held for tensors since the process started
(`torch.cuda.max_memory_allocated`, not counting its cache or the CUDA context); on CPU
the process's peak resident set size (VmHWM of /proc/self/status: everything the process
ever held in RAM at once, Python and libraries included), absent where /proc is not.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class GpuPeak:
    """Dense (no structured sparsity) peak TFLOP/s of one GPU, by the precision of its matmuls."""

    name: str  # matched, case-insensitively, as a part of torch.cuda.get_device_name()
    bf16: float
    tf32: float
    fp32: float  # without TF32 (PyTorch's default for fp32 matmuls)


# NVIDIA's datasheets give tensor-core figures "with sparsity"; the dense ones are half of
# those. H100 SXM, H100 PCIe and H100 NVL: "NVIDIA H100 Tensor Core GPU" datasheet
# (https://www.nvidia.com/en-us/data-center/h100/): BF16 1,979 / 1,513 / 1,671 TFLOPS with
# sparsity, TF32 989 / 756 / 835 with sparsity, FP32 67 / 51 / 60. H200 SXM and H200 NVL:
# "NVIDIA H200 Tensor Core GPU" datasheet (https://www.nvidia.com/en-us/data-center/h200/):
# the H100 SXM's and H100 NVL's figures (GH200's H100 is matched by "H200" below: the same
# 989 dense BF16). A100 (SXM and PCIe, 40 and 80 GB): "NVIDIA A100 Tensor Core GPU"
# datasheet (https://www.nvidia.com/en-us/data-center/a100/): BF16 312, TF32 156 (dense),
# FP32 19.5. Halves are rounded down to torchtitan's figures (989, 835: `get_peak_flops`).
# The first entry whose name the device's contains wins: the specific ones first.
PEAK_TFLOPS = (
    GpuPeak("H100 PCIe", bf16=756.0, tf32=378.0, fp32=51.0),
    GpuPeak("H100 NVL", bf16=835.0, tf32=417.5, fp32=60.0),
    GpuPeak("H200 NVL", bf16=835.0, tf32=417.5, fp32=60.0),
    GpuPeak("H100", bf16=989.0, tf32=494.5, fp32=67.0),  # SXM5 ("NVIDIA H100 80GB HBM3")
    GpuPeak("H200", bf16=989.0, tf32=494.5, fp32=67.0),  # SXM ("NVIDIA H200"), GH200
    GpuPeak("A100", bf16=312.0, tf32=156.0, fp32=19.5),
)


def table_peak_tflops(device_name: str, precision: str, tf32: bool) -> float | None:
    """The dense peak of a GPU named `device_name` for `precision` (bf16; fp32 with or without
    TF32 matmuls), or None for a GPU not in `PEAK_TFLOPS`."""
    for gpu in PEAK_TFLOPS:
        if gpu.name.lower() in device_name.lower():
            return gpu.bf16 if precision == "bf16" else gpu.tf32 if tf32 else gpu.fp32
    return None


def device_peak_tflops(configured: float | None, precision: str, device: torch.device) -> tuple[float | None, str]:
    """(peak TFLOP/s of one device or None, where it comes from) for the MFU."""
    if configured is not None:
        return configured, "training.peak_tflops"
    if device.type != "cuda":
        return None, f"no MFU on {device.type} (set training.peak_tflops to log one)"
    name = torch.cuda.get_device_name(device)
    tf32 = precision == "fp32" and torch.backends.cuda.matmul.allow_tf32
    peak = table_peak_tflops(name, precision, tf32)
    if peak is None:
        return None, f"no MFU: {name} is not in the table of known GPUs (set training.peak_tflops)"
    kind = "bf16" if precision == "bf16" else "TF32" if tf32 else "fp32"
    return peak, f"{name}, {kind} dense, NVIDIA's datasheet"


def peak_memory_gib(device: torch.device) -> float | None:
    """This process's peak memory in GiB (see the module docstring), or None where unknown."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):  # "VmHWM:   123456 kB"
            return int(line.split()[1]) * 1024 / 2**30
    return None


def throughput_scalars(tokens_per_s: float, world_size: int, flops_per_token: float,
                       peak_tflops: float | None) -> dict[str, float]:
    """tokens/s per device, model TFLOP/s per device and (with a peak) MFU, as logged."""
    per_device = tokens_per_s / world_size
    tflops = per_device * flops_per_token / 1e12
    scalars = {"train/tokens_per_s_per_device": per_device, "train/tflops_per_device": tflops}
    if peak_tflops is not None:
        scalars["train/mfu"] = tflops / peak_tflops
    return scalars
