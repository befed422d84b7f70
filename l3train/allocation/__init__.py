"""Per-token row allocation for L³ layers: LZW counting (lzw.py), allocations (allocation.py)
and building one from a corpus (build.py)."""

from l3train.allocation.allocation import (
    MODES,
    Allocation,
    check_budget,
    frequency_allocation,
    lzw_allocation,
    uniform_allocation,
)
from l3train.allocation.build import CorpusOptions, TextFile, build_allocation
from l3train.allocation.lzw import (
    LZWCodewords,
    LZWScanner,
    fast_lzw_counts,
    reference_lzw,
    reference_lzw_counts,
)

__all__ = [
    "MODES",
    "Allocation",
    "CorpusOptions",
    "LZWCodewords",
    "LZWScanner",
    "TextFile",
    "build_allocation",
    "check_budget",
    "fast_lzw_counts",
    "frequency_allocation",
    "lzw_allocation",
    "reference_lzw",
    "reference_lzw_counts",
    "uniform_allocation",
]
