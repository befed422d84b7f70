"""Which tensors of the plain model tensor parallelism splits, and along which dimension.

Kept apart from `tensor_parallel` (megatron-core's layers, seconds to import) so that the
memory planner and checkpoint conversion, which only need the names, start fast.
"""

from __future__ import annotations

import re

_TP_DIM_PATTERNS = [
    (re.compile(r"(embedding|output)\.weight"), 0),  # vocabulary split
    (re.compile(r"blocks\.\d+\.attention\.w[qkv]\.weight"), 0),  # column-parallel: heads split
    (re.compile(r"blocks\.\d+\.feed_forward\.w[13]\.weight"), 0),  # column-parallel: hidden split
    (re.compile(r"blocks\.\d+\.(attention\.wo|feed_forward\.w2)\.weight"), 1),  # row-parallel: input split
]


def tensor_parallel_dim(name: str) -> int | None:
    """The dimension along which `parallelize_tensor` splits the plain model's tensor `name` over
    the TP ranks, None for a replicated one: what checkpoint conversion merges and splits by
    (tests check it against the `partition_dim` megatron records on a parallelized model)."""
    return next((dim for pattern, dim in _TP_DIM_PATTERNS if pattern.fullmatch(name)), None)
