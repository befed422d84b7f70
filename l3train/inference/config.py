"""What a generation run is asked to do: where the L³ tables live, and how tokens are drawn."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from l3train.errors import L3TrainError

Placement = Literal["resident", "host", "disk"]
PLACEMENTS: tuple[str, ...] = ("resident", "host", "disk")


@dataclass(frozen=True)
class InferenceConfig:
    """Table placement (docs/inference.md) and sampling of one generation request.

    `temperature` 0 is greedy decoding (`top_k`, `top_p` and `seed` then do not matter);
    `top_k` 0 and `top_p` 1 disable those filters. Sequence i of a batch draws from its own
    generator seeded with `seed + i`, so a prompt gives the same tokens alone or in a batch.
    """

    placement: Placement = "resident"  # resident: on the compute device; host: host memory; disk: a file
    # A CPU model computes on host tables, and on a memory map of disk tables, in place; False
    # stages each step's rows as for a GPU (then a disk table's pages never enter the resident set).
    in_place: bool = True
    prefetch: bool = True  # fetch the next step's rows while the blocks before the L³ layer run
    staging_rows: int = 1 << 16  # rows per table in the staging buffer (a larger step is done in chunks)
    table_dir: str | None = None  # disk placement: where the table files are written (None: the default)
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_tokens: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise L3TrainError(f"placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        if self.staging_rows < 1:
            raise L3TrainError(f"staging rows must be at least 1, got {self.staging_rows}")
        if self.max_new_tokens < 1:
            raise L3TrainError(f"max new tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise L3TrainError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise L3TrainError(f"top-k must be >= 0 (0 keeps every token), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise L3TrainError(f"top-p must be in (0, 1] (1 keeps every token), got {self.top_p}")
        if any(token < 0 for token in self.stop_tokens):
            raise L3TrainError(f"stop tokens must be token ids >= 0, got {list(self.stop_tokens)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
